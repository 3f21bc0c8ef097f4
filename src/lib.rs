//! tally: exact usage metering.
//!
//! Data flow of `tally-ingest`: [`source`] (Kafka) → [`decode`] → [`verify`] → [`dedupe`] →
//! [`meter`] → [`sink`] (ClickHouse), with rejections going to [`dlq`]. [`pipeline`] is the pure
//! step between source and sink.

pub mod admin;
pub mod api;
pub mod config;
pub mod decode;
pub mod dedupe;
pub mod devkeys;
pub mod dlq;
pub mod httpd;
pub mod invoice;
pub mod loadgen;
pub mod meter;
pub mod metrics;
pub mod pipeline;
pub mod reject;
pub mod retry;
pub mod sink;
pub mod source;
pub mod stripe_emu;
pub mod timestamp;
pub mod verify;

/// The process allocator: mimalloc. The hot loop allocates and frees batch-sized buffers (rows,
/// staged events, request bodies: megabytes per batch); the system allocator hands them back to
/// the kernel and page-faults them in again on every batch, which cost the core a third of its
/// speed (docs/measurements.md, "The allocator").
///
/// With the crate's `override` feature, mimalloc also defines the C `malloc`, `free` and their
/// kin in each binary, and the linker exports them, so librdkafka (a fetch response buffer, an
/// op, a message and its parsed headers per record) and libc's own allocations (`strdup`) use it
/// too: a first pass of 1 M events used ~8 % less worker CPU (docs/measurements.md, "librdkafka
/// on mimalloc").
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process (Linux `prctl(PR_SET_THP_DISABLE)`, which
/// children inherit), unless `MIMALLOC_ALLOW_THP` is set: then mimalloc's own option decides
/// (`0` does the same, `1` keeps them). Called first thing by the tally binaries.
///
/// mimalloc asks for huge pages on its arenas (`madvise(MADV_HUGEPAGE)`), so each first write to
/// a fresh 2 MiB region faults in and zeroes a whole huge page: a worker's dedupe state (16 MiB
/// Bloom filter and 4 MiB of recent keys per partition, new at every assignment) and its batch
/// buffers. `perf record -g -p <worker>` during a bench pass put 47 % of the worker's samples in
/// the kernel zeroing those pages (`clear_page_erms` under `do_huge_pmd_wp_page` and
/// `do_huge_pmd_anonymous_page`); with huge pages off, a first pass of 1 M events used 2.36–2.91
/// CPU seconds of worker instead of 3.30–3.86 (docs/measurements.md, "Huge pages"). The core's
/// speed, a long-lived process's, did not change measurably either way.
///
/// Returns whether this call turned them off. Elsewhere than on Linux it does nothing.
pub fn disable_transparent_huge_pages() -> bool {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return false;
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl with PR_SET_THP_DISABLE takes integer arguments only and changes a flag
        // of this process's memory map; no memory is passed to the kernel.
        unsafe {
            libc::prctl(
                libc::PR_SET_THP_DISABLE,
                1 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            ) == 0
        }
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// Logs of the binaries: to stderr, filtered by `RUST_LOG` (else `default` such as `"info"`),
/// coloured only on a terminal (log files and collectors get plain `key=value` fields).
pub fn init_logging(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.to_string().into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// C code's allocations come from mimalloc's heap: `malloc` as librdkafka calls it, and
    /// `strdup`, whose allocation happens inside libc (so libc's calls are bound to mimalloc's
    /// exported `malloc` too, and a `free` of such memory by any library is mimalloc's).
    #[cfg(feature = "mimalloc")]
    #[test]
    fn c_allocations_are_mimallocs() {
        extern "C" {
            // mimalloc's own API (`mimalloc.h`); linked in with the `mimalloc` crate.
            fn mi_is_in_heap_region(p: *const libc::c_void) -> bool;
        }
        // SAFETY: plain C allocations of a few bytes, checked and freed with the matching `free`;
        // `mi_is_in_heap_region` only reads mimalloc's arena bookkeeping.
        unsafe {
            let p = libc::malloc(64);
            assert!(!p.is_null());
            assert!(mi_is_in_heap_region(p), "libc::malloc is not mimalloc's");
            libc::free(p);
            let s = libc::strdup(c"librdkafka".as_ptr());
            assert!(!s.is_null());
            assert!(mi_is_in_heap_region(s.cast()), "libc's internal malloc is not mimalloc's");
            libc::free(s.cast());
        }
    }

    /// Without `MIMALLOC_ALLOW_THP`, the call turns huge pages off for the process, as the kernel
    /// reports it back.
    #[test]
    fn transparent_huge_pages_are_turned_off() {
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
            return; // mimalloc's own option decides; nothing of ours to check
        }
        assert!(super::disable_transparent_huge_pages());
        // SAFETY: PR_GET_THP_DISABLE takes no pointers.
        let zero: libc::c_ulong = 0;
        assert_eq!(unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, zero, zero, zero, zero) }, 1);
    }
}
