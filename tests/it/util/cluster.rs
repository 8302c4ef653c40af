//! A private Redis Cluster per test: 3 masters and 3 replicas on free loopback ports, created with
//! `redis-cli --cluster create`, killed by their pids on drop. Small on purpose (2 cores here): no
//! persistence, 32 MB each, a 2 s node timeout so a failover takes seconds. [`Cluster::start_tls`]
//! starts one whose nodes speak only TLS, clients and cluster bus alike (the test CA in
//! tests/fixtures/tls).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::redis_server::free_port;
use super::{fixture, wait_for};

struct Node {
    child: Option<Child>,
    port: u16,
    bus: u16,
    /// Its working directory (nodes.conf), so [`Cluster::revive`] brings back the same node.
    dir: PathBuf,
    /// SIGSTOPped by [`Cluster::pause`]: not asked anything until resumed.
    paused: bool,
}

impl Node {
    fn live(&self) -> bool {
        self.child.is_some() && !self.paused
    }
}

pub struct Cluster {
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
    tls: bool,
}

fn binary() -> String {
    std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

/// A hash tag whose slot is `slot` (found by search: "t0", "t1", …).
pub fn tag_for_slot_near(slot: u16) -> String {
    (0..200_000)
        .map(|i| format!("t{i}"))
        .min_by_key(|t| redstream::client::slot::of(t).abs_diff(slot))
        .expect("some tag")
}

impl Cluster {
    /// Six nodes, three of them masters (slots 0-5460, 5461-10922, 10923-16383), each with a replica.
    pub fn start() -> Cluster {
        Cluster::start_with(false)
    }

    /// As [`Cluster::start`], every node listening only on a TLS port (`--port 0`), its cluster bus
    /// and replication on TLS too; clients need no certificate of their own.
    pub fn start_tls() -> Cluster {
        Cluster::start_with(true)
    }

    fn start_with(tls: bool) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir for the cluster");
        let mut cluster = Cluster {
            nodes: Vec::new(),
            dir,
            tls,
        };
        for i in 0..6 {
            let node = cluster.spawn_node(i);
            cluster.nodes.push(node);
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = cluster
            .cli()
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        cluster.wait_ok(Duration::from_secs(30));
        cluster
    }

    /// `redis-cli`, with the TLS options when the nodes speak TLS — under `timeout`: `--cluster
    /// create` waits forever for nodes that cannot meet.
    fn cli(&self) -> Command {
        let mut cli = Command::new("timeout");
        cli.args(["120", "redis-cli"]);
        if self.tls {
            cli.arg("--tls").arg("--cacert").arg(fixture("tls/ca.pem"));
        }
        cli
    }

    /// A client for the node at `port`, trusting the test CA when the nodes speak TLS.
    fn client(&self, port: u16) -> redis::Client {
        if self.tls {
            redis::Client::build_with_tls(format!("rediss://127.0.0.1:{port}"), certificates())
        } else {
            redis::Client::open(format!("redis://127.0.0.1:{port}"))
        }
        .expect("a client for a cluster node")
    }

    fn scheme(&self) -> &'static str {
        if self.tls { "rediss" } else { "redis" }
    }

    fn spawn_node(&self, i: usize) -> Node {
        for _ in 0..5 {
            let (port, bus) = (free_port(), free_port());
            if port == bus {
                continue;
            }
            let dir: PathBuf = self.dir.path().join(format!("n{i}-{port}"));
            std::fs::create_dir_all(&dir).unwrap();
            if let Some(child) = self.spawn_at(port, bus, &dir) {
                return Node {
                    child: Some(child),
                    port,
                    bus,
                    dir,
                    paused: false,
                };
            }
        }
        panic!("could not start a cluster node on a free port after 5 tries");
    }

    /// Starts redis-server as a cluster node on `port` and `bus` in `dir`; None when another process
    /// answered on that port (taken meanwhile) or the node exited.
    fn spawn_at(&self, port: u16, bus: u16, dir: &std::path::Path) -> Option<Child> {
        let mut command = Command::new(binary());
        if self.tls {
            command
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .args(["--tls-cluster", "yes", "--tls-replication", "yes"])
                .arg("--tls-cert-file")
                .arg(fixture("tls/server.pem"))
                .arg("--tls-key-file")
                .arg(fixture("tls/server.key"))
                .arg("--tls-ca-cert-file")
                .arg(fixture("tls/ca.pem"))
                // The cluster bus always asks its peers for a certificate: the nodes present
                // the client one (the server's is for server authentication only).
                .arg("--tls-client-cert-file")
                .arg(fixture("tls/client.pem"))
                .arg("--tls-client-key-file")
                .arg(fixture("tls/client.key"))
                .args(["--tls-auth-clients", "no"]);
        } else {
            command.args(["--port", &port.to_string()]);
        }
        let mut child = command
            .args(["--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus.to_string(),
            ])
            .args(["--cluster-node-timeout", "2000"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--maxmemory", "32mb", "--io-threads", "1"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (is it installed? .ci/run installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            match answering_pid(&self.client(port)) {
                Some(pid) if pid == child.id() => return Some(child),
                Some(_) => break,
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Starts a killed node again on its port, from its nodes.conf and without data: it rejoins the
    /// cluster — a master whose slots were taken over comes back as a replica of the new owner and
    /// syncs from it. Waits until its replication link is up and the cluster is ok.
    pub fn revive(&mut self, port: u16) {
        let i = self.nodes.iter().position(|n| n.port == port).unwrap();
        assert!(self.nodes[i].child.is_none(), "revive a killed node");
        let (bus, dir) = (self.nodes[i].bus, self.nodes[i].dir.clone());
        let child = wait_for("the node to start again", Duration::from_secs(20), || {
            self.spawn_at(port, bus, &dir)
        });
        self.nodes[i].child = Some(child);
        wait_for("the revived node to sync", Duration::from_secs(40), || {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut self.node(port))
                .ok()?;
            (info.contains("role:slave") && info.contains("master_link_status:up")).then_some(())
        });
        self.wait_ok(Duration::from_secs(30));
    }

    /// The ports of the live nodes, masters and replicas.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.live())
            .map(|n| n.port)
            .collect()
    }

    /// `redis.cluster = [...]` for a config (and the CA to trust, for a TLS cluster).
    pub fn seeds_toml(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("\"{}://127.0.0.1:{}\"", self.scheme(), n.port))
            .collect();
        let mut toml = format!("cluster = [{}]", seeds.join(", "));
        if self.tls {
            let ca = fixture("tls/ca.pem");
            toml.push_str(&format!("\ntls_ca = {{ file = \"{}\" }}", ca.display()));
        }
        toml
    }

    /// A synchronous cluster connection for set-up and inspection.
    pub fn conn(&self) -> redis::cluster::ClusterConnection {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.live())
            .map(|n| format!("{}://127.0.0.1:{}", self.scheme(), n.port))
            .collect();
        let mut builder = redis::cluster::ClusterClientBuilder::new(seeds);
        if self.tls {
            builder = builder.certs(certificates());
        }
        builder
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(5))
            .build()
            .expect("cluster client")
            .get_connection()
            .expect("connect to the test cluster")
    }

    /// A plain connection to one node.
    pub fn node(&self, port: u16) -> redis::Connection {
        self.client(port)
            .get_connection_with_timeout(Duration::from_secs(2))
            .expect("connect to a cluster node")
    }

    /// The port of the master serving `key`'s slot now, as a live node sees it.
    pub fn master_of(&self, key: &str) -> u16 {
        let slot = redstream::client::slot::of(key);
        let live = self.live_port();
        let map: redis::Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut self.node(live))
            .expect("CLUSTER SLOTS");
        let (_, port) = slot_owner(&map, slot).expect("an owner for every slot");
        port
    }

    fn live_port(&self) -> u16 {
        self.nodes
            .iter()
            .find(|n| n.live())
            .expect("a live node")
            .port
    }

    /// Node id of the node at `port`.
    pub fn id_of(&self, port: u16) -> String {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut self.node(port))
            .expect("CLUSTER MYID")
    }

    /// Waits until every live node reports `cluster_state:ok` and agrees on the masters.
    pub fn wait_ok(&self, limit: Duration) {
        wait_for("the cluster to be ok", limit, || {
            let states: Vec<bool> = self
                .nodes
                .iter()
                .filter(|n| n.live())
                .map(|n| {
                    self.client(n.port)
                        .get_connection_with_timeout(Duration::from_millis(300))
                        .ok()
                        .and_then(|mut c| {
                            redis::cmd("CLUSTER")
                                .arg("INFO")
                                .query::<String>(&mut c)
                                .ok()
                        })
                        .is_some_and(|info| info.contains("cluster_state:ok"))
                })
                .collect();
            states.iter().all(|ok| *ok).then_some(())
        });
    }

    /// The port of the replica of the master at `port` (the first, if it has several).
    pub fn replica_of(&self, port: u16) -> u16 {
        let id = self.id_of(port);
        wait_for("a replica of that master", Duration::from_secs(20), || {
            let nodes: String = redis::cmd("CLUSTER")
                .arg("NODES")
                .query(&mut self.node(port))
                .expect("CLUSTER NODES");
            nodes
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .find(|f| f.len() > 3 && f[3] == id)
                .and_then(|f| f[1].split(['@', ':']).nth(1)?.parse().ok())
        })
    }

    /// SIGSTOPs the node at `port` (it answers nothing, its links stay open) until [`Cluster::resume`].
    pub fn pause(&mut self, port: u16) {
        self.signal(port, libc::SIGSTOP);
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap()
            .paused = true;
    }

    pub fn resume(&mut self, port: u16) {
        self.signal(port, libc::SIGCONT);
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap()
            .paused = false;
    }

    fn signal(&self, port: u16, sig: i32) {
        let node = self.nodes.iter().find(|n| n.port == port).unwrap();
        let pid = node.child.as_ref().expect("a running node").id() as i32;
        // SAFETY: a signal to a child process this cluster started.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// SIGKILLs the node at `port`.
    pub fn kill(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|n| n.port == port).unwrap();
        if let Some(mut c) = node.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILLs the master serving `key`, waits for its replica to take over, and returns the port
    /// of the node that serves the slot now.
    pub fn fail_master_of(&mut self, key: &str) -> u16 {
        let old = self.master_of(key);
        let node = self.nodes.iter_mut().find(|n| n.port == old).unwrap();
        if let Some(mut c) = node.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        wait_for("a replica to take over", Duration::from_secs(30), || {
            let now = std::panic::catch_unwind(|| self.master_of(key)).ok()?;
            (now != old).then_some(now)
        });
        self.wait_ok(Duration::from_secs(30));
        self.master_of(key)
    }

    /// Moves the `slots` lowest slots of the master serving `key` to another master with
    /// `redis-cli --cluster reshard` (keys included, migrated by MIGRATE). Returns the new owner.
    pub fn reshard_from_master_of(&self, key: &str, slots: usize) -> u16 {
        let from = self.master_of(key);
        let masters = self.masters();
        let to = *masters.iter().find(|p| **p != from).unwrap();
        let out = self
            .cli()
            .arg("--cluster")
            .arg("reshard")
            .arg(format!("127.0.0.1:{from}"))
            .args(["--cluster-from", &self.id_of(from)])
            .args(["--cluster-to", &self.id_of(to)])
            .args(["--cluster-slots", &slots.to_string()])
            .args(["--cluster-yes", "--cluster-pipeline", "100"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster reshard");
        assert!(
            out.status.success(),
            "reshard failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.wait_ok(Duration::from_secs(30));
        to
    }

    /// The ports of the current masters.
    pub fn masters(&self) -> Vec<u16> {
        let map: redis::Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut self.node(self.live_port()))
            .expect("CLUSTER SLOTS");
        let mut ports: Vec<u16> = (0..16384u16)
            .step_by(512)
            .filter_map(|s| slot_owner(&map, s).map(|(_, p)| p))
            .collect();
        ports.sort();
        ports.dedup();
        ports
    }

    /// Every entry of `stream`, read through the cluster.
    pub fn entries(&self, stream: &str) -> Vec<HashMap<String, String>> {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query(&mut self.conn())
            .expect("XRANGE");
        reply
            .ids
            .into_iter()
            .map(|id| {
                id.map
                    .into_iter()
                    .map(|(k, v)| (k, redis::from_redis_value(v).unwrap_or_default()))
                    .collect()
            })
            .collect()
    }

    /// XLEN through the cluster.
    pub fn xlen(&self, stream: &str) -> u64 {
        redis::cmd("XLEN")
            .arg(stream)
            .query(&mut self.conn())
            .expect("XLEN")
    }

    /// Entries pending in `group` of `stream` (0 when the group does not exist yet).
    pub fn pending(&self, stream: &str, group: &str) -> u64 {
        let reply: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .query(&mut self.conn());
        match reply {
            Ok(redis::Value::Array(v)) => match v.first() {
                Some(redis::Value::Int(n)) => *n as u64,
                _ => 0,
            },
            _ => 0,
        }
    }
}

fn slot_owner(map: &redis::Value, slot: u16) -> Option<(String, u16)> {
    let redis::Value::Array(ranges) = map else {
        return None;
    };
    ranges.iter().find_map(|r| {
        let redis::Value::Array(parts) = r else {
            return None;
        };
        let (Some(redis::Value::Int(a)), Some(redis::Value::Int(b)), Some(redis::Value::Array(n))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            return None;
        };
        if !(*a as u16 <= slot && slot <= *b as u16) {
            return None;
        }
        let host: String = redis::from_redis_value(n.first()?.clone()).ok()?;
        let port: i64 = redis::from_redis_value(n.get(1)?.clone()).ok()?;
        Some((host, port as u16))
    })
}

/// The test CA, for clients of a TLS cluster.
fn certificates() -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(std::fs::read(fixture("tls/ca.pem")).expect("the test CA")),
    }
}

fn answering_pid(client: &redis::Client) -> Option<u32> {
    let info: String = client
        .get_connection_with_timeout(Duration::from_millis(200))
        .and_then(|mut c| redis::cmd("INFO").arg("server").query(&mut c))
        .ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
