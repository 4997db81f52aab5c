//! A test restore runs code the source database's owners wrote: here a CHECK constraint whose
//! function runs a program on the server (`COPY ... TO PROGRAM`). As a superuser scratch role
//! the program runs (the risk is real); the default refuses a superuser, and the role the docs
//! prescribe (LOGIN CREATEDB) restores the rows while the function is denied, so the program
//! never runs. Real PostgreSQL.

mod support;

use std::sync::Arc;

use backstop_events::Actor;
use backstop_ops::catalog;
use backstop_ops::verify::test_restore;
use backstop_testkit::{Postgres, RecordingAppender, server_tempdir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_in_the_source_cannot_use_the_test_restores_rights() {
    let pg = Postgres::start().unwrap();
    pg.create_db("app").unwrap();
    // Where the owners' program would leave its mark: a directory the server's user can write.
    // The program reads what COPY writes to it (`cat`, not `touch`): one that exits without
    // reading can close the pipe before the server writes, which fails the COPY with EPIPE.
    let marks = server_tempdir().unwrap();
    let mark = marks.path().join("pwned");
    pg.psql(
        "app",
        &format!(
            "CREATE FUNCTION evil(x int) RETURNS boolean LANGUAGE plpgsql AS $$ \
             BEGIN EXECUTE 'COPY (SELECT 1) TO PROGRAM ''cat > {}'''; RETURN true; END $$; \
             CREATE TABLE t (x int CHECK (evil(x))); INSERT INTO t VALUES (1), (2), (3);",
            mark.display()
        ),
    )
    .unwrap();
    // The source's own INSERT ran the program as the source's superuser: clear it.
    let _ = std::fs::remove_file(&mark);

    let repo = support::memory_repo().await;
    let dp = support::data_path(
        repo.clone(),
        Arc::new(RecordingAppender::new()),
        "app",
        pg.conninfo("app"),
    );
    let actor = Actor::operator("alice");
    let request = support::back_up(&dp, "app", &actor).await;
    let manifest = catalog::load_manifest(&repo, request.backup_id)
        .await
        .unwrap();

    // The default: a superuser scratch role is refused before anything runs.
    let refused = test_restore(
        &repo,
        &support::scratch_settings(pg.conninfo("postgres"), false),
        manifest.clone(),
        &actor,
    )
    .await
    .expect_err("a superuser scratch role is refused");
    assert!(
        refused.error.to_string().contains("is a superuser"),
        "{}",
        refused.error
    );
    assert!(
        !refused.error.is_data(),
        "nothing is said against the backup"
    );
    assert!(!mark.exists());

    // The prescribed role: the function is denied, so the program never runs.
    let role = pg.scratch_role().unwrap();
    let as_role = test_restore(
        &repo,
        &support::scratch_settings(role, false),
        manifest.clone(),
        &actor,
    )
    .await;
    assert!(
        !mark.exists(),
        "the owners' program ran during a non-superuser test restore"
    );
    if let Err(f) = &as_role {
        assert!(
            f.error.chain().contains("permission denied")
                || f.error.chain().contains("must be superuser")
                || f.error.chain().contains("pg_execute_server_program"),
            "{}",
            f.error.chain()
        );
    }

    // What the refusal prevents: the same restore as a superuser runs the owners' program.
    let _ = test_restore(
        &repo,
        &support::scratch_settings(pg.conninfo("postgres"), true),
        manifest,
        &actor,
    )
    .await;
    assert!(
        mark.exists(),
        "as a superuser, the source's CHECK ran its program"
    );
}
