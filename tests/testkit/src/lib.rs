//! backstop-testkit
