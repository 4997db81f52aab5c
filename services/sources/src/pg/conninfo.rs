//! PostgreSQL connection strings.
//!
//! Accepted forms, as libpq accepts them:
//! - a URL: `postgres://user:password@host:port/dbname?sslmode=...&host=/socket/dir`
//!   (`postgresql://` too; user, password and database percent-encoded);
//! - `key=value` pairs: `host=db1 port=5432 user=backup dbname=trading password='s3 cret'`
//!   (values may be single-quoted, with `\'` and `\\` escapes).
//!
//! Invariants:
//! - The password is kept apart from everything else. [`ConnInfo::redacted`] and `Display` never
//!   show it; external tools get a URL without it (`--dbname=...`) and the password through the
//!   `PGPASSWORD` environment variable, so it never appears in `ps` output or in logs.
//! - sqlx and the libpq tools are given the same host, port, user, database and parameters, so a
//!   dump's `COPY` workers and its `pg_dump` read the same server.

use std::fmt;
use std::str::FromStr;

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use tokio::process::Command;

use crate::error::SourceError;

/// A parsed PostgreSQL connection string.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnInfo {
    user: Option<String>,
    password: Option<String>,
    /// Host name, IP address, or a Unix socket directory (starts with `/`).
    host: Option<String>,
    port: Option<u16>,
    dbname: Option<String>,
    /// Every other parameter (`sslmode`, `application_name`, ...), decoded, in input order.
    params: Vec<(String, String)>,
}

impl ConnInfo {
    /// Parses a URL or a `key=value` connection string.
    pub fn parse(input: &str) -> Result<ConnInfo, SourceError> {
        let s = input.trim();
        let lower = s.to_ascii_lowercase();
        let parsed = if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            parse_url(s)
        } else if s.contains('=') {
            parse_key_values(s)
        } else {
            Err("expected a postgres:// URL or key=value pairs".to_string())
        };
        parsed.map_err(|why| SourceError::InvalidConninfo {
            // Never echo the input: it may hold a password.
            why,
        })
    }

    /// The database name, if the connection string names one (libpq otherwise uses the user name).
    pub fn database(&self) -> Option<&str> {
        self.dbname.as_deref()
    }

    /// The same server and credentials, another database.
    pub fn with_database(&self, dbname: &str) -> ConnInfo {
        let mut c = self.clone();
        c.dbname = Some(dbname.to_string());
        c
    }

    /// `user@host:port`, for messages; never the password.
    pub fn server(&self) -> String {
        let mut out = String::new();
        if let Some(u) = &self.user {
            out.push_str(u);
            out.push('@');
        }
        out.push_str(self.host.as_deref().unwrap_or("localhost"));
        if let Some(p) = self.port {
            out.push(':');
            out.push_str(&p.to_string());
        }
        out
    }

    /// Where the connection goes: the host (or socket directory; empty for libpq's default),
    /// the port (5432 when unset) and the database (the user's name when unset, as libpq does).
    pub fn place(&self) -> (String, u16, String) {
        (
            self.host.clone().unwrap_or_default(),
            self.port.unwrap_or(5432),
            self.dbname
                .clone()
                .or_else(|| self.user.clone())
                .unwrap_or_default(),
        )
    }

    /// Whether the connection carries a password.
    pub fn has_password(&self) -> bool {
        self.password.is_some()
    }

    /// `user@host:port/dbname`, for messages; never the password.
    pub fn redacted(&self) -> String {
        let mut out = self.server();
        out.push('/');
        out.push_str(self.dbname.as_deref().unwrap_or("(default database)"));
        out
    }

    /// The URL form, with or without the password.
    /// The connection as a `postgres://` URL, password included: for connecting, never for
    /// printing (use [`ConnInfo::redacted`]).
    pub fn url(&self) -> String {
        self.to_url(true)
    }

    fn to_url(&self, with_password: bool) -> String {
        let mut url = String::from("postgres://");
        if let Some(u) = &self.user {
            url.push_str(&percent_encode(u));
            if with_password && let Some(p) = &self.password {
                url.push(':');
                url.push_str(&percent_encode(p));
            }
            url.push('@');
        }
        match &self.host {
            // A socket directory is the host, percent-encoded: libpq and sqlx both read it so.
            Some(h) if h.starts_with('/') => url.push_str(&percent_encode(h)),
            Some(h) if h.contains(':') && !h.starts_with('[') => {
                url.push('[');
                url.push_str(h);
                url.push(']');
            }
            Some(h) => url.push_str(h),
            None => {}
        }
        if let Some(p) = self.port {
            url.push(':');
            url.push_str(&p.to_string());
        }
        url.push('/');
        if let Some(d) = &self.dbname {
            url.push_str(&percent_encode(d));
        }
        if !self.params.is_empty() {
            url.push('?');
            let pairs: Vec<String> = self
                .params
                .iter()
                .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
                .collect();
            url.push_str(&pairs.join("&"));
        }
        url
    }

    /// sqlx options for this connection string.
    pub(crate) fn connect_options(&self) -> Result<PgConnectOptions, SourceError> {
        let opts = PgConnectOptions::from_str(&self.to_url(true))
            .map_err(|e| SourceError::InvalidConninfo { why: e.to_string() })?;
        // sqlx logs every statement at INFO by default; keep logs to what an operator needs.
        // Dumps and restores run long statements by design: not worth a warning each.
        Ok(opts
            .log_statements(tracing::log::LevelFilter::Debug)
            .log_slow_statements(
                tracing::log::LevelFilter::Debug,
                std::time::Duration::from_secs(60),
            ))
    }

    /// Opens one connection, mapping failures to errors that name the server (never the password)
    /// and say what to check.
    pub(crate) async fn connect(&self) -> Result<PgConnection, SourceError> {
        let opts = self.connect_options()?;
        opts.connect()
            .await
            .map_err(|e| SourceError::connect(self, e))
    }

    /// [`ConnInfo::connect`] to a database that is to be read (backed up): a missing database is
    /// [`SourceError::SourceDatabaseMissing`], whose advice is to name the right one.
    pub(crate) async fn connect_source(&self) -> Result<PgConnection, SourceError> {
        self.connect().await.map_err(SourceError::reading_source)
    }

    /// Points an external libpq tool (`pg_dump`, `pg_restore`) at this database: the URL without
    /// the password as `--dbname`, and the password in `PGPASSWORD`.
    pub(crate) fn apply_to_tool(&self, cmd: &mut Command) {
        cmd.arg(format!("--dbname={}", self.to_url(false)));
        if let Some(p) = &self.password {
            cmd.env("PGPASSWORD", p);
        }
        // Our own settings decide the session; a stray PGOPTIONS could change output formats.
        cmd.env_remove("PGOPTIONS");
        cmd.env("PGAPPNAME", "backstop");
    }
}

impl fmt::Display for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnInfo({})", self.redacted())
    }
}

fn set_field(c: &mut ConnInfo, key: &str, value: String) -> Result<(), String> {
    match key {
        "user" => c.user = Some(value),
        "password" => c.password = Some(value),
        "host" => c.host = Some(value),
        "port" => {
            c.port = Some(
                value
                    .parse()
                    .map_err(|_| format!("port {value:?} is not a number between 1 and 65535"))?,
            )
        }
        "dbname" => c.dbname = Some(value),
        _ => c.params.push((key.to_string(), value)),
    }
    Ok(())
}

fn parse_url(s: &str) -> Result<ConnInfo, String> {
    let mut c = ConnInfo {
        user: None,
        password: None,
        host: None,
        port: None,
        dbname: None,
        params: Vec::new(),
    };
    let rest = &s[s.find("://").map(|i| i + 3).unwrap_or(0)..];
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let hostport = match authority.rfind('@') {
        Some(i) => {
            let userinfo = &authority[..i];
            match userinfo.split_once(':') {
                Some((u, p)) => {
                    c.user = Some(percent_decode(u)?);
                    c.password = Some(percent_decode(p)?);
                }
                None => c.user = Some(percent_decode(userinfo)?),
            }
            &authority[i + 1..]
        }
        None => authority,
    };
    if c.user.as_deref() == Some("") {
        c.user = None;
    }
    if !hostport.is_empty() {
        let (host, port) = if let Some(stripped) = hostport.strip_prefix('[') {
            let end = stripped
                .find(']')
                .ok_or_else(|| "unterminated [ in an IPv6 host".to_string())?;
            let after = &stripped[end + 1..];
            (&stripped[..end], after.strip_prefix(':'))
        } else if hostport.contains(',') {
            return Err("several hosts in one URL are not supported; name one server".into());
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if !host.is_empty() {
            c.host = Some(percent_decode(host)?);
        }
        if let Some(p) = port.filter(|p| !p.is_empty()) {
            set_field(&mut c, "port", p.to_string())?;
        }
    }
    if let Some(path) = path.filter(|p| !p.is_empty()) {
        c.dbname = Some(percent_decode(path)?);
    }
    if let Some(q) = query {
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            set_field(&mut c, &percent_decode(k)?, percent_decode(v)?)?;
        }
    }
    Ok(c)
}

fn parse_key_values(s: &str) -> Result<ConnInfo, String> {
    let mut c = ConnInfo {
        user: None,
        password: None,
        host: None,
        port: None,
        dbname: None,
        params: Vec::new(),
    };
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|ch| ch.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&ch) = chars.peek() {
            if ch == '=' || ch.is_whitespace() {
                break;
            }
            key.push(ch);
            chars.next();
        }
        while chars.peek().is_some_and(|ch| ch.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(format!("expected `=` after {key:?}"));
        }
        while chars.peek().is_some_and(|ch| ch.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            let mut closed = false;
            while let Some(ch) = chars.next() {
                match ch {
                    '\\' => match chars.next() {
                        Some(esc) => value.push(esc),
                        None => break,
                    },
                    '\'' => {
                        closed = true;
                        break;
                    }
                    _ => value.push(ch),
                }
            }
            if !closed {
                return Err(format!("unterminated quoted value for {key:?}"));
            }
        } else {
            while let Some(&ch) = chars.peek() {
                if ch.is_whitespace() {
                    break;
                }
                chars.next();
                if ch == '\\' {
                    if let Some(esc) = chars.next() {
                        value.push(esc);
                    }
                } else {
                    value.push(ch);
                }
            }
        }
        if key == "hostaddr" {
            // libpq's numeric address; sqlx connects to it as a host.
            set_field(&mut c, "host", value)?;
        } else {
            set_field(&mut c, &key, value)?;
        }
    }
    Ok(c)
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "bad percent-encoding in the URL".to_string())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the URL decodes to invalid UTF-8".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_password_is_split_off_and_never_shown() {
        let c =
            ConnInfo::parse("postgres://backup:s%40cret@db1:5433/trading?sslmode=disable").unwrap();
        assert_eq!(c.user.as_deref(), Some("backup"));
        assert_eq!(c.password.as_deref(), Some("s@cret"));
        assert_eq!(c.host.as_deref(), Some("db1"));
        assert_eq!(c.port, Some(5433));
        assert_eq!(c.database(), Some("trading"));
        assert_eq!(c.redacted(), "backup@db1:5433/trading");
        assert!(!format!("{c} {c:?}").contains("cret"));
        assert_eq!(
            c.to_url(false),
            "postgres://backup@db1:5433/trading?sslmode=disable"
        );
        assert!(c.to_url(true).contains("backup:s%40cret@"));
    }

    #[test]
    fn key_values_with_quotes_and_sockets() {
        let c = ConnInfo::parse("host=/tmp/s port=5432 user=u password='a \\'b' dbname=d").unwrap();
        assert_eq!(c.password.as_deref(), Some("a 'b"));
        assert_eq!(c.host.as_deref(), Some("/tmp/s"));
        assert_eq!(c.to_url(false), "postgres://u@%2Ftmp%2Fs:5432/d");
        let other = c.with_database("postgres");
        assert_eq!(other.database(), Some("postgres"));
        assert_eq!(other.password.as_deref(), Some("a 'b"));
    }

    #[test]
    fn rejects_garbage_without_echoing_it() {
        let e = ConnInfo::parse("just-a-secret-string")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secret"), "{e}");
        assert!(e.contains("URL"), "{e}");
        assert!(ConnInfo::parse("postgres://h:notaport/db").is_err());
    }

    #[test]
    fn ipv6_hosts_round_trip() {
        let c = ConnInfo::parse("postgresql://u@[::1]:6000/x").unwrap();
        assert_eq!(c.host.as_deref(), Some("::1"));
        assert_eq!(c.to_url(false), "postgres://u@[::1]:6000/x");
    }
}
