//! Qualified table names, SQL quoting, and resolving the names an operator types.
//!
//! Invariants:
//! - A [`QualifiedName`] holds the catalog's exact (case-sensitive, unquoted) schema and relation
//!   names. SQL text built from it always goes through [`quote_ident`], so any name, however odd
//!   (dots, spaces, quotes, capitals), is safe.
//! - `Display` is reversible: `schema.name`, with either half double-quoted when it is not a plain
//!   lower-case identifier (`"We.ird"."Mixed Case"`). [`resolve`] accepts that form back, as well
//!   as a bare table name when it is unique across schemas.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A schema-qualified relation name, exactly as the catalog spells it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QualifiedName {
    pub schema: String,
    pub name: String,
}

impl QualifiedName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> QualifiedName {
        QualifiedName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// `"schema"."name"`, always quoted: for SQL text.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}",
            display_ident(&self.schema),
            display_ident(&self.name)
        )
    }
}

/// Double-quotes an SQL identifier (doubling embedded quotes).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Single-quotes an SQL string literal for a server with `standard_conforming_strings = on`
/// (every supported PostgreSQL version's default): embedded quotes are doubled, backslashes are
/// literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// An identifier as an operator would type it: bare when it is a plain lower-case identifier,
/// double-quoted otherwise.
fn display_ident(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
    if plain { s.to_string() } else { quote_ident(s) }
}

/// Splits `a.b` / `"a.b"."C"` / `b` into its parts: quoted parts keep their case and dots.
fn split_name(input: &str) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = input.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        cur.push('"');
                    }
                    Some('"') => break,
                    Some(ch) => cur.push(ch),
                    None => return None,
                }
            },
            '.' => {
                parts.push(std::mem::take(&mut cur));
            }
            _ => cur.push(c),
        }
    }
    parts.push(cur);
    if parts.iter().any(|p| p.is_empty()) || parts.len() > 2 {
        return None;
    }
    Some(parts)
}

/// Why a name could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveError {
    NotFound(String),
    Ambiguous(String, Vec<QualifiedName>),
}

/// Finds the one table among `known` that `input` names: the exact `Display` form first, then
/// `schema.name` (quoted parts keep their case), then a bare name unique across schemas. Unquoted
/// parts match as typed, and failing that in lower case, as PostgreSQL folds them.
pub fn resolve<'a>(
    input: &str,
    known: impl IntoIterator<Item = &'a QualifiedName> + Clone,
) -> Result<QualifiedName, ResolveError> {
    let input = input.trim();
    if let Some(t) = known.clone().into_iter().find(|t| t.to_string() == input) {
        return Ok(t.clone());
    }
    let Some(parts) = split_name(input) else {
        return Err(ResolveError::NotFound(input.to_string()));
    };
    let attempts = [
        parts.clone(),
        parts.iter().map(|p| p.to_lowercase()).collect(),
    ];
    for parts in attempts {
        let found: Vec<QualifiedName> = match parts.as_slice() {
            [schema, name] => known
                .clone()
                .into_iter()
                .filter(|t| &t.schema == schema && &t.name == name)
                .cloned()
                .collect(),
            [name] => known
                .clone()
                .into_iter()
                .filter(|t| &t.name == name)
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        match found.len() {
            0 => continue,
            1 => return Ok(found[0].clone()),
            _ => return Err(ResolveError::Ambiguous(input.to_string(), found)),
        }
    }
    Err(ResolveError::NotFound(input.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_round_trips_through_resolve() {
        let known = vec![
            QualifiedName::new("public", "accounts"),
            QualifiedName::new("We.ird", "Mixed Case"),
            QualifiedName::new("audit", "accounts"),
            QualifiedName::new("public", "orders"),
        ];
        for t in &known {
            assert_eq!(resolve(&t.to_string(), &known), Ok(t.clone()));
        }
        assert_eq!(known[1].to_string(), "\"We.ird\".\"Mixed Case\"");
        assert_eq!(resolve("orders", &known), Ok(known[3].clone()));
        assert_eq!(resolve("ORDERS", &known), Ok(known[3].clone()));
        assert_eq!(resolve("public.accounts", &known), Ok(known[0].clone()));
        assert!(matches!(
            resolve("accounts", &known),
            Err(ResolveError::Ambiguous(_, v)) if v.len() == 2
        ));
        assert!(matches!(
            resolve("nope", &known),
            Err(ResolveError::NotFound(_))
        ));
        assert!(matches!(
            resolve("a.b.c", &known),
            Err(ResolveError::NotFound(_))
        ));
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(QualifiedName::new("s", "t\"x").quoted(), "\"s\".\"t\"\"x\"");
    }
}
