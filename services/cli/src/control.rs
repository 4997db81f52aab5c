//! The CLI beside a running `backstop serve`: sled lets one process hold the ledger, so when a
//! serve holds it, commands append and read through its control socket (`DATA_DIR/control.sock`,
//! see `backstop_ledger::local`) instead of refusing.
//!
//! The choice is made here once: open the ledger; if it is locked, use the socket when it
//! answers; if nothing answers either, say what to do. A command that needs the ledger's files
//! themselves (verify, stats, pubkey) still needs the serve stopped, and says so.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use backstop_events::Envelope;
use backstop_ledger::local::{LocalFollow, LocalLedger, socket_path};
use backstop_ledger::subscribe::Subscription;
use backstop_ledger::{Appender, Ledger, LedgerConfig, LedgerError};

/// An appender through the serve that holds the ledger at `locked` (for commands that found it
/// locked and have no NATS configured).
pub async fn appender_beside_serve(
    data_dir: &Path,
    locked: &Path,
) -> anyhow::Result<Arc<dyn Appender>> {
    Ok(Arc::new(connect(data_dir, locked).await?))
}

async fn connect(data_dir: &Path, locked: &Path) -> anyhow::Result<LocalLedger> {
    let socket = socket_path(data_dir);
    match LocalLedger::connect(&socket).await {
        Ok(l) => {
            tracing::debug!(socket = %socket.display(), "the ledger is held by a running serve; going through its control socket");
            Ok(l)
        }
        Err(e) => Err(anyhow::Error::from(e).context(format!(
            "the ledger at {} is held by another process, and its control socket {} does not answer: if `backstop serve` is running, check that it is this version and uses this data directory; otherwise stop whatever holds the ledger",
            locked.display(),
            socket.display()
        ))),
    }
}

/// The ledger as `backstop ledger` uses it: opened by this process, or through a running serve.
pub enum LedgerAccess {
    Open(Ledger),
    Serve(LocalLedger),
}

/// Opens the ledger, or reaches it through the serve that holds it.
pub async fn open_ledger(config: &LedgerConfig, data_dir: &Path) -> anyhow::Result<LedgerAccess> {
    match Ledger::open(config) {
        Ok(l) => Ok(LedgerAccess::Open(l)),
        Err(LedgerError::Locked { path }) => {
            Ok(LedgerAccess::Serve(connect(data_dir, &path).await?))
        }
        Err(e) => {
            Err(e).with_context(|| format!("cannot open the ledger in {}", data_dir.display()))
        }
    }
}

impl LedgerAccess {
    /// The ledger itself, for what only its files can answer.
    pub fn opened(&self, what: &str) -> anyhow::Result<&Ledger> {
        match self {
            LedgerAccess::Open(l) => Ok(l),
            LedgerAccess::Serve(l) => anyhow::bail!(
                "`backstop ledger {what}` reads the ledger's files, which the running `backstop serve` holds (reached at {}): stop the serve for it, or use the API",
                l.path().display()
            ),
        }
    }

    pub fn appender(&self) -> Arc<dyn Appender> {
        match self {
            LedgerAccess::Open(l) => Arc::new(l.clone()),
            LedgerAccess::Serve(l) => Arc::new(l.clone()),
        }
    }

    /// The committed head position.
    pub async fn head(&self) -> anyhow::Result<u64> {
        Ok(match self {
            LedgerAccess::Open(l) => l.head().position,
            LedgerAccess::Serve(l) => l.head().await?.position,
        })
    }

    /// Events from `from` onwards: catch-up, then live.
    pub async fn follow(&self, from: u64) -> anyhow::Result<Follower> {
        Ok(match self {
            LedgerAccess::Open(l) => Follower::Open(l.subscribe(from)),
            LedgerAccess::Serve(l) => Follower::Serve(l.follow(from).await?),
        })
    }

    pub async fn close(self) {
        if let LedgerAccess::Open(l) = self {
            l.close().await;
        }
    }
}

pub enum Follower {
    Open(Subscription),
    Serve(LocalFollow),
}

impl Follower {
    /// The next events; waits while there are none. Empty when the ledger or the serve stopped.
    pub async fn next_batch(&mut self) -> anyhow::Result<Vec<Envelope>> {
        Ok(match self {
            Follower::Open(s) => s.next_batch(1000).await?,
            Follower::Serve(f) => f.next_batch().await?,
        })
    }
}
