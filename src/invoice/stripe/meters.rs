//! Billing Meters calls, typed by async-stripe: meters, meter events, cancel adjustments,
//! meter event summaries, customers.

use std::collections::HashMap;

use stripe_billing::billing_meter::{ListBillingMeter, RetrieveBillingMeter};
use stripe_billing::billing_meter_event::CreateBillingMeterEvent;
use stripe_billing::billing_meter_event_adjustment::{
    CreateBillingMeterEventAdjustment, CreateBillingMeterEventAdjustmentCancel,
};
use stripe_billing::billing_meter_event_summary::{
    ListIdBillingMeterEventSummary, ListIdBillingMeterEventSummaryValueGroupingWindow,
};
use stripe_billing::{BillingMeterEventAdjustmentType, BillingMeterResourceAggregationSettingsFormula};
use stripe_client_core::{IdempotencyKey, RequestStrategy, StripeRequest};

use super::client::{StripeError, StripeHttp};

/// Largest page Stripe lists.
const PAGE: i64 = 100;

/// What the invoicer needs to know about a Stripe meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterInfo {
    pub id: String,
    pub event_name: String,
    /// `count`, `sum` or `last`.
    pub formula: String,
    pub customer_key: String,
    pub value_key: String,
    pub active: bool,
    /// `hour` or `day` for a pre-aggregated meter, which keeps only the last event of each
    /// window (Stripe: "Billing meters", `event_time_window`); `None` for a meter that adds up
    /// every event, the only kind tally can push to.
    pub event_time_window: Option<String>,
}

fn key(k: &str) -> Result<RequestStrategy, StripeError> {
    IdempotencyKey::new(k).map(RequestStrategy::Idempotent).map_err(|e| StripeError::Client(e.to_string()))
}

fn info(m: stripe_billing::BillingMeter) -> MeterInfo {
    let formula = match m.default_aggregation.formula {
        BillingMeterResourceAggregationSettingsFormula::Count => "count".to_string(),
        BillingMeterResourceAggregationSettingsFormula::Sum => "sum".to_string(),
        BillingMeterResourceAggregationSettingsFormula::Last => "last".to_string(),
        other => other.as_str().to_string(),
    };
    MeterInfo {
        id: m.id.as_str().to_string(),
        event_name: m.event_name,
        formula,
        customer_key: m.customer_mapping.event_payload_key,
        value_key: m.value_settings.event_payload_key,
        active: m.status.as_str() == "active",
        event_time_window: m.event_time_window.map(|w| w.as_str().to_string()),
    }
}

pub fn retrieve_meter(c: &StripeHttp, id: &str) -> Result<MeterInfo, StripeError> {
    RetrieveBillingMeter::new(id).customize().send_blocking(c).map(info)
}

/// Every item of a Stripe list, page after page (`starting_after` the last id of the page).
fn all_pages<T>(
    mut fetch: impl FnMut(Option<String>) -> Result<stripe_types::List<T>, StripeError>,
    id: impl Fn(&T) -> String,
) -> Result<Vec<T>, StripeError> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = fetch(after.take())?;
        after = page.data.last().map(&id);
        let more = page.has_more;
        out.extend(page.data);
        if !more || after.is_none() {
            return Ok(out);
        }
    }
}

pub fn list_meters(c: &StripeHttp) -> Result<Vec<MeterInfo>, StripeError> {
    let all = all_pages(
        |after| {
            let req = ListBillingMeter::new().limit(PAGE);
            after.map_or(req.clone(), |a| req.starting_after(a)).customize().send_blocking(c)
        },
        |m| m.id.as_str().to_string(),
    )?;
    Ok(all.into_iter().map(info).collect())
}

/// One meter event. `identifier` doubles as the Idempotency-Key.
pub fn create_meter_event(
    c: &StripeHttp,
    meter: &MeterInfo,
    customer: &str,
    value: u64,
    timestamp: i64,
    identifier: &str,
) -> Result<(), StripeError> {
    let payload: HashMap<String, String> =
        [(meter.customer_key.clone(), customer.to_string()), (meter.value_key.clone(), value.to_string())].into();
    CreateBillingMeterEvent::new(meter.event_name.clone(), payload)
        .identifier(identifier)
        .timestamp(timestamp)
        .customize()
        .request_strategy(key(identifier)?)
        .send_blocking(c)
        .map(|_| ())
}

/// Cancels the meter event `identifier` (Stripe allows it within 24 h of the event's creation).
pub fn cancel_meter_event(
    c: &StripeHttp,
    event_name: &str,
    identifier: &str,
    idempotency_key: &str,
) -> Result<(), StripeError> {
    let mut cancel = CreateBillingMeterEventAdjustmentCancel::new();
    cancel.identifier = Some(identifier.to_string());
    CreateBillingMeterEventAdjustment::new(event_name, BillingMeterEventAdjustmentType::Cancel)
        .cancel(cancel)
        .customize()
        .request_strategy(key(idempotency_key)?)
        .send_blocking(c)
        .map(|_| ())
}

/// Stripe's aggregated value for `customer` on `meter` in [start, end): per window start when
/// `window` is given, else one value for the whole range (keyed by `start`).
pub fn summaries(
    c: &StripeHttp,
    meter_id: &str,
    customer: &str,
    start: i64,
    end: i64,
    window: Option<&str>,
) -> Result<Vec<(i64, f64)>, StripeError> {
    let all = all_pages(
        |after| {
            // Mind the order: async-stripe takes (id, customer, end_time, start_time).
            let mut req = ListIdBillingMeterEventSummary::new(meter_id, customer, end, start).limit(PAGE);
            if let Some(w) = window {
                req = req.value_grouping_window(match w {
                    "day" => ListIdBillingMeterEventSummaryValueGroupingWindow::Day,
                    _ => ListIdBillingMeterEventSummaryValueGroupingWindow::Hour,
                });
            }
            if let Some(a) = after {
                req = req.starting_after(a);
            }
            req.customize().send_blocking(c)
        },
        |s| s.id.as_str().to_string(),
    )?;
    Ok(all.iter().map(|s| (s.start_time, s.aggregated_value)).collect())
}

/// A customer id and its metadata.
pub type CustomerMetadata = (String, HashMap<String, String>);

/// Customers with their metadata (for `customer_source = "metadata"`).
pub fn list_customers(c: &StripeHttp) -> Result<Vec<CustomerMetadata>, StripeError> {
    let all = all_pages(
        |after| {
            let req = stripe_core::customer::ListCustomer::new().limit(PAGE);
            after.map_or(req.clone(), |a| req.starting_after(a)).customize().send_blocking(c)
        },
        |x| x.id.as_str().to_string(),
    )?;
    Ok(all.into_iter().map(|x| (x.id.as_str().to_string(), x.metadata.unwrap_or_default())).collect())
}
