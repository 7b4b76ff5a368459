//! The body of a state-changing request, read into its contract type.
//!
//! Every way a body can be wrong is a 4xx whose message says what to fix:
//! not `application/json` (415 — a browser cannot send that cross-site without
//! a CORS preflight), too large (413), not JSON or not one object (400), or a
//! field that is unknown, missing, repeated, of the wrong type or out of range
//! (400, naming the field), or too slow to arrive (408). serde decides what is wrong; this module words it,
//! because serde's messages name the expected type but not where the value sat.

use std::fmt::{self, Write as _};
use std::marker::PhantomData;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_path_to_error::Segment;

use super::error::ApiError;

/// Request bodies are small JSON objects; anything larger is refused unread.
pub(super) const MAX_BODY: usize = 16 * 1024;
/// A body must arrive within this time (408): one sent a byte at a time would
/// otherwise hold its connection for as long as the sender likes.
pub(crate) const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A request body of type `T` (see the module doc for what is refused).
pub(crate) struct JsonBody<T>(pub(crate) T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<JsonBody<T>, ApiError> {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "send the body as JSON with `Content-Type: application/json`"));
        }
        let read = tokio::time::timeout(BODY_READ_TIMEOUT, read_body(req)).await.map_err(|_| {
            ApiError::new(StatusCode::REQUEST_TIMEOUT, format!("the request body did not arrive within {} s", BODY_READ_TIMEOUT.as_secs()))
        })?;
        let bytes = read?;
        parse(&bytes).map(JsonBody).map_err(ApiError::bad_request)
    }
}

/// A body past [`MAX_BODY`] but within this is read to its end and dropped
/// before the 413 goes out: closing a socket with unread bytes in it resets the
/// connection, and a client still writing its body would see that reset
/// instead of the answer. Larger ones are refused unread.
const MAX_DRAINED: u64 = 1024 * 1024;

/// The whole body, at most [`MAX_BODY`] bytes, or why not (413 after draining
/// what [`MAX_DRAINED`] allows, or the stream's own error).
async fn read_body(req: Request) -> Result<Bytes, ApiError> {
    use futures_util::StreamExt;
    let too_large = || ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("request body exceeds {MAX_BODY} bytes"));
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_DRAINED) {
        return Err(too_large());
    }
    let mut chunks = req.into_body().into_data_stream();
    let mut body = Vec::new();
    let mut seen: u64 = 0;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}")))?;
        seen += chunk.len() as u64;
        if seen > MAX_DRAINED {
            break;
        }
        if seen <= MAX_BODY as u64 {
            body.extend_from_slice(&chunk);
        }
    }
    if seen > MAX_BODY as u64 {
        return Err(too_large());
    }
    Ok(Bytes::from(body))
}

/// `T` from one JSON object and nothing after it, or what is wrong, in words.
fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let mut json = serde_json::Deserializer::from_slice(bytes);
    let Object(value) = serde_path_to_error::deserialize(&mut json).map_err(describe)?;
    json.end().map_err(|e| format!("malformed JSON: {e}"))?;
    Ok(value)
}

/// `T` from a JSON value already parsed (a `[[mappings]]` table of the config
/// file, read with the request type of the API), or what is wrong, worded as
/// the API words it: the same field names, the same expectations.
pub(crate) fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, String> {
    let Object(value) = serde_path_to_error::deserialize(value).map_err(describe)?;
    Ok(value)
}

/// `T` from an object only: a derived struct would also take its fields as an
/// array, in order, which no client means.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Object<T>, D::Error> {
        d.deserialize_map(ObjectVisitor(PhantomData)).map(Object)
    }
}

struct ObjectVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::deserialize(de::value::MapAccessDeserializer::new(map))
    }
}

fn describe(error: serde_path_to_error::Error<serde_json::Error>) -> String {
    let field = field_name(error.path());
    let error = error.into_inner();
    if error.classify() != serde_json::error::Category::Data {
        return format!("malformed JSON: {error}");
    }
    // The body is one short line: the field's name says more than a column.
    let text = error.to_string();
    let position = format!(" at line {} column {}", error.line(), error.column());
    explain(&field, text.strip_suffix(&position).unwrap_or(&text))
}

/// `quota.period`, `allow[3]`; empty for the body itself.
fn field_name(path: &serde_path_to_error::Path) -> String {
    let mut name = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => {
                let _ = write!(name, "[{index}]");
            }
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !name.is_empty() {
                    name.push('.');
                }
                name.push_str(key);
            }
            Segment::Unknown => name.push('?'),
        }
    }
    name
}

/// serde's message about the value at `field`, reworded to start with the
/// field, as the API's messages always have: `` `source_port` must be an
/// integer between 1 and 65535 (got 0) ``. serde's wording of these
/// few cases is stable; anything else keeps it, after the field's name.
fn explain(field: &str, text: &str) -> String {
    let within = |key: &str| if field.is_empty() { key.to_string() } else { format!("{field}.{key}") };
    let subject = if field.is_empty() { "the request body".to_string() } else { format!("`{field}`") };
    let quoted = |rest: &str| rest.split_once('`').map(|(name, after)| (name.to_string(), after.to_string()));
    if let Some((key, expected)) = text.strip_prefix("unknown field `").and_then(quoted) {
        // The path already ends at the unknown key.
        let name = if field == key || field.ends_with(&format!(".{key}")) { field.to_string() } else { within(&key) };
        return format!("unknown field `{name}`{expected}");
    }
    if let Some((key, _)) = text.strip_prefix("missing field `").and_then(quoted) {
        return format!("missing field `{}`", within(&key));
    }
    if let Some((key, _)) = text.strip_prefix("duplicate field `").and_then(quoted) {
        return format!("duplicate key `{}`", within(&key));
    }
    if let Some((got, expected)) = text
        .strip_prefix("invalid type: ")
        .or_else(|| text.strip_prefix("invalid value: "))
        .and_then(|rest| rest.rsplit_once(", expected "))
    {
        return format!("{subject} must be {expected} (got {})", as_json(got));
    }
    if let Some((variant, expected)) = text.strip_prefix("unknown variant `").and_then(quoted) {
        if let Some(expected) = expected.strip_prefix(", expected ") {
            return format!("{subject} must be {expected} (got `{variant}`)");
        }
    }
    match field {
        "" => text.to_string(),
        _ => format!("{subject}: {text}"),
    }
}

/// serde's words for a value (`integer `0``, `string "80"`, `sequence`) as the
/// JSON the client sent (`0`, `"80"`, `an array`).
fn as_json(unexpected: &str) -> String {
    for kind in ["integer `", "floating point `", "boolean `"] {
        if let Some(value) = unexpected.strip_prefix(kind).and_then(|rest| rest.strip_suffix('`')) {
            return value.to_string();
        }
    }
    match unexpected {
        "sequence" => "an array".to_string(),
        "map" => "an object".to_string(),
        "unit value" => "null".to_string(),
        _ => unexpected.strip_prefix("string ").unwrap_or(unexpected).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::contract::{CreateClient, CreateMapping, RemoveClient, UpdateMapping};

    fn refused<T: DeserializeOwned + fmt::Debug>(body: &str) -> String {
        match parse::<T>(body.as_bytes()) {
            Ok(value) => panic!("{body} was accepted as {value:?}"),
            Err(message) => message,
        }
    }

    #[test]
    fn good_bodies_are_read() {
        let create: CreateMapping =
            parse(br#"{"source_port": 8080, "target_host": "db", "target_port": 5432, "use_tunnel": null, "quota": null}"#).unwrap();
        assert_eq!((create.source_port, create.target_port, create.use_tunnel, create.quota), (8080, 5432, false, Some(None)));
        assert_eq!(create.bandwidth_limit, None, "absent stays absent");
        let remove: RemoveClient = parse(br#" {"name": "lab"} "#).unwrap();
        assert!(!remove.force);
    }

    #[test]
    fn every_way_a_body_can_be_wrong_names_what_to_fix() {
        let cases: &[(&str, &str)] = &[
            ("{not json", "malformed JSON"),
            (r#"{"port": 1} {}"#, "malformed JSON: trailing characters"),
            ("", "malformed JSON"),
            ("[1, 2]", "the request body must be a JSON object (got an array)"),
            ("\"port\"", "the request body must be a JSON object"),
            (r#"{"port": 1, "port": 2}"#, "duplicate key `port`"),
            (r#"{"port": 1, "descripton": "x"}"#, "unknown field `descripton`, expected one of"),
            (r#"{"description": "x"}"#, "missing field `port`"),
            (r#"{"port": 0}"#, "`port` must be an integer between 1 and 65535 (got 0)"),
            (r#"{"port": 65536}"#, "`port` must be an integer between 1 and 65535"),
            (r#"{"port": -1}"#, "`port` must be an integer between 1 and 65535 (got -1)"),
            (r#"{"port": "80"}"#, r#"`port` must be an integer between 1 and 65535 (got "80")"#),
            (r#"{"port": 1.5}"#, "`port` must be an integer between 1 and 65535 (got 1.5)"),
            (r#"{"port": null}"#, "`port` must be an integer between 1 and 65535 (got null)"),
            (r#"{"port": 1, "bandwidth_limit": 0}"#, "`bandwidth_limit` must be a positive whole number of bytes per second (got 0)"),
            (r#"{"port": 1, "description": 5}"#, "`description` must be a string (got 5)"),
            (
                r#"{"port": 1, "quota": {"bytes": 1, "period": "week", "action": "block"}}"#,
                "`quota.period` must be `day` or `month` (got `week`)",
            ),
            (
                r#"{"port": 1, "quota": {"bytes": 1, "period": "day", "action": "drop"}}"#,
                "`quota.action` must be `alert` or `block` (got `drop`)",
            ),
            (
                r#"{"port": 1, "quota": {"bytes": 0, "period": "day", "action": "alert"}}"#,
                "`quota.bytes` must be a positive whole number of bytes",
            ),
            (r#"{"port": 1, "quota": {"bytes": 1, "period": "day", "action": "alert", "x": 1}}"#, "unknown field `quota.x`"),
            (r#"{"port": 1, "quota": {"period": "day", "action": "alert"}}"#, "missing field `quota.bytes`"),
            (r#"{"port": 1, "quota": {"bytes": 1, "bytes": 2, "period": "day", "action": "alert"}}"#, "duplicate key `quota.bytes`"),
            (
                r#"{"port": 1, "quota": [1, "day", "alert"]}"#,
                "`quota` must be an object {\"bytes\": N, \"period\": \"day\"|\"month\", \"action\": \"alert\"|\"block\"} (got an array)",
            ),
            (r#"{"port": 1, "allow": ["10.0.0.0/33"]}"#, r#"`allow`: "10.0.0.0/33" is not a CIDR block"#),
            (r#"{"port": 1, "deny": "10.0.0.0/8"}"#, "`deny` must be a list of CIDR blocks"),
            (r#"{"port": 1, "deny": ["10.0.0.0/8", 7]}"#, "`deny[1]` must be a string (got 7)"),
        ];
        for (body, needle) in cases {
            let message = refused::<UpdateMapping>(body);
            assert!(message.contains(needle), "{body}: {message:?} should contain {needle:?}");
        }
        let message = refused::<CreateMapping>(r#"{"source_port": 1, "target_host": "h", "target_port": 2, "use_tunnel": "yes"}"#);
        assert_eq!(message, r#"`use_tunnel` must be a boolean (got "yes")"#);
        assert_eq!(refused::<CreateClient>(r#"{"name": 7}"#), "`name` must be a string (got 7)");
    }
}
