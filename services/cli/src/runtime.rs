//! Process plumbing shared by the long-running commands: shutdown signals and NATS connections.

use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

/// A watch that turns true on Ctrl-C or SIGTERM.
pub fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        let _ = tx.send(true);
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    rx
}

/// Connects to NATS, retrying the first connection a few times so that a server that is still
/// starting does not fail the command; an unreachable server gets a clear error.
pub async fn connect_nats(url: &str) -> anyhow::Result<async_nats::Client> {
    let mut last = None;
    for attempt in 0..3u64 {
        match async_nats::ConnectOptions::new()
            .name("backstop")
            .connection_timeout(Duration::from_secs(3))
            // After the first connection, ride out outages: keep reconnecting for ever.
            .max_reconnects(None)
            .connect(url)
            .await
        {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(anyhow::Error::from(e)),
        }
        tokio::time::sleep(Duration::from_millis(300 * (attempt + 1))).await;
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("unknown error"))).with_context(|| {
        format!("cannot reach NATS at {url}: check that nats-server is running with JetStream (-js) and the URL is right")
    })
}
