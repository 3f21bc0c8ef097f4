//! The emulator's Stripe objects and the rules Stripe applies to them.
//!
//! Modelled: customers (with metadata search), billing meters, meter events (identifier uniqueness,
//! 35-day / +5-minute timestamp window), meter event summaries (hour/day grouping, minute-aligned
//! times), meter event adjustments (cancel within 24 h of creation), prices (a metered price names
//! its meter), subscriptions and subscription items, the subscriptions' cycle invoices (draft for
//! an hour after their period ends, then finalized), legacy usage records and their summaries.
//! Everything an invoice needs, nothing else.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

/// Stripe's limits on meter event timestamps.
pub const METER_EVENT_MAX_AGE_SECS: i64 = 35 * 86_400;
pub const METER_EVENT_MAX_FUTURE_SECS: i64 = 5 * 60;
/// A meter event can be cancelled within this long after it was created.
pub const CANCEL_WINDOW_SECS: i64 = 24 * 3600;
/// Length of a subscription's billing period in the emulator.
pub const PERIOD_SECS: i64 = 31 * 86_400;
/// How long a subscription's cycle invoice stays a draft after its period ends before Stripe
/// finalizes it (Stripe: "Subscription invoices", automatic finalization about 1 hour after the
/// `invoice.created` event). Usage for the period is billed until then.
pub const FINALIZE_AFTER_SECS: i64 = 3600;

/// An API error: HTTP status and Stripe's `error` object.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub body: Value,
}

pub fn invalid(message: impl Into<String>, param: Option<&str>, code: Option<&str>) -> ApiError {
    let mut e = json!({"type": "invalid_request_error", "message": message.into()});
    if let Some(p) = param {
        e["param"] = p.into();
    }
    if let Some(c) = code {
        e["code"] = c.into();
    }
    ApiError { status: 400, body: json!({ "error": e }) }
}

pub fn missing(kind: &str, id: &str, param: &str) -> ApiError {
    let mut e = invalid(format!("No such {kind}: '{id}'"), Some(param), Some("resource_missing"));
    e.status = 404;
    e
}

type Result<T> = std::result::Result<T, ApiError>;

#[derive(Debug, Clone)]
struct Meter {
    obj: Value,
    event_name: String,
    formula: String,
    customer_key: String,
    value_key: String,
}

#[derive(Debug, Clone)]
pub struct MeterEvent {
    pub identifier: String,
    pub event_name: String,
    pub customer: String,
    pub value: i64,
    pub timestamp: i64,
    pub created: i64,
    pub cancelled: bool,
    /// Dropped after it was accepted (Stripe's asynchronous validation found it invalid): it
    /// counts in no summary, as with Stripe's `meter_event_error_report` cases.
    pub dropped: bool,
    payload: Value,
}

#[derive(Debug, Clone)]
struct Item {
    id: String,
    subscription: String,
    price: String,
    created: i64,
    period_start: i64,
}

#[derive(Debug, Clone)]
struct UsageRecord {
    item: String,
    quantity: i64,
    timestamp: i64,
    set: bool,
}

/// One Stripe account's objects (the platform, or a connected account via `Stripe-Account`).
#[derive(Debug, Default)]
pub struct Account {
    customers: BTreeMap<String, Value>,
    meters: BTreeMap<String, Meter>,
    events: Vec<MeterEvent>,
    by_identifier: HashMap<String, usize>,
    subscriptions: BTreeMap<String, Value>,
    items: BTreeMap<String, Item>,
    /// Price id → the meter a metered price bills (`recurring.meter`), for prices created
    /// through `POST /v1/prices`; other price ids are taken as legacy metered prices.
    prices: BTreeMap<String, Option<String>>,
    usage: Vec<UsageRecord>,
    next_id: u64,
}

fn str_param<'a>(p: &'a Value, key: &str) -> Option<&'a str> {
    p.get(key).and_then(Value::as_str)
}

fn required<'a>(p: &'a Value, key: &str) -> Result<&'a str> {
    str_param(p, key)
        .ok_or_else(|| invalid(format!("Missing required param: {key}."), Some(key), Some("parameter_missing")))
}

fn int_param(p: &Value, key: &str) -> Result<Option<i64>> {
    match str_param(p, key) {
        None => Ok(None),
        Some(s) => s
            .parse::<i64>()
            .map(Some)
            .map_err(|_| invalid(format!("Invalid integer: {s}"), Some(key), Some("parameter_invalid_integer"))),
    }
}

fn metadata(p: &Value) -> Value {
    p.get("metadata").cloned().filter(Value::is_object).unwrap_or_else(|| json!({}))
}

/// A Stripe list object, paginated by `limit` / `starting_after` over `items` (already ordered).
pub fn list(url: &str, items: Vec<(String, Value)>, params: &Value) -> Result<Value> {
    let limit = int_param(params, "limit")?.unwrap_or(10);
    if !(1..=100).contains(&limit) {
        return Err(invalid("limit must be between 1 and 100", Some("limit"), None));
    }
    let start = match str_param(params, "starting_after") {
        None => 0,
        Some(after) => items
            .iter()
            .position(|(id, _)| id == after)
            .map(|i| i + 1)
            .ok_or_else(|| invalid(format!("starting_after {after} not found"), Some("starting_after"), None))?,
    };
    let page: Vec<Value> = items.iter().skip(start).take(limit as usize).map(|(_, v)| v.clone()).collect();
    let has_more = items.len() > start + page.len();
    Ok(json!({"object": "list", "data": page, "has_more": has_more, "url": url}))
}

impl Account {
    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}_emu{:010}", self.next_id)
    }

    pub fn events(&self) -> &[MeterEvent] {
        &self.events
    }

    // ---- customers ----

    pub fn create_customer(&mut self, p: &Value, now: i64) -> Result<Value> {
        let id = self.id("cus");
        let obj = json!({
            "id": id, "object": "customer", "created": now, "livemode": false,
            "name": str_param(p, "name"), "email": str_param(p, "email"),
            "description": str_param(p, "description"), "metadata": metadata(p),
            "balance": 0, "currency": null, "delinquent": false, "invoice_prefix": null,
            "phone": null, "preferred_locales": [], "tax_exempt": "none", "test_clock": null,
        });
        self.customers.insert(id, obj.clone());
        Ok(obj)
    }

    pub fn customer(&self, id: &str) -> Result<Value> {
        self.customers.get(id).cloned().ok_or_else(|| missing("customer", id, "id"))
    }

    pub fn list_customers(&self, p: &Value) -> Result<Value> {
        let items = self.customers.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        list("/v1/customers", items, p)
    }

    /// Search supports what Stripe's query language offers for this use: `metadata['k']:'v'`,
    /// `email:'x'`, `name:'x'`, joined by `AND`.
    pub fn search_customers(&self, p: &Value) -> Result<Value> {
        let query = required(p, "query")?;
        let mut terms = Vec::new();
        for term in query.split(" AND ") {
            let (field, value) = term
                .split_once(':')
                .ok_or_else(|| invalid(format!("Invalid search query: {query}"), Some("query"), None))?;
            let value = value.trim().trim_matches(|c| c == '\'' || c == '"').to_string();
            let field = field.trim();
            let path: Vec<String> = match field.strip_prefix("metadata[") {
                Some(rest) => {
                    vec!["metadata".into(), rest.trim_end_matches(']').trim_matches(|c| c == '\'' || c == '"').into()]
                }
                None if matches!(field, "email" | "name") => vec![field.into()],
                None => return Err(invalid(format!("Field {field} is not supported in search"), Some("query"), None)),
            };
            terms.push((path, value));
        }
        let data: Vec<Value> = self
            .customers
            .values()
            .filter(|c| {
                terms.iter().all(|(path, want)| {
                    let got = path.iter().try_fold(*c, |v, k| v.get(k.as_str()));
                    got.and_then(Value::as_str) == Some(want.as_str())
                })
            })
            .take(int_param(p, "limit")?.unwrap_or(10).clamp(1, 100) as usize)
            .cloned()
            .collect();
        Ok(
            json!({"object": "search_result", "data": data, "has_more": false, "next_page": null, "url": "/v1/customers/search"}),
        )
    }

    // ---- meters ----

    pub fn create_meter(&mut self, p: &Value, now: i64) -> Result<Value> {
        let display_name = required(p, "display_name")?.to_string();
        let event_name = required(p, "event_name")?.to_string();
        let formula = p
            .pointer("/default_aggregation/formula")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                invalid(
                    "Missing required param: default_aggregation[formula].",
                    Some("default_aggregation"),
                    Some("parameter_missing"),
                )
            })?
            .to_string();
        if !matches!(formula.as_str(), "count" | "sum" | "last") {
            return Err(invalid(format!("Invalid formula: {formula}"), Some("default_aggregation[formula]"), None));
        }
        if self.meters.values().any(|m| m.event_name == event_name) {
            return Err(invalid(
                format!("A meter with event_name {event_name} already exists."),
                Some("event_name"),
                Some("resource_already_exists"),
            ));
        }
        let customer_key = p
            .pointer("/customer_mapping/event_payload_key")
            .and_then(Value::as_str)
            .unwrap_or("stripe_customer_id")
            .to_string();
        let value_key =
            p.pointer("/value_settings/event_payload_key").and_then(Value::as_str).unwrap_or("value").to_string();
        // A pre-aggregated meter (Stripe keeps only the last event of each hour or day). The
        // emulator records the setting, which tally refuses to push to; it does not aggregate by it.
        let window = match str_param(p, "event_time_window") {
            None => Value::Null,
            Some(w @ ("hour" | "day")) => Value::from(w),
            Some(w) => {
                return Err(invalid(format!("Invalid event_time_window: {w}"), Some("event_time_window"), None));
            }
        };
        let id = self.id("mtr");
        let obj = json!({
            "id": id, "object": "billing.meter", "created": now, "updated": now, "livemode": false,
            "display_name": display_name, "event_name": event_name, "event_time_window": window,
            "status": "active", "status_transitions": {"deactivated_at": null},
            "customer_mapping": {"event_payload_key": customer_key, "type": "by_id"},
            "default_aggregation": {"formula": formula},
            "value_settings": {"event_payload_key": value_key},
        });
        self.meters.insert(id, Meter { obj: obj.clone(), event_name, formula, customer_key, value_key });
        Ok(obj)
    }

    pub fn meter(&self, id: &str) -> Result<Value> {
        self.meters.get(id).map(|m| m.obj.clone()).ok_or_else(|| missing("billing.meter", id, "id"))
    }

    pub fn list_meters(&self, p: &Value) -> Result<Value> {
        let items = self.meters.iter().map(|(k, m)| (k.clone(), m.obj.clone())).collect();
        list("/v1/billing/meters", items, p)
    }

    // ---- meter events ----

    pub fn create_meter_event(&mut self, p: &Value, now: i64) -> Result<Value> {
        let event_name = required(p, "event_name")?.to_string();
        let payload =
            p.get("payload").cloned().filter(Value::is_object).ok_or_else(|| {
                invalid("Missing required param: payload.", Some("payload"), Some("parameter_missing"))
            })?;
        let meter = self
            .meters
            .values()
            .find(|m| m.event_name == event_name && m.obj["status"] == "active")
            .ok_or_else(|| invalid(format!("No active meter with event_name {event_name}."), Some("event_name"), None))?
            .clone();
        let customer = payload.get(&meter.customer_key).and_then(Value::as_str).ok_or_else(|| {
            invalid(format!("payload[{}] is required.", meter.customer_key), Some("payload"), Some("parameter_missing"))
        })?;
        if !self.customers.contains_key(customer) {
            return Err(missing("customer", customer, "payload"));
        }
        let value = match payload.get(&meter.value_key).and_then(Value::as_str) {
            Some(v) => v.parse::<i64>().map_err(|_| {
                invalid(format!("payload[{}] must be a whole number: {v}", meter.value_key), Some("payload"), None)
            })?,
            None if meter.formula == "count" => 1,
            None => {
                return Err(invalid(
                    format!("payload[{}] is required.", meter.value_key),
                    Some("payload"),
                    Some("parameter_missing"),
                ))
            }
        };
        let timestamp = int_param(p, "timestamp")?.unwrap_or(now);
        if timestamp < now - METER_EVENT_MAX_AGE_SECS || timestamp > now + METER_EVENT_MAX_FUTURE_SECS {
            return Err(invalid(
                "Timestamp must be within the past 35 calendar days and no more than 5 minutes in the future.",
                Some("timestamp"),
                Some("timestamp_outside_window"),
            ));
        }
        let identifier = match str_param(p, "identifier") {
            Some(i) => i.to_string(),
            None => self.id("evt"),
        };
        if identifier.len() > 100 {
            return Err(invalid("identifier must be at most 100 characters.", Some("identifier"), None));
        }
        if self.by_identifier.contains_key(&identifier) {
            // Real Stripe's answer: no `code`, this message (langfuse/langfuse#16292).
            let text = crate::invoice::stripe::client::DUPLICATE_IDENTIFIER_TEXT;
            return Err(invalid(format!("An event {text} {identifier}."), None, None));
        }
        let obj = json!({
            "object": "billing.meter_event", "created": now, "livemode": false,
            "event_name": event_name, "identifier": identifier, "payload": payload, "timestamp": timestamp,
        });
        self.by_identifier.insert(identifier.clone(), self.events.len());
        self.events.push(MeterEvent {
            identifier,
            event_name,
            customer: customer.to_string(),
            value,
            timestamp,
            created: now,
            cancelled: false,
            dropped: false,
            payload: obj["payload"].clone(),
        });
        Ok(obj)
    }

    pub fn create_adjustment(&mut self, p: &Value, now: i64) -> Result<Value> {
        let event_name = required(p, "event_name")?.to_string();
        let ty = required(p, "type")?;
        if ty != "cancel" {
            return Err(invalid(format!("Invalid type: {ty}"), Some("type"), None));
        }
        let identifier = p.pointer("/cancel/identifier").and_then(Value::as_str).ok_or_else(|| {
            invalid("Missing required param: cancel[identifier].", Some("cancel"), Some("parameter_missing"))
        })?;
        let idx = *self
            .by_identifier
            .get(identifier)
            .ok_or_else(|| missing("meter event", identifier, "cancel[identifier]"))?;
        let ev = &mut self.events[idx];
        if ev.event_name != event_name {
            return Err(invalid("event_name does not match the event's.", Some("event_name"), None));
        }
        if ev.cancelled {
            return Err(invalid(
                format!("Meter event {identifier} is already cancelled."),
                Some("cancel[identifier]"),
                None,
            ));
        }
        if now - ev.created > CANCEL_WINDOW_SECS {
            return Err(invalid(
                format!("Meter event {identifier} is older than 24 hours and can no longer be cancelled."),
                Some("cancel[identifier]"),
                Some("meter_event_cancel_window_passed"),
            ));
        }
        ev.cancelled = true;
        Ok(json!({
            "object": "billing.meter_event_adjustment", "livemode": false, "event_name": event_name,
            "status": "pending", "type": "cancel", "cancel": {"identifier": identifier},
        }))
    }

    pub fn event_summaries(&self, meter_id: &str, p: &Value) -> Result<Value> {
        let meter = self.meters.get(meter_id).ok_or_else(|| missing("billing.meter", meter_id, "id"))?;
        let customer = required(p, "customer")?;
        let start = int_param(p, "start_time")?.ok_or_else(|| {
            invalid("Missing required param: start_time.", Some("start_time"), Some("parameter_missing"))
        })?;
        let end = int_param(p, "end_time")?
            .ok_or_else(|| invalid("Missing required param: end_time.", Some("end_time"), Some("parameter_missing")))?;
        for (name, t) in [("start_time", start), ("end_time", end)] {
            if t % 60 != 0 {
                return Err(invalid(format!("{name} must be aligned with minute boundaries."), Some(name), None));
            }
        }
        if end <= start {
            return Err(invalid("end_time must be after start_time.", Some("end_time"), None));
        }
        let window = match str_param(p, "value_grouping_window") {
            None => None,
            Some("hour") => Some(3600),
            Some("day") => Some(86_400),
            Some(w) => {
                return Err(invalid(format!("Invalid value_grouping_window: {w}"), Some("value_grouping_window"), None))
            }
        };
        let mut events: Vec<&MeterEvent> = self
            .events
            .iter()
            .filter(|e| {
                !e.cancelled
                    && !e.dropped
                    && e.event_name == meter.event_name
                    && e.customer == customer
                    && e.timestamp >= start
                    && e.timestamp < end
            })
            .collect();
        events.sort_by_key(|e| e.timestamp); // stable: ties keep creation order
        let mut windows: BTreeMap<i64, Vec<&MeterEvent>> = BTreeMap::new();
        match window {
            None => {
                windows.insert(start, events);
            }
            Some(w) => {
                for e in events {
                    windows.entry(e.timestamp - e.timestamp.rem_euclid(w)).or_default().push(e);
                }
            }
        }
        let items = windows
            .into_iter()
            .map(|(ws, evs)| {
                let (s, e) = match window {
                    None => (start, end),
                    Some(w) => (ws.max(start), (ws + w).min(end)),
                };
                let value: i64 = match meter.formula.as_str() {
                    "count" => evs.len() as i64,
                    "sum" => evs.iter().map(|e| e.value).sum(),
                    _ => evs.last().map_or(0, |e| e.value),
                };
                let id = format!(
                    "mtrusg_{}_{}_{}",
                    meter_id.trim_start_matches("mtr_"),
                    customer.trim_start_matches("cus_"),
                    s
                );
                let obj = json!({
                    "id": id, "object": "billing.meter_event_summary", "livemode": false, "meter": meter_id,
                    "aggregated_value": value as f64, "start_time": s, "end_time": e,
                });
                (id, obj)
            })
            .collect();
        list(&format!("/v1/billing/meters/{meter_id}/event_summaries"), items, p)
    }

    // ---- prices, subscriptions, their invoices ----

    /// `POST /v1/prices` (beyond the spec subsets, as Stripe has it): a recurring price; a
    /// metered one may name the Billing Meter it bills (`recurring[meter]`).
    pub fn create_price(&mut self, p: &Value, now: i64) -> Result<Value> {
        let currency = required(p, "currency")?.to_string();
        let recurring = p.get("recurring").cloned().unwrap_or_else(|| json!({}));
        let meter = str_param(&recurring, "meter").map(str::to_string);
        if let Some(m) = &meter {
            if !self.meters.contains_key(m) {
                return Err(missing("billing.meter", m, "recurring[meter]"));
            }
            if str_param(&recurring, "usage_type") != Some("metered") {
                return Err(invalid(
                    "A price with a meter must have recurring[usage_type]=metered.",
                    Some("recurring[usage_type]"),
                    None,
                ));
            }
        }
        let id = self.id("price");
        let product = match str_param(p, "product") {
            Some(prod) => prod.to_string(),
            None => self.id("prod"),
        };
        let unit_amount = int_param(p, "unit_amount")?;
        self.prices.insert(id.clone(), meter.clone());
        Ok(json!({
            "id": id, "object": "price", "active": true, "billing_scheme": "per_unit", "created": now,
            "currency": currency, "livemode": false, "metadata": metadata(p), "type": "recurring",
            "product": product, "lookup_key": null, "nickname": null, "tax_behavior": "unspecified",
            "tiers_mode": null, "transform_quantity": null, "custom_unit_amount": null,
            "unit_amount": unit_amount, "unit_amount_decimal": unit_amount.map(|a| a.to_string()),
            "recurring": {"interval": str_param(&recurring, "interval").unwrap_or("month"), "interval_count": 1,
                "usage_type": str_param(&recurring, "usage_type").unwrap_or("licensed"), "meter": meter},
        }))
    }

    pub fn create_subscription(&mut self, p: &Value, now: i64) -> Result<Value> {
        let customer = required(p, "customer")?.to_string();
        if !self.customers.contains_key(&customer) {
            return Err(missing("customer", &customer, "customer"));
        }
        let start = int_param(p, "backdate_start_date")?.unwrap_or(now);
        let id = self.id("sub");
        let mut item_objs = Vec::new();
        let items = p.get("items").and_then(Value::as_object).cloned().unwrap_or_default();
        for item in items.values() {
            let price = required(item, "price")?.to_string();
            let it = self.add_item(&id, &price, now, start);
            item_objs.push(self.item_obj(&it));
        }
        let obj = json!({
            "id": id, "object": "subscription", "customer": customer, "created": now, "livemode": false,
            "status": "active", "start_date": start, "metadata": metadata(p), "billing_cycle_anchor": start,
            "automatic_tax": {"enabled": false}, "cancel_at_period_end": false,
            "collection_method": "charge_automatically", "currency": "usd",
            "items": {"object": "list", "data": item_objs, "has_more": false, "url": format!("/v1/subscription_items?subscription={id}")},
        });
        self.subscriptions.insert(id.clone(), obj);
        self.subscription(&id, now)
    }

    fn add_item(&mut self, sub: &str, price: &str, now: i64, period_start: i64) -> Item {
        let item = Item {
            id: self.id("si"),
            subscription: sub.to_string(),
            price: price.to_string(),
            created: now,
            period_start,
        };
        self.items.insert(item.id.clone(), item.clone());
        item
    }

    /// The item's current billing period at `now`: periods of [`PERIOD_SECS`] from its start.
    fn period(item: &Item, now: i64) -> (i64, i64) {
        let n = ((now - item.period_start).max(0)) / PERIOD_SECS;
        let s = item.period_start + n * PERIOD_SECS;
        (s, s + PERIOD_SECS)
    }

    /// A subscription item as API versions before 2025-03-31.basil have it (the billing period is
    /// on the subscription), with a metered monthly price.
    fn item_obj(&self, it: &Item) -> Value {
        json!({
            "id": it.id, "object": "subscription_item", "created": it.created, "subscription": it.subscription,
            "price": {
                "id": it.price, "object": "price", "active": true, "billing_scheme": "per_unit",
                "created": it.created, "currency": "usd", "livemode": false, "metadata": {},
                "product": format!("prod_{}", it.price.trim_start_matches("price_")), "type": "recurring",
                "recurring": {"interval": "month", "interval_count": 1, "usage_type": "metered",
                    "aggregate_usage": "sum", "meter": self.prices.get(&it.price).cloned().flatten(),
                    "trial_period_days": null},
            },
            "metadata": {}, "tax_rates": [], "billing_thresholds": null,
        })
    }

    /// A subscription with its current billing period (`current_period_start`/`_end` on the
    /// subscription, as API versions before 2025-03-31.basil have them).
    pub fn subscription(&self, id: &str, now: i64) -> Result<Value> {
        let mut obj = self.subscriptions.get(id).cloned().ok_or_else(|| missing("subscription", id, "id"))?;
        let start = obj["start_date"].as_i64().unwrap_or(0);
        let n = ((now - start).max(0)) / PERIOD_SECS;
        obj["current_period_start"] = json!(start + n * PERIOD_SECS);
        obj["current_period_end"] = json!(start + (n + 1) * PERIOD_SECS);
        Ok(obj)
    }

    /// `GET /v1/subscriptions`: by `customer` (all of the emulator's subscriptions are active).
    pub fn list_subscriptions(&self, p: &Value, now: i64) -> Result<Value> {
        let customer = str_param(p, "customer");
        let mut items = Vec::new();
        for (id, s) in self.subscriptions.iter().rev() {
            if customer.is_none_or(|c| s["customer"] == c) {
                items.push((id.clone(), self.subscription(id, now)?));
            }
        }
        list("/v1/subscriptions", items, p)
    }

    /// `GET /v1/invoices`, by `subscription` and/or `customer`, newest first: each subscription's
    /// `subscription_create` invoice (an empty usage period at its creation, finalized at once), and
    /// one `subscription_cycle` invoice per billing period that has ended, created at the period's
    /// end for its usage (`period_start`/`period_end` look back one period, as Stripe's do), a
    /// `draft` for [`FINALIZE_AFTER_SECS`], then `open` (finalized).
    pub fn list_invoices(&self, p: &Value, now: i64) -> Result<Value> {
        let (sub_filter, customer) = (str_param(p, "subscription"), str_param(p, "customer"));
        let mut all: Vec<(i64, String, Value)> = Vec::new();
        for (sub, s) in &self.subscriptions {
            if sub_filter.is_some_and(|f| f != sub) || customer.is_some_and(|c| s["customer"] != c) {
                continue;
            }
            let start = s["start_date"].as_i64().unwrap_or(0);
            let ended = ((now - start).max(0)) / PERIOD_SECS;
            let created = s["created"].as_i64().unwrap_or(start);
            for n in 0..=ended {
                // The create invoice has an empty period at the subscription's creation.
                let (from, to) =
                    if n == 0 { (created, created) } else { (start + (n - 1) * PERIOD_SECS, start + n * PERIOD_SECS) };
                let draft = n > 0 && now < to + FINALIZE_AFTER_SECS;
                let id = format!("in_{}_{n}", sub.trim_start_matches("sub_"));
                // The emulator prices nothing: every amount is 0.
                let obj = json!({
                    "id": id, "object": "invoice", "customer": s["customer"], "created": to, "livemode": false,
                    "currency": "usd", "collection_method": "charge_automatically", "auto_advance": true,
                    "billing_reason": if n == 0 { "subscription_create" } else { "subscription_cycle" },
                    "status": if draft { "draft" } else { "open" },
                    "automatically_finalizes_at": if draft { Some(to + FINALIZE_AFTER_SECS) } else { None },
                    "status_transitions": {"finalized_at": match (n, draft) {
                        (_, true) => None,
                        (0, false) => Some(to),
                        _ => Some(to + FINALIZE_AFTER_SECS),
                    },
                        "marked_uncollectible_at": null, "paid_at": null, "voided_at": null},
                    "period_start": from, "period_end": to,
                    "parent": {"type": "subscription_details", "quote_details": null,
                        "subscription_details": {"subscription": sub, "metadata": {}}},
                    "metadata": {}, "issuer": {"type": "self"}, "default_tax_rates": [], "discounts": [],
                    "automatic_tax": {"enabled": false, "liability": null, "status": null},
                    "payment_settings": {"default_mandate": null, "payment_method_options": null,
                        "payment_method_types": null},
                    "lines": {"object": "list", "data": [], "has_more": false, "url": format!("/v1/invoices/{id}/lines")},
                    "amount_due": 0, "amount_overpaid": 0, "amount_paid": 0, "amount_remaining": 0,
                    "amount_shipping": 0, "attempt_count": 0, "attempted": false, "starting_balance": 0,
                    "post_payment_credit_notes_amount": 0, "pre_payment_credit_notes_amount": 0,
                    "subtotal": 0, "total": 0,
                });
                all.push((to, id, obj));
            }
        }
        all.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
        list("/v1/invoices", all.into_iter().map(|(_, id, v)| (id, v)).collect(), p)
    }

    pub fn create_item(&mut self, p: &Value, now: i64) -> Result<Value> {
        let sub = required(p, "subscription")?.to_string();
        let start = self
            .subscriptions
            .get(&sub)
            .and_then(|s| s["start_date"].as_i64())
            .ok_or_else(|| missing("subscription", &sub, "subscription"))?;
        let price = required(p, "price")?.to_string();
        let it = self.add_item(&sub, &price, now, start);
        Ok(self.item_obj(&it))
    }

    pub fn item(&self, id: &str) -> Result<Value> {
        let it = self.items.get(id).ok_or_else(|| missing("subscription_item", id, "item"))?;
        Ok(self.item_obj(it))
    }

    pub fn list_items(&self, p: &Value) -> Result<Value> {
        let sub = required(p, "subscription")?;
        let items =
            self.items.values().filter(|i| i.subscription == sub).map(|i| (i.id.clone(), self.item_obj(i))).collect();
        list("/v1/subscription_items", items, p)
    }

    pub fn create_usage_record(&mut self, item_id: &str, p: &Value, now: i64) -> Result<Value> {
        let it =
            self.items.get(item_id).ok_or_else(|| missing("subscription_item", item_id, "subscription_item"))?.clone();
        let quantity = int_param(p, "quantity")?
            .ok_or_else(|| invalid("Missing required param: quantity.", Some("quantity"), Some("parameter_missing")))?;
        if quantity < 0 {
            return Err(invalid("quantity must be non-negative.", Some("quantity"), None));
        }
        let set = match str_param(p, "action").unwrap_or("increment") {
            "increment" => false,
            "set" => true,
            a => return Err(invalid(format!("Invalid action: {a}"), Some("action"), None)),
        };
        let timestamp = match str_param(p, "timestamp") {
            None | Some("now") => now,
            Some(_) => int_param(p, "timestamp")?.unwrap_or(now),
        };
        let (period_start, _) = Self::period(&it, now);
        if timestamp < period_start || timestamp > now + METER_EVENT_MAX_FUTURE_SECS {
            return Err(invalid(
                "Cannot create the usage record with this timestamp because timestamps must be after the \
                 subscription's last invoice period (or current period start time).",
                Some("timestamp"),
                None,
            ));
        }
        self.usage.push(UsageRecord { item: item_id.to_string(), quantity, timestamp, set });
        let id = self.id("mbur");
        Ok(json!({
            "id": id, "object": "usage_record", "livemode": false, "quantity": quantity,
            "subscription_item": item_id, "timestamp": timestamp,
        }))
    }

    /// One summary per billing period that has usage, newest first (as Stripe lists them).
    pub fn usage_summaries(&self, item_id: &str, p: &Value) -> Result<Value> {
        let it = self.items.get(item_id).ok_or_else(|| missing("subscription_item", item_id, "subscription_item"))?;
        // Per period, per timestamp: increments add, a set replaces what the timestamp had.
        let mut periods: BTreeMap<i64, BTreeMap<i64, i64>> = BTreeMap::new();
        for r in self.usage.iter().filter(|r| r.item == item_id) {
            let (s, _) = Self::period(it, r.timestamp);
            let slot = periods.entry(s).or_default().entry(r.timestamp).or_insert(0);
            *slot = if r.set { r.quantity } else { *slot + r.quantity };
        }
        let items = periods
            .into_iter()
            .rev()
            .map(|(s, by_ts)| {
                let id = format!("sis_{}_{s}", item_id.trim_start_matches("si_"));
                let obj = json!({
                    "id": id, "object": "usage_record_summary", "livemode": false, "invoice": null,
                    "period": {"start": s, "end": s + PERIOD_SECS}, "subscription_item": item_id,
                    "total_usage": by_ts.values().sum::<i64>(),
                });
                (id, obj)
            })
            .collect();
        list(&format!("/v1/subscription_items/{item_id}/usage_record_summaries"), items, p)
    }

    /// Drops an accepted meter event, as Stripe does when its asynchronous validation fails.
    pub fn drop_meter_event(&mut self, identifier: &str) -> Result<Value> {
        let idx =
            *self.by_identifier.get(identifier).ok_or_else(|| missing("meter event", identifier, "identifier"))?;
        self.events[idx].dropped = true;
        Ok(json!({"identifier": identifier, "dropped": true}))
    }

    pub fn meter_event_payload(&self, identifier: &str) -> Option<&Value> {
        self.by_identifier.get(identifier).map(|&i| &self.events[i].payload)
    }
}
