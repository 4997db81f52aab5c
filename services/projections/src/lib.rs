//! backstop-projections
