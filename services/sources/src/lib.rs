//! backstop-sources: where backups come from and where restores go.
//!
//! This crate knows how to read a source (a PostgreSQL database, logically or physically; a
//! command's output ([`command`]); a Redis snapshot ([`redis`]); a git repository's bundle ([`git`])) as a set of
//! named, streamed *parts*, and how to put such parts back. It knows nothing about the repository:
//! the caller implements [`pg::logical::DumpSink`] and [`pg::logical::DumpSource`] (chunking,
//! sealing and storing are the repository's business), so this crate sits beside `backstop-repo`
//! and below the workers.
//!
//! Invariants:
//! - Data is streamed: no table, dump or part is ever held whole in memory or written whole to
//!   local disk. Only the small schema archive is spooled to a temporary file on restore, because
//!   `pg_restore -L` and `-j` need a seekable file.
//! - Parts are uncompressed: the repository chunks, deduplicates and compresses them.
//! - Passwords never appear in argv, logs or errors: external tools get them through `PGPASSWORD`
//!   and every connection string shown is redacted.
//! - External programs never inherit Backstop's secrets ([`child_env`]).

pub mod capture;
pub mod child_env;
pub mod command;
pub mod config;
mod error;
pub mod files;
pub mod git;
pub mod pg;
pub mod redis;
pub mod webhook;

pub use error::SourceError;
