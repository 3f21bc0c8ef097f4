//! Plans and their assignment to orgs (`config/plans.toml`, PRODUCT.md §11).
//!
//! ```toml
//! default_plan = "free"              # orgs not listed below ("" = none: no entitlements)
//!
//! [plans.free]
//! anchor_day = 1                     # periods start on this day of the month, 00:00 UTC (1 = calendar month)
//! [plans.free.meters.events]
//! limit = 100000                     # per period, in the meter's unit
//! enforcement = "hard"               # "hard": past the limit, has_access = false; "soft": warn only
//! thresholds = [80, 100]             # percents of the limit that notify when crossed
//!
//! [orgs.acme]
//! plan = "pro"
//! anchor_day = 15                    # overrides the plan's
//! [orgs.acme.meters.input_tokens]    # overrides one meter's entitlement (omitted keys: the plan's)
//! limit = 5000000
//! ```
//!
//! A billing anchor day past the end of a short month falls on its last day, as Stripe's billing
//! cycle anchor does (a 31st anchor bills on 30 April, 28/29 February).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::meter::Meters;
use crate::timestamp::{civil_from_days, days_from_civil, days_in_month};

/// Soft limits warn; hard limits also take access away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Enforcement {
    Soft,
    Hard,
}

/// One meter's entitlement in a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entitlement {
    /// Per period, in the meter's unit (events, tokens, distinct users).
    pub limit: u64,
    pub enforcement: Enforcement,
    /// Percents of `limit`, ascending, without repeats (e.g. 80, 100, 120).
    pub thresholds: Vec<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntitlementDef {
    limit: Option<u64>,
    enforcement: Option<Enforcement>,
    thresholds: Option<Vec<u32>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanDef {
    #[serde(default = "default_anchor_day")]
    anchor_day: u32,
    #[serde(default)]
    meters: BTreeMap<String, EntitlementDef>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrgDef {
    plan: String,
    anchor_day: Option<u32>,
    #[serde(default)]
    meters: BTreeMap<String, EntitlementDef>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlansFile {
    #[serde(default)]
    default_plan: String,
    #[serde(default)]
    plans: BTreeMap<String, PlanDef>,
    #[serde(default)]
    orgs: BTreeMap<String, OrgDef>,
}

fn default_anchor_day() -> u32 {
    1
}

/// An org's resolved plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgPlan {
    pub plan: String,
    pub anchor_day: u32,
    /// Meter name → entitlement, overrides applied.
    pub meters: BTreeMap<String, Entitlement>,
}

/// The loaded plans file.
#[derive(Debug, Clone, Default)]
pub struct Plans {
    default_plan: Option<String>,
    plans: BTreeMap<String, OrgPlan>,
    orgs: BTreeMap<String, OrgPlan>,
}

#[derive(Debug, thiserror::Error)]
#[error("plans file {path}: {reason}")]
pub struct PlansError {
    pub path: String,
    pub reason: String,
}

impl Plans {
    /// Reads and checks `path` against the meter set.
    pub fn load(path: &Path, meters: &Meters) -> Result<Plans, PlansError> {
        let err = |reason: String| PlansError { path: path.display().to_string(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Plans::parse(&text, meters).map_err(err)
    }

    /// Parses the text of a plans file; every meter named must exist in `meters`.
    pub fn parse(text: &str, meters: &Meters) -> Result<Plans, String> {
        let f: PlansFile = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
        let mut plans = BTreeMap::new();
        for (name, p) in &f.plans {
            let mut out = BTreeMap::new();
            for (meter, d) in &p.meters {
                let at = format!("plans.{name}.meters.{meter}");
                out.insert(meter.clone(), resolve(&at, d, None, meters)?);
            }
            check_anchor(&format!("plans.{name}.anchor_day"), p.anchor_day)?;
            plans.insert(name.clone(), OrgPlan { plan: name.clone(), anchor_day: p.anchor_day, meters: out });
        }
        let mut orgs = BTreeMap::new();
        for (org, o) in &f.orgs {
            let base = plans.get(&o.plan).ok_or_else(|| format!("orgs.{org}.plan: no plan named {:?}", o.plan))?;
            let mut resolved = base.clone();
            if let Some(a) = o.anchor_day {
                check_anchor(&format!("orgs.{org}.anchor_day"), a)?;
                resolved.anchor_day = a;
            }
            for (meter, d) in &o.meters {
                let at = format!("orgs.{org}.meters.{meter}");
                let e = resolve(&at, d, base.meters.get(meter), meters)?;
                resolved.meters.insert(meter.clone(), e);
            }
            orgs.insert(org.clone(), resolved);
        }
        let default_plan = match f.default_plan.as_str() {
            "" => None,
            p if plans.contains_key(p) => Some(p.to_string()),
            p => return Err(format!("default_plan: no plan named {p:?}")),
        };
        Ok(Plans { default_plan, plans, orgs })
    }

    /// The plan of `org`: its own assignment, else the default plan, else none.
    pub fn for_org(&self, org: &str) -> Option<&OrgPlan> {
        self.orgs.get(org).or_else(|| self.default_plan.as_ref().and_then(|p| self.plans.get(p)))
    }

    /// Every org named in the file with its plan (the default plan's orgs are not enumerable).
    pub fn assigned(&self) -> impl Iterator<Item = (&str, &OrgPlan)> {
        self.orgs.iter().map(|(o, p)| (o.as_str(), p))
    }

    /// Whether orgs not named in the file get a plan.
    pub fn has_default(&self) -> bool {
        self.default_plan.is_some()
    }
}

fn check_anchor(at: &str, day: u32) -> Result<(), String> {
    if (1..=31).contains(&day) {
        Ok(())
    } else {
        Err(format!("{at}: must be a day of the month, 1 to 31 (got {day})"))
    }
}

fn resolve(at: &str, d: &EntitlementDef, base: Option<&Entitlement>, meters: &Meters) -> Result<Entitlement, String> {
    let name = at.rsplit('.').next().unwrap_or_default();
    if meters.get(name).is_none() {
        return Err(format!("{at}: no meter named {name:?} in the meters file"));
    }
    let limit = d.limit.or(base.map(|b| b.limit)).ok_or_else(|| format!("{at}.limit: required"))?;
    // `limit` and `remaining` are JSON numbers in every answer (PRODUCT.md §1).
    if limit > crate::decode::number::MAX_EXACT_JSON_INTEGER {
        return Err(format!("{at}.limit: at most 2^53 - 1 (9007199254740991), the largest integer JSON holds exactly"));
    }
    let enforcement = d.enforcement.or(base.map(|b| b.enforcement)).unwrap_or(Enforcement::Soft);
    let mut thresholds = d.thresholds.clone().or(base.map(|b| b.thresholds.clone())).unwrap_or_default();
    if thresholds.iter().any(|&t| t == 0 || t > 1000) {
        return Err(format!("{at}.thresholds: percents must be 1 to 1000"));
    }
    thresholds.sort_unstable();
    thresholds.dedup();
    Ok(Entitlement { limit, enforcement, thresholds })
}

/// The usage period containing `t` (Unix seconds) for a billing anchor day: [start, end).
/// With `anchor_day = 1` it is the calendar month (UTC).
pub fn period_at(t: i64, anchor_day: u32) -> (i64, i64) {
    let (y, m, _) = civil_from_days(t.div_euclid(86_400));
    let start_in = |y: i64, m: i64| -> i64 {
        let day = i64::from(anchor_day).min(days_in_month(y, m));
        days_from_civil(y, m, day) * 86_400
    };
    let next = |y: i64, m: i64| if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let prev = |y: i64, m: i64| if m == 1 { (y - 1, 12) } else { (y, m - 1) };
    let (sy, sm) = if t >= start_in(y, m) { (y, m) } else { prev(y, m) };
    let (ny, nm) = next(sy, sm);
    (start_in(sy, sm), start_in(ny, nm))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::DEFAULT_METERS_TOML;
    use crate::timestamp::parse_rfc3339;

    fn t(s: &str) -> i64 {
        parse_rfc3339(s).unwrap()
    }

    #[test]
    fn periods_follow_the_anchor_day() {
        let p = |at: &str, a| {
            let (s, e) = period_at(t(at), a);
            (crate::timestamp::format_rfc3339(s), crate::timestamp::format_rfc3339(e))
        };
        assert_eq!(p("2026-11-29T10:00:00Z", 1), ("2026-11-01T00:00:00Z".into(), "2026-12-01T00:00:00Z".into()));
        assert_eq!(p("2026-12-31T23:59:59Z", 1), ("2026-12-01T00:00:00Z".into(), "2027-01-01T00:00:00Z".into()));
        assert_eq!(p("2026-11-29T10:00:00Z", 15), ("2026-11-15T00:00:00Z".into(), "2026-12-15T00:00:00Z".into()));
        assert_eq!(p("2026-11-14T23:59:59Z", 15), ("2026-10-15T00:00:00Z".into(), "2026-11-15T00:00:00Z".into()));
        // A 31st anchor: the last day of short months (Stripe's billing cycle anchor).
        assert_eq!(p("2027-02-28T00:00:00Z", 31), ("2027-02-28T00:00:00Z".into(), "2027-03-31T00:00:00Z".into()));
        assert_eq!(p("2027-02-27T00:00:00Z", 31), ("2027-01-31T00:00:00Z".into(), "2027-02-28T00:00:00Z".into()));
        assert_eq!(p("2028-02-29T12:00:00Z", 30), ("2028-02-29T00:00:00Z".into(), "2028-03-30T00:00:00Z".into()));
        assert_eq!(p("2026-01-05T00:00:00Z", 10), ("2025-12-10T00:00:00Z".into(), "2026-01-10T00:00:00Z".into()));
    }

    #[test]
    fn orgs_get_their_plan_with_overrides() {
        let meters = Meters::parse(DEFAULT_METERS_TOML).unwrap();
        let plans = Plans::parse(
            r#"
            default_plan = "free"
            [plans.free.meters.events]
            limit = 1000
            enforcement = "hard"
            thresholds = [100, 80, 80]
            [plans.pro]
            anchor_day = 15
            [plans.pro.meters.input_tokens]
            limit = 5000
            [orgs.acme]
            plan = "free"
            anchor_day = 3
            [orgs.acme.meters.events]
            limit = 2000
            "#,
            &meters,
        )
        .unwrap();
        let free = plans.for_org("anyone").unwrap();
        assert_eq!(free.plan, "free");
        assert_eq!(
            free.meters["events"],
            Entitlement { limit: 1000, enforcement: Enforcement::Hard, thresholds: vec![80, 100] }
        );
        let acme = plans.for_org("acme").unwrap();
        assert_eq!(acme.anchor_day, 3);
        assert_eq!(acme.meters["events"].limit, 2000);
        assert_eq!(acme.meters["events"].enforcement, Enforcement::Hard, "omitted keys come from the plan");
        assert_eq!(plans.assigned().count(), 1);
    }

    #[test]
    fn mistakes_are_named() {
        let meters = Meters::parse(DEFAULT_METERS_TOML).unwrap();
        for (text, want) in [
            ("[plans.a.meters.nope]\nlimit = 1", "plans.a.meters.nope: no meter"),
            ("[plans.a.meters.events]\nenforcement = \"hard\"", "plans.a.meters.events.limit: required"),
            ("[plans.a]\nanchor_day = 32", "plans.a.anchor_day"),
            ("[orgs.x]\nplan = \"b\"", "orgs.x.plan: no plan named \"b\""),
            ("default_plan = \"z\"", "default_plan"),
            ("[plans.a.meters.events]\nlimit = 1\nthresholds = [0]", "thresholds"),
            ("[plans.a]\nlimits = 3", "unknown field"),
            ("[plans.a.meters.events]\nlimit = 9007199254740992", "at most 2^53 - 1"),
        ] {
            let e = Plans::parse(text, &meters).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
        assert!(Plans::parse("", &meters).unwrap().for_org("x").is_none());
    }
}
