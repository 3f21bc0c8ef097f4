//! A consumed message's headers, read without trusting their names to be UTF-8.
//!
//! Kafka header names are strings by convention only: brokers pass any bytes through. rdkafka
//! 0.38's `Headers::try_get` unwraps a UTF-8 conversion of the name, so one message with a
//! non-UTF-8 header name would panic the worker, and again on every redelivery — a poison
//! message no one could get past. The names are read here as bytes instead (librdkafka's own
//! `rd_kafka_header_get_all`), and dead letters copy the headers whole (`BorrowedHeaders::detach`,
//! which does not look at the names).

use rdkafka::bindings as rd;
use rdkafka::message::BorrowedMessage;

/// The (name, value) pairs of `msg`'s headers, in order; a header without a value has `None`.
pub fn raw_headers<'a>(msg: &'a BorrowedMessage<'_>) -> Vec<(&'a [u8], Option<&'a [u8]>)> {
    let mut out = Vec::new();
    // SAFETY: `msg.ptr()` is a valid message for the lifetime of `msg`; librdkafka returns the
    // headers it owns (or an error when there are none), and each name (NUL-terminated) and
    // value (`size` bytes) stays valid and unchanged while the message lives, which `'a` ties
    // the returned slices to. Nothing here writes through the pointers.
    unsafe {
        let mut hdrs: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
        if rd::rd_kafka_message_headers(msg.ptr(), &mut hdrs) != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
            || hdrs.is_null()
        {
            return out;
        }
        let mut idx = 0;
        loop {
            let (mut name, mut value, mut size) = (std::ptr::null(), std::ptr::null(), 0usize);
            let err = rd::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size);
            if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr(name).to_bytes();
            let value = (!value.is_null()).then(|| std::slice::from_raw_parts(value.cast::<u8>(), size));
            out.push((name, value));
            idx += 1;
        }
    }
    out
}
