//! The two ways a message leaves Backstop: email over SMTP ([`EmailChannel`], lettre) and an
//! HTTP POST of JSON ([`WebhookChannel`], reqwest).
//!
//! The webhook body is Slack-compatible (`text` plus one `attachments` entry coloured by
//! severity), so Slack, Mattermost, Rocket.Chat and most SMS or paging gateways take it as it is,
//! and carries Backstop's own fields beside it for anything that reads JSON:
//!
//! ```json
//! {"text": "<subject>", "attachments": [{"color": "#d00000", "title": "<subject>",
//!   "text": "<body>", "title_link": "<link>"}],
//!  "backstop": {"kind": "alert", "severity": "critical", "source": "orders",
//!   "key": "backup_failed/orders", "link": "https://...", "subject": "...", "text": "..."}}
//! ```
//!
//! Failures are typed ([`NotifyError`]); [`NotifyError::is_transient`] says whether another
//! attempt may succeed, by variant.

use std::time::Duration;

use async_trait::async_trait;
use backstop_events::Severity;
use lettre::message::{Mailbox, header::ContentType};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use super::Message;
use super::config::{ChannelConfig, ChannelKind, Security};

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The channel's configuration cannot work (a bad address, an unreadable password file).
    #[error("channel misconfigured: {0}")]
    Config(String),
    /// No connection: refused, unreachable, reset, or the DNS name did not resolve.
    #[error("cannot reach {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("no answer from {endpoint} within {seconds} s")]
    Timeout { endpoint: String, seconds: u64 },
    /// The TLS handshake failed (a certificate that does not match, a server without TLS).
    #[error("TLS with {endpoint} failed: {reason}")]
    Tls { endpoint: String, reason: String },
    /// The SMTP server answered with an error: 4xx is transient (greylisting, a full queue),
    /// 5xx permanent (an unknown recipient, authentication refused).
    #[error("the SMTP server refused: {reason}")]
    SmtpRefused { reason: String, transient: bool },
    /// The webhook answered with a non-2xx status.
    #[error("the webhook answered HTTP {status}: {body}")]
    HttpStatus { status: u16, body: String },
}

impl NotifyError {
    /// Whether another attempt may succeed. Connection trouble, timeouts, SMTP 4xx and HTTP 5xx,
    /// 408 and 429 may pass; a misconfiguration, a TLS failure, SMTP 5xx and the other HTTP 4xx
    /// will not, whatever the wait.
    pub fn is_transient(&self) -> bool {
        match self {
            NotifyError::Config(_) | NotifyError::Tls { .. } => false,
            NotifyError::Connect { .. } | NotifyError::Timeout { .. } => true,
            NotifyError::SmtpRefused { transient, .. } => *transient,
            NotifyError::HttpStatus { status, .. } => {
                *status >= 500 || *status == 408 || *status == 429
            }
        }
    }
}

/// Somewhere a message can be sent.
#[async_trait]
pub trait Channel: Send + Sync {
    async fn send(&self, message: &Message) -> Result<(), NotifyError>;
}

/// Builds the channel a configuration entry describes (nothing is contacted yet).
pub fn build(config: &ChannelConfig, timeout: Duration) -> Result<Box<dyn Channel>, NotifyError> {
    Ok(match config.kind {
        ChannelKind::Email => Box::new(EmailChannel::new(config, timeout)?),
        ChannelKind::Webhook => Box::new(WebhookChannel::new(config, timeout)?),
    })
}

/// Email over SMTP: plain, STARTTLS (required, never opportunistic: a server that does not
/// offer it is a failure, not a reason to send in clear) or TLS from the start; with
/// authentication when a username and password file are configured. The password file is read
/// at each send, so it can be rotated without a restart.
pub struct EmailChannel {
    host: String,
    port: u16,
    security: Security,
    username: Option<String>,
    password_file: Option<std::path::PathBuf>,
    ca_file: Option<std::path::PathBuf>,
    from: Mailbox,
    to: Vec<Mailbox>,
    timeout: Duration,
}

impl EmailChannel {
    pub fn new(config: &ChannelConfig, timeout: Duration) -> Result<EmailChannel, NotifyError> {
        let host = config
            .smtp_host
            .clone()
            .ok_or_else(|| NotifyError::Config("no smtp_host".into()))?;
        let parse = |a: &str| {
            a.parse::<Mailbox>()
                .map_err(|e| NotifyError::Config(format!("{a:?} is not an email address: {e}")))
        };
        let from = parse(
            config
                .from
                .as_deref()
                .ok_or_else(|| NotifyError::Config("no from".into()))?,
        )?;
        let to = config
            .to
            .iter()
            .map(|a| parse(a))
            .collect::<Result<Vec<_>, _>>()?;
        if to.is_empty() {
            return Err(NotifyError::Config("no recipient in `to`".into()));
        }
        Ok(EmailChannel {
            port: config.port(),
            host,
            security: config.security,
            username: config.username.clone(),
            password_file: config.password_file.clone(),
            ca_file: config.ca_file.clone(),
            from,
            to,
            timeout,
        })
    }

    fn endpoint(&self) -> String {
        format!("smtp://{}:{}", self.host, self.port)
    }

    fn transport(&self) -> Result<AsyncSmtpTransport<Tokio1Executor>, NotifyError> {
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&self.host)
            .port(self.port)
            .timeout(Some(self.timeout));
        builder = match self.security {
            Security::Plain => builder.tls(Tls::None),
            Security::Starttls => builder.tls(Tls::Required(self.tls_parameters()?)),
            Security::Tls => builder.tls(Tls::Wrapper(self.tls_parameters()?)),
        };
        if let (Some(user), Some(file)) = (&self.username, &self.password_file) {
            let password = std::fs::read_to_string(file).map_err(|e| {
                NotifyError::Config(format!("cannot read password_file {}: {e}", file.display()))
            })?;
            builder = builder.credentials(Credentials::new(
                user.clone(),
                password.trim_end().to_string(),
            ));
        }
        Ok(builder.build())
    }

    /// The server name to verify, and the system's CAs plus `ca_file`'s.
    fn tls_parameters(&self) -> Result<TlsParameters, NotifyError> {
        let mut params = TlsParameters::builder(self.host.clone());
        if let Some(file) = &self.ca_file {
            let pem = std::fs::read(file).map_err(|e| {
                NotifyError::Config(format!("cannot read ca_file {}: {e}", file.display()))
            })?;
            let cert = Certificate::from_pem(&pem)
                .map_err(|e| NotifyError::Config(format!("ca_file {}: {e}", file.display())))?;
            params = params.add_root_certificate(cert);
        }
        params.build().map_err(|e| NotifyError::Tls {
            endpoint: self.endpoint(),
            reason: e.to_string(),
        })
    }

    fn email(&self, message: &Message) -> Result<lettre::Message, NotifyError> {
        let mut b = lettre::Message::builder()
            .from(self.from.clone())
            .subject(message.subject.clone())
            .header(ContentType::TEXT_PLAIN);
        for to in &self.to {
            b = b.to(to.clone());
        }
        b.body(message.body())
            .map_err(|e| NotifyError::Config(format!("cannot compose the email: {e}")))
    }
}

#[async_trait]
impl Channel for EmailChannel {
    async fn send(&self, message: &Message) -> Result<(), NotifyError> {
        let email = self.email(message)?;
        let transport = self.transport()?;
        // lettre's own timeout covers each read and write; this one bounds the whole dialogue.
        let sent = tokio::time::timeout(self.timeout, transport.send(email))
            .await
            .map_err(|_| NotifyError::Timeout {
                endpoint: self.endpoint(),
                seconds: self.timeout.as_secs(),
            })?;
        sent.map(|_| ()).map_err(|e| {
            let endpoint = self.endpoint();
            if e.is_permanent() || e.is_transient() {
                NotifyError::SmtpRefused {
                    transient: e.is_transient(),
                    reason: e.to_string(),
                }
            } else if e.is_timeout() {
                NotifyError::Timeout {
                    endpoint,
                    seconds: self.timeout.as_secs(),
                }
            } else if e.is_tls() || self.tls_refused(&e) {
                NotifyError::Tls {
                    endpoint,
                    reason: e.to_string(),
                }
            } else if e.is_client() {
                NotifyError::Config(e.to_string())
            } else {
                // Connection refused or reset, name resolution, an unparsable answer.
                NotifyError::Connect {
                    endpoint,
                    reason: error_chain(&e),
                }
            }
        })
    }
}

impl EmailChannel {
    /// lettre reports a handshake that failed inside rustls (a server that speaks no TLS, a
    /// certificate that does not verify) as a connection error whose source is an I/O error of
    /// kind `InvalidData`: that is a TLS failure (permanent), not a network one.
    fn tls_refused(&self, e: &lettre::transport::smtp::Error) -> bool {
        if self.security == Security::Plain {
            return false;
        }
        let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
        while let Some(c) = cur {
            if let Some(io) = c.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::InvalidData
            {
                return true;
            }
            cur = c.source();
        }
        false
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A JSON POST (see the module docs for the body).
pub struct WebhookChannel {
    url: String,
    headers: reqwest::header::HeaderMap,
    client: reqwest::Client,
    timeout: Duration,
}

impl WebhookChannel {
    pub fn new(config: &ChannelConfig, timeout: Duration) -> Result<WebhookChannel, NotifyError> {
        let url = config
            .url
            .clone()
            .ok_or_else(|| NotifyError::Config("no url".into()))?;
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &config.headers {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| NotifyError::Config(format!("header name {k:?}: {e}")))?;
            let value = reqwest::header::HeaderValue::from_str(v)
                .map_err(|e| NotifyError::Config(format!("header {k}: {e}")))?;
            headers.insert(name, value);
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| NotifyError::Config(format!("HTTP client: {e}")))?;
        Ok(WebhookChannel {
            url,
            headers,
            client,
            timeout,
        })
    }
}

/// The webhook body of a message.
pub fn webhook_body(message: &Message) -> serde_json::Value {
    let color = match message.severity {
        Severity::Critical => "#d00000",
        Severity::Warning => "#e0a000",
        Severity::Info => "#2eb886",
    };
    let mut attachment = serde_json::json!({
        "color": color,
        "title": message.subject,
        "text": message.text,
        "fallback": message.subject,
    });
    if let Some(link) = &message.link {
        attachment["title_link"] = serde_json::Value::String(link.clone());
    }
    serde_json::json!({
        "text": message.subject,
        "attachments": [attachment],
        "backstop": {
            "kind": message.kind.as_str(),
            "severity": message.severity,
            "source": message.source,
            "key": message.key,
            "link": message.link,
            "subject": message.subject,
            "text": message.text,
        },
    })
}

#[async_trait]
impl Channel for WebhookChannel {
    async fn send(&self, message: &Message) -> Result<(), NotifyError> {
        let response = self
            .client
            .post(&self.url)
            .headers(self.headers.clone())
            .json(&webhook_body(message))
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    NotifyError::Timeout {
                        endpoint: self.url.clone(),
                        seconds: self.timeout.as_secs(),
                    }
                } else if e.is_builder() {
                    NotifyError::Config(error_chain(&e))
                } else {
                    NotifyError::Connect {
                        endpoint: self.url.clone(),
                        reason: error_chain(&e),
                    }
                }
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let mut body = response.text().await.unwrap_or_default();
        body.truncate(500);
        Err(NotifyError::HttpStatus {
            status: status.as_u16(),
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transience_is_decided_by_variant() {
        let status = |s| NotifyError::HttpStatus {
            status: s,
            body: String::new(),
        };
        assert!(status(503).is_transient());
        assert!(status(429).is_transient());
        assert!(!status(404).is_transient());
        assert!(!status(401).is_transient());
        assert!(
            NotifyError::Connect {
                endpoint: "x".into(),
                reason: "refused".into()
            }
            .is_transient()
        );
        assert!(
            !NotifyError::SmtpRefused {
                reason: "550".into(),
                transient: false
            }
            .is_transient()
        );
        assert!(!NotifyError::Config("x".into()).is_transient());
    }
}
