//! Meters (§4): which events count, and how, as defined in `config/meters.toml`.

use std::path::Path;

use serde::Deserialize;

use crate::decode::scan::same_key;
use crate::decode::{Captured, PathTree};

/// One `[[meter]]` table of `meters.toml`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MeterDef {
    pub name: String,
    /// `"all"` or a list of event types.
    pub types: Types,
    pub aggregation: Aggregation,
    /// Dotted JSON path into the event for `sum` and `unique` (e.g. `body.usage.input`).
    #[serde(default)]
    pub path: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Types {
    All(AllTypes),
    Only(Vec<String>),
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AllTypes {
    All,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Aggregation {
    Count,
    Sum,
    Unique,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetersFile {
    meter: Vec<MeterDef>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeterError {
    #[error("failed to read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid meters file: {0}")]
    Invalid(String),
}

/// A meter ready to apply.
#[derive(Debug, Clone)]
pub struct Meter {
    pub name: String,
    pub aggregation: Aggregation,
    types: Option<Vec<String>>,
    slot: Option<usize>,
}

impl Meter {
    fn applies_to(&self, ty: &str) -> bool {
        self.types.as_ref().is_none_or(|ts| ts.iter().any(|t| t == ty))
    }
}

/// The compiled meter set and the paths it reads.
#[derive(Debug, Clone)]
pub struct Meters {
    meters: Vec<Meter>,
    tree: PathTree,
    /// Per event type named by some meter, the indices of the meters that apply to it, in
    /// definition order: one look-up per event instead of one comparison per meter and listed
    /// type (callgrind, benches/pipeline.rs: docs/measurements.md).
    plans: Vec<(Box<str>, Vec<u16>)>,
    /// The meters of `types = "all"`: the plan of every type no meter names.
    all_types: Vec<u16>,
}

/// What one event contributes: additive values (count/sum, only non-zero) and unique hashes,
/// as (meter index, value) pairs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Contribution {
    pub additive: Vec<(u16, u64)>,
    pub unique: Vec<(u16, u64)>,
}

impl Contribution {
    pub fn clear(&mut self) {
        self.additive.clear();
        self.unique.clear();
    }
}

/// A meter field has the wrong type: the event is malformed.
#[derive(Debug, PartialEq, Eq)]
pub struct WrongType;

/// Hash of a unique-meter value. Only this is stored, never the raw value.
pub fn unique_hash(value: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(value.as_bytes(), 0x7a11_7a11)
}

impl Meters {
    pub fn load(path: &Path) -> Result<Self, MeterError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| MeterError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, MeterError> {
        Self::compile(parse_defs(text)?)
    }

    pub fn compile(defs: Vec<MeterDef>) -> Result<Self, MeterError> {
        let invalid = |m: &MeterDef, why: &str| MeterError::Invalid(format!("meter {:?}: {why}", m.name));
        if defs.len() > u16::MAX as usize {
            return Err(MeterError::Invalid("too many meters".into()));
        }
        let mut tree = PathTree::new();
        let mut meters = Vec::with_capacity(defs.len());
        for d in &defs {
            if d.name.is_empty()
                || !d.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
            {
                return Err(invalid(d, "name must be non-empty [A-Za-z0-9_.-]"));
            }
            if meters.iter().any(|m: &Meter| m.name == d.name) {
                return Err(invalid(d, "defined twice"));
            }
            let slot = match (d.aggregation, &d.path) {
                (Aggregation::Count, None) => None,
                (Aggregation::Count, Some(_)) => return Err(invalid(d, "count takes no path")),
                (_, None) => return Err(invalid(d, "sum and unique need a path")),
                (_, Some(p)) => Some(tree.add(p).map_err(|e| invalid(d, &e.to_string()))?),
            };
            let types = match &d.types {
                Types::All(_) => None,
                Types::Only(ts) if ts.is_empty() => return Err(invalid(d, "types must not be empty")),
                Types::Only(ts) => Some(ts.clone()),
            };
            meters.push(Meter { name: d.name.clone(), aggregation: d.aggregation, types, slot });
        }
        let mut named: Vec<&str> = meters.iter().flat_map(|m| m.types.iter().flatten()).map(String::as_str).collect();
        named.sort_unstable();
        named.dedup();
        let plan = |ty: &str| (0..meters.len() as u16).filter(|&i| meters[i as usize].applies_to(ty)).collect();
        let plans = named.iter().map(|&ty| (ty.into(), plan(ty))).collect();
        let all_types = (0..meters.len() as u16).filter(|&i| meters[i as usize].types.is_none()).collect();
        Ok(Meters { meters, tree, plans, all_types })
    }

    pub fn tree(&self) -> &PathTree {
        &self.tree
    }

    pub fn get(&self, name: &str) -> Option<&Meter> {
        self.meters().iter().find(|m| m.name == name)
    }

    pub fn meters(&self) -> &[Meter] {
        &self.meters
    }

    pub fn name(&self, index: u16) -> &str {
        &self.meters[index as usize].name
    }

    /// Applies every meter to an event of type `ty` with fields `caps`, appending to `out`.
    pub fn apply(&self, ty: &str, caps: &[Captured<'_>], out: &mut Contribution) -> Result<(), WrongType> {
        let plan = match self.plans.iter().find(|(t, _)| same_key(t.as_bytes(), ty.as_bytes())) {
            Some((_, plan)) => plan,
            None => &self.all_types,
        };
        for &i in plan {
            let m = &self.meters[i as usize];
            match m.aggregation {
                Aggregation::Count => out.additive.push((i, 1)),
                Aggregation::Sum => match &caps[m.slot.expect("sum has a slot")] {
                    Captured::Missing | Captured::U64(0) => {}
                    Captured::U64(v) => out.additive.push((i, *v)),
                    Captured::Str(_) | Captured::Other => return Err(WrongType),
                },
                Aggregation::Unique => match &caps[m.slot.expect("unique has a slot")] {
                    Captured::Missing => {}
                    Captured::Str(s) => out.unique.push((i, unique_hash(s))),
                    Captured::U64(_) | Captured::Other => return Err(WrongType),
                },
            }
        }
        Ok(())
    }
}

/// The `[[meter]]` definitions of a meters file, as written (see [`Meters::compile`]).
pub fn parse_defs(text: &str) -> Result<Vec<MeterDef>, MeterError> {
    let file: MetersFile =
        toml::from_str(text).map_err(|e| MeterError::Invalid(e.to_string().trim_end().to_string()))?;
    Ok(file.meter)
}

/// The default meter set of §4, as shipped in `config/meters.toml`.
pub const DEFAULT_METERS_TOML: &str = include_str!("../config/meters.toml");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{decode_message, Captured};

    fn contribution(meters: &Meters, event: &str) -> Result<Vec<(String, u64)>, WrongType> {
        let mut caps = vec![Captured::Missing; meters.tree().slots()];
        decode_message(event.as_bytes(), meters.tree(), &mut caps).unwrap();
        let Captured::Str(ty) = caps[crate::decode::SLOT_TYPE].clone() else { panic!() };
        let mut c = Contribution::default();
        meters.apply(&ty, &caps, &mut c)?;
        let mut v: Vec<_> = c.additive.iter().map(|(i, v)| (meters.name(*i).to_string(), *v)).collect();
        v.extend(c.unique.iter().map(|(i, h)| (meters.name(*i).to_string(), *h)));
        Ok(v)
    }

    /// The per-type plans pick exactly the meters whose `types` hold the event's type, in
    /// definition order, for named types, unnamed ones and near misses alike.
    #[test]
    fn plans_pick_the_meters_that_apply() {
        let m = Meters::parse(
            r#"
            [[meter]]
            name = "a"
            types = ["x", "generation-create"]
            aggregation = "count"
            [[meter]]
            name = "b"
            types = "all"
            aggregation = "count"
            [[meter]]
            name = "c"
            types = ["generation-create", "generation-update", "x"]
            aggregation = "count"
            [[meter]]
            name = "d"
            types = ["y"]
            aggregation = "count"
            [[meter]]
            name = "e"
            types = "all"
            aggregation = "count"
            "#,
        )
        .unwrap();
        for ty in ["x", "y", "z", "", "generation-create", "generation-update", "generation-creatE", "generation", "xx"]
        {
            let mut c = Contribution::default();
            m.apply(ty, &[], &mut c).unwrap();
            let got: Vec<u16> = c.additive.iter().map(|(i, _)| *i).collect();
            let want: Vec<u16> = (0..5).filter(|&i| m.meters()[i as usize].applies_to(ty)).collect();
            assert_eq!(got, want, "{ty:?}");
        }
        let mut c = Contribution::default();
        m.apply("generation-update", &[], &mut c).unwrap();
        assert_eq!(c.additive, [(1, 1), (2, 1), (4, 1)]);
    }

    #[test]
    fn default_meters_follow_the_contract() {
        let m = Meters::parse(DEFAULT_METERS_TOML).unwrap();
        let names: Vec<_> = m.meters().iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            ["events", "traces", "observations", "scores", "input_tokens", "output_tokens", "unique_users"]
        );
        let gen = r#"{"id":"1","type":"generation-create","body":{"userId":"u-42","usage":{"input":812,"output":96}}}"#;
        assert_eq!(
            contribution(&m, gen).unwrap(),
            [
                ("events".into(), 1),
                ("observations".into(), 1),
                ("input_tokens".into(), 812),
                ("output_tokens".into(), 96),
                ("unique_users".into(), unique_hash("u-42"))
            ]
        );
        let upd = r#"{"id":"1","type":"generation-update","body":{"usage":{"input":5}}}"#;
        assert_eq!(contribution(&m, upd).unwrap(), [("events".into(), 1), ("input_tokens".into(), 5)]);
        let trace = r#"{"id":"1","type":"trace-create","body":{"usage":{"input":-5}}}"#;
        assert_eq!(contribution(&m, trace).unwrap(), [("events".into(), 1), ("traces".into(), 1)]);
        let score = r#"{"id":"1","type":"score-create"}"#;
        assert_eq!(contribution(&m, score).unwrap(), [("events".into(), 1), ("scores".into(), 1)]);
    }

    #[test]
    fn wrong_meter_field_types_are_malformed() {
        let m = Meters::parse(DEFAULT_METERS_TOML).unwrap();
        for e in [
            r#"{"type":"generation-create","body":{"usage":{"input":-1}}}"#,
            r#"{"type":"generation-create","body":{"usage":{"input":1.5}}}"#,
            r#"{"type":"generation-create","body":{"usage":{"output":"12"}}}"#,
            r#"{"type":"span-create","body":{"userId":42}}"#,
        ] {
            assert_eq!(contribution(&m, e), Err(WrongType), "{e}");
        }
    }

    #[test]
    fn bad_definitions_are_rejected() {
        for t in [
            "[[meter]]\nname='a'\ntypes='all'\naggregation='sum'\n",
            "[[meter]]\nname='a'\ntypes='all'\naggregation='count'\npath='x'\n",
            "[[meter]]\nname='a'\ntypes=[]\naggregation='count'\n",
            "[[meter]]\nname='a'\ntypes='all'\naggregation='count'\n[[meter]]\nname='a'\ntypes='all'\naggregation='count'\n",
            "[[meter]]\nname='a'\ntypes='some'\naggregation='count'\n",
            "[[meter]]\nname='a'\ntypes='all'\naggregation='max'\n",
            "[[meter]]\nname='a'\ntypes='all'\naggregation='count'\nfilter=1\n",
        ] {
            assert!(Meters::parse(t).is_err(), "{t}");
        }
    }
}
