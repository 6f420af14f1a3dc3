//! The JSON-lines mapping of an event, for `weir test`, `weir send --file` and the file sink.
//!
//! One event is one JSON object on one line:
//!
//! ```json
//! {"key":"user-7","value":{"path":"/"},"timestamp_ms":1700000000000,"headers":{"user-agent":"curl/8"},"route":"eu"}
//! ```
//!
//! - `value`: the event's bytes are the JSON text of this value, kept verbatim (no re-ordering,
//!   no re-formatting). A value that is not exactly one JSON text (including JSON with leading or
//!   trailing whitespace, such as `{"a":1}` followed by a newline, which `value` could not carry
//!   back) is written as `value_text` (UTF-8 text) or `value_b64` (anything else, standard
//!   base64); both are accepted on input too. Every event reads back byte for byte.
//! - `key`: a UTF-8 string, or `key_b64`; absent when the event has no key.
//! - `timestamp_ms`: integer milliseconds since the Unix epoch. On input it may be left out:
//!   the reader's default applies (the CLI passes the current time).
//! - `headers`: an object of name → UTF-8 string, or `{"b64": "..."}` for a binary value. When a
//!   name repeats, the output is an array of `[name, value]` pairs instead (accepted on input).
//!   A name that repeats in the object form on input is an error (JSON parsers disagree on
//!   which one wins), naming the header and pointing to the pairs form.
//! - `route`: the route tag, absent when none is set.
//!
//! Unknown fields are an error, so that a typo never silently drops a field.

use crate::{Event, EventRef};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fmt;
use std::io::BufRead;

/// A JSON line that is not an event.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("line {line}: {message}")]
pub struct JsonError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InEvent<'a> {
    key: Option<String>,
    key_b64: Option<String>,
    #[serde(borrow)]
    value: Option<&'a RawValue>,
    value_text: Option<String>,
    value_b64: Option<String>,
    timestamp_ms: Option<i64>,
    headers: Option<InHeaders>,
    route: Option<String>,
}

#[derive(Deserialize, Serialize)]
#[serde(untagged)]
enum HeaderValue {
    Text(String),
    Binary { b64: String },
}

/// Input headers in either form, every entry kept (a JSON map would keep only the last of a
/// repeated name); `object` tells which form they came in.
struct InHeaders {
    entries: Vec<(String, serde_json::Value)>,
    object: bool,
}

impl<'de> Deserialize<'de> for InHeaders {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HeadersVisitor;

        impl<'de> Visitor<'de> for HeadersVisitor {
            type Value = InHeaders;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of header values or an array of [name, value] pairs")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<InHeaders, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(InHeaders {
                    entries,
                    object: true,
                })
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<InHeaders, A::Error> {
                let mut entries = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(entry) = seq.next_element()? {
                    entries.push(entry);
                }
                Ok(InHeaders {
                    entries,
                    object: false,
                })
            }
        }

        deserializer.deserialize_any(HeadersVisitor)
    }
}

#[derive(Serialize)]
struct OutEvent<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_b64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_b64: Option<String>,
    timestamp_ms: i64,
    #[serde(skip_serializing_if = "OutHeaders::is_empty")]
    headers: OutHeaders<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutHeaders<'a> {
    Object(serde_json::Map<String, serde_json::Value>),
    Pairs(Vec<(&'a str, HeaderValue)>),
}

impl OutHeaders<'_> {
    fn is_empty(&self) -> bool {
        match self {
            OutHeaders::Object(map) => map.is_empty(),
            OutHeaders::Pairs(pairs) => pairs.is_empty(),
        }
    }
}

fn decode_b64(field: &str, text: &str) -> Result<Vec<u8>, String> {
    B64.decode(text)
        .map_err(|e| format!("`{field}` is not valid base64: {e}"))
}

fn header_bytes(name: &str, value: HeaderValue) -> Result<Vec<u8>, String> {
    match value {
        HeaderValue::Text(text) => Ok(text.into_bytes()),
        HeaderValue::Binary { b64 } => decode_b64(&format!("headers.{name}.b64"), &b64),
    }
}

/// Parses one JSON line into an event; `default_timestamp_ms` applies when it has none.
pub fn parse_line(line: &str, default_timestamp_ms: i64) -> Result<Event, String> {
    let input: InEvent<'_> = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let key = match (input.key, input.key_b64) {
        (Some(_), Some(_)) => return Err("both `key` and `key_b64` are set".into()),
        (Some(k), None) => Some(k.into_bytes()),
        (None, Some(b)) => Some(decode_b64("key_b64", &b)?),
        (None, None) => None,
    };
    let value = match (input.value, input.value_text, input.value_b64) {
        (Some(raw), None, None) => raw.get().as_bytes().to_vec(),
        (None, Some(text), None) => text.into_bytes(),
        (None, None, Some(b)) => decode_b64("value_b64", &b)?,
        (None, None, None) => return Err("missing `value` (or `value_text`, `value_b64`)".into()),
        _ => return Err("more than one of `value`, `value_text`, `value_b64` is set".into()),
    };
    let headers = match input.headers {
        None => Vec::new(),
        Some(InHeaders { entries, object }) => {
            let mut headers: Vec<(String, Vec<u8>)> = Vec::with_capacity(entries.len());
            for (name, value) in entries {
                if object && headers.iter().any(|(n, _)| *n == name) {
                    return Err(format!(
                        "header `{name}` appears more than once in the `headers` object: \
                         use the pairs form `[[name, value], ...]` to repeat a header"
                    ));
                }
                let value: HeaderValue = serde_json::from_value(value).map_err(|_| {
                    format!("header `{name}` must be a string or {{\"b64\": \"...\"}}")
                })?;
                let value = header_bytes(&name, value)?;
                headers.push((name, value));
            }
            headers
        }
    };
    Ok(Event {
        key,
        value,
        timestamp_ms: input.timestamp_ms.unwrap_or(default_timestamp_ms),
        headers,
        route: input.route,
    })
}

/// Reads JSON lines, skipping blank ones; each error names its line.
pub fn read_lines(
    reader: impl BufRead,
    default_timestamp_ms: i64,
) -> impl Iterator<Item = Result<Event, JsonError>> {
    reader.lines().enumerate().filter_map(move |(i, line)| {
        let line_no = i + 1;
        match line {
            Err(e) => Some(Err(JsonError {
                line: line_no,
                message: e.to_string(),
            })),
            Ok(text) if text.trim().is_empty() => None,
            Ok(text) => {
                Some(
                    parse_line(&text, default_timestamp_ms).map_err(|message| JsonError {
                        line: line_no,
                        message,
                    }),
                )
            }
        }
    })
}

fn header_value(value: &[u8]) -> HeaderValue {
    match std::str::from_utf8(value) {
        Ok(text) => HeaderValue::Text(text.to_owned()),
        Err(_) => HeaderValue::Binary {
            b64: B64.encode(value),
        },
    }
}

fn to_line<'a>(
    key: Option<&'a [u8]>,
    value: &'a [u8],
    timestamp_ms: i64,
    headers: impl Iterator<Item = (&'a str, &'a [u8])> + Clone,
    route: Option<&'a str>,
) -> String {
    let key_text = key.and_then(|k| std::str::from_utf8(k).ok());
    // serde_json trims whitespace around a raw value: use `value` only when that lost nothing.
    let raw = std::str::from_utf8(value)
        .ok()
        .and_then(|text| serde_json::from_str::<&RawValue>(text).ok())
        .filter(|raw| raw.get().len() == value.len());
    let text = raw
        .is_none()
        .then(|| std::str::from_utf8(value).ok())
        .flatten();
    let mut names = std::collections::HashSet::new();
    let unique = headers.clone().all(|(name, _)| names.insert(name));
    let headers = if unique {
        OutHeaders::Object(
            headers
                .map(|(name, v)| {
                    let value = serde_json::to_value(header_value(v)).unwrap_or_default();
                    (name.to_owned(), value)
                })
                .collect(),
        )
    } else {
        OutHeaders::Pairs(headers.map(|(name, v)| (name, header_value(v))).collect())
    };
    let out = OutEvent {
        key: key_text,
        key_b64: key.filter(|_| key_text.is_none()).map(|k| B64.encode(k)),
        value: raw,
        value_text: text,
        value_b64: (raw.is_none() && text.is_none()).then(|| B64.encode(value)),
        timestamp_ms,
        headers,
        route,
    };
    serde_json::to_string(&out).unwrap_or_default()
}

/// One JSON line (without the newline) for an event read from a batch.
pub fn event_ref_to_line(event: &EventRef<'_>) -> String {
    to_line(
        event.key(),
        event.value(),
        event.timestamp_ms(),
        event.headers(),
        event.route(),
    )
}

/// One JSON line (without the newline) for an owned event.
pub fn event_to_line(event: &Event) -> String {
    to_line(
        event.key.as_deref(),
        &event.value,
        event.timestamp_ms,
        event.header_pairs(),
        event.route.as_deref(),
    )
}
