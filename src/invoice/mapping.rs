//! org → Stripe customer and tally meter → Stripe meter (or subscription item), from
//! `config/billing.toml` and optionally from Stripe customer metadata (`tally_org_id`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Deserialize;

/// The metadata key that names a customer's tally org.
pub const ORG_METADATA_KEY: &str = "tally_org_id";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// org → Stripe customer id.
    #[serde(default)]
    pub customers: BTreeMap<String, String>,
    /// tally meter → Stripe meter (Billing Meters mode).
    #[serde(default)]
    pub meters: BTreeMap<String, MeterMap>,
    /// org → tally meter → subscription item (legacy usage-records mode).
    #[serde(default)]
    pub subscription_items: BTreeMap<String, BTreeMap<String, String>>,
    /// Per-org replacements of `meters` entries.
    #[serde(default)]
    pub overrides: BTreeMap<String, Override>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterMap {
    /// `mtr_...`
    pub stripe_meter: String,
    /// If given, must equal the Stripe meter's `event_name` (checked before anything is pushed).
    #[serde(default)]
    pub event_name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    #[serde(default)]
    pub customer: Option<String>,
    #[serde(default)]
    pub meters: BTreeMap<String, MeterMap>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MappingError {
    #[error("failed to read billing mapping {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid billing mapping {path}: {message}")]
    Parse { path: String, message: String },
    #[error("customer metadata: org {org} is claimed by both {a} and {b}")]
    Ambiguous { org: String, a: String, b: String },
}

impl Mapping {
    pub fn load(path: &Path) -> Result<Mapping, MappingError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| MappingError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text).map_err(|message| MappingError::Parse { path: path.display().to_string(), message })
    }

    pub fn parse(text: &str) -> Result<Mapping, String> {
        let m: Mapping = toml::from_str(text).map_err(|e| e.message().to_string())?;
        for (meter, mm) in m.meters.iter().chain(m.overrides.values().flat_map(|o| o.meters.iter())) {
            if mm.stripe_meter.is_empty() {
                return Err(format!("meters.{meter}.stripe_meter is empty"));
            }
        }
        Ok(m)
    }

    /// Adds customers found by metadata (`tally_org_id`); entries of the file win.
    pub fn add_metadata_customers(
        &mut self,
        customers: &[(String, HashMap<String, String>)],
    ) -> Result<(), MappingError> {
        let mut found: BTreeMap<String, String> = BTreeMap::new();
        for (id, md) in customers {
            if let Some(org) = md.get(ORG_METADATA_KEY) {
                if let Some(prev) = found.insert(org.clone(), id.clone()) {
                    if !self.customers.contains_key(org) {
                        return Err(MappingError::Ambiguous { org: org.clone(), a: prev, b: id.clone() });
                    }
                }
            }
        }
        for (org, id) in found {
            self.customers.entry(org).or_insert(id);
        }
        Ok(())
    }

    pub fn customer(&self, org: &str) -> Option<&str> {
        self.overrides
            .get(org)
            .and_then(|o| o.customer.as_deref())
            .or_else(|| self.customers.get(org).map(String::as_str))
    }

    pub fn meter(&self, org: &str, meter: &str) -> Option<&MeterMap> {
        self.overrides.get(org).and_then(|o| o.meters.get(meter)).or_else(|| self.meters.get(meter))
    }

    pub fn item(&self, org: &str, meter: &str) -> Option<&str> {
        self.subscription_items.get(org).and_then(|m| m.get(meter)).map(String::as_str)
    }

    /// Every Stripe meter id referenced.
    pub fn stripe_meters(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .meters
            .values()
            .chain(self.overrides.values().flat_map(|o| o.meters.values()))
            .map(|m| m.stripe_meter.as_str())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = r#"
[customers]
"org-1" = "cus_1"
"org-2" = "cus_2"

[meters.events]
stripe_meter = "mtr_events"
event_name = "tally_events"

[meters.unique_users]
stripe_meter = "mtr_users"

[subscription_items."org-1"]
events = "si_1"

[overrides."org-2".meters.events]
stripe_meter = "mtr_events_enterprise"
"#;

    #[test]
    fn file_and_overrides() {
        let m = Mapping::parse(TOML).unwrap();
        assert_eq!(m.customer("org-1"), Some("cus_1"));
        assert_eq!(m.customer("org-9"), None);
        assert_eq!(m.meter("org-1", "events").unwrap().stripe_meter, "mtr_events");
        assert_eq!(m.meter("org-2", "events").unwrap().stripe_meter, "mtr_events_enterprise");
        assert_eq!(m.meter("org-2", "unique_users").unwrap().stripe_meter, "mtr_users");
        assert_eq!(m.item("org-1", "events"), Some("si_1"));
        assert_eq!(m.stripe_meters(), vec!["mtr_events", "mtr_events_enterprise", "mtr_users"]);
    }

    #[test]
    fn metadata_fills_gaps_and_refuses_ambiguity() {
        let mut m = Mapping::parse(TOML).unwrap();
        let md = |org: &str| HashMap::from([(ORG_METADATA_KEY.to_string(), org.to_string())]);
        m.add_metadata_customers(&[("cus_x".into(), md("org-1")), ("cus_3".into(), md("org-3"))]).unwrap();
        assert_eq!(m.customer("org-1"), Some("cus_1"), "the file wins");
        assert_eq!(m.customer("org-3"), Some("cus_3"));
        let err =
            m.add_metadata_customers(&[("cus_a".into(), md("org-4")), ("cus_b".into(), md("org-4"))]).unwrap_err();
        assert!(err.to_string().contains("org-4"));
    }

    #[test]
    fn the_shipped_example_parses() {
        let m = Mapping::parse(include_str!("../../config/billing.toml")).unwrap();
        assert_eq!(m.meter("org-000", "events").unwrap().stripe_meter, "mtr_example_events_enterprise");
        assert_eq!(m.item("org-000", "events"), Some("si_example000_events"));
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(Mapping::parse("[meters.events]\nstripe_meter = \"m\"\nevent = \"x\"\n")
            .unwrap_err()
            .contains("event"));
    }
}
