//! A minimal HTTP/1.0 GET over a plain TCP stream, used only to probe readiness (NATS monitoring
//! `/healthz`, Garage's S3 port), so the kit needs no HTTP client dependency.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, bail};

/// Sends `GET path` to `127.0.0.1:port` and returns the status code and body.
pub(crate) fn get(port: u16, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("could not connect to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the response from {addr}"))?;
    let text = String::from_utf8_lossy(&raw);
    let status_line = text.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        bail!("{addr} answered with no HTTP status line: {status_line:?}");
    };
    if !version.starts_with("HTTP/") {
        bail!("{addr} did not answer HTTP: {status_line:?}");
    }
    let code: u16 = code
        .parse()
        .with_context(|| format!("{addr} sent a bad status line {status_line:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}
