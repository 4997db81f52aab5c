//! The `[notify]` section of the configuration: channels, their routing, retries.
//!
//! ```toml
//! [notify]
//! dashboard_url = "https://backstop.example.com"   # links in messages
//! attempts = 3                                      # per channel and notification
//! backoff_ms = 2000                                 # before the 2nd attempt; doubled after
//!
//! [[notify.channels]]
//! name = "oncall"
//! kind = "email"
//! smtp_host = "smtp.example.com"
//! smtp_port = 587
//! security = "starttls"                             # plain | starttls | tls
//! username = "backstop"
//! password_file = "/etc/backstop/smtp-password"
//! ca_file = "/etc/backstop/relay-ca.pem"           # optional: trusted beside the system's CAs
//! from = "Backstop <backstop@example.com>"
//! to = ["oncall@example.com"]
//! min_severity = "warning"                          # alerts below it are not sent here
//! sources = ["orders"]                              # empty or absent: every source
//! events = ["alerts", "recoveries"]                 # default: all four
//!
//! [[notify.channels]]
//! name = "chat"
//! kind = "webhook"
//! url = "https://hooks.example.com/T000/B000"
//! headers = { Authorization = "Bearer ..." }
//! ```
//!
//! A channel is one flat table whose kind decides which keys it needs; [`NotifyConfig::check`]
//! names the key that is missing or wrong (`notify.channels[0] (oncall): an email channel needs
//! \`to\``), so a mistake stops `serve` at start-up instead of when the first alert is due.

use std::collections::BTreeMap;
use std::path::PathBuf;

use backstop_events::Severity;
use serde::Deserialize;

/// `[notify]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// The dashboard's public URL, for links in messages (no link when absent).
    pub dashboard_url: Option<String>,
    /// Attempts per channel and notification, the first included (default 3).
    pub attempts: Option<u32>,
    /// Wait before the second attempt in milliseconds, doubled before each later one
    /// (default 2000).
    pub backoff_ms: Option<u64>,
    /// Seconds one attempt may take (connect, TLS, SMTP dialogue or HTTP request; default 30).
    pub timeout_seconds: Option<u64>,
    #[serde(default)]
    pub channels: Vec<ChannelConfig>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelKind {
    Email,
    Webhook,
}

/// How the SMTP connection is secured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Security {
    /// No TLS at all (a relay on the same host or network).
    Plain,
    /// Plain connection upgraded with STARTTLS, which the server must offer (port 587).
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS, port 465).
    Tls,
}

/// Which kinds of message a channel gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventClass {
    /// `alert.raised`.
    Alerts,
    /// `alert.resolved`.
    Recoveries,
    /// `backup.completed`.
    Successes,
    /// `report.generated`.
    Reports,
}

pub const ALL_CLASSES: [EventClass; 4] = [
    EventClass::Alerts,
    EventClass::Recoveries,
    EventClass::Successes,
    EventClass::Reports,
];

/// `[[notify.channels]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    pub name: String,
    pub kind: ChannelKind,
    // email
    pub smtp_host: Option<String>,
    pub smtp_port: Option<u16>,
    #[serde(default)]
    pub security: Security,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// A PEM file of CA certificates to trust beside the system's (a relay with a private CA).
    pub ca_file: Option<PathBuf>,
    pub from: Option<String>,
    #[serde(default)]
    pub to: Vec<String>,
    // webhook
    pub url: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    // routing
    /// Alerts below this severity are not sent to this channel (default info: all).
    #[serde(default = "info")]
    pub min_severity: Severity,
    /// Only messages about these sources (messages about no source, such as reports, always
    /// pass); empty: all sources.
    #[serde(default)]
    pub sources: Vec<String>,
    /// Default: all.
    pub events: Option<Vec<EventClass>>,
}

fn info() -> Severity {
    Severity::Info
}

impl ChannelConfig {
    /// The SMTP port, defaulting by security (25, 587, 465).
    pub fn port(&self) -> u16 {
        self.smtp_port.unwrap_or(match self.security {
            Security::Plain => 25,
            Security::Starttls => 587,
            Security::Tls => 465,
        })
    }

    pub fn classes(&self) -> Vec<EventClass> {
        self.events.clone().unwrap_or_else(|| ALL_CLASSES.to_vec())
    }

    /// Who receives what this channel sends, for `notification.sent`.
    pub fn recipient(&self) -> String {
        match self.kind {
            ChannelKind::Email => self.to.join(", "),
            ChannelKind::Webhook => self.url.clone().unwrap_or_default(),
        }
    }
}

impl NotifyConfig {
    pub fn attempts(&self) -> u32 {
        self.attempts.unwrap_or(3).max(1)
    }

    pub fn backoff(&self, after_attempt: u32) -> std::time::Duration {
        let base = self.backoff_ms.unwrap_or(2000);
        let factor = 1u64 << after_attempt.saturating_sub(1).min(16);
        std::time::Duration::from_millis(base.saturating_mul(factor))
    }

    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.timeout_seconds.unwrap_or(30).max(1))
    }

    /// Every mistake serde cannot see, naming the key.
    pub fn check(&self) -> Result<(), String> {
        if let Some(url) = &self.dashboard_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(format!(
                "notify.dashboard_url: {url:?} is not an http:// or https:// URL"
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, c) in self.channels.iter().enumerate() {
            let at = format!("notify.channels[{i}] ({})", c.name);
            if c.name.is_empty()
                || !c
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            {
                return Err(format!(
                    "notify.channels[{i}].name: {:?} must be letters, digits, '-', '_' or '.'",
                    c.name
                ));
            }
            if !names.insert(c.name.as_str()) {
                return Err(format!("{at}: the name is used by two channels"));
            }
            let email_only = [
                ("smtp_host", c.smtp_host.is_some()),
                ("smtp_port", c.smtp_port.is_some()),
                ("username", c.username.is_some()),
                ("password_file", c.password_file.is_some()),
                ("ca_file", c.ca_file.is_some()),
                ("from", c.from.is_some()),
                ("to", !c.to.is_empty()),
            ];
            let webhook_only = [("url", c.url.is_some()), ("headers", !c.headers.is_empty())];
            match c.kind {
                ChannelKind::Email => {
                    if let Some((k, _)) = webhook_only.iter().find(|(_, set)| *set) {
                        return Err(format!("{at}: `{k}` is for webhook channels"));
                    }
                    if c.smtp_host.as_deref().is_none_or(str::is_empty) {
                        return Err(format!("{at}: an email channel needs `smtp_host`"));
                    }
                    let Some(from) = &c.from else {
                        return Err(format!("{at}: an email channel needs `from`"));
                    };
                    if c.to.is_empty() {
                        return Err(format!(
                            "{at}: an email channel needs `to` (a list of addresses)"
                        ));
                    }
                    for (key, addr) in
                        std::iter::once(("from", from)).chain(c.to.iter().map(|t| ("to", t)))
                    {
                        addr.parse::<lettre::message::Mailbox>().map_err(|e| {
                            format!("{at}.{key}: {addr:?} is not an email address: {e}")
                        })?;
                    }
                    if c.ca_file.is_some() && c.security == Security::Plain {
                        return Err(format!(
                            "{at}: `ca_file` needs security = \"starttls\" or \"tls\""
                        ));
                    }
                    if c.password_file.is_some() != c.username.is_some() {
                        return Err(format!("{at}: `username` and `password_file` go together"));
                    }
                }
                ChannelKind::Webhook => {
                    if let Some((k, _)) = email_only.iter().find(|(_, set)| *set) {
                        return Err(format!("{at}: `{k}` is for email channels"));
                    }
                    let Some(url) = &c.url else {
                        return Err(format!("{at}: a webhook channel needs `url`"));
                    };
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(format!(
                            "{at}.url: {url:?} is not an http:// or https:// URL"
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}
