//! `tally-invoicer provision`: creates what billing needs in a Stripe account (the emulator, or a
//! test-mode account) — one Stripe meter per tally meter, one customer per org (metadata
//! `tally_org_id`), and in legacy mode a subscription per org with an item per meter — and writes
//! the matching `billing.toml`. In meters mode it can also create a metered price per Stripe meter
//! and a subscription per org with them, whose invoices close billing periods
//! (`stripe::invoices`). Rerunning finds the meters and customers that exist instead of creating
//! them again; subscriptions and prices are only kept from being made twice by their
//! Idempotency-Keys, which Stripe holds for 24 hours: a rerun after that makes new ones.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use stripe_billing::billing_meter::{
    CreateBillingMeter, CreateBillingMeterCustomerMapping, CreateBillingMeterCustomerMappingType,
    CreateBillingMeterDefaultAggregation, CreateBillingMeterDefaultAggregationFormula, CreateBillingMeterValueSettings,
};
use stripe_client_core::{IdempotencyKey, RequestStrategy, StripeMethod, StripeRequest};

use super::mapping::ORG_METADATA_KEY;
use super::stripe::meters::{list_customers, list_meters};
use super::stripe::{StripeError, StripeHttp};
use crate::meter::{Aggregation, Meters};
use crate::stripe_emu::form::encode;

fn idem(k: &str) -> Result<RequestStrategy, StripeError> {
    IdempotencyKey::new(k).map(RequestStrategy::Idempotent).map_err(|e| StripeError::Client(e.to_string()))
}

/// The Stripe event name of a tally meter.
pub fn event_name(meter: &str) -> String {
    format!("tally_{meter}")
}

/// The price id used for a tally meter's subscription item (legacy mode).
pub fn price_id(meter: &str) -> String {
    format!("price_tally_{meter}")
}

/// Which subscriptions to create, with the start of their first billing period (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscriptions {
    /// Legacy mode: items on the prices [`price_id`] names, usage records on the items.
    Legacy(i64),
    /// Meters mode: items on metered prices that bill the Stripe meters (`recurring[meter]`).
    Metered(i64),
}

/// Ensures meters, customers (and subscriptions when asked) exist; returns the mapping file's text.
pub fn provision(
    stripe: &StripeHttp,
    meters: &Meters,
    orgs: &[String],
    subscriptions: Option<Subscriptions>,
) -> Result<String, StripeError> {
    let mut out = String::from("# Written by `tally-invoicer provision`.\n\n[customers]\n");
    let existing: BTreeMap<String, String> = list_customers(stripe)?
        .into_iter()
        .filter_map(|(id, md)| md.get(ORG_METADATA_KEY).map(|org| (org.clone(), id)))
        .collect();
    let mut customers = BTreeMap::new();
    for org in orgs {
        let id = match existing.get(org) {
            Some(id) => id.clone(),
            None => {
                let c = stripe_core::customer::CreateCustomer::new()
                    .name(org.clone())
                    .metadata(
                        [(ORG_METADATA_KEY.to_string(), org.clone())]
                            .into_iter()
                            .collect::<std::collections::HashMap<_, _>>(),
                    )
                    .customize()
                    .request_strategy(idem(&format!("tally-provision-customer-{org}"))?)
                    .send_blocking(stripe)?;
                c.id.as_str().to_string()
            }
        };
        let _ = writeln!(out, "{} = {}", toml_str(org), toml_str(&id));
        customers.insert(org.clone(), id);
    }

    match subscriptions {
        None | Some(Subscriptions::Metered(_)) => {
            let have = list_meters(stripe)?;
            let mut prices = Vec::new();
            for m in meters.meters() {
                let name = event_name(&m.name);
                let id = match have.iter().find(|x| x.event_name == name) {
                    Some(x) => x.id.clone(),
                    None => {
                        let formula = if m.aggregation == Aggregation::Unique {
                            CreateBillingMeterDefaultAggregationFormula::Last
                        } else {
                            CreateBillingMeterDefaultAggregationFormula::Sum
                        };
                        let created = CreateBillingMeter::new(
                            CreateBillingMeterDefaultAggregation::new(formula),
                            format!("tally {}", m.name),
                            name.clone(),
                        )
                        .customer_mapping(CreateBillingMeterCustomerMapping::new(
                            "stripe_customer_id",
                            CreateBillingMeterCustomerMappingType::ById,
                        ))
                        .value_settings(CreateBillingMeterValueSettings::new("value"))
                        .customize()
                        .request_strategy(idem(&format!("tally-provision-meter-{name}"))?)
                        .send_blocking(stripe)?;
                        created.id.as_str().to_string()
                    }
                };
                if let Some(Subscriptions::Metered(_)) = subscriptions {
                    let form = format!(
                        "currency=usd&unit_amount=1&recurring[interval]=month&recurring[usage_type]=metered\
                         &recurring[meter]={}&product_data[name]={}",
                        encode(&id),
                        encode(&format!("tally {}", m.name))
                    );
                    let key = format!("tally-provision-price-{name}");
                    let body = stripe.send(StripeMethod::Post, "/prices", None, Some(&form), Some(&key))?;
                    prices.push(created_id(&body)?);
                }
                let _ = write!(
                    out,
                    "\n[meters.{}]\nstripe_meter = {}\nevent_name = {}\n",
                    toml_str(&m.name),
                    toml_str(&id),
                    toml_str(&name)
                );
            }
            if let Some(Subscriptions::Metered(start)) = subscriptions {
                for (org, customer) in &customers {
                    let mut form = format!("customer={}&backdate_start_date={start}", encode(customer));
                    for (i, p) in prices.iter().enumerate() {
                        let _ = write!(form, "&items[{i}][price]={}", encode(p));
                    }
                    let key = format!("tally-provision-metered-subscription-{org}");
                    stripe.send(StripeMethod::Post, "/subscriptions", None, Some(&form), Some(&key))?;
                }
            }
        }
        Some(Subscriptions::Legacy(start)) => {
            for (org, customer) in &customers {
                let mut form = format!("customer={}&backdate_start_date={start}", encode(customer));
                for (i, m) in meters.meters().iter().enumerate() {
                    let _ = write!(form, "&items[{i}][price]={}", encode(&price_id(&m.name)));
                }
                let key = format!("tally-provision-subscription-{org}");
                let body = stripe.send(StripeMethod::Post, "/subscriptions", None, Some(&form), Some(&key))?;
                let sub: serde_json::Value =
                    serde_json::from_str(&body).map_err(|e| StripeError::Decode(e.to_string()))?;
                let _ = write!(out, "\n[subscription_items.{}]\n", toml_str(org));
                for item in sub["items"]["data"].as_array().into_iter().flatten() {
                    let price = item["price"]["id"].as_str().unwrap_or_default();
                    if let Some(m) = meters.meters().iter().find(|m| price_id(&m.name) == price) {
                        let _ = writeln!(
                            out,
                            "{} = {}",
                            toml_str(&m.name),
                            toml_str(item["id"].as_str().unwrap_or_default())
                        );
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The `id` of the object a create call returned.
fn created_id(body: &str) -> Result<String, StripeError> {
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| StripeError::Decode(e.to_string()))?;
    v["id"].as_str().map(str::to_string).ok_or_else(|| StripeError::Decode("a created object without an id".into()))
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}
