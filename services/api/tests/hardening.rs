//! The API under attack, each attack tried against the real router, a real ledger (and, for the
//! public dashboard, real projections in PostgreSQL) and refused: bodies past the limit, answers
//! that take too long, more requests at once than allowed, floods of refused requests and of
//! sign-ins (429 with `Retry-After`, and a handful of `access.denied` events whose counts sum to
//! the flood), stolen or expired sessions, the live stream without a token, and an anonymous
//! viewer of a public dashboard looking for hosts, operators, locations and error texts.
//! Time is a `ManualClock` (windows, buckets, sessions) or tokio's paused clock (the timeout).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use backstop_api::{ApiConfig, ApiState, Role, StorageProbe, TokenEntry, Tokens};
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerConfig};
use backstop_ops::schedule::clock::ManualClock;
use chrono::Utc;
use tower::ServiceExt;

const OPERATOR: &str = "operator-token-0123456789";
const AUDITOR: &str = "auditor-token-0123456789";

fn tokens() -> Tokens {
    Tokens::new(vec![
        TokenEntry::from_plain("alice", Role::Operator, OPERATOR).unwrap(),
        TokenEntry::from_plain("audrey", Role::Auditor, AUDITOR).unwrap(),
    ])
}

struct Env {
    _dir: tempfile::TempDir,
    ledger: Ledger,
    state: ApiState,
    clock: Arc<ManualClock>,
    _stop: tokio::sync::watch::Sender<bool>,
}

async fn env(config: ApiConfig, projections: Option<backstop_projections::Projections>) -> Env {
    env_with(config, projections, None).await
}

async fn env_with(
    config: ApiConfig,
    projections: Option<backstop_projections::Projections>,
    probe: Option<Arc<dyn StorageProbe>>,
) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LedgerConfig::in_data_dir(dir.path());
    let ledger = Ledger::open(&cfg).unwrap();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let mut state = ApiState::new(
        ApiConfig {
            tokens: tokens(),
            ..config
        },
        ledger.clone(),
        Arc::new(ledger.clone()),
        projections,
        stop,
    )
    .with_clock(clock.clone());
    if let Some(p) = probe {
        state = state.with_storage(p);
    }
    Env {
        _dir: dir,
        ledger,
        state,
        clock,
        _stop: stop_tx,
    }
}

fn peer(ip: [u8; 4]) -> ConnectInfo<SocketAddr> {
    ConnectInfo(SocketAddr::from((ip, 50000)))
}

async fn send(env: &Env, mut req: Request<Body>, from: [u8; 4]) -> axum::response::Response {
    req.extensions_mut().insert(peer(from));
    backstop_api::router(env.state.clone())
        .oneshot(req)
        .await
        .unwrap()
}

fn get(uri: &str, token: Option<&str>) -> Request<Body> {
    let mut r = Request::get(uri);
    if let Some(t) = token {
        r = r.header("authorization", format!("Bearer {t}"));
    }
    r.body(Body::empty()).unwrap()
}

async fn text(resp: axum::response::Response) -> String {
    let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20)
        .await
        .unwrap();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn denials(ledger: &Ledger) -> Vec<serde_json::Value> {
    ledger
        .read(1, 100_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == "access.denied")
        .map(|e| e.payload)
        .collect()
}

fn events_of(ledger: &Ledger, kind: &str) -> usize {
    ledger
        .read(1, 100_000)
        .unwrap()
        .iter()
        .filter(|e| e.event_type == kind)
        .count()
}

#[tokio::test]
async fn a_body_past_the_limit_is_refused_with_413_and_nothing_is_requested() {
    let env = env(
        ApiConfig {
            max_body_bytes: 1024,
            ..ApiConfig::default()
        },
        None,
    )
    .await;
    let big = format!(
        r#"{{"source":"trading","note":"{}"}}"#,
        "x".repeat(100 * 1024)
    );
    let resp = send(
        &env,
        Request::post("/api/backups")
            .header("authorization", format!("Bearer {OPERATOR}"))
            .header("content-type", "application/json")
            .body(Body::from(big.clone()))
            .unwrap(),
        [192, 0, 2, 1],
    )
    .await;
    // Sent without a length: refused while it is read.
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // Announced by its length (as any HTTP client sends it): refused before it is read.
    let resp = send(
        &env,
        Request::post("/api/backups")
            .header("authorization", format!("Bearer {OPERATOR}"))
            .header("content-type", "application/json")
            .header("content-length", big.len())
            .body(Body::from(big.clone()))
            .unwrap(),
        [192, 0, 2, 1],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(events_of(&env.ledger, "backup.requested"), 0);
    // A body within the limit is read (and here accepted).
    let resp = send(
        &env,
        Request::post("/api/backups")
            .header("authorization", format!("Bearer {OPERATOR}"))
            .header("content-type", "application/json")
            .body(Body::from(r#"{"source":"trading"}"#))
            .unwrap(),
        [192, 0, 2, 1],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED, "{}", text(resp).await);
}

/// A storage probe that waits at a gate, counting who came in.
struct GateProbe {
    gate: Arc<tokio::sync::Semaphore>,
    entered: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl StorageProbe for GateProbe {
    fn describe(&self) -> String {
        "a probe that waits".into()
    }
    async fn probe(&self) -> Result<Duration, String> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        match self.gate.acquire().await {
            Ok(p) => p.forget(),
            Err(_) => return Err("closed".into()),
        }
        Ok(Duration::from_millis(1))
    }
}

#[tokio::test(start_paused = true)]
async fn an_answer_past_the_time_limit_is_a_408() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let env = env_with(
        ApiConfig {
            request_timeout: Duration::from_secs(1),
            ..ApiConfig::default()
        },
        None,
        Some(Arc::new(GateProbe {
            gate,
            entered: Arc::new(AtomicUsize::new(0)),
        })),
    )
    .await;
    // The probe never answers (its own limit is 5 s); tokio's paused clock jumps to the 1 s
    // limit as soon as everything waits.
    let resp = send(
        &env,
        get("/api/storage/connectivity", Some(OPERATOR)),
        [192, 0, 2, 1],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_concurrency_limit_wait_for_a_slot() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let entered = Arc::new(AtomicUsize::new(0));
    let env = env_with(
        ApiConfig {
            max_concurrent_requests: 1,
            ..ApiConfig::default()
        },
        None,
        Some(Arc::new(GateProbe {
            gate: gate.clone(),
            entered: entered.clone(),
        })),
    )
    .await;
    let router = backstop_api::router(env.state.clone());
    let call = |router: axum::Router| async move {
        let mut req = get("/api/storage/connectivity", Some(OPERATOR));
        req.extensions_mut().insert(peer([192, 0, 2, 1]));
        router.oneshot(req).await.unwrap().status()
    };
    let first = tokio::spawn(call(router.clone()));
    while entered.load(Ordering::SeqCst) < 1 {
        tokio::task::yield_now().await;
    }
    let second = tokio::spawn(call(router.clone()));
    for _ in 0..200 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        entered.load(Ordering::SeqCst),
        1,
        "the second request waits for the first's slot, outside the handler"
    );
    assert!(!second.is_finished());
    gate.add_permits(2);
    assert_eq!(first.await.unwrap(), StatusCode::OK);
    assert_eq!(second.await.unwrap(), StatusCode::OK);
    assert_eq!(entered.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_flood_of_refusals_is_throttled_and_recorded_as_a_few_events_with_counts() {
    let env = env(
        ApiConfig {
            refusals_per_minute: 30,
            denial_window: Duration::from_secs(60),
            ..ApiConfig::default()
        },
        None,
    )
    .await;
    let attacker = [198, 51, 100, 7];
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut retry_after = None;
    for i in 0..1000 {
        // Anonymous reads of the audit trail, and guessed tokens.
        let req = if i % 2 == 0 {
            get("/api/audit", None)
        } else {
            get("/api/audit", Some(&format!("guess-{i:020}")))
        };
        let resp = send(&env, req, attacker).await;
        *statuses.entry(resp.status().as_u16()).or_default() += 1;
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            retry_after = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
        }
    }
    assert_eq!(statuses.get(&401), Some(&30), "{statuses:?}");
    assert_eq!(statuses.get(&429), Some(&970), "{statuses:?}");
    assert_eq!(retry_after.as_deref(), Some("2"), "one refusal every 2 s");
    // The ledger got one event so far (the window's first refusal).
    let d = denials(&env.ledger);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(d[0]["count"], 1);
    // A valid token from the same address is never throttled.
    let resp = send(&env, get("/api/events/stream", Some(AUDITOR)), attacker).await;
    assert_eq!(resp.status(), StatusCode::OK);

    // The window ends: the rest of the flood is one more event.
    env.clock
        .advance_to(Utc::now() + chrono::Duration::seconds(61));
    env.state.flush_denials(false).await;
    let d = denials(&env.ledger);
    assert!(d.len() <= 3, "{d:#?}");
    let total: u64 = d.iter().map(|e| e["count"].as_u64().unwrap()).sum();
    assert_eq!(total, 1000, "{d:#?}");
    assert!(d[1]["window_seconds"].as_u64().unwrap() >= 60);
    assert!(d[1]["caller"].as_str().unwrap().contains("198.51.100.7"));
    // Another client is counted apart, and its first refusal is recorded at once.
    let resp = send(&env, get("/api/audit", None), [203, 0, 113, 9]).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(denials(&env.ledger).len(), d.len() + 1);
    // After the bucket refills, the attacker is answered 401 again.
    let resp = send(&env, get("/api/audit", None), attacker).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

fn sign_in(token: &str) -> Request<Body> {
    Request::post("/login")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(format!("token={token}")))
        .unwrap()
}

#[tokio::test]
async fn sign_ins_are_limited_per_client_before_the_token_is_checked() {
    let env = env(
        ApiConfig {
            sign_ins_per_minute: 5,
            ..ApiConfig::default()
        },
        None,
    )
    .await;
    let guesser = [198, 51, 100, 8];
    for i in 0..5 {
        let resp = send(&env, sign_in(&format!("wrong-token-{i:010}")), guesser).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    // The sixth attempt is refused whatever it holds: even the right token.
    let resp = send(&env, sign_in(OPERATOR), guesser).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers().get("retry-after").unwrap(), "12");
    assert!(resp.headers().get("set-cookie").is_none());
    // Someone else signs in.
    let resp = send(&env, sign_in(OPERATOR), [203, 0, 113, 10]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    // Twelve seconds later the guesser has one attempt again.
    env.clock
        .advance_to(Utc::now() + chrono::Duration::seconds(13));
    let resp = send(&env, sign_in(OPERATOR), guesser).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    // Six refusals from the guesser, one event so far (one client, one window).
    let d = denials(&env.ledger);
    assert_eq!(d.len(), 1, "{d:#?}");
}

fn cookie_of(resp: &axum::response::Response) -> String {
    resp.headers()
        .get("set-cookie")
        .expect("a cookie")
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn sign_in_gives_an_opaque_expiring_session_and_secure_cookies_behind_https() {
    let proxy = [127, 0, 0, 9];
    let env = env(
        ApiConfig {
            session_ttl: Duration::from_secs(3600),
            trusted_proxies: vec![std::net::IpAddr::from(proxy)],
            ..ApiConfig::default()
        },
        None,
    )
    .await;
    let resp = send(&env, sign_in(OPERATOR), [192, 0, 2, 20]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let cookie = cookie_of(&resp);
    assert!(!cookie.contains(OPERATOR), "never the token: {cookie}");
    let pair = cookie.split(';').next().unwrap().to_string();
    let (name, id) = pair.split_once('=').unwrap();
    assert_eq!(name, "backstop_session");
    assert_eq!(id.len(), 64, "a 256-bit random id: {id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    assert!(cookie.contains("Max-Age=3600"), "{cookie}");
    assert!(!cookie.contains("Secure"), "plain HTTP: {cookie}");

    // The session authorizes reads, the live stream included.
    let with_cookie = |c: &str| {
        Request::get("/api/events/stream")
            .header("cookie", c)
            .body(Body::empty())
            .unwrap()
    };
    let resp = send(&env, with_cookie(&pair), [192, 0, 2, 20]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    // A made-up session id is nobody.
    let forged = format!("backstop_session={}", "ab".repeat(32));
    let resp = send(&env, with_cookie(&forged), [192, 0, 2, 20]).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // The token itself in the cookie is nobody either.
    let resp = send(
        &env,
        with_cookie(&format!("backstop_session={OPERATOR}")),
        [192, 0, 2, 20],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // Signing out ends the session on the server: the old cookie no longer works.
    let resp = send(
        &env,
        Request::post("/logout")
            .header("cookie", &pair)
            .body(Body::empty())
            .unwrap(),
        [192, 0, 2, 20],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let resp = send(&env, with_cookie(&pair), [192, 0, 2, 20]).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // A session expires.
    let resp = send(&env, sign_in(OPERATOR), [192, 0, 2, 21]).await;
    let pair = cookie_of(&resp).split(';').next().unwrap().to_string();
    env.clock
        .advance_to(Utc::now() + chrono::Duration::seconds(3601));
    let resp = send(&env, with_cookie(&pair), [192, 0, 2, 21]).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // Behind the trusted proxy, over HTTPS: Secure. The same header from anyone else: ignored.
    let https = || {
        Request::post("/login")
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-for", "192.0.2.30")
            .body(Body::from(format!("token={OPERATOR}")))
            .unwrap()
    };
    let resp = send(&env, https(), proxy).await;
    assert!(
        cookie_of(&resp).contains("; Secure"),
        "{}",
        cookie_of(&resp)
    );
    let resp = send(&env, https(), [192, 0, 2, 22]).await;
    assert!(!cookie_of(&resp).contains("Secure"), "{}", cookie_of(&resp));

    // `secure_cookies = true`: always Secure.
    let env = env_secure().await;
    let resp = send(&env, sign_in(OPERATOR), [192, 0, 2, 23]).await;
    assert!(
        cookie_of(&resp).contains("; Secure"),
        "{}",
        cookie_of(&resp)
    );
}

async fn env_secure() -> Env {
    env(
        ApiConfig {
            secure_cookies: true,
            ..ApiConfig::default()
        },
        None,
    )
    .await
}

#[tokio::test]
async fn the_live_stream_needs_a_token_or_a_session_even_on_a_public_dashboard() {
    let env = env(
        ApiConfig {
            public_dashboard: true,
            ..ApiConfig::default()
        },
        None,
    )
    .await;
    let resp = send(&env, get("/api/events/stream", None), [192, 0, 2, 40]).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = send(
        &env,
        get("/api/events/stream", Some("not-a-token-of-this-server")),
        [192, 0, 2, 40],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = send(
        &env,
        get("/api/events/stream", Some(OPERATOR)),
        [192, 0, 2, 40],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "text/event-stream"
    );
}

/// A probe whose target and error name the storage location.
struct FailingProbe;

#[async_trait::async_trait]
impl StorageProbe for FailingProbe {
    fn describe(&self) -> String {
        "s3://secret-bucket/prod at http://10.1.2.3:9000".into()
    }
    async fn probe(&self) -> Result<Duration, String> {
        Err("connect to 10.1.2.3:9000 refused".into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_viewer_of_the_public_dashboard_sees_statuses_not_who_or_where() {
    use backstop_projections::sample::{self, BackupSpec};
    let pg = backstop_testkit::Postgres::start().unwrap();
    pg.create_db("hardening").unwrap();
    let p = backstop_projections::Projections::connect(&pg.conninfo("hardening"))
        .await
        .unwrap();
    p.migrate().await.unwrap();
    let env = env_with(
        ApiConfig {
            public_dashboard: true,
            ..ApiConfig::default()
        },
        Some(p.clone()),
        Some(Arc::new(FailingProbe)),
    )
    .await;
    let mut events = Vec::new();
    for day in 0..3 {
        let mut spec = BackupSpec::new(
            "trading",
            Utc::now() - chrono::Duration::days(3 - day),
            50_000_000,
        );
        spec.verified = Some(day != 1);
        events.extend(sample::backup(&spec).1);
    }
    events.push(sample::alert(
        "verification_failed",
        "trading on db1",
        "row counts differ on db1 for public.trades",
    ));
    for e in events {
        let stream = e.stream.clone();
        env.ledger
            .append(&stream, ExpectedVersion::Any, vec![e])
            .await
            .unwrap();
    }
    for proj in backstop_projections::projectors() {
        p.catch_up(&env.ledger, proj.as_ref(), 1000).await.unwrap();
    }
    let secrets = [
        "\"db1\"",
        "on db1",
        "secret-bucket",
        "10.1.2.3",
        "operator:",
        "worker:",
    ];
    let (_, body) = {
        let r = send(&env, get("/api/overview", Some(OPERATOR)), [192, 0, 2, 50]).await;
        (r.status(), text(r).await)
    };
    // A signed-in operator sees who and where.
    assert!(body.contains("\"db1\""), "{body}");
    assert!(body.contains("secret-bucket"), "{body}");
    let backup_id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["sources"][0]
        ["latest"]["backup_id"]
        .as_str()
        .unwrap()
        .to_string();

    let public = [
        "/api/overview".to_string(),
        "/api/backups".to_string(),
        format!("/api/backups/{backup_id}"),
        "/api/verifications".to_string(),
        "/api/storage/connectivity".to_string(),
        "/api/alerts".to_string(),
        "/api/reencryption".to_string(),
        "/".to_string(),
        "/partials/overview".to_string(),
        format!("/backups/{backup_id}"),
    ];
    for uri in &public {
        let resp = send(&env, get(uri, None), [192, 0, 2, 51]).await;
        let status = resp.status();
        let body = text(resp).await;
        assert_eq!(status, StatusCode::OK, "{uri}: {body}");
        for s in secrets {
            assert!(!body.contains(s), "{uri} shows {s:?} to anyone: {body}");
        }
    }
    // Statuses and ages are still there.
    let body = text(send(&env, get("/api/overview", None), [192, 0, 2, 51]).await).await;
    let o: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(o["sources"][0]["source"], "trading");
    assert_eq!(o["sources"][0]["latest"]["state"], "completed");
    assert!(o["sources"][0]["latest"]["completed_at"].is_string());
    assert_eq!(o["storage"]["ok"], false);
    assert_eq!(o["storage"]["error"], "");
    // The page for an anonymous viewer does not open the live stream.
    let page = text(send(&env, get("/", None), [192, 0, 2, 51]).await).await;
    assert!(!page.contains("data-live=\"1\""));
    let page = text(send(&env, get("/", Some(OPERATOR)), [192, 0, 2, 51]).await).await;
    assert!(page.contains("data-live=\"1\""));
    assert!(page.contains("db1"), "the operator's page shows the host");
}

/// A throwaway certificate for `localhost` and 127.0.0.1, made by the `openssl` command.
fn throwaway_certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        // An end-entity certificate, trusted as its own anchor (webpki refuses a CA as a leaf).
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// One HTTP/1.1 request over TLS, trusting only `ca`; the whole answer.
async fn https_request(
    port: u16,
    ca: &std::path::Path,
    request: &str,
) -> Result<String, std::io::Error> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(request.as_bytes()).await?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_tls_serves_https_with_secure_cookies_and_refuses_plain_http() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = throwaway_certificate(certs.path());
    let acceptor = backstop_api::tls_acceptor(&cert, &key).expect("the pair loads");
    let env = env(ApiConfig::default(), None).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(backstop_api::serve_tls(
        listener,
        acceptor,
        env.state.clone(),
        stop,
    ));

    let answer = https_request(
        port,
        &cert,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("a TLS client that trusts the certificate gets an answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Signing in over the server's own TLS gives a Secure cookie, with no configuration.
    let form = format!("token={OPERATOR}");
    let answer = https_request(
        port,
        &cert,
        &format!(
            "POST /login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
            form.len()
        ),
    )
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 303"), "{answer}");
    let cookie = answer
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .expect("a cookie");
    assert!(
        cookie.contains("; Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );

    // A client that does not trust the certificate is refused by its own TLS stack.
    let other = tempfile::tempdir().unwrap();
    let (other_cert, _) = throwaway_certificate(other.path());
    let e = https_request(port, &other_cert, "GET /healthz HTTP/1.1\r\n\r\n")
        .await
        .expect_err("an untrusted certificate");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");

    // Plain HTTP on the TLS port gets no HTTP answer.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = tcp.read_to_end(&mut out).await;
        assert!(
            !String::from_utf8_lossy(&out).contains("200 OK"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }

    stop_tx.send_replace(true);
    server.await.unwrap().unwrap();

    // A key that is not the certificate's is refused with what is wrong.
    let Err(e) = backstop_api::tls_acceptor(&cert, &other.path().join("key.pem")) else {
        panic!("another certificate's key was accepted");
    };
    assert!(
        e.to_string().contains("tls_key") || e.to_string().contains("pair"),
        "{e}"
    );
}
