//! `tally-stripe-emulator`: a local, stateful Stripe for tests and the demo (see `tally::stripe_emu`).

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "A local, stateful emulator of the Stripe API subset tally uses (Billing Meters, legacy usage records)"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:12111", env = "TALLY_STRIPE_EMULATOR_LISTEN")]
    listen: String,
    /// The secret key clients must send (Bearer or Basic auth).
    #[arg(long, default_value = "sk_test_tally_emulator", env = "TALLY_STRIPE_EMULATOR_API_KEY")]
    api_key: String,
    /// Seed of the fault-injection dice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Probability of answering a request with 429 (`Stripe-Should-Retry: true`).
    #[arg(long, default_value_t = 0.0)]
    rate_429: f64,
    /// Probability of answering a request with 500.
    #[arg(long, default_value_t = 0.0)]
    rate_500: f64,
    /// Probability of doing a POST's write and then dropping the connection without an answer.
    #[arg(long, default_value_t = 0.0)]
    rate_drop_after_write: f64,
    /// Probability of accepting a meter event and then dropping it (Stripe's asynchronous
    /// validation): it never shows in a summary.
    #[arg(long, default_value_t = 0.0)]
    rate_async_drop: f64,
    /// Keep no Idempotency-Key (as after Stripe forgot one, 24 hours on): a resent meter event
    /// meets its own identifier and is refused the way Stripe refuses it.
    #[arg(long)]
    forget_idempotency_keys: bool,
    /// Probability of a POST with a new Idempotency-Key failing while executing (its write done
    /// half of the time) with a 500 that Stripe keeps under the key: resends with that key get it
    /// again for 24 hours.
    #[arg(long, default_value_t = 0.0)]
    rate_500_stored: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let emu = tally::stripe_emu::Emulator::start(&args.listen, &args.api_key, args.seed)?;
    emu.set_faults(tally::stripe_emu::Faults {
        rate_429: args.rate_429,
        rate_500: args.rate_500,
        rate_drop_after_write: args.rate_drop_after_write,
        rate_async_drop: args.rate_async_drop,
        forget_idempotency_keys: args.forget_idempotency_keys,
        rate_500_stored: args.rate_500_stored,
    });
    eprintln!("stripe emulator listening on {}", emu.base_url());
    emu.join();
    Ok(())
}
