//! Each server the kit starts really starts, answers, and stops (its port free afterwards).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use backstop_testkit::{
    Garage, GarageOptions, Nats, NatsCluster, Postgres, PostgresOptions, deadline, port_is_free,
    require_tool, server_tempdir,
};

/// Polls `check` until it returns true or the kit's deadline passes.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < deadline(), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn postgres_starts_answers_restarts_and_stops() {
    let mut pg = Postgres::start().expect("start PostgreSQL");
    let port = pg.port();
    assert!(!port_is_free(port), "PostgreSQL should hold its port");
    assert_eq!(pg.psql("postgres", "SELECT 1").unwrap(), "1");
    assert_eq!(
        pg.conninfo("app"),
        format!("postgres://postgres@127.0.0.1:{port}/app")
    );
    assert!(pg.bin_dir().join("pg_dump").is_file());
    assert!(pg.data_dir().join("PG_VERSION").is_file());
    let settings = pg
        .psql(
            "postgres",
            "SELECT current_setting('wal_level'), current_setting('max_wal_senders'), \
             current_setting('fsync'), current_setting('archive_mode'), \
             current_setting('listen_addresses'), current_setting('server_version_num')::int / 10000",
        )
        .unwrap();
    assert_eq!(settings, "replica|10|off|off|127.0.0.1|15");

    pg.create_db("app").unwrap();
    pg.psql(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a'), (2, 'b');",
    )
    .unwrap();
    assert_eq!(
        pg.psql("app", "SELECT id, v FROM t ORDER BY id").unwrap(),
        "1|a\n2|b"
    );

    // A failing statement is an error that names the problem.
    let err = pg.psql("app", "SELECT * FROM missing_table").unwrap_err();
    assert!(format!("{err:#}").contains("missing_table"), "{err:#}");

    // psql_file with variables.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("q.sql");
    std::fs::write(
        &file,
        "INSERT INTO t VALUES (:id, :'val');\nSELECT v FROM t WHERE id = :id;\n",
    )
    .unwrap();
    assert_eq!(
        pg.psql_file("app", &file, &[("id", "3"), ("val", "it's")])
            .unwrap(),
        "it's"
    );

    // Clean restart keeps data and port.
    pg.restart().unwrap();
    assert_eq!(pg.port(), port);
    assert_eq!(pg.psql("app", "SELECT count(*) FROM t").unwrap(), "3");

    // Crash-like stop, then recovery on start.
    pg.stop_immediate().unwrap();
    assert!(port_is_free(port));
    pg.start_again().unwrap();
    assert_eq!(pg.psql("app", "SELECT count(*) FROM t").unwrap(), "3");

    pg.stop().unwrap();
    assert!(!pg.is_running());
    assert!(port_is_free(port), "port {port} still taken after stop");
}

#[test]
fn postgres_is_stopped_and_removed_on_drop() {
    let pg = Postgres::start().expect("start PostgreSQL");
    let port = pg.port();
    let data = pg.data_dir().to_path_buf();
    drop(pg);
    assert!(port_is_free(port), "port {port} still taken after drop");
    assert!(!data.exists(), "data directory left behind");
}

#[test]
fn postgres_archives_wal_and_takes_extra_conf() {
    let pg = Postgres::start_with(
        PostgresOptions::new()
            .archive_wal()
            .conf("work_mem = '7MB'"),
    )
    .expect("start PostgreSQL with WAL archiving");
    assert_eq!(pg.psql("postgres", "SHOW work_mem").unwrap(), "7MB");
    assert_eq!(pg.psql("postgres", "SHOW archive_mode").unwrap(), "on");
    let archive = pg.wal_archive_dir().expect("archive dir").to_path_buf();
    pg.psql(
        "postgres",
        "CREATE TABLE w AS SELECT g FROM generate_series(1, 1000) g; SELECT pg_switch_wal();",
    )
    .unwrap();
    eventually("a WAL segment in the archive", || {
        std::fs::read_dir(&archive)
            .map(|d| d.flatten().any(|e| e.file_name().len() == 24))
            .unwrap_or(false)
    });
    let failed = pg
        .psql("postgres", "SELECT failed_count FROM pg_stat_archiver")
        .unwrap();
    assert_eq!(
        failed,
        "0",
        "archive_command failed; log:\n{}",
        pg.log_tail(30)
    );
}

#[test]
fn postgres_starts_from_a_restored_base_backup() {
    let source = Postgres::start().expect("start source PostgreSQL");
    source.create_db("shop").unwrap();
    source
        .psql(
            "shop",
            "CREATE TABLE orders AS SELECT g AS id FROM generate_series(1, 250) g",
        )
        .unwrap();

    let restore = server_tempdir().unwrap();
    let target = restore.path().join("data");
    let out = std::process::Command::new(source.bin("pg_basebackup"))
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-X",
            "stream",
            "-c",
            "fast",
        ])
        .arg("-p")
        .arg(source.port().to_string())
        .arg("-D")
        .arg(&target)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let copy =
        Postgres::from_data_dir(&target, PostgresOptions::new()).expect("start restored copy");
    assert_ne!(copy.port(), source.port());
    assert_eq!(
        copy.psql("shop", "SELECT count(*) FROM orders").unwrap(),
        "250"
    );
    let port = copy.port();
    drop(copy);
    assert!(port_is_free(port));
    assert!(
        target.join("PG_VERSION").is_file(),
        "the caller's data dir is kept"
    );
}

/// Reads the INFO line nats-server sends to a new client.
fn nats_info(port: u16) -> String {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    line
}

#[test]
fn nats_starts_with_jetstream_survives_outages_and_stops() {
    let mut nats = Nats::start().expect("start nats-server");
    let port = nats.port();
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{port}"));
    let info = nats_info(port);
    assert!(info.starts_with("INFO "), "{info}");
    assert!(info.contains("\"jetstream\":true"), "{info}");

    // Graceful stop frees the port; start_again comes back on the same URL.
    nats.stop();
    assert!(!nats.is_running());
    assert!(port_is_free(port), "port {port} still taken after stop");
    nats.start_again().expect("start nats-server again");
    assert_eq!(nats.port(), port);
    assert!(nats_info(port).contains("\"jetstream\":true"));
    assert!(nats.store_dir().exists(), "JetStream store dir kept");

    // SIGKILL, then back again.
    nats.kill();
    assert!(port_is_free(port), "port {port} still taken after kill");
    nats.start_again().expect("start nats-server after kill");
    assert!(nats_info(port).contains("\"jetstream\":true"));

    drop(nats);
    assert!(port_is_free(port), "port {port} still taken after drop");
}

#[test]
fn nats_cluster_elects_a_leader_survives_a_lost_node_and_stops() {
    let mut cluster = NatsCluster::start().expect("start a three-node NATS cluster");
    let urls = cluster.urls();
    assert_eq!(urls.split(',').count(), 3, "{urls}");
    let leader = cluster.wait_ready().expect("a meta leader");
    assert!(NatsCluster::NODES.contains(&leader.as_str()), "{leader}");
    for name in NatsCluster::NODES {
        let port: u16 = cluster
            .url(name)
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let info = nats_info(port);
        assert!(info.contains("\"jetstream\":true"), "{name}: {info}");
        assert!(
            info.contains(&format!("\"server_name\":\"{name}\"")),
            "{name}: {info}"
        );
    }

    // The leader dies; the other two elect a new one among themselves.
    let port: u16 = cluster
        .url(&leader)
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    cluster.kill(&leader).unwrap();
    assert!(!cluster.is_running(&leader));
    assert!(port_is_free(port), "port {port} still taken after kill");
    let next = cluster.wait_ready().expect("a new meta leader");
    assert_ne!(next, leader);

    // Back on the same port, it rejoins.
    cluster.start_again(&leader).expect("start the node again");
    assert!(cluster.is_running(&leader));
    assert!(nats_info(port).contains("\"jetstream\":true"));

    drop(cluster);
    assert!(port_is_free(port), "port {port} still taken after drop");
}

/// Sends a bare GET to the S3 port; returns the status line.
fn s3_status_line(endpoint: &str) -> String {
    let addr = endpoint.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET /backups HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut resp = String::new();
    stream.read_to_string(&mut resp).unwrap();
    resp.lines().next().unwrap_or_default().to_string()
}

#[test]
fn garage_starts_with_a_bucket_and_key_and_stops() {
    // scripts/setup installs Garage; without it this fails with the install command.
    require_tool("garage").expect("garage");
    let mut g = Garage::start().expect("start Garage");
    assert_eq!(g.region(), "garage");
    assert_eq!(g.bucket(), "backups");
    assert!(g.access_key().starts_with("GK") && g.access_key().len() == 26);
    assert_eq!(g.secret_key().len(), 64);
    let port = g.s3_port();
    assert_eq!(g.endpoint(), format!("http://127.0.0.1:{port}"));
    // An unsigned request is refused by S3 itself: the API is up and enforcing auth.
    let status = s3_status_line(&g.endpoint());
    assert!(
        status.starts_with("HTTP/1.") && status.contains(" 403"),
        "{status}"
    );

    g.create_bucket("second").unwrap();
    let buckets = g.cli(&["bucket", "list"]).unwrap();
    assert!(
        buckets.contains("backups") && buckets.contains("second"),
        "{buckets}"
    );
    let key = g.cli(&["key", "info", g.access_key()]).unwrap();
    assert!(key.contains("second"), "{key}");

    g.stop();
    assert!(port_is_free(port), "port {port} still taken after stop");
    g.start_again().expect("start Garage again");
    assert!(g.cli(&["bucket", "list"]).unwrap().contains("second"));

    drop(g);
    assert!(port_is_free(port), "port {port} still taken after drop");
}

#[test]
fn postgres_start_failure_carries_the_server_log() {
    let err = Postgres::start_with(PostgresOptions::new().conf("shared_buffers = 'lots'"))
        .expect_err("an invalid setting must stop the server from starting");
    let msg = format!("{err:#}");
    assert!(msg.contains("did not start"), "{msg}");
    // The server's own complaint, from its log, is in the error.
    assert!(msg.contains("shared_buffers"), "{msg}");
}

#[test]
fn postgres_options_for_benchmarks_take_effect() {
    let parent = tempfile::tempdir().expect("tempdir");
    // The server user must traverse the parent (as root PostgreSQL runs as `postgres`).
    let mode = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755);
    std::fs::set_permissions(parent.path(), mode).unwrap();
    let mut pg = Postgres::start_with(
        PostgresOptions::new()
            .durable()
            .autovacuum_off()
            .in_dir(parent.path()),
    )
    .expect("start PostgreSQL");
    assert!(pg.data_dir().starts_with(parent.path()), "{pg:?}");
    let settings = pg
        .psql(
            "postgres",
            "SELECT current_setting('fsync') || current_setting('synchronous_commit') \
             || current_setting('autovacuum')",
        )
        .unwrap();
    assert_eq!(settings, "ononoff");
    let pid = pg.postmaster_pid().unwrap();
    assert!(Path::new(&format!("/proc/{pid}")).exists(), "pid {pid}");
    let out = pg
        .client("psql")
        .args(["-X", "-A", "-t", "-d", "postgres", "-c", "SELECT 41 + 1"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42", "{out:?}");
    pg.set_command_timeout(Duration::from_millis(300));
    let err = pg
        .psql("postgres", "SELECT pg_sleep(5)")
        .expect_err("over the limit");
    assert!(format!("{err:#}").contains("did not finish"), "{err:#}");
}

#[test]
fn garage_options_name_the_bucket_and_store_blocks_uncompressed() {
    require_tool("garage").expect("garage");
    let parent = tempfile::tempdir().expect("tempdir");
    let g = Garage::start_with(
        GarageOptions::new()
            .bucket("bench")
            .uncompressed()
            .in_dir(parent.path()),
    )
    .expect("start Garage");
    assert_eq!(g.bucket(), "bench");
    assert!(g.config_path().starts_with(parent.path()));
    let config = std::fs::read_to_string(g.config_path()).unwrap();
    assert!(config.contains("compression_level = \"none\""), "{config}");
    let pid = g.pid().expect("running");
    assert!(Path::new(&format!("/proc/{pid}")).exists(), "pid {pid}");
    assert!(g.cli(&["bucket", "list"]).unwrap().contains("bench"));
}
