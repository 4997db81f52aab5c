//! API tokens, roles, and what each role may do.
//!
//! | what                                          | auditor | operator | recovery-lead |
//! |-----------------------------------------------|:-------:|:--------:|:-------------:|
//! | read: dashboard pages, JSON reads, live events |   yes   |   yes    |      yes      |
//! | read the audit trail                          |   yes   |   yes    |      yes      |
//! | export the audit trail (signed file)          |   yes   |    -     |       -       |
//! | request a backup (`POST /api/backups`)        |    -    |   yes    |      yes      |
//! | request a restore (`POST /api/restores`)      |    -    |    -     |      yes      |
//!
//! `/healthz` needs nothing. `/metrics` needs nothing unless `api.metrics_public = false`.
//! With `api.public_dashboard = true`, the overview, backup pages and their JSON reads are served
//! without a token (a wall display); the audit trail, the export and every change still need one.
//!
//! Credentials: `Authorization: Bearer TOKEN` on any request; or the `backstop_token` cookie set
//! by the sign-in page, which is accepted for GET and HEAD only, so that a page on another site
//! can never make a browser change anything (changes need the header).
//!
//! Tokens are configured by their SHA3-256 (hex), never stored in clear by the server; a
//! presented token is hashed and compared with each configured hash. Every refused request is
//! recorded as an `access.denied` event naming the caller (the token's name, or "anonymous" and
//! the peer address) before the 401 or 403 is sent.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha3::{Digest, Sha3_256};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Auditor,
    Operator,
    RecoveryLead,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Auditor => "auditor",
            Role::Operator => "operator",
            Role::RecoveryLead => "recovery-lead",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auditor" => Ok(Role::Auditor),
            "operator" => Ok(Role::Operator),
            "recovery-lead" | "recovery_lead" => Ok(Role::RecoveryLead),
            other => Err(format!(
                "unknown role {other:?}: expected auditor, operator or recovery-lead"
            )),
        }
    }
}

/// What a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Overview, backups, charts: public when `public_dashboard` is on.
    Dashboard,
    /// The audit trail and live events: any role, never public.
    Read,
    AuditExport,
    RequestBackup,
    Restore,
}

impl Need {
    pub fn allows(&self, role: Role) -> bool {
        match self {
            Need::Dashboard | Need::Read => true,
            Need::AuditExport => role == Role::Auditor,
            Need::RequestBackup => matches!(role, Role::Operator | Role::RecoveryLead),
            Need::Restore => role == Role::RecoveryLead,
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Need::Dashboard | Need::Read => "reading needs any role",
            Need::AuditExport => "exporting the audit trail needs the auditor role",
            Need::RequestBackup => "requesting a backup needs the operator or recovery-lead role",
            Need::Restore => "restores need the recovery-lead role",
        }
    }
}

/// One configured token.
#[derive(Clone, Debug)]
pub struct TokenEntry {
    pub name: String,
    pub role: Role,
    pub sha3: [u8; 32],
}

impl TokenEntry {
    /// From a name, role and the token's SHA3-256 in hex.
    pub fn from_hash(name: &str, role: Role, sha3_hex: &str) -> Result<TokenEntry, String> {
        let bytes = hex::decode(sha3_hex.trim()).map_err(|_| {
            format!("token `{name}`: sha3 must be 64 hex characters (SHA3-256 of the token)")
        })?;
        let sha3: [u8; 32] = bytes.try_into().map_err(|_| {
            format!("token `{name}`: sha3 must be 64 hex characters (SHA3-256 of the token)")
        })?;
        check_name(name)?;
        Ok(TokenEntry {
            name: name.to_string(),
            role,
            sha3,
        })
    }

    /// From a name, role and the token itself (tokens file).
    pub fn from_plain(name: &str, role: Role, token: &str) -> Result<TokenEntry, String> {
        check_name(name)?;
        if token.len() < 16 {
            return Err(format!(
                "token `{name}` is shorter than 16 characters; use a long random token (e.g. `openssl rand -hex 32`)"
            ));
        }
        Ok(TokenEntry {
            name: name.to_string(),
            role,
            sha3: hash(token),
        })
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "token name {name:?} must be 1 to 64 characters of [A-Za-z0-9._@-] (it becomes the actor `operator:NAME`)"
        ))
    }
}

/// SHA3-256 of a token.
pub fn hash(token: &str) -> [u8; 32] {
    Sha3_256::digest(token.as_bytes()).into()
}

/// Parses a tokens file: one token per line, `NAME ROLE TOKEN`, `#` comments and blank lines
/// ignored.
pub fn parse_tokens_file(text: &str) -> Result<Vec<TokenEntry>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [name, role, token] = parts.as_slice() else {
            return Err(format!(
                "line {}: expected `NAME ROLE TOKEN` (three fields separated by spaces)",
                i + 1
            ));
        };
        let role: Role = role.parse().map_err(|e| format!("line {}: {e}", i + 1))?;
        out.push(
            TokenEntry::from_plain(name, role, token)
                .map_err(|e| format!("line {}: {e}", i + 1))?,
        );
    }
    Ok(out)
}

/// The configured tokens.
#[derive(Clone, Debug, Default)]
pub struct Tokens(Vec<TokenEntry>);

impl Tokens {
    pub fn new(entries: Vec<TokenEntry>) -> Tokens {
        Tokens(entries)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The entry whose hash matches the presented token.
    pub fn find(&self, token: &str) -> Option<&TokenEntry> {
        let h = hash(token);
        // Comparing digests, not tokens: the time taken reveals nothing usable about a token.
        self.0.iter().find(|e| e.sha3 == h)
    }
}

/// Who is calling, as far as the request says.
#[derive(Clone, Debug)]
pub enum Caller {
    Anonymous,
    /// A token was presented but matches no configured token.
    UnknownToken {
        fingerprint: String,
    },
    Known {
        name: String,
        role: Role,
    },
}

impl Caller {
    pub fn describe(&self, peer: &str) -> String {
        match self {
            Caller::Anonymous => format!("anonymous ({peer})"),
            Caller::UnknownToken { fingerprint } => {
                format!("unknown token sha3:{fingerprint}… ({peer})")
            }
            Caller::Known { name, role } => format!("{name} ({role}, {peer})"),
        }
    }

    pub fn role(&self) -> Option<Role> {
        match self {
            Caller::Known { role, .. } => Some(*role),
            _ => None,
        }
    }
}

/// Identifies the caller from a presented token.
pub fn identify(tokens: &Tokens, token: Option<&str>) -> Caller {
    match token {
        None => Caller::Anonymous,
        Some(t) => match tokens.find(t) {
            Some(e) => Caller::Known {
                name: e.name.clone(),
                role: e.role,
            },
            None => Caller::UnknownToken {
                fingerprint: hex::encode(&hash(t)[..4]),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_role_matrix() {
        use Role::*;
        assert!(Need::Read.allows(Auditor));
        assert!(Need::AuditExport.allows(Auditor));
        assert!(!Need::AuditExport.allows(Operator));
        assert!(!Need::RequestBackup.allows(Auditor));
        assert!(Need::RequestBackup.allows(Operator));
        assert!(Need::RequestBackup.allows(RecoveryLead));
        assert!(!Need::Restore.allows(Operator));
        assert!(Need::Restore.allows(RecoveryLead));
    }

    #[test]
    fn tokens_file_and_hashes() {
        let entries = parse_tokens_file(
            "# comment\nalice operator 0123456789abcdef0123\n\nbob auditor fedcba9876543210fedc\n",
        )
        .unwrap();
        let tokens = Tokens::new(entries);
        assert_eq!(tokens.find("0123456789abcdef0123").unwrap().name, "alice");
        assert!(tokens.find("nope").is_none());
        assert!(parse_tokens_file("alice operator").is_err());
        assert!(parse_tokens_file("alice admin 0123456789abcdef0123").is_err());
        assert!(parse_tokens_file("alice operator short").is_err());
        let h = hex::encode(hash("0123456789abcdef0123"));
        assert!(TokenEntry::from_hash("alice", Role::Operator, &h).is_ok());
        assert!(TokenEntry::from_hash("alice", Role::Operator, "abc").is_err());
    }
}
