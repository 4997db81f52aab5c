//! backstop-repo
