//! The API over real projections (PostgreSQL 15) and a real ledger: roles and refusals (each
//! recorded in the ledger), malformed input answered with 400s, the overview, metrics, the audit
//! query and export, and the 503 when projections are not configured.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use backstop_api::{ApiConfig, ApiState, Role, StorageProbe, TokenEntry, Tokens};
use backstop_events::NewEvent;
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerConfig};
use backstop_projections::sample::{self, BackupSpec};
use backstop_projections::{Projections, projectors};
use backstop_testkit::Postgres;
use chrono::Utc;
use tower::ServiceExt;

const OPERATOR: &str = "operator-token-0123456789";
const AUDITOR: &str = "auditor-token-0123456789";
const LEAD: &str = "lead-token-0123456789abc";

struct DirProbe(std::path::PathBuf);

#[async_trait::async_trait]
impl StorageProbe for DirProbe {
    fn describe(&self) -> String {
        self.0.display().to_string()
    }
    async fn probe(&self) -> Result<Duration, String> {
        let t = std::time::Instant::now();
        tokio::fs::metadata(&self.0)
            .await
            .map_err(|e| format!("{}: {e}", self.0.display()))?;
        Ok(t.elapsed())
    }
}

struct Env {
    _pg: Option<Postgres>,
    projections: Option<Projections>,
    dir: tempfile::TempDir,
    ledger: Ledger,
    state: ApiState,
    _stop: tokio::sync::watch::Sender<bool>,
}

fn tokens() -> Tokens {
    Tokens::new(vec![
        TokenEntry::from_plain("alice", Role::Operator, OPERATOR).unwrap(),
        TokenEntry::from_plain("audrey", Role::Auditor, AUDITOR).unwrap(),
        TokenEntry::from_plain("lee", Role::RecoveryLead, LEAD).unwrap(),
    ])
}

async fn append_all(ledger: &Ledger, events: Vec<NewEvent>) {
    for e in events {
        let stream = e.stream.clone();
        ledger
            .append(&stream, ExpectedVersion::Any, vec![e])
            .await
            .unwrap();
    }
}

async fn env(with_projections: bool) -> Env {
    env_with(with_projections, None).await
}

async fn env_with(with_projections: bool, repository: Option<&str>) -> Env {
    env_from(with_projections, repository, None).await
}

/// Five daily backups of `trading` (the middle one failed verification), and optionally a
/// newest one `last_hours_ago` old that is not verified yet.
async fn env_from(
    with_projections: bool,
    repository: Option<&str>,
    unverified_newest: Option<i64>,
) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = LedgerConfig::in_data_dir(dir.path());
    cfg.checkpoint_every = 5;
    let ledger = Ledger::open(&cfg).unwrap();
    let now = Utc::now();
    if let Some(hours) = unverified_newest {
        let mut spec = BackupSpec::new("trading", now - chrono::Duration::hours(hours), 60_000_000);
        spec.verified = None;
        append_all(&ledger, sample::backup(&spec).1).await;
    }
    for day in 0..5 {
        let mut spec = BackupSpec::new(
            "trading",
            // Older than the unverified newest, when there is one.
            now - chrono::Duration::days(4 - day)
                - chrono::Duration::hours(if unverified_newest.is_some() { 2 } else { 0 }),
            50_000_000 + day as u64 * 1_000_000,
        );
        spec.verified = Some(day != 2);
        append_all(&ledger, sample::backup(&spec).1).await;
        append_all(
            &ledger,
            vec![sample::storage_sample(
                now - chrono::Duration::days(4 - day),
                10_000_000 * (day as u64 + 1),
                100,
            )],
        )
        .await;
    }
    // An older failed drill of `trading`, then a passed one: /metrics shows the newest.
    append_all(&ledger, sample::drill("trading", false, 9_000)).await;
    append_all(&ledger, sample::drill("trading", true, 2_500)).await;
    // A replica that fell 3 hours behind, then caught up to 120 s: /metrics shows the newest.
    for lag in [10_800, 120] {
        append_all(
            &ledger,
            vec![NewEvent::new(
                backstop_events::streams::storage(),
                backstop_events::Actor::worker("replicate"),
                &backstop_events::Event::ReplicationLagMeasured(
                    backstop_events::ReplicationLagMeasured {
                        region: "eu".into(),
                        lag_seconds: lag,
                    },
                ),
            )],
        )
        .await;
    }
    // The replica's replications: one completed, then a newer one failed.
    let (done, broken) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let replication = |event: backstop_events::Event| {
        NewEvent::new(
            "replication-eu",
            backstop_events::Actor::worker("replicate"),
            &event,
        )
    };
    append_all(
        &ledger,
        vec![
            replication(backstop_events::Event::ReplicationCompleted(
                backstop_events::ReplicationCompleted {
                    replication_id: uuid::Uuid::now_v7(),
                    backup_id: done,
                    from_region: "primary".into(),
                    to_region: "eu".into(),
                    objects: 12,
                    bytes: 4096,
                },
            )),
            replication(backstop_events::Event::ReplicationFailed(
                backstop_events::ReplicationFailed {
                    replication_id: uuid::Uuid::now_v7(),
                    backup_id: broken,
                    from_region: "primary".into(),
                    to_region: "eu".into(),
                    reason: "the replica's bucket refused the upload".into(),
                },
            )),
        ],
    )
    .await;
    let (pg, projections) = if with_projections {
        let pg = Postgres::start().unwrap();
        pg.create_db("api").unwrap();
        let p = Projections::connect(&pg.conninfo("api")).await.unwrap();
        p.migrate().await.unwrap();
        for proj in projectors() {
            p.catch_up(&ledger, proj.as_ref(), 1000).await.unwrap();
        }
        (Some(pg), Some(p))
    } else {
        (None, None)
    };
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let state = ApiState::new(
        ApiConfig {
            tokens: tokens(),
            ..ApiConfig::default()
        },
        ledger.clone(),
        Arc::new(ledger.clone()),
        projections.clone(),
        stop,
    )
    .with_export_signer(Arc::new(
        backstop_ledger::CheckpointSigner::load_or_create(&cfg.signing_key).unwrap(),
    ))
    .with_storage(Arc::new(DirProbe(match repository {
        Some(name) => dir.path().join(name),
        None => dir.path().to_path_buf(),
    })));
    Env {
        _pg: pg,
        projections,
        dir,
        ledger,
        state,
        _stop: stop_tx,
    }
}

/// A new peer address for each request: the refusals of one client in a window are aggregated
/// into one event (`tests/hardening.rs` tests that), and these tests look at each refusal.
fn next_peer() -> axum::extract::ConnectInfo<std::net::SocketAddr> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    axum::extract::ConnectInfo(std::net::SocketAddr::from((
        [10, (n >> 16) as u8, (n >> 8) as u8, n as u8],
        40000,
    )))
}

async fn call(
    env: &Env,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (StatusCode, String) {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .extension(next_peer());
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(
            body.map(|b| Body::from(b.to_string()))
                .unwrap_or_else(Body::empty),
        )
        .unwrap();
    let resp = backstop_api::router(env.state.clone())
        .oneshot(req)
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

fn denials(ledger: &Ledger) -> Vec<serde_json::Value> {
    ledger
        .read(1, 100_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == "access.denied")
        .map(|e| {
            let mut p = e.payload.clone();
            p["actor"] = e.actor.to_string().into();
            p
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_decide_and_every_refusal_is_recorded_with_the_caller() {
    let env = env(true).await;

    let (s, body) = call(&env, "GET", "/api/overview", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");
    let (s, _) = call(
        &env,
        "GET",
        "/api/overview",
        Some("not-a-known-token-at-all"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, body) = call(
        &env,
        "POST",
        "/api/backups",
        Some(AUDITOR),
        Some(r#"{"source":"trading"}"#),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("operator"), "{body}");
    let (s, _) = call(
        &env,
        "POST",
        "/api/restores",
        Some(OPERATOR),
        Some(r#"{"backup":"latest","target":"postgres://db/restore"}"#),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = call(&env, "GET", "/api/audit/export", Some(OPERATOR), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    let d = denials(&env.ledger);
    assert_eq!(d.len(), 5, "{d:#?}");
    assert!(
        d[0]["caller"].as_str().unwrap().starts_with("anonymous"),
        "{d:#?}"
    );
    assert!(
        d[1]["caller"].as_str().unwrap().contains("unknown token"),
        "{d:#?}"
    );
    assert_eq!(d[2]["role"], "auditor");
    assert_eq!(d[2]["actor"], "operator:audrey");
    assert_eq!(d[2]["method"], "POST");
    assert_eq!(d[2]["path"], "/api/backups");
    assert_eq!(d[3]["actor"], "operator:alice");
    assert_eq!(d[3]["path"], "/api/restores");
    assert!(
        !serde_json::to_string(&d)
            .unwrap()
            .contains("not-a-known-token-at-all"),
        "tokens never reach the ledger"
    );

    // Allowed: reads for every role, backups for operators, restores for the recovery lead,
    // the export for the auditor.
    for t in [OPERATOR, AUDITOR, LEAD] {
        let (s, body) = call(&env, "GET", "/api/overview", Some(t), None).await;
        assert_eq!(s, StatusCode::OK, "{body}");
    }
    let (s, body) = call(
        &env,
        "POST",
        "/api/backups",
        Some(OPERATOR),
        Some(r#"{"source":"trading","kind":"incremental"}"#),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{body}");
    let requested: serde_json::Value = serde_json::from_str(&body).unwrap();
    let (s, body) = call(&env, "POST", "/api/restores", Some(LEAD), Some(r#"{"backup":"latest","source":"trading","target":"postgres://db.internal/restore","tables":["public.trades"]}"#)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{body}");
    let events = env.ledger.read(1, 100_000).unwrap();
    let req = events
        .iter()
        .find(|e| {
            e.event_type == "backup.requested" && e.payload["backup_id"] == requested["backup_id"]
        })
        .expect("backup.requested by alice");
    assert_eq!(req.payload["kind"], "incremental");
    assert_eq!(req.actor.to_string(), "operator:alice");
    let rec = events
        .iter()
        .find(|e| e.event_type == "recovery.requested")
        .expect("recovery.requested");
    assert_eq!(rec.payload["operator"], "lee");
    assert_eq!(rec.actor.to_string(), "operator:lee");
    assert_eq!(rec.payload["scope"]["tables"][0], "public.trades");
    let (s, body) = call(
        &env,
        "GET",
        "/api/audit/export?format=jsonl",
        Some(AUDITOR),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let v = backstop_api::audit_export::verify(
        std::io::Cursor::new(body.as_bytes()),
        Some(env.ledger.public_key()),
    )
    .expect("the served export verifies");
    assert!(v.events > 10);
    assert_eq!(
        denials(&env.ledger).len(),
        5,
        "allowed requests record no refusal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_is_a_400_with_a_message_never_a_500() {
    let env = env(true).await;
    let bad_gets = [
        "/api/audit?limit=abc",
        "/api/audit?limit=0",
        "/api/audit?limit=99999999999999999999999",
        "/api/audit?from=yesterday",
        "/api/audit?from=2025-02-01&to=2025-01-01",
        "/api/audit?before=-1",
        "/api/audit?type=DROP%20TABLE",
        "/api/audit?tpye=backup.completed",
        "/api/backups/not-a-uuid",
        "/api/backups?limit=-5",
        "/api/charts/storage?bucket=week",
        "/api/charts/sizes?days=0",
        "/api/verifications?days=abc",
        "/api/audit/export?format=xml",
        "/api/audit/export?from=31/01/2025",
        "/api/overview?x=1",
    ];
    let long_actor = format!("/api/audit?actor={}", "a".repeat(300));
    for uri in bad_gets
        .iter()
        .copied()
        .chain(std::iter::once(long_actor.as_str()))
    {
        let token = if uri.contains("export") {
            AUDITOR
        } else {
            OPERATOR
        };
        let (s, body) = call(&env, "GET", uri, Some(token), None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}: {body}");
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("{uri}: not JSON: {body}"));
        assert!(
            v["error"].as_str().is_some_and(|m| m.len() > 10),
            "{uri}: {body}"
        );
    }
    let bad_posts = [
        ("/api/backups", "{not json"),
        ("/api/backups", r#"{"kind":"full"}"#),
        ("/api/backups", r#"{"source":"trading","kind":"weekly"}"#),
        ("/api/backups", r#"{"source":"has space"}"#),
        ("/api/backups", r#"{"source":"x","colour":"red"}"#),
        (
            "/api/restores",
            r#"{"backup":"latest","target":"postgres://u:secret@db/x"}"#,
        ),
        (
            "/api/restores",
            r#"{"backup":"latest","target":"host=db password=secret"}"#,
        ),
        (
            "/api/restores",
            r#"{"backup":"nope","target":"/srv/restore"}"#,
        ),
        (
            "/api/restores",
            r#"{"backup":"latest","target":"/srv/restore","point_in_time":"noon"}"#,
        ),
    ];
    for (uri, body) in bad_posts {
        let (s, resp) = call(&env, "POST", uri, Some(LEAD), Some(body)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri} {body}: {resp}");
        assert!(resp.contains("\"error\""), "{resp}");
    }
    let (s, body) = call(
        &env,
        "GET",
        "/api/backups/0191e8a0-0000-7000-8000-000000000000",
        Some(OPERATOR),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    let (s, _) = call(&env, "GET", "/no/such/page", Some(OPERATOR), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_page_json_audit_and_metrics_show_the_projections() {
    let env = env(true).await;
    let (s, body) = call(&env, "GET", "/api/overview", Some(OPERATOR), None).await;
    assert_eq!(s, StatusCode::OK);
    let o: serde_json::Value = serde_json::from_str(&body).unwrap();
    let src = &o["sources"][0];
    assert_eq!(src["source"], "trading");
    assert_eq!(src["last_success"]["verification_state"], "passed");
    assert_eq!(src["last_success"]["raw_bytes"], 54_000_000);
    assert!(src["age_seconds"].as_i64().unwrap() < 120);
    assert_eq!(o["verified_failed_7d"], 1);
    assert_eq!(o["verified_passed_7d"], 4);
    assert!(o["estimate"]["estimated_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(o["storage"]["ok"], true);

    let (s, html) = call(&env, "GET", "/", Some(OPERATOR), None).await;
    assert_eq!(s, StatusCode::OK, "{html}");
    assert!(html.contains("data-source=\"trading\""), "{html}");
    // The drills panel: both drills, newest (passed, 2.5 s) first, each with its RTO bar.
    let panel = html
        .split("id=\"drills-panel\"")
        .nth(1)
        .expect("the drills panel");
    let passed = panel.find("data-passed=\"true\" data-rto-ms=\"2500\"");
    let failed = panel.find("data-passed=\"false\" data-rto-ms=\"9000\"");
    assert!(
        passed.is_some() && failed.is_some() && passed < failed,
        "{panel}"
    );
    assert_eq!(
        panel
            .split("</section>")
            .next()
            .unwrap()
            .matches("class=\"rto-bar\"")
            .count(),
        2,
        "{panel}"
    );
    assert_eq!(
        html.matches("<rect class=\"bar ").count(),
        15,
        "three bars per backup"
    );
    // The replication panel: the replica's measured lag, its last completed replication and
    // its newest one, failed with the reason.
    let replicas = html
        .split("id=\"replicas-panel\"")
        .nth(1)
        .expect("the replicas panel")
        .split("</section>")
        .next()
        .unwrap();
    assert!(
        replicas.contains(
            "data-replica=\"eu\" data-lag-seconds=\"120\" data-lagging=\"false\" data-state=\"failed\""
        ),
        "{replicas}"
    );
    assert!(
        replicas.contains("2 min") && replicas.contains(" behind"),
        "{replicas}"
    );
    assert!(
        replicas.contains("the replica&#x27;s bucket refused the upload")
            || replicas.contains("the replica's bucket refused the upload"),
        "{replicas}"
    );
    assert!(!replicas.contains(">never<"), "{replicas}");
    let r = &o["replicas"][0];
    assert_eq!(r["replica"], "eu");
    assert_eq!(r["lag_seconds"], 120);
    assert_eq!(r["state"], "failed");
    assert!(r["last_replicated_at"].is_string(), "{r}");
    assert!(r["last_backup_id"].is_string(), "{r}");
    assert!(html.contains("class=\"chart storage\""));
    assert!(html.contains("data-verification=\"passed\""));

    let backup_id = src["last_success"]["backup_id"].as_str().unwrap();
    let (s, html) = call(
        &env,
        "GET",
        &format!("/backups/{backup_id}"),
        Some(OPERATOR),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{html}");
    assert!(html.contains("public.trades"), "{html}");

    let (s, body) = call(
        &env,
        "GET",
        "/api/audit?type=verification.*&limit=3",
        Some(AUDITOR),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let a: serde_json::Value = serde_json::from_str(&body).unwrap();
    let events = a["events"].as_array().unwrap();
    assert_eq!(events.len(), 3);
    assert!(events.iter().all(|e| {
        e["event_type"]
            .as_str()
            .unwrap()
            .starts_with("verification.")
    }));
    let before = a["next_before"].as_i64().unwrap();
    let (_, body) = call(
        &env,
        "GET",
        &format!("/api/audit?type=verification.*&limit=3&before={before}"),
        Some(AUDITOR),
        None,
    )
    .await;
    let page2: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        page2["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["position"].as_i64().unwrap() < before)
    );
    let (s, html) = call(
        &env,
        "GET",
        "/audit?actor=worker:verify",
        Some(AUDITOR),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{html}");
    assert!(html.contains("verification.passed"));

    let (s, text) = call(&env, "GET", "/metrics", None, None).await;
    assert_eq!(s, StatusCode::OK);
    for needle in [
        "backstop_last_success_timestamp_seconds{source=\"trading\",kind=\"full\"}",
        "backstop_last_success_bytes{source=\"trading\",kind=\"full\",size=\"raw\"} 54000000",
        "backstop_verifications_total{result=\"failed\"} 1",
        "backstop_ledger_head_position",
        "backstop_projection_lag_events{projector=\"audit\"} 0",
        "backstop_projections_up 1",
        "backstop_storage_up 1",
        "backstop_drill_last_rto_seconds{source=\"trading\"} 2.500",
        "backstop_drill_last_passed{source=\"trading\"} 1",
        "backstop_drill_last_timestamp_seconds{source=\"trading\"}",
        "backstop_replication_lag_seconds{replica=\"eu\"} 120\n",
        "backstop_replication_lag_measured_timestamp_seconds{replica=\"eu\"}",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    let (s, _) = call(&env, "GET", "/healthz", None, None).await;
    assert_eq!(s, StatusCode::OK);
    drop(env.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_projections_pages_say_what_to_configure_and_health_and_metrics_still_work() {
    let env = env(false).await;
    let (s, body) = call(&env, "GET", "/api/overview", Some(OPERATOR), None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("projections.database_url"), "{body}");
    let (s, body) = call(&env, "GET", "/", Some(OPERATOR), None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("projections.database_url"), "{body}");
    let (s, body) = call(&env, "GET", "/healthz", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(body.contains("not configured"));
    let (s, body) = call(&env, "GET", "/metrics", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(body.contains("backstop_projections_up 0"), "{body}");
    // The export reads the ledger, not the projections.
    let (s, body) = call(&env, "GET", "/api/audit/export", Some(AUDITOR), None).await;
    assert_eq!(s, StatusCode::OK, "{body}");
}

async fn raw(env: &Env, mut req: Request<Body>) -> axum::response::Response {
    req.extensions_mut().insert(next_peer());
    backstop_api::router(env.state.clone())
        .oneshot(req)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sign_in_cookie_authorizes_reads_but_never_changes() {
    let env = env(true).await;
    // A wrong token at sign-in is refused and recorded.
    let resp = raw(
        &env,
        Request::post("/login")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::from("token=wrong-token-0000000000"))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(denials(&env.ledger).len(), 1);

    let resp = raw(
        &env,
        Request::post("/login")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::from(format!("token={OPERATOR}")))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let cookie = resp
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_string();

    let resp = raw(
        &env,
        Request::get("/")
            .header("cookie", &pair)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    // Without the cookie, a person is sent to the sign-in page.
    let resp = raw(&env, Request::get("/").body(Body::empty()).unwrap()).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers().get("location").unwrap(), "/login");
    // The cookie never authorizes a change: a page elsewhere cannot request a backup.
    let resp = raw(
        &env,
        Request::post("/api/backups")
            .header("cookie", &pair)
            .header("content-type", "application/json")
            .body(Body::from(r#"{"source":"trading"}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // Three refusals recorded: the wrong sign-in, the page without a cookie, the cookie POST.
    assert_eq!(denials(&env.ledger).len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_storage_is_shown_and_measured() {
    let env = env_with(true, Some("no-such-repository")).await;
    let (s, body) = call(
        &env,
        "GET",
        "/api/storage/connectivity",
        Some(OPERATOR),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["live"]["ok"], false);
    assert!(
        v["live"]["error"]
            .as_str()
            .unwrap()
            .contains("no-such-repository"),
        "{body}"
    );
    let (_, html) = call(&env, "GET", "/", Some(OPERATOR), None).await;
    assert!(
        html.contains("unreachable") && html.contains("no-such-repository"),
        "{html}"
    );
    let (_, text) = call(&env, "GET", "/metrics", None, None).await;
    assert!(text.contains("backstop_storage_up 0"), "{text}");
}

#[tokio::test]
async fn restore_latest_takes_the_newest_verified_backup_unless_unverified_is_allowed() {
    let env = env_from(true, None, Some(1)).await;
    let newest = env
        .ledger
        .read(1, 100_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == "backup.completed")
        .max_by_key(|e| e.occurred_at)
        .map(|e| e.payload["backup_id"].as_str().unwrap().to_string())
        .unwrap();
    let body =
        r#"{"backup":"latest","source":"trading","target":"postgres://db.internal/restore"}"#;
    let (s, answer) = call(&env, "POST", "/api/restores", Some(LEAD), Some(body)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{answer}");
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_ne!(
        v["backup_id"],
        newest.as_str(),
        "the unverified newest is passed over"
    );
    let chosen = v["chosen"].as_str().unwrap();
    assert!(
        chosen.contains("passed verification") && chosen.contains(&newest),
        "{chosen}"
    );
    let body = r#"{"backup":"latest","source":"trading","target":"postgres://db.internal/restore","allow_unverified":true}"#;
    let (s, answer) = call(&env, "POST", "/api/restores", Some(LEAD), Some(body)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{answer}");
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(v["backup_id"], newest.as_str());
}

/// Metric names in a PromQL expression: `backstop_...` identifiers, with a histogram's or
/// summary's series suffixes taken back to the family name.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("backstop_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &expr[start..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.push(family.to_string());
        i = end;
    }
    out
}

fn deploy(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(path)
}

/// promtool from PATH or where scripts/setup puts it.
fn promtool() -> Option<std::path::PathBuf> {
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(home.map(|h| h.join(".local/bin")));
    candidates.map(|d| d.join("promtool")).find(|p| p.is_file())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_rules_and_the_grafana_dashboard_name_only_exported_metrics() {
    let env = env(true).await;
    // The process-wide recorder `serve` installs, for the HTTP request families. No other test
    // in this binary installs one.
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("the only recorder of this test binary");
    let env = Env {
        state: env.state.with_prometheus(handle),
        ..env
    };
    // A running backup, and an open and a resolved alert, so every family has a sample.
    append_all(
        &env.ledger,
        vec![
            sample::alert("backup_failed", "trading", "pg_dump: connection refused"),
            sample::alert("no_recent_backup", "trading", "no backup in 25 h"),
        ],
    )
    .await;
    let raised = env.ledger.read(1, 100_000).unwrap();
    let resolved_of = raised
        .iter()
        .rev()
        .find(|e| e.event_type == "alert.raised")
        .unwrap();
    let backstop_events::Event::AlertRaised(r) = resolved_of.event().unwrap() else {
        unreachable!()
    };
    append_all(
        &env.ledger,
        vec![NewEvent::new(
            backstop_events::streams::alerts(),
            backstop_events::Actor::worker("alert-monitor"),
            &backstop_events::Event::AlertResolved(backstop_events::AlertResolved {
                alert_id: r.alert_id,
                kind: r.kind,
                subject: r.subject,
                message: "cleared".into(),
                key: String::new(),
                source: None,
            }),
        )],
    )
    .await;
    let p = env.projections.as_ref().unwrap();
    for proj in projectors() {
        p.catch_up(&env.ledger, proj.as_ref(), 1000).await.unwrap();
    }
    // The alerts panel: the open one first, the resolved one below it.
    let (s, html) = call(&env, "GET", "/", Some(OPERATOR), None).await;
    assert_eq!(s, StatusCode::OK, "{html}");
    let panel = html.find("id=\"alerts-panel\"").expect("an alerts panel");
    let open = html[panel..]
        .find("class=\"alert open-alert\" data-kind=\"backup_failed\"")
        .expect("the open alert in the panel");
    let resolved = html[panel..]
        .find("class=\"small muted resolved-alert\" data-kind=\"no_recent_backup\"")
        .expect("the resolved alert in the panel");
    assert!(open < resolved, "open alerts come first");

    let (s, text) = call(&env, "GET", "/metrics", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        text.contains("backstop_last_backup_success{source=\"trading\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("backstop_backup_running_seconds{source=\"trading\"} 0"),
        "{text}"
    );
    let exported: std::collections::BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();

    let rules = std::fs::read_to_string(deploy("prometheus/backstop-rules.yml")).unwrap();
    let mut named = Vec::new();
    for line in rules.lines() {
        if let Some(expr) = line.trim().strip_prefix("expr:") {
            named.extend(metric_names(expr));
        }
    }
    for alert in ["BackupFailure", "BackupLatency", "BackupNoSuccess24h"] {
        assert!(
            rules.contains(&format!("alert: {alert}")),
            "{alert} missing"
        );
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/backstop-dashboard.json")).unwrap(),
    )
    .expect("the Grafana dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    for p in panels {
        for t in p["targets"].as_array().expect("targets") {
            named.extend(metric_names(t["expr"].as_str().expect("expr")));
        }
    }
    assert!(named.len() > 15);
    for name in &named {
        assert!(
            exported.contains(name),
            "{name} is named in deploy/ but /metrics does not export it; exported: {exported:?}"
        );
    }

    // The rules parse and behave as their unit tests say, where promtool is installed
    // (scripts/setup installs it from Debian's prometheus package).
    match promtool() {
        Some(promtool) => {
            for args in [
                vec!["check", "rules", "backstop-rules.yml"],
                vec!["test", "rules", "backstop-rules.test.yml"],
            ] {
                let out = std::process::Command::new(&promtool)
                    .args(&args)
                    .current_dir(deploy("prometheus"))
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "promtool {args:?}: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        None => eprintln!("promtool not installed: the rule file's syntax is not checked here"),
    }
    drop(env.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_weekly_summary_page_and_json_count_the_weeks_backups() {
    use chrono::Datelike;
    let env = env(true).await;
    // The five daily backups span four days: within this week and the one before it.
    let today = Utc::now()
        .with_timezone(&chrono_tz::America::New_York)
        .date_naive();
    let next_monday =
        today + chrono::Duration::days(7 - i64::from(today.weekday().num_days_from_monday()));
    let mut completed = 0;
    let mut failed_verifications = 0;
    for before in [next_monday, next_monday - chrono::Duration::days(7)] {
        let (s, body) = call(
            &env,
            "GET",
            &format!("/api/reports/weekly?before={before}"),
            Some(OPERATOR),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        let r: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(r["zone"], "America/New_York");
        completed += r["backups_completed"].as_u64().unwrap();
        failed_verifications += r["verifications_failed"].as_u64().unwrap();
    }
    assert_eq!(completed, 5);
    assert_eq!(failed_verifications, 1);
    let (s, html) = call(
        &env,
        "GET",
        &format!("/reports/weekly?before={next_monday}"),
        Some(OPERATOR),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{html}");
    assert!(html.contains("id=\"report-text\""), "{html}");
    assert!(html.contains("Backstop weekly summary"), "{html}");
    let (s, body) = call(
        &env,
        "GET",
        "/api/reports/weekly?before=yesterday",
        Some(OPERATOR),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(body.contains("YYYY-MM-DD"), "{body}");
    let (s, _) = call(&env, "GET", "/api/reports/weekly", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    drop(env.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_shows_a_reencryption_jobs_progress() {
    use backstop_events::{Actor, Event, ReencryptionProgressed, ReencryptionStarted, streams};
    let env = env(true).await;
    let job = backstop_events::uuid_v7();
    append_all(
        &env.ledger,
        vec![
            NewEvent::new(
                streams::repository(),
                Actor::worker("key-rotation"),
                &Event::ReencryptionStarted(ReencryptionStarted {
                    job_id: job,
                    purpose: "database".into(),
                    from_key_id: "database-v1-0a0b0c0d".into(),
                    to_key_id: "database-v2-1a2b3c4d".into(),
                    backups: 4,
                }),
            ),
            NewEvent::new(
                streams::repository(),
                Actor::worker("key-rotation"),
                &Event::ReencryptionProgressed(ReencryptionProgressed {
                    job_id: job,
                    backup_id: backstop_events::uuid_v7(),
                    objects: 120,
                    bytes: 3 << 20,
                    manifest_sha3: "ab".repeat(32),
                    backups_done: 1,
                    backups_total: 4,
                }),
            ),
        ],
    )
    .await;
    let p = env.projections.as_ref().unwrap();
    for proj in projectors() {
        p.catch_up(&env.ledger, proj.as_ref(), 1000).await.unwrap();
    }
    let (s, html) = call(&env, "GET", "/", Some(OPERATOR), None).await;
    assert_eq!(s, StatusCode::OK, "{html}");
    let panel = html
        .find("id=\"reencryption-panel\"")
        .expect("a key rotation panel");
    let job_html = &html[panel..];
    assert!(
        job_html.contains("data-state=\"running\" data-done=\"1\" data-total=\"4\""),
        "{job_html}"
    );
    assert!(
        job_html.contains("database-v2-1a2b3c4d") && job_html.contains("1 of 4 backups (25%)"),
        "{job_html}"
    );
}
