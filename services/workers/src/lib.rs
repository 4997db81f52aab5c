//! backstop-workers
