//! Query-string and body parsing that turns every malformed input into a 400 with a message.
//!
//! Axum's own extractors answer malformed input with plain-text rejections; these wrap them so
//! that the API's one error format ([`crate::error::ApiError`]) is used everywhere. Unknown
//! parameter names are refused too: a typo such as `?tpye=` silently ignored would return the
//! wrong rows.

use std::collections::HashMap;

use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use chrono::{DateTime, NaiveDate, Utc};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::error::ApiError;

/// The query string as name -> value (the last value wins for repeated names).
pub struct Params(HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Query(map) = Query::<HashMap<String, String>>::try_from_uri(&parts.uri)
            .map_err(|e| ApiError::bad(format!("malformed query string: {}", e.body_text())))?;
        Ok(Params(map))
    }
}

impl Params {
    pub fn from_map(map: HashMap<String, String>) -> Params {
        Params(map)
    }

    /// Refuses parameters not in `known`.
    pub fn only(&self, known: &[&str]) -> Result<(), ApiError> {
        let mut unknown: Vec<&String> = self
            .0
            .keys()
            .filter(|k| !known.contains(&k.as_str()))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        unknown.sort();
        Err(ApiError::bad(format!(
            "unknown parameter {}; this endpoint takes: {}",
            unknown
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", "),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )))
    }

    /// A non-empty text value, or `None` when absent or empty.
    pub fn text(&self, name: &str) -> Option<String> {
        self.0
            .get(name)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    /// A bounded text value (identifiers, names): at most `max` characters.
    pub fn short(&self, name: &str, max: usize) -> Result<Option<String>, ApiError> {
        match self.text(name) {
            Some(s) if s.chars().count() > max => Err(ApiError::bad(format!(
                "`{name}` is longer than {max} characters"
            ))),
            other => Ok(other),
        }
    }

    /// An unsigned integer in `[min, max]`, or `default` when absent.
    pub fn uint(&self, name: &str, default: u64, min: u64, max: u64) -> Result<u64, ApiError> {
        match self.text(name) {
            None => Ok(default),
            Some(s) => {
                let v: u64 = s.parse().map_err(|_| {
                    ApiError::bad(format!(
                        "`{name}` must be a whole number between {min} and {max}, got {s:?}"
                    ))
                })?;
                if v < min || v > max {
                    return Err(ApiError::bad(format!(
                        "`{name}` must be between {min} and {max}, got {v}"
                    )));
                }
                Ok(v)
            }
        }
    }

    pub fn opt_uint(&self, name: &str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
        match self.text(name) {
            None => Ok(None),
            Some(_) => self.uint(name, 0, min, max).map(Some),
        }
    }

    /// A time: RFC 3339 (`2025-01-31T02:00:00Z`, offsets allowed) or a date (`2025-01-31`,
    /// midnight UTC).
    pub fn time(&self, name: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
        match self.text(name) {
            None => Ok(None),
            Some(s) => parse_time(&s)
                .map(Some)
                .map_err(|why| ApiError::bad(format!("`{name}`: {why}"))),
        }
    }

    pub fn uuid(&self, name: &str) -> Result<Option<Uuid>, ApiError> {
        match self.text(name) {
            None => Ok(None),
            Some(s) => s
                .parse()
                .map(Some)
                .map_err(|_| ApiError::bad(format!("`{name}` must be a UUID, got {s:?}"))),
        }
    }
}

/// Parses an RFC 3339 time or a plain date (midnight UTC).
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d")
        && let Some(t) = d.and_hms_opt(0, 0, 0)
    {
        return Ok(t.and_utc());
    }
    Err(format!(
        "{s:?} is not a time; use RFC 3339 (2025-01-31T02:00:00Z) or a date (2025-01-31)"
    ))
}

/// A JSON body whose rejections (wrong content type, bad JSON, missing fields) are 400s in the
/// API's error format.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(JsonBody(v)),
            // A body without a length that grows past `api.max_body_bytes` while it is read.
            Err(e) if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => Err(
                ApiError::TooLarge(format!("the request body is too large: {}", e.body_text())),
            ),
            Err(e) => Err(ApiError::bad(format!(
                "malformed request body: {}",
                e.body_text()
            ))),
        }
    }
}

/// A path segment that must be a UUID.
pub fn path_uuid(s: &str, what: &str) -> Result<Uuid, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad(format!("{what} must be a UUID, got {s:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Params {
        Params(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn numbers_times_and_unknown_names_are_checked() {
        assert!(p(&[("limit", "x")]).uint("limit", 50, 1, 1000).is_err());
        assert!(p(&[("limit", "0")]).uint("limit", 50, 1, 1000).is_err());
        assert_eq!(p(&[]).uint("limit", 50, 1, 1000).unwrap(), 50);
        assert!(p(&[("from", "yesterday")]).time("from").is_err());
        assert!(p(&[("from", "2025-01-31")]).time("from").unwrap().is_some());
        assert!(
            p(&[("from", "2025-01-31T02:00:00-05:00")])
                .time("from")
                .unwrap()
                .is_some()
        );
        let e = p(&[("tpye", "x")]).only(&["type"]).unwrap_err().to_string();
        assert!(e.contains("tpye"), "{e}");
    }
}
