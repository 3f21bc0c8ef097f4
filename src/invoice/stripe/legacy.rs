//! Legacy usage records (subscription items, `usage_records`, `usage_record_summaries`) for
//! accounts pinned to API versions before 2025-03-31.basil. async-stripe 1.x has no types for
//! them; they go through the same transport (Idempotency-Key, rate limit, retries).

use serde::Deserialize;
use stripe_client_core::StripeMethod;

use super::client::{StripeError, StripeHttp};
use crate::stripe_emu::form::encode as enc;

#[derive(Debug, Deserialize)]
struct Summary {
    id: String,
    period: Period,
    total_usage: i64,
}

#[derive(Debug, Deserialize)]
struct Period {
    start: Option<i64>,
    end: Option<i64>,
}

/// Records usage on a subscription item: `increment` adds `quantity` at `timestamp`; `set`
/// replaces the quantity at that timestamp. `idempotency_key` makes a resend harmless.
pub fn create_usage_record(
    c: &StripeHttp,
    item: &str,
    quantity: u64,
    timestamp: i64,
    set: bool,
    idempotency_key: &str,
) -> Result<(), StripeError> {
    let action = if set { "set" } else { "increment" };
    let form = format!("quantity={quantity}&timestamp={timestamp}&action={action}");
    let path = format!("/subscription_items/{}/usage_records", enc(item));
    let body = c.send(StripeMethod::Post, &path, None, Some(&form), Some(idempotency_key))?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| StripeError::Decode(e.to_string()))?;
    if v["object"] != "usage_record" {
        return Err(StripeError::Decode(format!("expected a usage_record, got {}", v["object"])));
    }
    Ok(())
}

/// One usage record summary: (period start, period end, total usage); the spec lets either bound
/// be null.
pub type PeriodUsage = (Option<i64>, Option<i64>, i64);

/// Stripe's usage record summaries of `item`, one per billing period that has usage, every page.
pub fn summaries(c: &StripeHttp, item: &str) -> Result<Vec<PeriodUsage>, StripeError> {
    let path = format!("/subscription_items/{}/usage_record_summaries", enc(item));
    let all: Vec<Summary> = c.list_all(&path, "", |s: &Summary| s.id.clone())?;
    Ok(all.iter().map(|s| (s.period.start, s.period.end, s.total_usage)).collect())
}

/// Total usage of the billing periods of `item` that overlap [start, end).
pub fn usage_total(c: &StripeHttp, item: &str, start: i64, end: i64) -> Result<i64, StripeError> {
    Ok(summaries(c, item)?
        .iter()
        .filter(|(ps, pe, _)| ps.unwrap_or(i64::MIN) < end && pe.unwrap_or(i64::MAX) > start)
        .map(|(_, _, t)| t)
        .sum())
}

/// The billing period Stripe currently records usage in for `item`: its subscription's
/// `current_period_start` and `_end` (on the subscription in API versions before
/// 2025-03-31.basil). Stripe refuses usage records timestamped before the start.
pub fn current_period(c: &StripeHttp, item: &str) -> Result<(i64, i64), StripeError> {
    let body = c.send(StripeMethod::Get, &format!("/subscription_items/{}", enc(item)), None, None, None)?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| StripeError::Decode(e.to_string()))?;
    let sub = v["subscription"]
        .as_str()
        .ok_or_else(|| StripeError::Decode(format!("subscription item {item} has no subscription")))?
        .to_string();
    let body = c.send(StripeMethod::Get, &format!("/subscriptions/{}", enc(&sub)), None, None, None)?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| StripeError::Decode(e.to_string()))?;
    let field = |k: &str| v[k].as_i64().ok_or_else(|| StripeError::Decode(format!("subscription {sub} has no {k}")));
    Ok((field("current_period_start")?, field("current_period_end")?))
}
