//! The configuration file with its environment overrides, read as one serde input.
//!
//! An override `TALLY_<SECTION>_<KEY>=text` is read with the type of the key it sets (PRODUCT.md
//! §10), never guessed from the text: `TALLY_CLICKHOUSE_PASSWORD=123456` is the string "123456",
//! `TALLY_DEDUPE_WINDOW_SECS=60` the integer 60, because the field asks for a string or an integer
//! (the approach of quickwit's `config_value.rs`: parse with the field's own type). Every error
//! about an override names its variable; a variable that sets no known key is an error too.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};

/// A configuration error, with the key or the variable it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerError(pub String);

impl fmt::Display for LayerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LayerError {}

impl de::Error for LayerError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        LayerError(msg.to_string())
    }
}

/// A value of the layered configuration.
#[derive(Debug, Clone)]
pub enum Layered {
    /// A table whose entries may come from the file or the environment.
    Table(BTreeMap<String, Layered>),
    /// A value from the file.
    File(toml::Value),
    /// A value from the environment variable `var`, still text.
    Env { var: String, text: String },
}

impl Layered {
    /// Wraps a file's table.
    pub fn from_file(table: toml::Table) -> Layered {
        Layered::Table(table.into_iter().map(|(k, v)| (k, Layered::file_value(v))).collect())
    }

    fn file_value(v: toml::Value) -> Layered {
        match v {
            toml::Value::Table(t) => Layered::from_file(t),
            v => Layered::File(v),
        }
    }

    /// Sets `section.key` from the variable `var` (overriding the file).
    pub fn set_env(&mut self, section: &str, key: &str, var: &str, text: &str) -> Result<(), LayerError> {
        let Layered::Table(root) = self else { unreachable!("the root is a table") };
        let sec = root.entry(section.to_string()).or_insert_with(|| Layered::Table(BTreeMap::new()));
        let Layered::Table(sec) = sec else {
            return Err(LayerError(format!("{var}: [{section}] in the file is not a table")));
        };
        sec.insert(key.to_string(), Layered::Env { var: var.to_string(), text: text.to_string() });
        Ok(())
    }
}

fn unsupported(var: &str, what: &str) -> LayerError {
    LayerError(format!("{var}: this key takes {what}, which cannot be set from the environment; set it in the file"))
}

/// Deserializes one environment value with the type the field asks for.
struct EnvValue<'a> {
    var: &'a str,
    text: &'a str,
}

impl EnvValue<'_> {
    fn parse<T: std::str::FromStr>(&self, what: &str) -> Result<T, LayerError>
    where
        T::Err: fmt::Display,
    {
        self.text.trim().parse().map_err(|e| LayerError(format!("{}: {:?} is not {what}: {e}", self.var, self.text)))
    }
}

macro_rules! parse_as {
    ($($method:ident $visit:ident $t:ty, $what:literal;)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, LayerError> {
            let v: $t = self.parse($what)?;
            visitor.$visit(v).map_err(|e: LayerError| LayerError(format!("{}: {e}", self.var)))
        }
    )*};
}

impl<'de> de::Deserializer<'de> for EnvValue<'_> {
    type Error = LayerError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, LayerError> {
        visitor.visit_str(self.text).map_err(|e: LayerError| LayerError(format!("{}: {e}", self.var)))
    }

    parse_as! {
        deserialize_bool visit_bool bool, "true or false";
        deserialize_i8 visit_i8 i8, "an integer";
        deserialize_i16 visit_i16 i16, "an integer";
        deserialize_i32 visit_i32 i32, "an integer";
        deserialize_i64 visit_i64 i64, "an integer";
        deserialize_u8 visit_u8 u8, "a non-negative integer";
        deserialize_u16 visit_u16 u16, "a non-negative integer";
        deserialize_u32 visit_u32 u32, "a non-negative integer";
        deserialize_u64 visit_u64 u64, "a non-negative integer";
        deserialize_f32 visit_f32 f32, "a number";
        deserialize_f64 visit_f64 f64, "a number";
        deserialize_char visit_char char, "one character";
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, LayerError> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &'static str, visitor: V) -> Result<V::Value, LayerError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, LayerError> {
        let var = self.var;
        visitor
            .visit_enum(IntoDeserializer::<LayerError>::into_deserializer(self.text))
            .map_err(|e| LayerError(format!("{var}: {e}")))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, _: V) -> Result<V::Value, LayerError> {
        Err(unsupported(self.var, "a list"))
    }

    fn deserialize_map<V: Visitor<'de>>(self, _: V) -> Result<V::Value, LayerError> {
        Err(unsupported(self.var, "a table"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, LayerError> {
        Err(unsupported(self.var, "a table"))
    }

    serde::forward_to_deserialize_any! {
        str string bytes byte_buf unit unit_struct tuple tuple_struct identifier ignored_any
    }
}

/// Integers, booleans and strings of an environment value are read with the field's type: the
/// derived `Deserialize` of a struct calls `deserialize_u64` etc. on each value, which for
/// [`Layered::Env`] must reach [`EnvValue`], never `deserialize_any`.
macro_rules! typed_leaf {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, LayerError> {
            match self {
                Layered::File(v) => v.$method(visitor).map_err(file_error),
                Layered::Env { var, text } => EnvValue { var: &var, text: &text }.$method(visitor),
                t @ Layered::Table(_) => t.deserialize_any(visitor),
            }
        }
    )*};
}

impl<'de> de::Deserializer<'de> for Layered {
    type Error = LayerError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, LayerError> {
        match self {
            Layered::Table(t) => visitor.visit_map(Entries::new(t, None)),
            Layered::File(v) => v.deserialize_any(visitor).map_err(file_error),
            Layered::Env { var, text } => EnvValue { var: &var, text: &text }.deserialize_any(visitor),
        }
    }

    typed_leaf! {
        deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64 deserialize_u8
        deserialize_u16 deserialize_u32 deserialize_u64 deserialize_f32 deserialize_f64 deserialize_char
        deserialize_str deserialize_string deserialize_seq deserialize_map
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, LayerError> {
        match self {
            Layered::Table(t) => visitor.visit_map(Entries::new(t, Some(fields))),
            Layered::File(v) => v.deserialize_struct(name, fields, visitor).map_err(file_error),
            Layered::Env { var, text } => EnvValue { var: &var, text: &text }.deserialize_struct(name, fields, visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, LayerError> {
        match self {
            Layered::File(v) => v.deserialize_option(visitor).map_err(file_error),
            other => visitor.visit_some(other),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, LayerError> {
        match self {
            Layered::File(v) => v.deserialize_newtype_struct(name, visitor).map_err(file_error),
            other => visitor.visit_newtype_struct(other),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, LayerError> {
        match self {
            Layered::File(v) => v.deserialize_enum(name, variants, visitor).map_err(file_error),
            Layered::Env { var, text } => EnvValue { var: &var, text: &text }.deserialize_enum(name, variants, visitor),
            Layered::Table(_) => Err(LayerError(format!("a table where {name} was expected"))),
        }
    }

    serde::forward_to_deserialize_any! {
        i128 u128 bytes byte_buf unit unit_struct tuple tuple_struct identifier ignored_any
    }
}

fn file_error(e: toml::de::Error) -> LayerError {
    LayerError(e.message().to_string())
}

/// The entries of a table; with `fields`, an environment variable naming no field is an error
/// that names the variable (file keys are checked by `deny_unknown_fields`).
struct Entries {
    iter: std::collections::btree_map::IntoIter<String, Layered>,
    fields: Option<&'static [&'static str]>,
    current: Option<(String, Layered)>,
}

impl Entries {
    fn new(t: BTreeMap<String, Layered>, fields: Option<&'static [&'static str]>) -> Self {
        Entries { iter: t.into_iter(), fields, current: None }
    }
}

impl<'de> MapAccess<'de> for Entries {
    type Error = LayerError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, LayerError> {
        let Some((key, value)) = self.iter.next() else { return Ok(None) };
        if let (Some(fields), Layered::Env { var, .. }) = (self.fields, &value) {
            if !fields.contains(&key.as_str()) {
                return Err(LayerError(format!("{var}: unknown key {key:?} (known: {})", fields.join(", "))));
            }
        }
        let k = seed.deserialize(IntoDeserializer::<LayerError>::into_deserializer(key.as_str()))?;
        self.current = Some((key, value));
        Ok(Some(k))
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, LayerError> {
        let (key, value) = self.current.take().expect("next_value after next_key");
        let from_env = matches!(value, Layered::Env { .. });
        seed.deserialize(value).map_err(|e| if from_env { e } else { LayerError(format!("key {key:?}: {e}")) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Root {
        #[serde(default)]
        s: Section,
    }

    #[derive(Debug, Deserialize, PartialEq, Default)]
    #[serde(deny_unknown_fields)]
    struct Section {
        #[serde(default)]
        name: String,
        #[serde(default)]
        n: u64,
        #[serde(default)]
        on: bool,
        #[serde(default)]
        maybe: Option<String>,
        #[serde(default)]
        path: std::path::PathBuf,
        #[serde(default)]
        map: BTreeMap<String, String>,
    }

    fn load(file: &str, env: &[(&str, &str, &str)]) -> Result<Root, LayerError> {
        let mut l = Layered::from_file(toml::from_str(file).unwrap());
        for (k, var, text) in env {
            l.set_env("s", k, var, text)?;
        }
        Root::deserialize(l)
    }

    #[test]
    fn overrides_take_the_type_of_their_key() {
        let r = load(
            "",
            &[
                ("name", "T_S_NAME", "123456"),
                ("n", "T_S_N", "7"),
                ("on", "T_S_ON", "true"),
                ("maybe", "T_S_MAYBE", "2024"),
                ("path", "T_S_PATH", "42"),
            ],
        )
        .unwrap();
        assert_eq!(r.s.name, "123456");
        assert_eq!(r.s.n, 7);
        assert!(r.s.on);
        assert_eq!(r.s.maybe.as_deref(), Some("2024"));
        assert_eq!(r.s.path, std::path::PathBuf::from("42"));
        // The file keeps its own types; env wins over the file.
        let r = load("[s]\nname = \"a\"\nn = 3\n[s.map]\nx = \"y\"\n", &[("name", "T_S_NAME", "false")]).unwrap();
        assert_eq!((r.s.name.as_str(), r.s.n, r.s.map.len()), ("false", 3, 1));
    }

    #[test]
    fn bad_overrides_name_their_variable() {
        for (env, needle) in [
            (("n", "T_S_N", "seven"), "T_S_N"),
            (("n", "T_S_N", "-1"), "T_S_N"),
            (("on", "T_S_ON", "yes"), "T_S_ON"),
            (("port", "T_S_PORT", "9092"), "T_S_PORT"),
            (("map", "T_S_MAP", "x=y"), "T_S_MAP"),
        ] {
            let err = load("", &[env]).unwrap_err().to_string();
            assert!(err.contains(needle), "{env:?}: {err}");
        }
        let err = load("[s]\nn = \"x\"\n", &[]).unwrap_err().to_string();
        assert!(err.contains("\"n\""), "{err}");
    }
}
