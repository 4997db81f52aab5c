//! A configuration source through the binary (R16, seed 001 "on change"): an env file, a JSON
//! settings file, a variable from backstop's environment and a real PostgreSQL server's
//! settings. Backed up; unchanged, no new backup; a changed variable, a new one; `config import`
//! gives the exact file back; and no secret value appears in any output, `ledger tail --json`,
//! serve's log, the API or the dashboard.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use backstop_testkit::{Postgres, free_port};
use support::{Process, Site, bin, stderr, stdout};

const TOKEN: &str = "operator-token-config-0123456789";
/// Distinctive secret values: none may appear anywhere but the sealed backup and the import.
const SECRETS: [&str; 5] = [
    "S3cr3t-Zebra-4417",
    "sk-live-Quokka-9921",
    "Tok-Narwhal-7730",
    "Env-Pangolin-5512",
    "Env-Pangolin-6623",
];

/// `backstop ARGS` on the site with `APP_SIGNING_SECRET` set to `secret` in its environment.
fn run(site: &Site, secret: &str, args: &[&str]) -> Output {
    Command::new(bin())
        .arg("--config")
        .arg(site.path("backstop.toml"))
        .args(args)
        .current_dir(site.tmp.path())
        .env_remove("BACKSTOP_MASTER_KEY")
        .env("BACKSTOP_OPERATOR", site.operator)
        .env("BACKSTOP_LOG", "debug")
        .env("APP_SIGNING_SECRET", secret)
        .output()
        .expect("run backstop")
}

/// Everything a command printed, kept for the secret check at the end.
fn ok(site: &Site, secret: &str, args: &[&str], seen: &mut String) -> String {
    let out = run(site, secret, args);
    seen.push_str(&stdout(&out));
    seen.push_str(&stderr(&out));
    assert!(
        out.status.success(),
        "backstop {args:?} failed:\n{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

fn backup_id(json: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    v["backup_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no backup id in {v}"))
        .to_string()
}

fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, text))
}

#[test]
fn a_config_source_backs_up_on_change_imports_exactly_and_never_shows_a_secret() {
    let pg = Postgres::start().expect("PostgreSQL");
    pg.create_db("projections").unwrap();
    let site = Site::new("ops");
    let env_file = site.path("app.env");
    let env_v1 = "# production\nDATABASE_URL=postgres://app:S3cr3t-Zebra-4417@db/app\nAPI_KEY = 'sk-live-Quokka-9921'\nexport MODE=live";
    std::fs::write(&env_file, env_v1).unwrap();
    let settings = site.path("settings.json");
    let settings_bytes = b"{\n  \"feature\": \"on\",\n  \"token\": \"Tok-Narwhal-7730\"\n}\n";
    std::fs::write(&settings, settings_bytes).unwrap();
    std::fs::write(site.path("tokens"), format!("alice operator {TOKEN}\n")).unwrap();
    std::fs::write(
        site.path("backstop.toml"),
        format!(
            "data_dir = {:?}\n[repository]\nlocation = {:?}\nmaster_key_file = {:?}\n\n[api]\ntokens_file = {:?}\n\n\
             [[sources]]\nname = \"cfg\"\nkind = \"config\"\nenv_file = {:?}\njson_files = [{:?}]\npostgres_settings = {:?}\n\n\
             [[sources]]\nname = \"vars\"\nkind = \"config\"\nenv_vars = [\"APP_SIGNING_SECRET\"]\n",
            site.path("data"),
            site.path("repo"),
            site.path("master.key"),
            site.path("tokens"),
            env_file,
            settings,
            pg.conninfo("postgres"),
        ),
    )
    .unwrap();
    let mut seen = String::new();
    let v1 = SECRETS[3];
    let v2 = SECRETS[4];
    ok(
        &site,
        v1,
        &[
            "init",
            "--generate-key",
            site.path("master.key").to_str().unwrap(),
        ],
        &mut seen,
    );

    // First backups of both sources.
    let cfg1 = backup_id(&ok(
        &site,
        v1,
        &["backup", "--source", "cfg", "--json"],
        &mut seen,
    ));
    let vars1 = backup_id(&ok(
        &site,
        v1,
        &["backup", "--source", "vars", "--json"],
        &mut seen,
    ));

    // Unchanged: no new backup, and it says since which one.
    let out = ok(&site, v1, &["backup", "--source", "vars"], &mut seen);
    assert!(
        out.contains(&format!("unchanged since backup {vars1}")),
        "{out}"
    );
    let out = ok(
        &site,
        v1,
        &["backup", "--source", "cfg", "--json"],
        &mut seen,
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["unchanged_since"], cfg1.as_str(), "{out}");

    // A changed variable: a new backup.
    let vars2 = backup_id(&ok(
        &site,
        v2,
        &["backup", "--source", "vars", "--json"],
        &mut seen,
    ));
    assert_ne!(vars2, vars1);
    let out = ok(&site, v2, &["backup", "--source", "vars"], &mut seen);
    assert!(
        out.contains(&format!("unchanged since backup {vars2}")),
        "{out}"
    );
    // A changed env file line: a new backup of cfg; --force takes one even when unchanged.
    let env_v2 = env_v1.replace("MODE=live", "MODE=maintenance");
    std::fs::write(&env_file, &env_v2).unwrap();
    let cfg2 = backup_id(&ok(
        &site,
        v2,
        &["backup", "--source", "cfg", "--json"],
        &mut seen,
    ));
    assert_ne!(cfg2, cfg1);
    let forced = backup_id(&ok(
        &site,
        v2,
        &["backup", "--source", "cfg", "--json", "--force"],
        &mut seen,
    ));
    assert_ne!(forced, cfg2);

    // Names and keyed hashes only.
    let shown = ok(&site, v2, &["config", "show", &cfg2], &mut seen);
    for name in ["DATABASE_URL", "API_KEY", "MODE", "listen_addresses"] {
        assert!(shown.contains(name), "{name} not in {shown}");
    }
    assert!(shown.contains(settings.to_str().unwrap()), "{shown}");
    let hashes: serde_json::Value = serde_json::from_str(&ok(
        &site,
        v2,
        &["config", "show", &cfg1, "--json"],
        &mut seen,
    ))
    .unwrap();
    let mode_hash = |v: &serde_json::Value| {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == "MODE")
            .map(|i| i["hash"].as_str().unwrap().to_string())
            .unwrap()
    };
    let hashes2: serde_json::Value = serde_json::from_str(&ok(
        &site,
        v2,
        &["config", "show", &cfg2, "--json"],
        &mut seen,
    ))
    .unwrap();
    assert_ne!(mode_hash(&hashes), mode_hash(&hashes2), "MODE changed");

    // Import: each file exactly as it was backed up.
    let out1 = site.path("imported-v1.env");
    ok(
        &site,
        v2,
        &["config", "import", &cfg1, "--out", out1.to_str().unwrap()],
        &mut seen,
    );
    assert_eq!(std::fs::read(&out1).unwrap(), env_v1.as_bytes());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&out1).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let out2 = site.path("imported-latest.env");
    ok(
        &site,
        v2,
        &[
            "config",
            "import",
            "latest",
            "--source",
            "cfg",
            "--out",
            out2.to_str().unwrap(),
        ],
        &mut seen,
    );
    assert_eq!(std::fs::read(&out2).unwrap(), env_v2.as_bytes());
    let json_out = site.path("settings-back.json");
    ok(
        &site,
        v2,
        &[
            "config",
            "import",
            &cfg2,
            "--file",
            settings.to_str().unwrap(),
            "--out",
            json_out.to_str().unwrap(),
        ],
        &mut seen,
    );
    assert_eq!(std::fs::read(&json_out).unwrap(), settings_bytes);
    let vars_out = site.path("vars.env");
    ok(
        &site,
        v2,
        &[
            "config",
            "import",
            &vars1,
            "--out",
            vars_out.to_str().unwrap(),
        ],
        &mut seen,
    );
    assert_eq!(
        std::fs::read_to_string(&vars_out).unwrap(),
        format!("APP_SIGNING_SECRET='{v1}'\n")
    );
    let all_out = site.path("all.json");
    ok(
        &site,
        v2,
        &[
            "config",
            "import",
            &cfg2,
            "--format",
            "json",
            "--out",
            all_out.to_str().unwrap(),
        ],
        &mut seen,
    );
    let all: serde_json::Value = serde_json::from_slice(&std::fs::read(&all_out).unwrap()).unwrap();
    assert_eq!(all["env"]["MODE"], "maintenance");
    assert_eq!(
        all["json_files"][settings.to_str().unwrap()]["token"],
        SECRETS[2]
    );
    assert!(all["postgres_settings"].is_object(), "{all}");

    // Onto an existing file: refused, the file untouched.
    let out = run(
        &site,
        v2,
        &["config", "import", &cfg2, "--out", out1.to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("exists already"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&out1).unwrap(), env_v1.as_bytes());
    // `restore` of a configuration backup says what to use instead.
    let out = run(&site, v2, &["restore", &cfg2, "--out", "x"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("config import"), "{}", stderr(&out));

    // The ledger: five backups (two of vars, three of cfg), four imports, no secret.
    let tail = ok(
        &site,
        v2,
        &["ledger", "tail", "--json", "--from", "1"],
        &mut seen,
    );
    let count = |t: &str| {
        tail.lines()
            .filter(|l| l.contains(&format!("\"type\":\"{t}\"")))
            .count()
    };
    assert_eq!(count("backup.completed"), 5, "{tail}");
    assert_eq!(count("backup.requested"), 5, "{tail}");
    assert_eq!(count("recovery.completed"), 5, "{tail}");
    assert!(tail.contains("\"method\":\"config\""), "{tail}");

    // serve's API and dashboard, once its read models hold the backups.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut serve = Process::spawn(
        &site.path("data"),
        &[
            "--config",
            site.path("backstop.toml").to_str().unwrap(),
            "serve",
            "--projections-url",
            &pg.conninfo("projections"),
            "--listen",
            &listen,
        ],
        &[("APP_SIGNING_SECRET", v2), ("BACKSTOP_LOG", "debug")],
    );
    serve.wait_for_log("API and dashboard listening", Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(60);
    let backups = loop {
        let got = get(port, "/api/backups").ok();
        if let Some((200, body)) = &got
            && body.contains(&cfg2)
            && body.contains(&vars2)
        {
            break body.clone();
        }
        assert!(Instant::now() < deadline, "no backups in the API: {got:?}");
        std::thread::sleep(Duration::from_millis(300));
    };
    let mut pages = backups;
    for path in [
        "/api/overview".to_string(),
        format!("/api/backups/{cfg2}"),
        format!("/backups/{cfg2}"),
        "/".to_string(),
        "/api/audit".to_string(),
        "/audit".to_string(),
    ] {
        let (status, body) = get(port, &path).unwrap();
        assert_eq!(status, 200, "{path}: {body}");
        pages.push_str(&body);
    }
    assert!(serve.terminate().success(), "{}", serve.log());
    seen.push_str(&serve.log());

    for secret in SECRETS {
        assert!(!tail.contains(secret), "{secret} in ledger tail");
        assert!(!pages.contains(secret), "{secret} in the API or dashboard");
        assert!(!seen.contains(secret), "{secret} in the output or logs");
    }
}
