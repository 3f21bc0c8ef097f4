//! Stripe: the disciplined transport ([`client`]), Billing Meters ([`meters`]), the invoices
//! that close meters-mode periods ([`invoices`]) and legacy usage records ([`legacy`]).

pub mod client;
pub mod invoices;
pub mod legacy;
pub mod meters;

pub use client::{StripeError, StripeHttp};
