//! PostgreSQL sources.
//!
//! - [`logical`]: consistent logical dumps (schema through `pg_dump`, data through parallel `COPY`
//!   from one exported snapshot) and restores of all or chosen tables.
//! - [`conninfo`]: connection strings (URL or `key=value`), redaction, and how external tools get
//!   them without exposing the password.
//! - [`names`]: qualified table names, identifier quoting and name resolution.

pub mod conninfo;
pub mod logical;
pub mod names;
pub mod physical;
mod tools;
pub mod wal;

pub use conninfo::ConnInfo;
pub use names::QualifiedName;
