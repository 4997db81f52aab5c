//! Alerting: the conditions that need a person, as `alert.raised` and `alert.resolved` events.
//!
//! ```text
//! ledger events --> Facts (facts.rs: the newest fact per source, endpoint, backend, ...)
//!                     |  + the clock
//!                     v
//!                  conditions (rules.rs: pure, one stable key per condition)
//!                     |  compared with the alerts the ledger records as open
//!                     v
//!                  alert.raised / alert.resolved (monitor.rs) --> notify worker --> people
//! ```
//!
//! Alerts are *level-triggered*: the monitor never reacts to an event by raising, it recomputes
//! which conditions hold and reconciles. So a redelivered failure raises nothing twice, a
//! condition that clears while `serve` is down is resolved when it starts, and the rules that
//! depend only on time (no backup in 25 hours, a backup running too long, WAL stalled) are
//! evaluated with an injected [`crate::schedule::Clock`], never by sleeping.
//!
//! The monitor runs in `backstop serve`, beside the ledger it reads (like the lease monitor);
//! notification is a worker (`backstop_workers::notify`) that reacts to the alert events, so it can
//! run anywhere the events are delivered.

pub mod facts;
pub mod monitor;
pub mod rules;

pub use facts::{Facts, dead_letter_key};
pub use monitor::{AlertMonitor, run_monitor, run_monitor_with};
pub use rules::{AlertThresholds, Condition, CostEstimator, conditions};
