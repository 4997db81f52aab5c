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

/// The servers of a `[nats] url` / `--nats` value: comma-separated URLs, each its own server.
/// (async-nats reads a `&str` as one URL, so `nats://n1:4222,nats://n2:4222` must be split here;
/// given every node of a cluster, the client fails over to the others when one is lost.)
pub fn server_addrs(url: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    let addrs = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .with_context(|| format!("`{u}` is not a NATS server URL"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if addrs.is_empty() {
        anyhow::bail!("the NATS URL `{url}` names no server");
    }
    Ok(addrs)
}

/// Connects to NATS, retrying the first connection a few times so that a server that is still
/// starting does not fail the command; an unreachable server gets a clear error.
pub async fn connect_nats(
    url: &str,
    auth: &crate::config::NatsSection,
) -> anyhow::Result<async_nats::Client> {
    let servers = server_addrs(url)?;
    let mut last = None;
    for attempt in 0..3u64 {
        let options = nats_options(auth).await?;
        match options.connect(servers.as_slice()).await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(anyhow::Error::from(e)),
        }
        tokio::time::sleep(Duration::from_millis(300 * (attempt + 1))).await;
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("unknown error"))).with_context(|| {
        format!("cannot reach NATS at {url}: check that nats-server is running with JetStream (-js), the URL is right, and the [nats] credentials are the ones its authorization expects")
    })
}

/// The connection options: a name, timeouts, and the credentials and TLS of `[nats]`.
async fn nats_options(
    auth: &crate::config::NatsSection,
) -> anyhow::Result<async_nats::ConnectOptions> {
    let mut o = async_nats::ConnectOptions::new()
        .name("backstop")
        .connection_timeout(Duration::from_secs(3))
        // After the first connection, ride out outages: keep reconnecting for ever.
        .max_reconnects(None);
    if let (Some(user), Some(file)) = (&auth.user, &auth.password_file) {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read nats.password_file {}", file.display()))?;
        let password = text.lines().next().unwrap_or_default().to_string();
        o = o.user_and_password(user.clone(), password);
    }
    if let Some(creds) = &auth.creds_file {
        o = o
            .credentials_file(creds)
            .await
            .with_context(|| format!("cannot use nats.creds_file {}", creds.display()))?;
    }
    if let Some(seed) = &auth.nkey_seed_file {
        let text = std::fs::read_to_string(seed)
            .with_context(|| format!("cannot read nats.nkey_seed_file {}", seed.display()))?;
        o = o.nkey(text.trim().to_string());
    }
    if let Some(ca) = &auth.tls_ca_file {
        o = o.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&auth.tls_cert_file, &auth.tls_key_file) {
        o = o.add_client_certificate(cert.clone(), key.clone());
    }
    if let Some(required) = auth.tls_required {
        o = o.require_tls(required);
    }
    Ok(o)
}

/// The remote ledger over `client`, signing its appends with `[nats] identity` when one is set.
pub fn remote_ledger(
    config: &crate::config::Config,
    client: async_nats::Client,
) -> anyhow::Result<backstop_ledger::remote::RemoteLedger> {
    let remote = backstop_ledger::remote::RemoteLedger::new(client);
    Ok(match config.append_signer()? {
        Some(signer) => remote.signed_by(signer),
        None => remote,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comma_separated_url_names_each_server() {
        let addrs =
            server_addrs("nats://n1:4222, nats://n2:4222,nats://127.0.0.1:4223").expect("parses");
        let hosts: Vec<(String, u16)> = addrs
            .iter()
            .map(|a| (a.host().to_string(), a.port()))
            .collect();
        assert_eq!(
            hosts,
            [
                ("n1".to_string(), 4222),
                ("n2".to_string(), 4222),
                ("127.0.0.1".to_string(), 4223)
            ]
        );
        assert!(server_addrs(" , ").is_err());
        assert!(server_addrs("http://n1:4222").is_err());
    }
}
