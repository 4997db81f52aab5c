//! backstop-sources
