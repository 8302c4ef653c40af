//! Redis Cluster: three daemons on a real 3-master + 3-replica cluster, consuming hash-tagged streams
//! spread over every master — a daemon SIGKILLed again and again, a master killed and its replica
//! promoted, a busy stream's slot resharded away, replies crossing slots through the outbox — and in
//! every case each message's reply exists exactly once. Plus the relay's crash windows, step by step,
//! on one node.

use std::collections::HashMap;
use std::time::Duration;

use crate::util::cluster::{Cluster, tag_for_slot_near};
use crate::util::{Daemon, RedisServer, admin, config_toml, wait_for};
use redstream::client::outbox;

/// A daemon config for `cluster` with consumer tables `consumers`, as instance `instance`.
pub(crate) fn toml(cluster: &Cluster, instance: usize, consumers: &str) -> String {
    let base = config_toml(
        "redis://127.0.0.1:1/0",
        &format!("[daemon]\ndrain_timeout = \"10s\"\ninstance = \"n{instance}\"\n{consumers}"),
    );
    base.replace("url = \"redis://127.0.0.1:1/0\"", &cluster.seeds_toml())
}

/// One consumer per (input, output) pair: the `faults` handler replying to the output after a short
/// sleep, so a run lasts long enough to be hit mid-way.
pub(crate) fn consumers(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(i, o)| {
            format!(
                "[[consumers]]\nstream = \"{i}\"\ngroup = \"g\"\nstart = \"0\"\nblock = \"500ms\"\n\
                 claim_min_idle = \"2s\"\nclaim_interval = \"500ms\"\nhandler_timeout = \"1s\"\n\
                 batch_size = 20\nin_flight = 20\nhandler = \"faults\"\n\
                 faults = {{ reply_to = \"{o}\", sleep = \"2ms\" }}\n"
            )
        })
        .collect()
}

/// Three streams, one per master, each replying to a stream of its own entity (`same_slot`) or of
/// the next one's (crossing slots).
pub(crate) fn pairs(same_slot: bool) -> Vec<(String, String)> {
    let tags: Vec<String> = [100u16, 5600, 11000]
        .iter()
        .map(|s| tag_for_slot_near(*s))
        .collect();
    (0..3)
        .map(|i| {
            let out = if same_slot {
                &tags[i]
            } else {
                &tags[(i + 1) % 3]
            };
            (
                format!("nova:task:{{{}}}:in", tags[i]),
                format!("nova:task:{{{out}}}:out"),
            )
        })
        .collect()
}

/// Publishes `n` messages to `stream` on its master, and waits until a replica has them (a failover
/// must not lose input before the daemons are judged). Returns their ids.
pub(crate) fn publish(cluster: &Cluster, stream: &str, n: usize) -> Vec<String> {
    let mut conn = cluster.node(cluster.master_of(stream));
    let mut ids = Vec::new();
    for i in 0..n {
        let id: String = redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("n")
            .arg(i)
            .query(&mut conn)
            .expect("XADD on the stream's master");
        ids.push(id);
    }
    let _: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query(&mut conn)
        .expect("WAIT");
    ids
}

/// Every id of `ids` has exactly one reply in `out` (by `_cause`), and nothing else does.
fn assert_exactly_once(cluster: &Cluster, input: &str, out: &str, ids: &[String]) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for e in cluster.entries(out) {
        // The reply as the handler made it, with its envelope: nothing of the outbox's own (a packed
        // reply arrives unpacked).
        assert!(
            [
                "n",
                "faults_started_us",
                "_timestamp",
                "_source",
                "_trace_id"
            ]
            .iter()
            .all(|f| e.contains_key(*f))
                && !e.keys().any(|k| k.starts_with("_outbox")),
            "{out}: {e:?}"
        );
        let cause = e.get("_cause").expect("every reply has _cause");
        let id = cause
            .strip_prefix(&format!("{input}/"))
            .expect("the cause names the input")
            .to_owned();
        *seen.entry(id).or_insert(0) += 1;
    }
    let lost = ids.iter().filter(|id| !seen.contains_key(*id)).count();
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    let strangers = seen.keys().filter(|id| !ids.contains(id)).count();
    println!("{input} → {out}: lost={lost} duplicates={duplicates}");
    assert_eq!(
        (lost, duplicates, strangers),
        (0, 0, 0),
        "lost, duplicated, unknown"
    );
}

/// Publishes `n` more messages to every input, adding their ids to `ids`.
pub(crate) fn publish_all(
    cluster: &Cluster,
    pairs: &[(String, String)],
    ids: &mut [Vec<String>],
    n: usize,
) {
    for (i, (input, _)) in pairs.iter().enumerate() {
        ids[i].extend(publish(cluster, input, n));
    }
}

/// Waits until every output holds as many replies as its input has messages, and nothing is
/// pending any more.
fn settle(cluster: &Cluster, pairs: &[(String, String)], ids: &[Vec<String>], limit: Duration) {
    wait_for("every reply", limit, || {
        pairs
            .iter()
            .zip(ids)
            .all(|((_, o), ids)| cluster.xlen(o) >= ids.len() as u64)
            .then_some(())
    });
    for (input, _) in pairs {
        wait_for("nothing pending", Duration::from_secs(20), || {
            (cluster.pending(input, "g") == 0).then_some(())
        });
    }
}

/// Three times: 150 more messages per input, then the first daemon SIGKILLed mid-run and started
/// again.
fn sigkill_the_first_again_and_again(
    cluster: &Cluster,
    pairs: &[(String, String)],
    ids: &mut [Vec<String>],
    daemons: &mut [Daemon],
) {
    for _ in 0..3 {
        publish_all(cluster, pairs, ids, 150);
        std::thread::sleep(Duration::from_millis(150));
        daemons[0].kill9();
        std::thread::sleep(Duration::from_millis(300));
        daemons[0] = Daemon::running(&toml(cluster, 0, &consumers(pairs)), &[]);
    }
}

/// Stops every daemon (a clean drain) and checks each input's replies: exactly one per message.
fn judge(
    cluster: &Cluster,
    pairs: &[(String, String)],
    ids: &[Vec<String>],
    daemons: &mut [Daemon],
) {
    stop_all(daemons);
    for ((input, out), ids) in pairs.iter().zip(ids) {
        assert_exactly_once(cluster, input, out, ids);
    }
}

fn start_daemons(cluster: &Cluster, pairs: &[(String, String)]) -> Vec<Daemon> {
    (0..3)
        .map(|i| Daemon::running(&toml(cluster, i, &consumers(pairs)), &[]))
        .collect()
}

fn stop_all(daemons: &mut [Daemon]) {
    for d in daemons {
        assert_eq!(d.stop(Duration::from_secs(15)), 0, "a clean drain exits 0");
    }
}

#[test]
fn three_daemons_on_three_masters_survive_one_of_them_sigkilled_again_and_again() {
    let cluster = Cluster::start();
    let pairs = pairs(true);
    let mut daemons = start_daemons(&cluster, &pairs);
    let mut ids: Vec<Vec<String>> = vec![Vec::new(); 3];
    sigkill_the_first_again_and_again(&cluster, &pairs, &mut ids, &mut daemons);
    settle(&cluster, &pairs, &ids, Duration::from_secs(60));
    judge(&cluster, &pairs, &ids, &mut daemons);
}

#[test]
fn a_master_killed_mid_run_fails_over_to_its_replica_without_loss_or_duplicates() {
    let mut cluster = Cluster::start();
    let pairs = pairs(true);
    let mut daemons = start_daemons(&cluster, &pairs);
    let mut ids: Vec<Vec<String>> = vec![Vec::new(); 3];
    publish_all(&cluster, &pairs, &mut ids, 300);
    std::thread::sleep(Duration::from_millis(100));
    let victim = &pairs[1].0;
    let before = cluster.master_of(victim);
    let after = cluster.fail_master_of(victim);
    assert_ne!(before, after, "the replica took the slot over");
    publish_all(&cluster, &pairs, &mut ids, 100);
    settle(&cluster, &pairs, &ids, Duration::from_secs(90));
    assert!(
        daemons
            .iter()
            .any(|d| d.count_log("reading again after Redis trouble") > 0),
        "the failover was felt, and recovered from"
    );
    judge(&cluster, &pairs, &ids, &mut daemons);
}

#[test]
fn a_busy_streams_slot_resharded_mid_run_is_followed_without_loss_or_duplicates() {
    let cluster = Cluster::start();
    // The first stream's tag hashes near slot 100, among the lowest slots of the first master,
    // which the reshard moves.
    let pairs = pairs(true);
    let mut daemons = start_daemons(&cluster, &pairs);
    let mut ids: Vec<Vec<String>> = vec![Vec::new(); 3];
    publish_all(&cluster, &pairs, &mut ids, 300);
    let busy = &pairs[0].0;
    let before = cluster.master_of(busy);
    let to = cluster.reshard_from_master_of(busy, 200);
    assert_eq!(cluster.master_of(busy), to, "the busy stream's slot moved");
    assert_ne!(before, to);
    publish_all(&cluster, &pairs, &mut ids, 100);
    settle(&cluster, &pairs, &ids, Duration::from_secs(60));
    assert!(
        daemons
            .iter()
            .any(|d| d.count_log("the stream's slot moved; following it") > 0),
        "a reader followed MOVED"
    );
    judge(&cluster, &pairs, &ids, &mut daemons);
    // Replaying a dead letter is one transaction: across slots it is refused, saying why.
    let (stream, dlq) = ("nova:task:plain:in", "nova:task:plain:in-dlq");
    let id: String = redis::cmd("XADD")
        .arg(dlq)
        .arg("*")
        .arg("_dlq_source")
        .arg(format!("{stream}/1-0"))
        .query(&mut cluster.conn())
        .unwrap();
    let settings = crate::util::settings_from(&toml(&cluster, 0, "")).expect("valid");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let refused = rt.block_on(async {
        let client = redstream::client::Client::connect(
            settings.redis.clone(),
            settings.naming.clone(),
            settings.identity.clone().unwrap().identity,
        )
        .unwrap();
        client.replay_dead_letter(dlq, &id, stream).await
    });
    let e = refused.expect_err("a replay across slots is refused");
    assert!(
        matches!(e, redstream::client::Error::CrossSlot { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("hash tag"), "{e}");
    assert_eq!(cluster.xlen(dlq), 1, "the dead letter stays");
}

#[test]
fn replies_crossing_slots_go_through_the_outbox_exactly_once_under_sigkill() {
    let cluster = Cluster::start();
    let pairs = pairs(false);
    for (i, o) in &pairs {
        assert_ne!(
            redstream::client::slot::of(i),
            redstream::client::slot::of(o),
            "the replies cross slots"
        );
    }
    let mut daemons = start_daemons(&cluster, &pairs);
    let mut ids: Vec<Vec<String>> = vec![Vec::new(); 3];
    sigkill_the_first_again_and_again(&cluster, &pairs, &mut ids, &mut daemons);
    settle(&cluster, &pairs, &ids, Duration::from_secs(90));
    for (input, _) in &pairs {
        let outbox = outbox::outbox_of(input);
        wait_for("every outbox settled", Duration::from_secs(30), || {
            (cluster.pending(input, "g") == 0
                && cluster.xlen(&outbox) == 0
                && cluster.pending(&outbox, outbox::GROUP) == 0)
                .then_some(())
        });
    }
    let repeated: usize = daemons
        .iter()
        .map(|d| d.count_log("outbox entries delivered before"))
        .sum();
    println!("relay passes that found entries delivered before a crash: {repeated}");
    judge(&cluster, &pairs, &ids, &mut daemons);
    let cli = std::process::Command::new(crate::util::bin())
        .args(["check", "--config"])
        .arg({
            let p = std::env::temp_dir().join(format!("rs-cluster-{}.toml", std::process::id()));
            std::fs::write(&p, toml(&cluster, 0, &consumers(&pairs))).unwrap();
            p
        })
        .output()
        .expect("redstream check");
    let shown = String::from_utf8_lossy(&cli.stdout);
    assert!(cli.status.success(), "{shown}");
    assert!(
        shown.contains("replies to other slots effectively-once through the outbox"),
        "{shown}"
    );
}

/// A delivery another relay made while the target's replica was paused is not settled on the word
/// of a relay that only finds its record: both wait for a replica to have it, and the finding
/// settles once it does.
#[test]
fn a_delivery_found_made_before_is_settled_only_once_a_replica_has_it() {
    let mut cluster = Cluster::start();
    let source = format!("nova:task:{{{}}}:in", tag_for_slot_near(5600));
    let target = format!("nova:task:{{{}}}:out", tag_for_slot_near(100));
    let master = cluster.master_of(&target);
    assert_ne!(cluster.master_of(&source), master);
    let settings = crate::util::settings_from(&toml(&cluster, 0, "")).expect("valid");
    let connect = || {
        redstream::client::Client::connect(
            settings.redis.clone(),
            settings.naming.clone(),
            settings.identity.clone().unwrap().identity,
        )
        .unwrap()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Two relays, each on a connection of its own (as each relay runs).
    let (first, second) = rt.block_on(async {
        let own = |c: redstream::client::Client| c.dedicated(outbox::REPLICA_WAIT).unwrap();
        (own(connect()), own(connect()))
    });
    let entries = rt.block_on(async {
        first.outbox_group(&source).await.unwrap();
        let _: String = redis::cmd("XADD")
            .arg(outbox::outbox_of(&source))
            .arg("*")
            .arg(outbox::TARGET)
            .arg(&target)
            .arg(outbox::OUTBOX_REPLY)
            .arg("0")
            .arg("_cause")
            .arg("x/1")
            .query(&mut cluster.conn())
            .unwrap();
        read_outbox(&first, &source, "alpha", 10).await
    });
    let far = redstream::model::envelope::now_ms() + 60_000;
    let keep = Duration::from_secs(3600);
    // The replica paused, its link kept: the master still counts it, with its last acknowledged
    // offset — so a WAIT covers exactly the writes of the connection that asks.
    let replica = cluster.replica_of(master);
    cluster.pause(replica);
    let (made, found) = rt.block_on(async {
        let made = first.deliver(&source, &entries, far, keep).await.unwrap();
        let found = second.deliver(&source, &entries, far, keep).await.unwrap();
        (made, found)
    });
    cluster.resume(replica);
    assert_eq!((made.delivered, made.ready.len()), (1, 0), "{made:?}");
    assert_eq!(
        (found.repeated, found.ready.len(), found.unreplicated),
        (1, 0, 1),
        "found, and not settled before a replica has it: {found:?}"
    );
    // Once the replica has caught up, the same finding settles it.
    wait_for("the replica to catch up", Duration::from_secs(30), || {
        let found = rt
            .block_on(second.deliver(&source, &entries, far, keep))
            .unwrap();
        (found.ready.len() == 1).then_some(())
    });
}

/// How many entries were ever added to `stream` (XINFO STREAM's entries-added; 0 for none).
fn added(cluster: &Cluster, stream: &str) -> u64 {
    let info: redis::RedisResult<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(stream)
        .query(&mut cluster.conn());
    info.ok()
        .and_then(|m| m.get("entries-added").cloned())
        .and_then(|v| redis::from_redis_value::<u64>(v).ok())
        .unwrap_or(0)
}

/// A reply to another slot of its source's own node is committed in place, with the ack — unless
/// the source's outbox holds something (the reply could overtake replies waiting there), or the
/// node no longer serves that slot (moved since the daemon last asked): then it goes through the
/// outbox. Every reply arrives exactly once whichever way it went.
#[test]
fn a_reply_to_a_slot_of_its_own_node_is_committed_in_place_while_the_outbox_is_empty() {
    let cluster = Cluster::start();
    // Both on the first master (slots 0-5460); the reshard below moves its lowest slots, the
    // target's among them, and not the source's.
    let source = format!("nova:task:{{{}}}:in", tag_for_slot_near(3000));
    let target = format!("nova:task:{{{}}}:out", tag_for_slot_near(50));
    assert_eq!(cluster.master_of(&source), cluster.master_of(&target));
    let pairs = vec![(source.clone(), target.clone())];
    let outbox = outbox::outbox_of(&source);
    let mut daemon = Daemon::running(&toml(&cluster, 0, &consumers(&pairs)), &[]);
    let mut ids: Vec<Vec<String>> = vec![Vec::new()];
    publish_all(&cluster, &pairs, &mut ids, 100);
    settle(&cluster, &pairs, &ids, Duration::from_secs(30));
    assert_eq!(
        added(&cluster, &outbox),
        0,
        "written in place, not through the outbox"
    );

    // An entry the relay cannot deliver (its target holds a string) keeps the outbox from emptying:
    // replies go through it, behind it.
    let stuck = format!("nova:task:{{{}}}:stuck", tag_for_slot_near(9000));
    let _: () = redis::cmd("SET")
        .arg(&stuck)
        .arg("x")
        .query(&mut cluster.conn())
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(&outbox)
        .arg("*")
        .arg(outbox::TARGET)
        .arg(&stuck)
        .arg("n")
        .arg("stuck")
        .query(&mut cluster.conn())
        .unwrap();
    publish_all(&cluster, &pairs, &mut ids, 50);
    settle(&cluster, &pairs, &ids, Duration::from_secs(30));
    assert_eq!(
        added(&cluster, &outbox),
        51,
        "through the outbox while it held an entry"
    );

    // Once that entry is delivered (its target is a stream again), replies go in place again.
    let _: () = redis::cmd("DEL")
        .arg(&stuck)
        .query(&mut cluster.conn())
        .unwrap();
    wait_for("the stuck entry delivered", Duration::from_secs(30), || {
        (cluster.xlen(&outbox) == 0 && cluster.xlen(&stuck) == 1).then_some(())
    });
    publish_all(&cluster, &pairs, &mut ids, 50);
    settle(&cluster, &pairs, &ids, Duration::from_secs(30));
    assert_eq!(added(&cluster, &outbox), 51, "in place again");

    // The target's slot moves to another master; the daemon, whose source did not move, still
    // believes them neighbours: the script finds the key elsewhere and uses the outbox.
    let to = cluster.reshard_from_master_of(&target, 200);
    assert_eq!(cluster.master_of(&target), to, "the target's slot moved");
    assert_ne!(cluster.master_of(&source), to, "the source's did not");
    publish_all(&cluster, &pairs, &mut ids, 50);
    settle(&cluster, &pairs, &ids, Duration::from_secs(30));
    assert_eq!(
        added(&cluster, &outbox),
        101,
        "through the outbox to the other node"
    );
    judge(&cluster, &pairs, &ids, std::slice::from_mut(&mut daemon));
}

/// A failover that loses the last writes of a reply's target: its replica is cut off (paused, its
/// replication link killed) while replies crossing slots are relayed to the master, which is then
/// killed — its replica promoted without those replies. The relay settles nothing a replica does not
/// have, so every reply whose input survived is delivered again to the new master; and the messages
/// whose acks died with that master (it also serves another pair's input) run again without
/// writing their replies twice: lost=0, duplicates=0.
#[test]
fn a_failover_that_loses_the_targets_last_writes_loses_no_reply() {
    let mut cluster = Cluster::start();
    let pairs = pairs(false);
    let (input, target) = (pairs[0].0.clone(), pairs[0].1.clone());
    let master = cluster.master_of(&target);
    let replica = cluster.replica_of(master);
    assert_ne!(
        cluster.master_of(&input),
        master,
        "the input is safe elsewhere"
    );
    let mut daemons = start_daemons(&cluster, &pairs);
    let mut ids: Vec<Vec<String>> = vec![Vec::new(); 3];
    publish_all(&cluster, &pairs, &mut ids, 30);
    settle(&cluster, &pairs, &ids, Duration::from_secs(60));

    // Cut the replica off: it stops, and the master closes its replication link.
    cluster.pause(replica);
    let _: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "replica"])
        .query(&mut cluster.node(master))
        .unwrap();
    ids[0].extend(publish(&cluster, &input, 100));
    let xlen = |cluster: &Cluster, port: u16| -> u64 {
        redis::cmd("XLEN")
            .arg(&target)
            .query(&mut cluster.node(port))
            .unwrap()
    };
    wait_for(
        "the replies on the cut-off master",
        Duration::from_secs(30),
        || (xlen(&cluster, master) >= ids[0].len() as u64).then_some(()),
    );

    // The master dies; the replica comes back and is promoted without the last replies.
    cluster.kill(master);
    cluster.resume(replica);
    wait_for("the replica to take over", Duration::from_secs(40), || {
        let now = std::panic::catch_unwind(|| cluster.master_of(&target)).ok()?;
        (now == replica).then_some(())
    });
    cluster.wait_ok(Duration::from_secs(30));
    let kept = xlen(&cluster, replica);
    println!(
        "replies the promoted replica had: {kept} of {}",
        ids[0].len()
    );
    assert!(
        kept < ids[0].len() as u64,
        "the failover must lose writes, or this test proves nothing"
    );
    // The old master comes back, as the new master's replica: until then the new master has no
    // replica to confirm what the relays deliver to it, and nothing delivered there is settled.
    cluster.revive(master);
    settle(&cluster, &pairs, &ids, Duration::from_secs(90));
    for (input, _) in &pairs {
        let outbox = outbox::outbox_of(input);
        wait_for("every outbox settled", Duration::from_secs(30), || {
            (cluster.xlen(&outbox) == 0 && cluster.pending(&outbox, outbox::GROUP) == 0)
                .then_some(())
        });
    }
    judge(&cluster, &pairs, &ids, &mut daemons);
}

/// A consumer whose BLOCK is long against its claim_min_idle: replies arriving late in a relay's read
/// still make their deadline (the relay blocks at most a quarter of claim_min_idle), so the relay
/// never fails over its own fence.
#[test]
fn a_long_block_never_makes_the_relay_miss_its_deadline() {
    let cluster = Cluster::start();
    let pairs = pairs(false);
    let long = consumers(&pairs).replace("block = \"500ms\"", "block = \"2s\"");
    assert!(long.contains("block = \"2s\""));
    let mut daemon = Daemon::running(&toml(&cluster, 0, &long), &[]);
    let mut ids: Vec<Vec<String>> = vec![Vec::new(); 3];
    // Spread out, so replies reach the outboxes at every point of the relays' reads.
    for _ in 0..12 {
        publish_all(&cluster, &pairs, &mut ids, 2);
        std::thread::sleep(Duration::from_millis(170));
    }
    settle(&cluster, &pairs, &ids, Duration::from_secs(30));
    assert_eq!(
        daemon.count_log("outbox relay failed"),
        0,
        "{}",
        daemon.logs().join("\n")
    );
    judge(&cluster, &pairs, &ids, std::slice::from_mut(&mut daemon));
}

/// A Redis ACL user, as on one node: every connection the daemon makes — the cluster client's to each
/// master and the group readers' own — logs in as it, and the work gets done.
#[test]
fn an_acl_user_logs_in_on_every_master_for_every_connection() {
    let cluster = Cluster::start();
    for port in cluster.ports() {
        let _: String = redis::cmd("ACL")
            .arg(&[
                "SETUSER",
                "rsuser",
                "on",
                ">rs-cluster-pw",
                "~*",
                "&*",
                "+@all",
            ])
            .query(&mut cluster.node(port))
            .expect("ACL SETUSER on every node");
    }
    let pairs = pairs(true);
    let config = toml(&cluster, 0, &consumers(&pairs)).replace(
        "[redis]\n",
        "[redis]\nusername = \"rsuser\"\npassword = \"rs-cluster-pw\"\n",
    );
    assert!(config.contains("username = \"rsuser\""), "{config}");
    let mut daemon = Daemon::running(&config, &[]);
    let mut ids: Vec<Vec<String>> = vec![Vec::new(); 3];
    publish_all(&cluster, &pairs, &mut ids, 50);
    settle(&cluster, &pairs, &ids, Duration::from_secs(30));
    // On every master: the daemon's group reader (XREADGROUP on the plain connection) as rsuser.
    for (input, _) in &pairs {
        let clients: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query(&mut cluster.node(cluster.master_of(input)))
            .unwrap();
        let readers: Vec<&str> = clients
            .lines()
            .filter(|l| l.contains("cmd=xreadgroup"))
            .collect();
        assert!(
            !readers.is_empty(),
            "a reader on {input}'s master:\n{clients}"
        );
        assert!(
            readers.iter().all(|l| l.contains("user=rsuser")),
            "readers log in as the ACL user:\n{clients}"
        );
        assert!(
            !clients
                .lines()
                .any(|l| l.contains("user=default") && l.contains("cmd=evalsha")),
            "no commit as the default user:\n{clients}"
        );
    }
    judge(&cluster, &pairs, &ids, std::slice::from_mut(&mut daemon));
}

/// A cluster whose nodes speak only TLS (`rediss://` seeds, the test CA): commands, group reads
/// (over the cluster client, as the fast plain reader cannot speak TLS), same-slot atomic commits and
/// replies crossing slots through the outbox, with a daemon SIGKILLed again and again — every reply
/// exactly once.
#[test]
fn a_tls_cluster_gets_the_same_guarantees_over_rediss() {
    let cluster = Cluster::start_tls();
    let same = pairs(true);
    let crossing = pairs(false);
    // Two streams replying in their own slot, one crossing to another master's.
    let pairs = vec![
        same[0].clone(),
        same[1].clone(),
        (
            crossing[2].0.clone(),
            crossing[2].1.replace(":out", ":relayed"),
        ),
    ];
    assert_ne!(
        redstream::client::slot::of(&pairs[2].0),
        redstream::client::slot::of(&pairs[2].1),
        "the third pair crosses slots"
    );
    let config = toml(&cluster, 0, &consumers(&pairs));
    assert!(
        config.contains("rediss://") && config.contains("tls_ca"),
        "{config}"
    );
    let mut daemons = vec![
        Daemon::running(&config, &[]),
        Daemon::running(&toml(&cluster, 1, &consumers(&pairs)), &[]),
    ];
    let mut ids: Vec<Vec<String>> = vec![Vec::new(); 3];
    sigkill_the_first_again_and_again(&cluster, &pairs, &mut ids, &mut daemons);
    settle(&cluster, &pairs, &ids, Duration::from_secs(90));
    let outbox = outbox::outbox_of(&pairs[2].0);
    wait_for("the outbox settled", Duration::from_secs(30), || {
        (cluster.xlen(&outbox) == 0 && cluster.pending(&outbox, outbox::GROUP) == 0).then_some(())
    });
    judge(&cluster, &pairs, &ids, &mut daemons);
}

/// A slot held half-migrated (source MIGRATING, target IMPORTING, the stream's keys already moved):
/// the source answers ASK for the stream, and the group reader must send ASKING to the target for
/// each read — treating ASK as MOVED would bounce between the two nodes (the target answers MOVED
/// without ASKING) and nothing published meanwhile would be handled. Then the migration completes
/// and the reader follows MOVED.
#[test]
fn a_stream_whose_slot_is_mid_migration_is_read_through_ask() {
    let cluster = Cluster::start();
    let pairs = pairs(true);
    let mut daemon = Daemon::running(&toml(&cluster, 0, &consumers(&pairs)), &[]);
    let mut ids: Vec<Vec<String>> = vec![Vec::new(); 3];
    publish_all(&cluster, &pairs, &mut ids, 30);
    settle(&cluster, &pairs, &ids, Duration::from_secs(30));

    let (input, _) = &pairs[0];
    let slot = redstream::client::slot::of(input);
    let from = cluster.master_of(input);
    let to = *cluster.masters().iter().find(|p| **p != from).unwrap();
    let (from_id, to_id) = (cluster.id_of(from), cluster.id_of(to));
    let setslot = |port: u16, state: &str, id: &str| {
        let _: () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(state)
            .arg(id)
            .query(&mut cluster.node(port))
            .expect("CLUSTER SETSLOT");
    };
    setslot(to, "IMPORTING", &from_id);
    setslot(from, "MIGRATING", &to_id);
    // Move every key of the slot (the daemon may create one meanwhile: repeat until none is left).
    wait_for("the slot's keys moved", Duration::from_secs(20), || {
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(100)
            .query(&mut cluster.node(from))
            .expect("GETKEYSINSLOT");
        if keys.is_empty() {
            return Some(());
        }
        let _: redis::Value = redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(to)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query(&mut cluster.node(from))
            .expect("MIGRATE");
        None
    });
    // Published on the target, after ASKING: only a reader that follows ASK sees these. In two
    // batches three claim intervals apart, so claim rounds run mid-migration too: a script declaring
    // a key that exists on neither side (the group's scheduled retries) is refused there with
    // TRYAGAIN, and the loop must not be stuck on it.
    let mut conn = cluster.node(to);
    for i in 0..40 {
        if i == 20 {
            std::thread::sleep(Duration::from_millis(1500));
        }
        let (_, id): ((), String) = redis::pipe()
            .cmd("ASKING")
            .cmd("XADD")
            .arg(input)
            .arg("*")
            .arg("n")
            .arg(1000 + i)
            .query(&mut conn)
            .expect("XADD on the importing node");
        ids[0].push(id);
    }
    let out = &pairs[0].1;
    wait_for(
        "replies to what was published mid-migration",
        Duration::from_secs(30),
        || (cluster.xlen(out) >= ids[0].len() as u64).then_some(()),
    );
    // Complete the migration: every master learns the new owner; the reader follows MOVED.
    for port in cluster.masters() {
        setslot(port, "NODE", &to_id);
    }
    cluster.wait_ok(Duration::from_secs(30));
    wait_for(
        "every node to see the new owner",
        Duration::from_secs(30),
        || (cluster.master_of(input) == to).then_some(()),
    );
    publish_all(&cluster, &pairs, &mut ids, 30);
    settle(&cluster, &pairs, &ids, Duration::from_secs(30));
    assert!(
        daemon.count_log("the stream's slot moved; following it") > 0,
        "the reader followed MOVED after the migration"
    );
    judge(&cluster, &pairs, &ids, std::slice::from_mut(&mut daemon));
}

/// The relay's crash windows on one node, where each step can be stopped between: an entry
/// delivered and not settled (a crash) is settled by the next relay without a second write; a relay
/// past its deadline (a stalled process) writes nothing.
#[test]
fn the_relay_never_writes_an_outbox_entry_twice() {
    let server = RedisServer::start();
    let source = "nova:task:{relay}:in";
    let target = "nova:task:{other}:out";
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = admin(&server);
        client.outbox_group(source).await.unwrap();
        let box_ = outbox::outbox_of(source);
        for n in 0..3 {
            server.xadd(
                &box_,
                &[
                    (outbox::TARGET, target),
                    ("n", &n.to_string()),
                    ("_cause", "x/1"),
                ],
            );
        }
        let mut alpha = client
            .outbox_reader(source, "alpha", Duration::from_secs(1))
            .unwrap();
        let got = alpha
            .read(redstream::client::ReadFrom::New, 10, None)
            .await
            .unwrap();
        assert_eq!(got.entries.len(), 3);
        let far = redstream::model::envelope::now_ms() + 60_000;
        let keep = Duration::from_secs(3600);
        // A relay that delivers and stops before settling: "alpha crashed after delivering" as seen
        // by the one who relays them next.
        let crashed = client
            .deliver(source, &got.entries, far, keep)
            .await
            .unwrap();
        assert_eq!(
            (crashed.delivered, crashed.settled, crashed.ready.len()),
            (3, 0, 3)
        );
        assert_eq!(server.xlen(target), 3);
        // Redis forgets the relay's scripts (a restart, a promoted replica, SCRIPT FLUSH): the
        // next EVALSHA meets NOSCRIPT, loads the script and runs it.
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query(&mut server.conn())
            .unwrap();
        // The owner relays them again: nothing written twice, all settled; the records stay (for a
        // message that runs again, below).
        let again = client.relay(source, &got.entries, far, keep).await.unwrap();
        assert_eq!((again.delivered, again.repeated, again.settled), (0, 3, 3));
        assert_eq!(server.xlen(target), 3, "no second write");
        assert_eq!(server.xlen(&box_), 0, "settled entries are deleted");
        assert_eq!(
            records(&server, target),
            3,
            "the records outlive the settling"
        );

        // A message whose commit was lost with its master runs again: its commit makes new outbox
        // entries for the same effects (same cause, same reply index). Nothing is written twice; a
        // reply of another index, or of another message, is.
        let rerun = |n: &str, cause: &str, index: &str| {
            server.xadd(
                &box_,
                &[
                    (outbox::TARGET, target),
                    (outbox::OUTBOX_REPLY, index),
                    ("n", n),
                    ("_cause", cause),
                ],
            )
        };
        rerun("first", "nova:task:{relay}:in/7-0", "0");
        let got = alpha
            .read(redstream::client::ReadFrom::New, 10, None)
            .await
            .unwrap();
        let first = client.relay(source, &got.entries, far, keep).await.unwrap();
        assert_eq!((first.delivered, first.settled), (1, 1));
        rerun("again", "nova:task:{relay}:in/7-0", "0");
        rerun("second reply", "nova:task:{relay}:in/7-0", "1");
        rerun("another message", "nova:task:{relay}:in/8-0", "0");
        let got = alpha
            .read(redstream::client::ReadFrom::New, 10, None)
            .await
            .unwrap();
        let again = client.relay(source, &got.entries, far, keep).await.unwrap();
        assert_eq!((again.delivered, again.repeated, again.settled), (2, 1, 3));
        let written: Vec<String> = server
            .entries(target)
            .iter()
            .skip(3)
            .map(|e| e.fields.get_str("n").unwrap().to_owned())
            .collect();
        assert_eq!(written, ["first", "second reply", "another message"]);
        assert!(
            server
                .entries(target)
                .iter()
                .all(|e| e.fields.get(outbox::OUTBOX_REPLY).is_none()),
            "the index stays in the outbox"
        );

        // A relay past its deadline writes nothing; the entry stays pending for a claim.
        server.xadd(&box_, &[(outbox::TARGET, target), ("n", "late")]);
        let got = alpha
            .read(redstream::client::ReadFrom::New, 10, None)
            .await
            .unwrap();
        let past = redstream::model::envelope::now_ms() - 1;
        let late = client.relay(source, &got.entries, past, keep).await;
        assert!(late.is_err(), "a stalled relay is refused: {late:?}");
        assert_eq!(server.xlen(target), 6, "nothing written");
        assert_eq!(server.pending(&box_, outbox::GROUP), 1, "still pending");

        // An entry a target refuses (a key of another type) stays pending; the others go on.
        server.set_string("nova:task:{bad}:out");
        server.xadd(
            &box_,
            &[(outbox::TARGET, "nova:task:{bad}:out"), ("n", "w")],
        );
        let mut beta = client
            .outbox_reader(source, "beta", Duration::from_secs(1))
            .unwrap();
        let got = beta
            .read(redstream::client::ReadFrom::New, 10, None)
            .await
            .unwrap();
        let refused = client.relay(source, &got.entries, far, keep).await.unwrap();
        assert_eq!(refused.refused.len(), 1, "{refused:?}");
        assert!(refused.refused[0].1.contains("WRONGTYPE"), "{refused:?}");
        assert_eq!(server.pending(&box_, outbox::GROUP), 2);
    });
}

/// Up to `count` new entries of `source`'s outbox, read as relay consumer `consumer`.
async fn read_outbox(
    client: &redstream::client::Client,
    source: &str,
    consumer: &str,
    count: u64,
) -> Vec<redstream::model::envelope::Entry> {
    let mut reader = client
        .outbox_reader(source, consumer, Duration::from_secs(1))
        .unwrap();
    reader
        .read(redstream::client::ReadFrom::New, count, None)
        .await
        .unwrap()
        .entries
}

/// How many delivery records `target`'s record sets hold.
fn records(server: &RedisServer, target: &str) -> u64 {
    let mut conn = server.conn();
    let sets: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", outbox::seen_prefix(target)))
        .query(&mut conn)
        .unwrap();
    sets.iter()
        .map(|k| redis::cmd("SCARD").arg(k).query::<u64>(&mut conn).unwrap())
        .sum()
}

/// A delivery's record is found for at least `keep`: in the period after its own too (records are
/// kept in a set per period of `keep`), and not after the end of that. Records of an older version
/// (a sorted set) are found while they exist, and new deliveries are recorded there too, for a relay
/// of that version still running.
#[test]
fn a_delivery_record_is_found_for_at_least_keep_and_old_records_count() {
    let server = RedisServer::start();
    let source = "nova:task:{period}:in";
    let target = "nova:task:{elsewhere}:out";
    let box_ = outbox::outbox_of(source);
    let keep = Duration::from_secs(2);
    let keep_ms = keep.as_millis() as u64;
    let redis_ms = || -> u64 {
        let (s, us): (u64, u64) = redis::cmd("TIME").query(&mut server.conn()).unwrap();
        s * 1000 + us / 1000
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = admin(&server);
        client.outbox_group(source).await.unwrap();
        // Relays one new entry of effect `cause`#0 and says what became of it.
        let relay_one = async |cause: &str| {
            server.xadd(
                &box_,
                &[
                    (outbox::TARGET, target),
                    (outbox::OUTBOX_REPLY, "0"),
                    ("_cause", cause),
                ],
            );
            let got = read_outbox(&client, source, "alpha", 10).await;
            let far = redstream::model::envelope::now_ms() + 60_000;
            let done = client.relay(source, &got, far, keep).await.unwrap();
            (done.delivered, done.repeated)
        };
        // Delivered within one period (else tried again with another effect), then again in the
        // next period: found.
        let mut attempt = 0;
        let period = loop {
            attempt += 1;
            let before = redis_ms() / keep_ms;
            assert_eq!(relay_one(&format!("x/{attempt}")).await, (1, 0));
            if redis_ms() / keep_ms == before {
                break before;
            }
        };
        let cause = format!("x/{attempt}");
        while redis_ms() / keep_ms == period {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(relay_one(&cause).await, (0, 1), "found in the next period");
        // Past the end of the next period the record is gone: the same effect is written again.
        while redis_ms() / keep_ms <= period + 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            relay_one(&cause).await,
            (1, 0),
            "forgotten after the next period"
        );

        // A record of the older version's sorted set counts; a new delivery is recorded there too
        // while it exists.
        let _: () = redis::cmd("ZADD")
            .arg(outbox::seen_of(target))
            .arg(redis_ms())
            .arg("old/1#0")
            .query(&mut server.conn())
            .unwrap();
        assert_eq!(relay_one("old").await, (1, 0), "another effect");
        assert_eq!(relay_one("old/1").await, (0, 1), "the old record counts");
        let also: Option<f64> = redis::cmd("ZSCORE")
            .arg(outbox::seen_of(target))
            .arg("old#0")
            .query(&mut server.conn())
            .unwrap();
        assert!(also.is_some(), "recorded for an older relay too");
    });
}

/// Settling removes from the outbox what the group no longer holds, and nothing another relay still
/// holds: a relay that settles entries read after another relay's pending ones deletes its own and
/// leaves those; once they are settled too, the outbox is empty.
#[test]
fn settling_never_removes_an_entry_another_relay_still_holds() {
    let server = RedisServer::start();
    let source = "nova:task:{trim}:in";
    let target = "nova:task:{elsewhere}:out";
    let box_ = outbox::outbox_of(source);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = admin(&server);
        client.outbox_group(source).await.unwrap();
        for n in 0..5 {
            server.xadd(&box_, &[(outbox::TARGET, target), ("n", &n.to_string())]);
        }
        let alpha = read_outbox(&client, source, "alpha", 2).await;
        let beta = read_outbox(&client, source, "beta", 3).await;
        let far = redstream::model::envelope::now_ms() + 60_000;
        let keep = Duration::from_secs(3600);
        let done = client.relay(source, &beta, far, keep).await.unwrap();
        assert_eq!((done.delivered, done.settled), (3, 3));
        let left: Vec<String> = server
            .entries(&box_)
            .iter()
            .map(|e| e.fields.get_str("n").unwrap().to_owned())
            .collect();
        assert_eq!(left, ["0", "1"], "alpha's pending entries stay");
        assert_eq!(server.pending(&box_, outbox::GROUP), 2);
        let done = client.relay(source, &alpha, far, keep).await.unwrap();
        assert_eq!((done.delivered, done.settled), (2, 2));
        assert_eq!(server.xlen(&box_), 0);
        assert_eq!(server.pending(&box_, outbox::GROUP), 0);
        assert_eq!(server.xlen(target), 5);
    });
}

/// Ids pending in an outbox whose entries are gone (deleted by hand, or trimmed): the relay's next
/// start acks them and relays the pending entries after them (it once stopped at the first read of
/// its pending entries that held none, leaving the rest to a claim).
#[test]
fn a_relay_acks_pending_ids_whose_entries_are_gone_and_relays_the_rest() {
    let server = RedisServer::start();
    let source = "nova:task:{gone}:in";
    let target = "nova:task:{elsewhere}:out";
    let box_ = outbox::outbox_of(source);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = rt.enter();
    let client = admin(&server);
    rt.block_on(async {
        client.outbox_group(source).await.unwrap();
        let ids: Vec<String> = (0..4)
            .map(|n| server.xadd(&box_, &[(outbox::TARGET, target), ("n", &n.to_string())]))
            .collect();
        assert_eq!(read_outbox(&client, source, "alpha", 10).await.len(), 4);
        let _: u64 = redis::cmd("XDEL")
            .arg(&box_)
            .arg(&ids[..3])
            .query(&mut server.conn())
            .unwrap();
    });
    assert_eq!(server.pending(&box_, outbox::GROUP), 4);
    let (stop, stopped) = redstream::shutdown::channel();
    let relay = rt.spawn(redstream::engine::relay::run(
        client,
        redstream::engine::relay::RelaySettings {
            source: source.into(),
            consumer: "alpha".into(),
            // Two per read: the first read of its pending entries holds none.
            batch_size: 2,
            block: Duration::from_millis(100),
            // No claim within the test: only the start's own pending read can do it.
            claim_min_idle: Duration::from_secs(600),
            claim_interval: Duration::from_secs(600),
            keep: Duration::from_secs(3600),
            retry_min: Duration::from_millis(50),
            retry_max: Duration::from_millis(500),
        },
        stopped,
    ));
    wait_for("the outbox settled", Duration::from_secs(10), || {
        (server.pending(&box_, outbox::GROUP) == 0 && server.xlen(&box_) == 0).then_some(())
    });
    stop.trigger();
    rt.block_on(relay).unwrap();
    let written: Vec<String> = server
        .entries(target)
        .iter()
        .map(|e| e.fields.get_str("n").unwrap().to_owned())
        .collect();
    assert_eq!(written, ["3"], "only the entry that was left is delivered");
}

/// Retry schedules and delayed messages on a cluster: their keys live in each stream's slot, so every
/// script touching them runs on that stream's master. Each message of three streams (one per master)
/// fails its first two deliveries and is retried on a schedule, then answered once; a delayed message
/// to each output stream arrives once, and so does a handler's delayed reply (through the outbox and
/// the relay, which holds it beside its stream in another slot).
#[test]
fn retry_schedules_and_delayed_messages_work_on_every_master() {
    let cluster = Cluster::start();
    let pairs = pairs(false);
    let scheduled = consumers(&pairs).replace(
        "faults = { reply_to",
        "retry = { backoff = [\"200ms\", \"400ms\"], jitter = \"0%\" }\n\
         faults = { fail_deliveries = 2, reply_to",
    );
    assert!(scheduled.contains("fail_deliveries = 2"), "{scheduled}");
    let mut daemons: Vec<Daemon> = (0..2)
        .map(|i| Daemon::running(&toml(&cluster, i, &scheduled), &[]))
        .collect();
    let mut ids: Vec<Vec<String>> = vec![Vec::new(); 3];
    publish_all(&cluster, &pairs, &mut ids, 20);
    let mut later = Vec::new();
    for (input, _) in &pairs {
        let id: String = redis::cmd("XADD")
            .arg(input)
            .arg("*")
            .arg("faults_delay_ms")
            .arg(300)
            .arg("delayed_reply")
            .arg("yes")
            .query(&mut cluster.node(cluster.master_of(input)))
            .unwrap();
        later.push(id);
    }
    for (_, out) in &pairs {
        let said = std::process::Command::new(crate::util::bin())
            .arg("--config")
            .arg(daemons[0].config_path())
            .args(["publish", out, "--delay", "300ms", "delayed=yes"])
            .env_remove("REDSTREAM_CONFIG")
            .output()
            .unwrap();
        assert!(
            said.status.success(),
            "{}",
            String::from_utf8_lossy(&said.stderr)
        );
    }
    wait_for(
        "every reply and delayed message",
        Duration::from_secs(60),
        || {
            pairs
                .iter()
                .zip(&ids)
                .all(|((_, o), ids)| cluster.xlen(o) > ids.len() as u64 + 1)
                .then_some(())
        },
    );
    for (((input, out), ids), later) in pairs.iter().zip(&ids).zip(&later) {
        wait_for("nothing pending", Duration::from_secs(20), || {
            (cluster.pending(input, "g") == 0).then_some(())
        });
        let (delayed, rest): (Vec<_>, Vec<_>) = cluster
            .entries(out)
            .into_iter()
            .partition(|e| e.get("delayed").is_some());
        let (delayed_replies, replies): (Vec<_>, Vec<_>) = rest
            .into_iter()
            .partition(|e| e.get("delayed_reply").is_some());
        assert_eq!(delayed.len(), 1, "{out}: the delayed message once");
        assert_eq!(replies.len(), ids.len(), "{out}: one reply each");
        assert_eq!(delayed_replies.len(), 1, "{out}: the delayed reply once");
        let reply = &delayed_replies[0];
        assert_eq!(
            reply.get("_cause").map(String::as_str),
            Some(format!("{input}/{later}").as_str())
        );
        // Held until 300 ms after its commit (the envelope's time), not delivered by the relay at once.
        let committed: u64 = reply["_timestamp"].parse().unwrap();
        let range: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(out)
            .arg("-")
            .arg("+")
            .query(&mut cluster.conn())
            .unwrap();
        let id = range
            .ids
            .iter()
            .find(|e| e.map.contains_key("delayed_reply"))
            .map(|e| e.id.clone())
            .unwrap();
        let arrived: u64 = id.split('-').next().unwrap().parse().unwrap();
        assert!(
            arrived >= committed + 300,
            "{out}: committed at {committed}, arrived at {arrived}"
        );
    }
    assert!(
        daemons.iter().any(|d| d.count_log("retried in 200ms") > 0),
        "no failure was retried on the schedule"
    );
    stop_all(&mut daemons);
}

/// Handler state on a cluster: each of three streams (one per master) goes to a counter whose state
/// namespace shares the stream's hash tag, replying across slots; the changes of state are written by
/// the commit script on that master with the ack, once per message, whichever of two daemons runs it.
#[test]
fn handler_state_is_committed_in_the_slot_of_its_stream_on_every_master() {
    let cluster = Cluster::start();
    let pairs = pairs(false);
    let counter = crate::util::root().join("handlers/build/counter.wasm");
    let mut tables = String::new();
    for (i, (input, out)) in pairs.iter().enumerate() {
        let tag = input.split(['{', '}']).nth(1).unwrap();
        tables.push_str(&format!(
            "[[consumers]]\nstream = \"{input}\"\ngroup = \"g\"\nstart = \"0\"\nblock = \"500ms\"\n\
             handler = \"counter{i}\"\n\
             [[handlers]]\nname = \"counter{i}\"\nfile = \"{}\"\nroles = [\"task_write\"]\n\
             state = \"nova:task:{{{tag}}}:state\"\nconfig = {{ reply_to = \"{out}\" }}\n",
            counter.display()
        ));
    }
    let mut daemons: Vec<Daemon> = (0..2)
        .map(|i| Daemon::running(&toml(&cluster, i, &tables), &[]))
        .collect();
    for (input, _) in &pairs {
        let mut conn = cluster.node(cluster.master_of(input));
        for n in 0..10 {
            let _: String = redis::cmd("XADD")
                .arg(input)
                .arg("*")
                .arg("k")
                .arg(if n % 2 == 0 { "even" } else { "odd" })
                .query(&mut conn)
                .unwrap();
        }
    }
    for (input, out) in &pairs {
        wait_for("ten replies", Duration::from_secs(30), || {
            (cluster.xlen(out) >= 10 && cluster.pending(input, "g") == 0).then_some(())
        });
        let tag = input.split(['{', '}']).nth(1).unwrap();
        for k in ["even", "odd"] {
            let count: Option<String> = redis::cmd("GET")
                .arg(format!("nova:task:{{{tag}}}:state:count:{k}"))
                .query(&mut cluster.conn())
                .unwrap();
            assert_eq!(count.as_deref(), Some("5"), "{input}: {k}");
        }
        let mut counts: Vec<String> = cluster
            .entries(out)
            .into_iter()
            .filter(|e| e.get("k").map(String::as_str) == Some("even"))
            .map(|e| e["count"].clone())
            .collect();
        counts.sort();
        assert_eq!(counts, ["1", "2", "3", "4", "5"], "{out}: each count once");
    }
    stop_all(&mut daemons);
}

/// Calls of `command` (as INFO commandstats names it, e.g. `cluster|nodes`) on every master.
fn calls(cluster: &Cluster, command: &str) -> u64 {
    let prefix = format!("cmdstat_{command}:calls=");
    cluster
        .masters()
        .into_iter()
        .map(|port| {
            let info: String = redis::cmd("INFO")
                .arg("commandstats")
                .query(&mut cluster.node(port))
                .expect("INFO commandstats");
            info.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .and_then(|rest| rest.split(',').next()?.parse().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// The relay learns a target slot's master and replicas from CLUSTER NODES at most once a second
/// per slot and daemon (`slot::MASTERS_FOR`), not on every pass: replies cross slots until the relays
/// have waited for a replica (one WAIT per pass and target) four times as often as that bound allows
/// CLUSTER NODES, and CLUSTER NODES stays within the bound for the time it took.
#[test]
fn the_relay_asks_cluster_nodes_at_most_once_a_second_per_slot() {
    let cluster = Cluster::start();
    let pairs = pairs(false);
    let mut daemons = start_daemons(&cluster, &pairs);
    // The clock starts first: every ask counted falls inside the time measured. A relay's asks of one
    // slot reach Redis at least a second apart, so there are at most ⌊secs⌋ + 1 of them.
    let started = std::time::Instant::now();
    let (nodes_before, waits_before) = (calls(&cluster, "cluster|nodes"), calls(&cluster, "wait"));
    let bound = |secs: f64| (daemons.len() * pairs.len()) as f64 * (secs + 1.0);
    let mut conns: Vec<redis::Connection> = pairs
        .iter()
        .map(|(input, _)| cluster.node(cluster.master_of(input)))
        .collect();
    let mut sent = vec![0u64; pairs.len()];
    loop {
        // Small batches, no WAIT of our own: every pass of a relay is a WAIT the count sees.
        for (k, (input, _)) in pairs.iter().enumerate() {
            for _ in 0..3 {
                let _: String = redis::cmd("XADD")
                    .arg(input)
                    .arg("*")
                    .arg("n")
                    .arg(sent[k])
                    .query(&mut conns[k])
                    .expect("XADD on the input's master");
                sent[k] += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
        let secs = started.elapsed().as_secs_f64();
        let waits = calls(&cluster, "wait") - waits_before;
        if waits as f64 >= 4.0 * bound(secs) {
            break;
        }
        assert!(
            secs < 60.0,
            "the relays waited for replicas only {waits} times in {secs:.0} s"
        );
    }
    let secs = started.elapsed().as_secs_f64();
    let nodes = calls(&cluster, "cluster|nodes") - nodes_before;
    let waits = calls(&cluster, "wait") - waits_before;
    println!(
        "in {secs:.1} s: {waits} WAITs, {nodes} CLUSTER NODES (bound {:.0})",
        bound(secs)
    );
    assert!(
        nodes as f64 <= bound(secs),
        "CLUSTER NODES asked {nodes} times in {secs:.1} s by {} daemons for {} target slots",
        daemons.len(),
        pairs.len()
    );
    for (k, (_, out)) in pairs.iter().enumerate() {
        wait_for("every reply", Duration::from_secs(60), || {
            (cluster.xlen(out) >= sent[k]).then_some(())
        });
    }
    stop_all(&mut daemons);
}
