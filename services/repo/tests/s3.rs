//! The S3 backend against a real Garage started by the test (backstop-testkit).

mod common;

use std::sync::Arc;
use std::time::Duration;

use backstop_repo::{
    Backend, KeyAccessLog, Location, MasterKey, RepoError, Repository, S3Backend, S3Settings,
};
use bytes::Bytes;
use common::*;

fn settings(g: &backstop_testkit::Garage, prefix: &str) -> S3Settings {
    S3Settings {
        endpoint: Some(g.endpoint()),
        region: Some(g.region().to_string()),
        bucket: g.bucket().to_string(),
        prefix: prefix.to_string(),
        access_key: Some(g.access_key().to_string()),
        secret_key: Some(g.secret_key().to_string()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_backend_and_repository_on_garage() {
    let garage = backstop_testkit::Garage::start().expect("start Garage");

    // Objects: put, get, range, head, list (across pages), delete, multipart.
    let b = S3Backend::connect(settings(&garage, "objects"))
        .await
        .unwrap();
    assert!(b.describe().contains(&garage.endpoint()));
    b.put("a/1", Bytes::from_static(b"hello")).await.unwrap();
    assert_eq!(b.get("a/1").await.unwrap(), Bytes::from_static(b"hello"));
    assert_eq!(
        b.get_range("a/1", 1, 3).await.unwrap(),
        Bytes::from_static(b"ell")
    );
    assert_eq!(b.head("a/1").await.unwrap(), Some(5));
    assert_eq!(b.head("a/2").await.unwrap(), None);
    assert!(matches!(
        b.get("a/2").await,
        Err(RepoError::NotFound { .. })
    ));
    for i in 0..1100 {
        b.put(&format!("many/{i:05}"), Bytes::from(vec![1u8; i % 7]))
            .await
            .unwrap();
    }
    let listed = b.list("many/").await.unwrap();
    assert_eq!(listed.len(), 1100, "listing follows continuation tokens");
    assert_eq!(listed[6].key, "many/00006");
    assert_eq!(listed[6].size, 6);
    assert!(
        !b.put_if_absent("a/1", Bytes::from_static(b"x"))
            .await
            .unwrap()
    );
    assert!(
        b.put_if_absent("a/3", Bytes::from_static(b"x"))
            .await
            .unwrap()
    );
    b.delete("a/1").await.unwrap();
    b.delete("a/1").await.unwrap();
    assert_eq!(b.head("a/1").await.unwrap(), None);

    let big = Bytes::from(test_data(21 << 20, 20));
    b.put("big", big.clone()).await.unwrap();
    assert_eq!(b.head("big").await.unwrap(), Some(big.len() as u64));
    assert_eq!(
        b.get("big").await.unwrap(),
        big,
        "multipart upload (3 parts)"
    );

    // A whole repository on S3, opened through Location::parse.
    let loc = Location::parse(&format!("s3://{}/repo", garage.bucket())).unwrap();
    let backend: Arc<dyn Backend> = loc.open(Some(settings(&garage, "ignored"))).await.unwrap();
    let master = MasterKey::generate();
    let log = Arc::new(KeyAccessLog::new());
    let repo = Repository::init(backend.clone(), &master, small_chunks(), log.clone())
        .await
        .unwrap();
    let data = test_data(6 << 20, 21);
    let other = test_data(1 << 20, 22);
    let res = backup(&repo, &[("dump", &data), ("other", &other)]).await;
    assert_eq!(res.objects_verified, res.new_chunks + 1);
    let again = backup(&repo, &[("dump", &data)]).await;
    assert_eq!(again.new_chunks, 0);
    let reopened = Repository::open(backend.clone(), &master, log.clone())
        .await
        .unwrap();
    let m = reopened.load_manifest(res.backup_id).await.unwrap();
    assert_eq!(read_stream(&reopened, &m, "dump").await.unwrap(), data);
    assert_eq!(read_stream(&reopened, &m, "other").await.unwrap(), other);
    let report = reopened.check(Some(100.0)).await.unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    // Objects live under the prefix.
    let raw = S3Backend::connect(settings(&garage, "")).await.unwrap();
    assert!(raw.head("repo/config").await.unwrap().is_some());
    assert!(matches!(
        Repository::open(backend.clone(), &MasterKey::generate(), log.clone()).await,
        Err(RepoError::WrongKey { .. })
    ));
}

#[tokio::test]
async fn unreachable_store_is_retried_then_reported() {
    // Nothing listens on this port: connection refused on every attempt.
    let port = backstop_testkit::free_port();
    let s = S3Settings {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        region: Some("garage".into()),
        bucket: "backups".into(),
        access_key: Some("GK00".into()),
        secret_key: Some("00".into()),
        max_attempts: 3,
        base_backoff: Duration::from_millis(10),
        connect_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let b = S3Backend::connect(s).await.unwrap();
    let err = b.put("x", Bytes::from_static(b"1")).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("after 3 attempts"), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(msg.contains("s3://backups/x"), "{msg}");
}

#[tokio::test]
async fn wrong_credentials_are_refused_without_retrying() {
    let garage = backstop_testkit::Garage::start().expect("start Garage");
    let mut s = settings(&garage, "");
    s.secret_key = Some("0".repeat(64));
    let b = S3Backend::connect(s).await.unwrap();
    let err = b.get("config").await.unwrap_err();
    assert!(matches!(err, RepoError::Refused { .. }), "{err}");
    assert!(err.to_string().contains("access key"), "{err}");
}

/// A TCP proxy in front of Garage that answers the first `failures` connections itself with
/// `503 SlowDown`, then forwards every later connection to Garage unchanged.
async fn flaky_proxy(
    target: String,
    failures: usize,
) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let target = target.clone();
            tokio::spawn(async move {
                if n < failures {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => head.extend_from_slice(&buf[..k]),
                        }
                    }
                    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
                    let resp = format!(
                        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                    let _ = sock.shutdown().await;
                } else if let Ok(mut up) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut sock, &mut up).await;
                }
            });
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_down_answers_are_retried_with_backoff() {
    let garage = backstop_testkit::Garage::start().expect("start Garage");
    let target = format!("127.0.0.1:{}", garage.s3_port());

    // Two 503 SlowDown answers, then Garage: the put succeeds on the third attempt.
    let (port, seen) = flaky_proxy(target.clone(), 2).await;
    let mut s = settings(&garage, "flaky");
    s.endpoint = Some(format!("http://127.0.0.1:{port}"));
    s.base_backoff = Duration::from_millis(20);
    s.max_attempts = 4;
    let b = S3Backend::connect(s.clone()).await.unwrap();
    b.put("x", Bytes::from_static(b"payload")).await.unwrap();
    assert!(seen.load(std::sync::atomic::Ordering::SeqCst) >= 3);
    assert_eq!(b.get("x").await.unwrap(), Bytes::from_static(b"payload"));

    // A store that keeps answering 503: bounded attempts, then an error naming the cause.
    let (port, seen) = flaky_proxy(target, usize::MAX).await;
    s.endpoint = Some(format!("http://127.0.0.1:{port}"));
    s.max_attempts = 3;
    let b = S3Backend::connect(s).await.unwrap();
    let err = b
        .put("y", Bytes::from_static(b"payload"))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("after 3 attempts") && msg.contains("503") && msg.contains("SlowDown"),
        "{msg}"
    );
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[tokio::test]
async fn credentials_and_region_from_the_aws_environment() {
    let garage = backstop_testkit::Garage::start().expect("start Garage");
    // SAFETY: this test binary's other tests use static credentials and an explicit region, so
    // nothing else reads these variables concurrently in a way that matters.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", garage.access_key());
        std::env::set_var("AWS_SECRET_ACCESS_KEY", garage.secret_key());
        std::env::set_var("AWS_REGION", garage.region());
    }
    let s = S3Settings {
        endpoint: Some(garage.endpoint()),
        bucket: garage.bucket().to_string(),
        ..Default::default()
    };
    let b = S3Backend::connect(s).await.unwrap();
    b.put("env/x", Bytes::from_static(b"1")).await.unwrap();
    assert_eq!(b.get("env/x").await.unwrap(), Bytes::from_static(b"1"));
}
