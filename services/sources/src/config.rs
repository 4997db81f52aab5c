//! Configuration sources: an application's environment variables (an env file, or variables
//! read from Backstop's own environment), its JSON settings files and, optionally, the
//! non-default settings of a PostgreSQL server, read into one canonical document.
//!
//! # The document (`config.json`, the backup's only part)
//! ```json
//! {"format":"backstop-config","format_version":1,
//!  "env_file":{"path":"/etc/app/.env","bytes":"<base64 of the file exactly as read>"},
//!  "env_vars":{"API_KEY":"..."},
//!  "json_files":[{"path":"/etc/app/settings.json","bytes":"<base64>"}],
//!  "postgres_settings":{"max_connections":"200"}}
//! ```
//! Absent parts are left out. Maps are sorted by name and `json_files` keeps the configured
//! order, so the same configuration always serializes to the same bytes: the keyed hash of those
//! bytes (computed by the caller, which holds the `config` key) is what change detection
//! compares. Files are kept as the exact bytes read, so an import writes back the same file.
//!
//! # Invariants
//! - Values never leave this module except inside the document, which the caller seals:
//!   errors and logs name files, lines and variables, never a value ([`ConfigError`]).
//! - A configured variable that is not set, an env file line that is not `NAME=VALUE` and a JSON
//!   file that does not parse are errors (naming what and where): a backup that silently lost a
//!   secret would restore a broken application.

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use crate::pg::logical::{DumpSink, PartStored, SinkError};

/// The name of the document's part in the repository.
pub const CONFIG_PART: &str = "config.json";
/// `format` of the document.
pub const DOCUMENT_FORMAT: &str = "backstop-config";

/// A configured configuration source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigSource {
    /// An env file (`NAME=VALUE` lines), kept byte for byte.
    pub env_file: Option<PathBuf>,
    /// Variables read from Backstop's own environment when the backup runs.
    pub env_vars: Vec<String>,
    /// JSON settings files, kept byte for byte (they must parse as JSON).
    pub json_files: Vec<PathBuf>,
    /// A PostgreSQL connection whose non-default settings (`pg_settings`) are recorded.
    pub postgres_settings: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the variable {0} is not set in backstop's environment (or is not UTF-8); set it, or remove it from env_vars"
    )]
    MissingVar(String),
    #[error(
        "{path}, line {line}: not a NAME=VALUE line (values are not shown); fix the line or comment it out with #"
    )]
    EnvLine { path: PathBuf, line: usize },
    #[error("{path}: not valid JSON ({why}); json_files must hold JSON documents")]
    NotJson { path: PathBuf, why: String },
    #[error("reading the PostgreSQL settings: {0}")]
    Postgres(String),
    #[error("the configuration document is damaged or not a backstop-config document: {0}")]
    Document(String),
    #[error("storing the configuration document: {0}")]
    Sink(#[source] SinkError),
}

impl ConfigError {
    /// A file that could not be read (a busy or vanished mount), an unreachable server or the
    /// storage may work next time; a missing variable or a bad line will not.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ConfigError::Io { .. } | ConfigError::Postgres(_) | ConfigError::Sink(_)
        )
    }
}

/// A file as read: its path and exact bytes (base64 in the document).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    pub path: String,
    #[serde(with = "b64")]
    pub bytes: Vec<u8>,
}

/// The canonical document (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigDocument {
    pub format: String,
    pub format_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_file: Option<StoredFile>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env_vars: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub json_files: Vec<StoredFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres_settings: Option<BTreeMap<String, String>>,
}

/// What one named item of a document is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemKind {
    /// A variable defined in the env file.
    EnvFile,
    /// A variable read from the environment.
    EnvVar,
    /// A JSON settings file (named by its path).
    JsonFile,
    /// A PostgreSQL setting.
    PostgresSetting,
}

/// One named item and the bytes its keyed hash covers (never shown).
pub struct Item<'a> {
    pub kind: ItemKind,
    pub name: String,
    pub value: std::borrow::Cow<'a, [u8]>,
}

impl ConfigDocument {
    /// The canonical bytes: what is stored and what the keyed hash covers.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing maps of strings and vectors cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<ConfigDocument, ConfigError> {
        let doc: ConfigDocument =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::Document(e.to_string()))?;
        if doc.format != DOCUMENT_FORMAT || doc.format_version != 1 {
            return Err(ConfigError::Document(format!(
                "format {:?} version {}",
                doc.format, doc.format_version
            )));
        }
        Ok(doc)
    }

    /// Every named item, for per-item keyed hashes (what changed, without what it is).
    pub fn items(&self) -> Result<Vec<Item<'_>>, ConfigError> {
        let mut out = Vec::new();
        if let Some(f) = &self.env_file {
            for (name, value) in parse_env(&f.bytes, &f.path)? {
                out.push(Item {
                    kind: ItemKind::EnvFile,
                    name,
                    value: value.into_bytes().into(),
                });
            }
        }
        for (name, value) in &self.env_vars {
            out.push(Item {
                kind: ItemKind::EnvVar,
                name: name.clone(),
                value: value.as_bytes().into(),
            });
        }
        for f in &self.json_files {
            out.push(Item {
                kind: ItemKind::JsonFile,
                name: f.path.clone(),
                value: f.bytes.as_slice().into(),
            });
        }
        for (name, value) in self.postgres_settings.iter().flatten() {
            out.push(Item {
                kind: ItemKind::PostgresSetting,
                name: name.clone(),
                value: value.as_bytes().into(),
            });
        }
        Ok(out)
    }

    /// The variables as an env file: the stored env file's exact bytes, then (when variables
    /// were read from the environment) one `NAME='value'` line for each one the file does not
    /// define.
    pub fn to_env(&self) -> Result<Vec<u8>, ConfigError> {
        let mut out = Vec::new();
        let mut defined = std::collections::BTreeSet::new();
        if let Some(f) = &self.env_file {
            for (name, _) in parse_env(&f.bytes, &f.path)? {
                defined.insert(name);
            }
            out.extend_from_slice(&f.bytes);
        }
        for (name, value) in &self.env_vars {
            if defined.contains(name) {
                continue;
            }
            if !out.is_empty() && !out.ends_with(b"\n") {
                out.push(b'\n');
            }
            out.extend_from_slice(format!("{name}={}\n", quote_env(value)).as_bytes());
        }
        Ok(out)
    }

    /// Everything as one JSON object: `env` (the env file's and the environment's variables),
    /// `json_files` (path -> the parsed document) and `postgres_settings`.
    pub fn to_json(&self) -> Result<serde_json::Value, ConfigError> {
        let mut env = serde_json::Map::new();
        if let Some(f) = &self.env_file {
            for (name, value) in parse_env(&f.bytes, &f.path)? {
                env.insert(name, value.into());
            }
        }
        for (name, value) in &self.env_vars {
            env.insert(name.clone(), value.clone().into());
        }
        let mut files = serde_json::Map::new();
        for f in &self.json_files {
            let v: serde_json::Value =
                serde_json::from_slice(&f.bytes).map_err(|e| ConfigError::NotJson {
                    path: f.path.clone().into(),
                    why: e.to_string(),
                })?;
            files.insert(f.path.clone(), v);
        }
        let mut out = serde_json::json!({ "env": env, "json_files": files });
        if let Some(s) = &self.postgres_settings {
            out["postgres_settings"] = serde_json::json!(s);
        }
        Ok(out)
    }
}

/// Reads `source` into its canonical document (see the module docs).
pub async fn read(source: &ConfigSource) -> Result<ConfigDocument, ConfigError> {
    let read_file = |path: &PathBuf| {
        let path = path.clone();
        async move {
            tokio::fs::read(&path)
                .await
                .map_err(|source| ConfigError::Io {
                    path: path.clone(),
                    source,
                })
                .map(|bytes| StoredFile {
                    path: path.display().to_string(),
                    bytes,
                })
        }
    };
    let env_file = match &source.env_file {
        Some(p) => {
            let f = read_file(p).await?;
            parse_env(&f.bytes, &f.path)?;
            Some(f)
        }
        None => None,
    };
    let mut env_vars = BTreeMap::new();
    for name in &source.env_vars {
        let value = std::env::var(name).map_err(|_| ConfigError::MissingVar(name.clone()))?;
        env_vars.insert(name.clone(), value);
    }
    let mut json_files = Vec::new();
    for p in &source.json_files {
        let f = read_file(p).await?;
        serde_json::from_slice::<serde_json::Value>(&f.bytes).map_err(|e| {
            ConfigError::NotJson {
                path: p.clone(),
                why: e.to_string(),
            }
        })?;
        json_files.push(f);
    }
    let postgres_settings = match &source.postgres_settings {
        Some(conninfo) => Some(pg_settings(conninfo).await?),
        None => None,
    };
    Ok(ConfigDocument {
        format: DOCUMENT_FORMAT.into(),
        format_version: 1,
        env_file,
        env_vars,
        json_files,
        postgres_settings,
    })
}

/// Stores `doc` as the backup's one part.
pub async fn store(doc: &ConfigDocument, sink: &dyn DumpSink) -> Result<PartStored, ConfigError> {
    let bytes = doc.to_bytes();
    sink.put_part(CONFIG_PART, Box::pin(std::io::Cursor::new(bytes)))
        .await
        .map_err(ConfigError::Sink)
}

/// The server's settings that are not at their built-in default (set in postgresql.conf, by
/// `ALTER SYSTEM`, per database or role), by name. Session-level values (`client`, `session`
/// and the like) are left out: they say how Backstop connected, not how the server is set up.
async fn pg_settings(conninfo: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    use sqlx::Row;
    let info = crate::pg::conninfo::ConnInfo::parse(conninfo)
        .map_err(|e| ConfigError::Postgres(e.to_string()))?;
    let mut conn = info
        .connect()
        .await
        .map_err(|e| ConfigError::Postgres(e.to_string()))?;
    let rows = sqlx::query(
        "SELECT name, setting FROM pg_settings \
         WHERE source NOT IN ('default', 'override', 'client', 'session', 'environment variable') \
         ORDER BY name",
    )
    .fetch_all(&mut conn)
    .await
    .map_err(|e| ConfigError::Postgres(format!("{} ({})", e, info.redacted())))?;
    let mut out = BTreeMap::new();
    for row in rows {
        let name: String = row
            .try_get(0)
            .map_err(|e| ConfigError::Postgres(e.to_string()))?;
        let setting: Option<String> = row
            .try_get(1)
            .map_err(|e| ConfigError::Postgres(e.to_string()))?;
        out.insert(name, setting.unwrap_or_default());
    }
    Ok(out)
}

/// The variables of an env file, in file order: `NAME=VALUE` lines, optionally after `export `;
/// blank lines and `#` comments skipped; a value in single quotes is taken as is, one in double
/// quotes with `\n`, `\"` and `\\` unescaped. Errors name the line, never its value.
pub fn parse_env(bytes: &[u8], path: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let bad = |line: usize| ConfigError::EnvLine {
        path: path.into(),
        line,
    };
    let text = std::str::from_utf8(bytes).map_err(|e| {
        // The line of the first byte that is not UTF-8.
        bad(bytes[..e.valid_up_to()]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1)
    })?;
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let (name, value) = line.split_once('=').ok_or_else(|| bad(i + 1))?;
        let name = name.trim_end();
        let valid_name = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            return Err(bad(i + 1));
        }
        let value = value.trim_start();
        let value = if let Some(v) = value.strip_prefix('\'') {
            v.strip_suffix('\'').ok_or_else(|| bad(i + 1))?.to_string()
        } else if let Some(v) = value.strip_prefix('"') {
            let v = v.strip_suffix('"').ok_or_else(|| bad(i + 1))?;
            unescape_double(v)
        } else {
            // Unquoted: a ` #` starts a comment.
            match value.find(" #") {
                Some(at) => value[..at].trim_end().to_string(),
                None => value.trim_end().to_string(),
            }
        };
        out.push((name.to_string(), value));
    }
    Ok(out)
}

fn unescape_double(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A value as a single-quoted env file value (`'` closes and reopens the quotes); one with a
/// newline is double-quoted with `\n`.
fn quote_env(value: &str) -> String {
    if value.contains('\n') || value.contains('\'') {
        let escaped = value
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        format!("\"{escaped}\"")
    } else {
        format!("'{value}'")
    }
}

mod b64 {
    use super::{Engine, STANDARD};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_files_parse_with_quotes_comments_and_export() {
        let text =
            b"# app\nexport A=1\nB = 'x y' \nC=\"l1\\nl2 \\\"q\\\"\"\nD=plain # note\n\nE=\n";
        let vars = parse_env(text, "/e").unwrap();
        assert_eq!(
            vars,
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "x y".into()),
                ("C".into(), "l1\nl2 \"q\"".into()),
                ("D".into(), "plain".into()),
                ("E".into(), "".into()),
            ]
        );
    }

    #[test]
    fn a_bad_env_line_names_the_line_and_not_the_value() {
        let err = parse_env(b"A=1\nsecret-value-xyz\n", "/e").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("line 2"), "{text}");
        assert!(!text.contains("secret-value-xyz"), "{text}");
        assert!(parse_env(b"1A=x\n", "/e").is_err());
        assert!(parse_env(b"A='open\n", "/e").is_err());
    }

    #[tokio::test]
    async fn the_document_keeps_exact_bytes_and_is_canonical() {
        let dir = tempfile::tempdir().unwrap();
        let env = dir.path().join(".env");
        // No newline at the end, a comment, spacing: all given back exactly.
        let env_bytes = b"# prod\nDATABASE_URL=postgres://u:pw@db/app\nAPI_KEY = 'k-1'".to_vec();
        std::fs::write(&env, &env_bytes).unwrap();
        let json = dir.path().join("settings.json");
        std::fs::write(&json, b"{ \"b\": 2,\n  \"a\": 1 }\n").unwrap();
        let source = ConfigSource {
            env_file: Some(env.clone()),
            env_vars: vec!["PATH".into()],
            json_files: vec![json.clone()],
            postgres_settings: None,
        };
        let doc = read(&source).await.unwrap();
        assert_eq!(doc.to_bytes(), read(&source).await.unwrap().to_bytes());
        let back = ConfigDocument::from_bytes(&doc.to_bytes()).unwrap();
        assert_eq!(back, doc);
        let env_out = back.to_env().unwrap();
        assert!(
            env_out.starts_with(&env_bytes),
            "the env file comes back first, exactly"
        );
        assert!(String::from_utf8_lossy(&env_out).contains("\nPATH='"));
        assert_eq!(back.json_files[0].bytes, std::fs::read(&json).unwrap());
        let names: Vec<String> = back.items().unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(
            names,
            vec!["DATABASE_URL", "API_KEY", "PATH", json.to_str().unwrap()]
        );
        assert_eq!(back.to_json().unwrap()["env"]["API_KEY"], "k-1");

        // Without variables from the environment, the env file alone, byte for byte.
        let only = read(&ConfigSource {
            env_file: Some(env),
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(only.to_env().unwrap(), env_bytes);
    }

    #[tokio::test]
    async fn missing_variables_and_bad_json_are_refused() {
        let err = read(&ConfigSource {
            env_vars: vec!["BACKSTOP_TEST_SURELY_UNSET_VAR".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
        assert!(matches!(err, ConfigError::MissingVar(_)), "{err}");
        assert!(!err.is_transient());
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("bad.json");
        std::fs::write(&json, b"{not json").unwrap();
        let err = read(&ConfigSource {
            json_files: vec![json],
            ..Default::default()
        })
        .await
        .unwrap_err();
        assert!(matches!(err, ConfigError::NotJson { .. }), "{err}");
    }
}
