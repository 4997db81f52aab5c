//! backstop-api
