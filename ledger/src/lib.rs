//! backstop-ledger
