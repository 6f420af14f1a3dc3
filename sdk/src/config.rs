//! A stage's config, as `init` receives it.
//!
//! The pipeline config gives each stage a `with` table; the host passes it to `init` as
//! (key, JSON text of the value) pairs (see the package doc of `wit/weir.wit`): TOML
//! `with = { field = "country_code", table = { US = "United States" } }` arrives as
//! `[("field", "\"country_code\""), ("table", "{\"US\":\"United States\"}")]`. The SDK joins the
//! pairs into one JSON object and deserializes the plugin's config type from it, once, in
//! `init`; a bad config fails `init` with a message that names the key:
//! ``config: missing field `table` ``, ``config: table.US: invalid type: integer `5`, expected a
//! string``.
//!
//! The config type is any `serde::de::DeserializeOwned + Send + Sync + 'static` type: a struct
//! (use `#[serde(default)]` for optional keys and `#[serde(deny_unknown_fields)]` to refuse
//! typos), [`NoConfig`], or [`Config`] for untyped access by key. To validate values or to
//! precompute something once (lowercase a table, build an index), deserialize through
//! `#[serde(try_from = "RawConfig")]`: the `TryFrom` error becomes the `init` error.

use crate::{Error, Result};
use serde::de::{DeserializeOwned, Deserializer, IgnoredAny};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Config accessed by key, for plugins that do not want a config struct.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Config {
    values: Map<String, Value>,
}

impl Config {
    /// Builds the config from (key, JSON text) pairs, as the host passes them to `init`.
    pub fn from_pairs<K, V>(pairs: impl IntoIterator<Item = (K, V)>) -> Result<Self>
    where
        K: Into<String>,
        V: AsRef<str>,
    {
        let mut values = Map::new();
        for (key, text) in pairs {
            let key = key.into();
            let value = serde_json::from_str(text.as_ref())
                .map_err(|e| Error::new(format!("config: `{key}` is not JSON: {e}")))?;
            values.insert(key, value);
        }
        Ok(Config { values })
    }

    /// The value of `key` as a `T`; `None` when the key is absent (or JSON `null`).
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.values.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => T::deserialize(value)
                .map(Some)
                .map_err(|e| Error::new(format!("config: `{key}`: {e}"))),
        }
    }

    /// The value of `key` as a `T`; an error naming the key when it is absent.
    pub fn require<T: DeserializeOwned>(&self, key: &str) -> Result<T> {
        self.get(key)?
            .ok_or_else(|| Error::new(format!("config: missing key `{key}`")))
    }

    /// Whether `key` is set.
    pub fn contains(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }

    /// The keys, sorted (the same on every target, whatever serde_json's map order).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        let mut keys: Vec<&str> = self.values.keys().map(String::as_str).collect();
        keys.sort_unstable();
        keys.into_iter()
    }

    /// The raw JSON value of `key`.
    pub fn value(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    /// Deserializes the whole config (a JSON object) into `C`; errors name the failing path.
    pub fn parse<C: DeserializeOwned>(&self) -> Result<C> {
        serde_path_to_error::deserialize(&self.values)
            .map_err(|e| Error::new(format!("config: {e}")))
    }
}

/// The config type of a plugin that takes none. Any `with` value is accepted and ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoConfig;

impl<'de> Deserialize<'de> for NoConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        IgnoredAny::deserialize(deserializer).map(|_| NoConfig)
    }
}
