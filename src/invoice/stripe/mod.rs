//! Stripe: the disciplined transport ([`client`]), Billing Meters ([`meters`]) and legacy usage
//! records ([`legacy`]).

pub mod client;
pub mod legacy;
pub mod meters;

pub use client::{StripeError, StripeHttp};
