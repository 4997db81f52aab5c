//! A bus strangers cannot write to: a real nats-server running deploy/nats/auth.conf's users and
//! permissions. `backstop serve` (user `ledger`) publishes the ledger; `backstop worker` (user
//! `worker`) handles an event and appends its result; an anonymous client is refused; the
//! worker's credentials cannot publish an event onto the stream. On top of the bus's own
//! authorization, the worker signs its appends with an identity made by `backstop ledger
//! identity new` (its printed configuration used as is), and an append the worker's NATS
//! credentials can send but its identity did not sign is refused and recorded.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use backstop_testkit::{Nats, free_port};
use support::{Process, Webhook, run, stderr};

fn deploy(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/nats")
        .join(name)
        .canonicalize()
        .expect("deploy/nats exists")
}

fn secret(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, format!("{text}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p.display().to_string()
}

fn config(dir: &std::path::Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_ledger_publishes_events_and_strangers_are_refused() {
    let (ledger_pw, worker_pw) = ("ledger-pw-4e1f0a", "worker-pw-9c2b7d");
    // deploy/nats/auth.conf itself, as the nodes include it (includes resolve relative to the
    // including file, so the kit's configuration is the file's text).
    let nats = Nats::start_with_config(
        &std::fs::read_to_string(deploy("auth.conf")).unwrap(),
        &[
            ("BACKSTOP_NATS_LEDGER_PASSWORD", ledger_pw),
            ("BACKSTOP_NATS_WORKER_PASSWORD", worker_pw),
            ("BACKSTOP_NATS_WALHOST_PASSWORD", "walhost-pw-51d0e3"),
        ],
    )
    .expect("nats-server with deploy/nats/auth.conf");
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start();
    let common = format!(
        "[nats]\nurl = \"{}\"\n\n[api]\nlisten = \"127.0.0.1:{}\"\n\n[reports]\nweekly = false\n\n[notify]\nbackoff_ms = 50\n\n[[notify.channels]]\nname = \"chat\"\nkind = \"webhook\"\nurl = \"{}\"\nevents = [\"alerts\"]\n",
        nats.url(),
        free_port(),
        hook.url()
    );
    // The worker's identity: the command prints the ledger's part, then the worker's.
    let key_file = dir.path().join("worker-a.key");
    let made = run(
        dir.path(),
        &[
            "ledger",
            "identity",
            "new",
            "worker-a",
            "--key-file",
            key_file.to_str().unwrap(),
            "--role",
            "worker",
        ],
    );
    assert!(made.status.success(), "{}", stderr(&made));
    let printed = support::stdout(&made);
    let (ledger_part, worker_part) = printed
        .split_once("# On the worker")
        .expect("the command prints both parts");
    let worker_part = worker_part.split_once('\n').unwrap().1;
    let serve_cfg = config(
        dir.path(),
        "serve.toml",
        &format!("{common}\n{ledger_part}").replace(
            "[nats]\n",
            &format!(
                "[nats]\nuser = \"ledger\"\npassword_file = \"{}\"\n",
                secret(dir.path(), "ledger.pw", ledger_pw)
            ),
        ),
    );
    let worker_cfg = config(
        dir.path(),
        "worker.toml",
        &common.replace(
            "[nats]\n",
            &format!(
                "[nats]\nuser = \"worker\"\npassword_file = \"{}\"\n{worker_part}\n",
                secret(dir.path(), "worker.pw", worker_pw)
            ),
        ),
    );
    let mut serve = Process::spawn(
        dir.path(),
        &["--config", &serve_cfg, "serve", "--no-workers"],
        &[],
    );
    serve.wait_for_log("publishing to NATS JetStream", Duration::from_secs(60));
    let worker = Process::spawn(
        dir.path(),
        &["--config", &worker_cfg, "worker", "--only", "notify"],
        &[],
    );
    worker.wait_for_log("worker running", Duration::from_secs(60));

    // An alert recorded beside serve reaches the worker over JetStream; the worker's webhook
    // fires and its notification.sent goes back through backstop.ledger.append.
    let out = run(
        dir.path(),
        &[
            "--config",
            &serve_cfg,
            "ledger",
            "append",
            "--stream",
            "alerts",
            "--type",
            "alert.raised",
            "--payload",
            r#"{"alert_id":"01941f29-7c80-7000-8000-00000000c001","severity":"critical","kind":"backup_failed","subject":"orders","message":"the last backup of `orders` failed","key":"backup_failed/orders","source":"orders"}"#,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let bodies = hook.wait_for(1);
    assert_eq!(bodies[0]["backstop"]["key"], "backup_failed/orders");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let tail = run(
            dir.path(),
            &[
                "--config", &serve_cfg, "ledger", "tail", "--json", "--from", "1",
            ],
        );
        if support::stdout(&tail).contains("\"notification.sent\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker's append never arrived"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Strangers: no credentials, or wrong ones, cannot even connect.
    assert!(
        async_nats::connect(nats.url()).await.is_err(),
        "anonymous access"
    );
    assert!(
        async_nats::ConnectOptions::with_user_and_password("worker".into(), "guess".into())
            .connect(nats.url())
            .await
            .is_err(),
        "a wrong password"
    );

    // The worker's credentials cannot put an event on the stream.
    // The server's answers to this connection (a refused publish is an asynchronous -ERR).
    let errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = errors.clone();
    let as_worker =
        async_nats::ConnectOptions::with_user_and_password("worker".into(), worker_pw.into())
            .event_callback(move |event| {
                let sink = sink.clone();
                async move {
                    sink.lock().unwrap().push(event.to_string());
                }
            })
            .connect(nats.url())
            .await
            .expect("the worker connects");
    let as_ledger =
        async_nats::ConnectOptions::with_user_and_password("ledger".into(), ledger_pw.into())
            .connect(nats.url())
            .await
            .expect("the ledger connects");
    let js = async_nats::jetstream::new(as_ledger);
    let count = |js: async_nats::jetstream::Context| async move {
        js.get_stream("BACKSTOP_EVENTS")
            .await
            .expect("the stream")
            .info()
            .await
            .expect("stream info")
            .state
            .messages
    };
    let before = count(js.clone()).await;
    as_worker
        .publish(
            "backstop.events.verification.passed",
            r#"{"forged":true}"#.into(),
        )
        .await
        .ok();
    as_worker.flush().await.ok();
    // A request the worker may make shows the connection is alive and the publish was handled.
    let _ = as_worker
        .request("$JS.API.INFO", "".into())
        .await
        .expect("the worker may ask for JetStream info");
    assert_eq!(
        count(js.clone()).await,
        before,
        "a forged event reached the stream"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !errors
        .lock()
        .unwrap()
        .iter()
        .any(|e| e.to_lowercase().contains("permissions violation"))
    {
        assert!(
            Instant::now() < deadline,
            "the server did not refuse the publish: {:?}",
            errors.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The worker's NATS credentials may request appends, but without its identity's signature
    // the ledger refuses one (here a forged verification) and records who tried.
    let forged = backstop_ledger::remote::RemoteLedger::new(as_worker.clone());
    let reply = forged
        .request_raw(br#"{"stream":"backup-x","expected":{"expect":"any"},"events":[]}"#.to_vec())
        .await
        .expect("the ledger answers");
    assert!(
        matches!(&reply, backstop_ledger::remote::AppendReply::Error { kind, .. } if kind == "denied"),
        "{reply:?}"
    );
    // A database host's NATS user may request appends, and its unsigned one is refused too.
    let as_walhost = async_nats::ConnectOptions::with_user_and_password(
        "walhost".into(),
        "walhost-pw-51d0e3".into(),
    )
    .connect(nats.url())
    .await
    .expect("the wal host connects");
    let reply = backstop_ledger::remote::RemoteLedger::new(as_walhost)
        .request_raw(br#"{"stream":"wal-1","expected":{"expect":"any"},"events":[]}"#.to_vec())
        .await
        .expect("the ledger answers the wal host");
    assert!(
        matches!(&reply, backstop_ledger::remote::AppendReply::Error { kind, .. } if kind == "denied"),
        "{reply:?}"
    );
    drop(worker);
    assert!(serve.terminate().success(), "{}", serve.log());
    let tail = run(
        dir.path(),
        &[
            "--config", &serve_cfg, "ledger", "tail", "--json", "--from", "1", "--stream", "access",
        ],
    );
    let access = support::stdout(&tail);
    assert!(
        access.contains("\"access.denied\"") && access.contains("\"caller\":\"unsigned\""),
        "the refusal was not recorded: {access}"
    );
    assert!(
        support::stdout(&run(
            dir.path(),
            &[
                "--config", &serve_cfg, "ledger", "tail", "--json", "--from", "1"
            ],
        ))
        .contains("\"notification.sent\""),
        "the signed append is in the ledger"
    );
}
