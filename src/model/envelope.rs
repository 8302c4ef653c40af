//! The message envelope, wire-compatible with the TypeScript RedStream (docs/design.md, "Envelope and naming").
//!
//! Owns how a message's fields are encoded for XADD and viewed after a read: flat fields, values as
//! text, objects/arrays/null as JSON, plus the `_timestamp` / `_source` / `_trace_id` stamp. Values are
//! kept as raw bytes end to end, so a non-UTF-8 value survives a round trip; the JSON view is only a view.
//! Talking to Redis is [`crate::client`]'s job.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{Map, Value};

/// Epoch milliseconds at publish, as a decimal string.
pub const TIMESTAMP: &str = "_timestamp";
/// The verified identity of the publisher; never taken from the caller's fields.
pub const SOURCE: &str = "_source";
/// Correlates a message with everything it causes; kept when the publisher gives one.
pub const TRACE_ID: &str = "_trace_id";
/// On replies: `<source stream>/<source id>` of the message that caused them.
pub const CAUSE: &str = "_cause";

/// The fields of one stream entry, in order, as raw bytes. Duplicated names are kept as Redis keeps them;
/// lookups return the first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fields(Vec<(Vec<u8>, Vec<u8>)>);

impl Fields {
    pub fn new() -> Self {
        Fields(Vec::new())
    }

    pub fn with_capacity(n: usize) -> Self {
        Fields(Vec::with_capacity(n))
    }

    /// Appends a field.
    pub fn push(&mut self, name: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.0.push((name.into(), value.into()));
    }

    /// Replaces the first field called `name`, or appends it.
    pub fn set(&mut self, name: &str, value: impl Into<Vec<u8>>) {
        match self.0.iter_mut().find(|(n, _)| n == name.as_bytes()) {
            Some((_, v)) => *v = value.into(),
            None => self.0.push((name.into(), value.into())),
        }
    }

    /// Removes every field called `name`, returning the first one's value.
    pub fn take(&mut self, name: &str) -> Option<Vec<u8>> {
        let at = self.0.iter().position(|(n, _)| n == name.as_bytes())?;
        let (_, value) = self.0.remove(at);
        self.remove(name);
        Some(value)
    }

    /// Removes every field called `name`.
    pub fn remove(&mut self, name: &str) {
        self.0.retain(|(n, _)| n != name.as_bytes());
    }

    /// The raw value of the first field called `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(n, _)| n == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// The value of `name` if it is present and UTF-8.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&[u8], &[u8])> {
        self.0.iter().map(|(n, v)| (n.as_slice(), v.as_slice()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_vec(self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.0
    }

    /// Encodes a JSON object the way the original did: one flat field per key; strings as they are,
    /// numbers and booleans as their text, objects, arrays and null as JSON.
    pub fn from_json_object(object: &Map<String, Value>) -> Fields {
        let mut fields = Fields::with_capacity(object.len() + 3);
        for (name, value) in object {
            fields.push(name.as_str(), encode_value(value));
        }
        fields
    }

    /// Adds the envelope: `_timestamp` = `now_ms`, `_source` = `source` (replacing whatever the caller put
    /// there, since it is the verified publisher), and `_trace_id` unless one is already present.
    pub fn stamp(&mut self, source: &str, now_ms: u64) {
        self.set(TIMESTAMP, now_ms.to_string());
        self.set(SOURCE, source);
        if self.get(TRACE_ID).is_none_or(<[u8]>::is_empty) {
            self.set(TRACE_ID, new_trace_id());
        }
    }

    /// The JSON view: `{"fields": {name: value}, "binary": {name: base64}}`. Text that is a JSON object,
    /// array or null is shown decoded (the inverse of [`Fields::from_json_object`]); other text stays a
    /// string; values that are not UTF-8 go to `binary`, base64-encoded, so nothing is lost or mangled.
    pub fn to_json(&self) -> Value {
        let mut text = Map::new();
        let mut binary = Map::new();
        for (name, value) in self.iter() {
            let name = String::from_utf8_lossy(name).into_owned();
            match std::str::from_utf8(value) {
                Ok(s) => {
                    text.entry(name).or_insert_with(|| decode_text(s));
                }
                Err(_) => {
                    let b64 = base64::engine::general_purpose::STANDARD.encode(value);
                    binary.entry(name).or_insert(Value::String(b64));
                }
            }
        }
        let mut view = Map::new();
        view.insert("fields".into(), Value::Object(text));
        if !binary.is_empty() {
            view.insert("binary".into(), Value::Object(binary));
        }
        Value::Object(view)
    }
}

impl<N: Into<Vec<u8>>, V: Into<Vec<u8>>> FromIterator<(N, V)> for Fields {
    fn from_iter<T: IntoIterator<Item = (N, V)>>(iter: T) -> Self {
        Fields(
            iter.into_iter()
                .map(|(n, v)| (n.into(), v.into()))
                .collect(),
        )
    }
}

impl From<Vec<(Vec<u8>, Vec<u8>)>> for Fields {
    fn from(v: Vec<(Vec<u8>, Vec<u8>)>) -> Self {
        Fields(v)
    }
}

/// One stream entry. The entry id lives beside the fields, so a user field named `id` never hides it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub fields: Fields,
}

impl Entry {
    /// `{"id": …, "stream": …, "fields": {…}, "binary": {…}}`, one line of `redstream read` output.
    pub fn to_json(&self, stream: &str) -> Value {
        let mut view = Map::new();
        view.insert("id".into(), Value::String(self.id.clone()));
        view.insert("stream".into(), Value::String(stream.to_owned()));
        if let Value::Object(fields) = self.fields.to_json() {
            view.extend(fields);
        }
        Value::Object(view)
    }
}

/// The wire text of one JSON value.
pub fn encode_value(value: &Value) -> Vec<u8> {
    match value {
        Value::String(s) => s.clone().into_bytes(),
        Value::Number(n) => n.to_string().into_bytes(),
        Value::Bool(b) => b.to_string().into_bytes(),
        Value::Null | Value::Array(_) | Value::Object(_) => {
            serde_json::to_vec(value).expect("serializing a serde_json::Value cannot fail")
        }
    }
}

fn decode_text(s: &str) -> Value {
    let t = s.trim_start();
    if (t.starts_with('{') || t.starts_with('[') || t == "null")
        && let Ok(v) = serde_json::from_str::<Value>(s)
    {
        return v;
    }
    Value::String(s.to_owned())
}

/// A fresh random trace id (UUID v4, hyphenated).
pub fn new_trace_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
