//! A three-node nats-server JetStream cluster on loopback, for failure tests.
//!
//! Layout (the one `deploy/nats/` describes): nodes `n1`, `n2`, `n3`, one cluster, every node
//! listing all three routes, JetStream with file storage. Each node runs as
//! `nats-server -c <tmp>/nI/nats.conf -a 127.0.0.1 -p PORT -m MONITOR_PORT
//! --cluster nats://127.0.0.1:CLUSTER_PORT --routes <all three>` in its own directory
//! `<tmp>/nI/` (its configuration, its JetStream store `<tmp>/nI/jetstream`, its log
//! `<tmp>/nI/nats.log`). Command-line flags outrank the file, so a configuration written for
//! production (deploy/nats/nats-I.conf, with `n1:6222` routes and port 4222) runs unchanged on
//! free loopback ports; only its `store_dir:` line is rewritten, because nats-server refuses
//! `-sd` beside a `store_dir` in the file.
//!
//! Ready means: every running node's `/healthz` answers 200 and its `/jsz` names the same
//! JetStream meta leader, one of the running nodes. [`NatsCluster::kill`] is SIGKILL (a lost
//! machine, as far as clients and the other nodes can tell); [`NatsCluster::start_again`] brings
//! a node back on the same ports with the same store. Only features of nats-server 2.9 are used.
//! Every node is killed on drop.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::process;

/// The node names, as in deploy/nats/.
const NODE_NAMES: [&str; 3] = ["n1", "n2", "n3"];

struct Node {
    name: String,
    port: u16,
    monitor_port: u16,
    cluster_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn log_path(&self) -> PathBuf {
        self.dir.join("nats.log")
    }
}

/// Three nats-server processes forming one JetStream cluster. Killed on drop.
pub struct NatsCluster {
    bin: PathBuf,
    nodes: Vec<Node>,
    env: Vec<(String, String)>,
    // Last: removed after `Drop::drop` has killed the servers.
    _tmp: TempDir,
}

/// The configuration the kit writes when given none: the deploy layout without authorization.
fn default_config(name: &str) -> String {
    format!(
        "server_name: {name}\nmax_payload: 8MB\njetstream {{\n  store_dir: x\n}}\ncluster {{\n  name: backstop-test\n}}\n"
    )
}

/// `text` with its `store_dir:` line(s) pointing at `store` (module docs).
fn with_store_dir(text: &str, store: &Path) -> String {
    text.lines()
        .map(|line| {
            if line.trim_start().starts_with("store_dir:") {
                format!("  store_dir: \"{}\"", store.display())
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

impl NatsCluster {
    /// The node names, as in deploy/nats/.
    pub const NODES: [&'static str; 3] = NODE_NAMES;

    /// Starts three nodes with the kit's own configuration (no authorization).
    pub fn start() -> anyhow::Result<NatsCluster> {
        let configs = NODE_NAMES.map(default_config);
        NatsCluster::start_with_configs(&configs, &[], &[])
    }

    /// Starts node `nI` with `configs[I-1]` as its configuration file (for example
    /// deploy/nats/nats-I.conf), `files` written beside each (an `include`d auth.conf), and `env`
    /// in every server's environment (the `$VARIABLES` the files read). Each configuration must
    /// set `server_name` and a `cluster { name }`; ports, routes and the store are the kit's.
    pub fn start_with_configs(
        configs: &[String; 3],
        files: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> anyhow::Result<NatsCluster> {
        let bin = crate::require_tool("nats-server")?;
        let tmp = tempfile::Builder::new()
            .prefix("backstop-nats-cluster-")
            .tempdir()
            .context("could not create a temporary directory for the NATS cluster")?;
        let mut nodes = Vec::new();
        for (name, config) in NODE_NAMES.iter().zip(configs) {
            let dir = tmp.path().join(name);
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("could not create {}", dir.display()))?;
            let text = with_store_dir(config, &dir.join("jetstream"));
            std::fs::write(dir.join("nats.conf"), text)
                .with_context(|| format!("could not write {}/nats.conf", dir.display()))?;
            for (file, text) in files {
                std::fs::write(dir.join(file), text)
                    .with_context(|| format!("could not write {}/{file}", dir.display()))?;
            }
            nodes.push(Node {
                name: name.to_string(),
                port: crate::try_free_port()?,
                monitor_port: crate::try_free_port()?,
                cluster_port: crate::try_free_port()?,
                dir,
                child: None,
            });
        }
        let mut cluster = NatsCluster {
            bin,
            nodes,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            _tmp: tmp,
        };
        for i in 0..cluster.nodes.len() {
            cluster.spawn(i)?;
        }
        cluster.wait_ready()?;
        Ok(cluster)
    }

    fn routes(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.cluster_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let routes = self.routes();
        let node = &mut self.nodes[i];
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.log_path())
            .with_context(|| format!("could not open {}", node.log_path().display()))?;
        let log2 = log
            .try_clone()
            .context("could not duplicate the log file handle")?;
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(node.dir.join("nats.conf"))
            .args(["-a", "127.0.0.1", "-p"])
            .arg(node.port.to_string())
            .arg("-m")
            .arg(node.monitor_port.to_string())
            .arg("--cluster")
            .arg(format!("nats://127.0.0.1:{}", node.cluster_port))
            .arg("--routes")
            .arg(routes)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(&node.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .with_context(|| format!("could not run {}", self.bin.display()))?;
        node.child = Some(child);
        Ok(())
    }

    /// The meta leader as node `i` reports it (`/jsz`), if it answers and names one.
    fn meta_leader_seen_by(&self, i: usize) -> anyhow::Result<Option<String>> {
        let node = &self.nodes[i];
        let (code, body) = crate::http::get(node.monitor_port, "/jsz", Duration::from_secs(5))?;
        if code != 200 {
            bail!("{}: /jsz answered {code}", node.name);
        }
        let jsz: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("{}: /jsz is not JSON", node.name))?;
        Ok(jsz["meta_cluster"]["leader"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string))
    }

    /// One readiness check (module docs): the agreed meta leader, or why there is none yet.
    fn check_ready(&mut self) -> anyhow::Result<Result<String, String>> {
        let mut leader: Option<String> = None;
        for i in 0..self.nodes.len() {
            let Some(child) = self.nodes[i].child.as_mut() else {
                continue;
            };
            if let Some(status) = child.try_wait().context("waiting for nats-server")? {
                self.nodes[i].child = None;
                bail!(
                    "nats-server {} exited ({status}); last lines of its log:\n{}",
                    self.nodes[i].name,
                    crate::log_tail(&self.nodes[i].log_path(), 40)
                );
            }
            let node = &self.nodes[i];
            match crate::http::get(node.monitor_port, "/healthz", Duration::from_secs(5)) {
                Ok((200, _)) => {}
                Ok((code, body)) => {
                    return Ok(Err(format!(
                        "{}: /healthz answered {code}: {}",
                        node.name,
                        body.trim()
                    )));
                }
                Err(e) => return Ok(Err(format!("{}: {e:#}", node.name))),
            }
            match self.meta_leader_seen_by(i) {
                Ok(Some(l)) => match &leader {
                    Some(other) if *other != l => {
                        return Ok(Err(format!(
                            "nodes disagree on the meta leader ({other}, {l})"
                        )));
                    }
                    _ => leader = Some(l),
                },
                Ok(None) => return Ok(Err(format!("{}: no meta leader yet", node.name))),
                Err(e) => return Ok(Err(format!("{e:#}"))),
            }
        }
        Ok(match leader {
            Some(l) if self.is_running(&l) => Ok(l),
            Some(l) => Err(format!("the meta leader {l} is a node that is down")),
            None => Err("no node is running".to_string()),
        })
    }

    /// Waits until the running nodes agree on a meta leader among them (module docs); returns
    /// its name.
    pub fn wait_ready(&mut self) -> anyhow::Result<String> {
        let start = Instant::now();
        loop {
            let why = match self.check_ready() {
                Ok(Ok(leader)) => {
                    tracing::debug!(%leader, "NATS cluster ready");
                    return Ok(leader);
                }
                Ok(Err(why)) => why,
                Err(e) => return Err(e),
            };
            if start.elapsed() > crate::deadline() {
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| {
                        format!(
                            "--- {} ({}):\n{}",
                            n.name,
                            n.log_path().display(),
                            crate::log_tail(&n.log_path(), 20)
                        )
                    })
                    .collect();
                bail!(
                    "the NATS cluster was not ready after {}s (last check: {why})\n{}",
                    crate::deadline().as_secs(),
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every node's client URL, comma-separated (`nats://127.0.0.1:P1,...`): what Backstop's
    /// `[nats] url` takes, so that its clients fail over to the nodes still up.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `name`'s client URL.
    pub fn url(&self, name: &str) -> anyhow::Result<String> {
        Ok(format!("nats://127.0.0.1:{}", self.node(name)?.port))
    }

    /// Node `name`'s monitoring port (`/healthz`, `/jsz`, `/varz`).
    pub fn monitor_port(&self, name: &str) -> anyhow::Result<u16> {
        Ok(self.node(name)?.monitor_port)
    }

    pub fn log_path(&self, name: &str) -> anyhow::Result<PathBuf> {
        Ok(self.node(name)?.log_path())
    }

    pub fn is_running(&self, name: &str) -> bool {
        self.nodes
            .iter()
            .any(|n| n.name == name && n.child.is_some())
    }

    fn node(&self, name: &str) -> anyhow::Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name} (nodes: {})", NODE_NAMES.join(", ")))
    }

    fn index(&self, name: &str) -> anyhow::Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no node {name} (nodes: {})", NODE_NAMES.join(", ")))
    }

    /// Abrupt death of node `name`: SIGKILL. The other two keep a quorum.
    pub fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self.index(name)?;
        if let Some(mut c) = self.nodes[i].child.take() {
            process::kill(&mut c);
        }
        Ok(())
    }

    /// Starts node `name` again after [`NatsCluster::kill`]: same ports, same store, and waits
    /// until the cluster is ready again.
    pub fn start_again(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self.index(name)?;
        if self.nodes[i].child.is_some() {
            bail!("node {name} is already running");
        }
        let start = Instant::now();
        // Another process may have taken a port meanwhile; wait a little for it.
        while !(crate::port_is_free(self.nodes[i].port)
            && crate::port_is_free(self.nodes[i].cluster_port))
            && start.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.spawn(i)?;
        self.wait_ready().map(|_| ())
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut c) = node.child.take() {
                process::kill(&mut c);
            }
        }
    }
}

impl std::fmt::Debug for NatsCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsCluster")
            .field("urls", &self.urls())
            .field(
                "running",
                &self
                    .nodes
                    .iter()
                    .filter(|n| n.child.is_some())
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_dir_line_is_rewritten_and_nothing_else() {
        let text = "server_name: n1\njetstream {\n  store_dir: /var/lib/nats/jetstream\n  max_file_store: 50GB\n}\n";
        let out = with_store_dir(text, Path::new("/tmp/x/jetstream"));
        assert_eq!(
            out,
            "server_name: n1\njetstream {\n  store_dir: \"/tmp/x/jetstream\"\n  max_file_store: 50GB\n}\n"
        );
    }
}
