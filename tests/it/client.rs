//! The authorized client against a real Redis: reads in both directions, groups, pending, claims,
//! deleted entries, listing, trimming, and the blocking-read connection rules.

use std::time::{Duration, Instant};

use redstream::auth::{Identity, Roles};
use redstream::client::Error;
use redstream::client::{Client, PendingQuery, PublishOptions, ReadFrom, ReadOptions, wait_ready};
use redstream::model::envelope::Fields;

use crate::util::{RedisServer, admin, client_as, config_toml, settings_from, wait_for};

async fn publish_n(client: &Client, stream: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let f = Fields::from_iter([("n", i.to_string())]);
        ids.push(
            client
                .publish(stream, f, PublishOptions::default())
                .await
                .unwrap(),
        );
    }
    ids
}

fn numbers(entries: &[redstream::model::envelope::Entry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e.fields.get_str("n").unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn reverse_read_returns_newest_first_with_bounds_in_the_right_order() {
    let server = RedisServer::start();
    let client = admin(&server);
    let s = "nova:task:client:range";
    let ids = publish_n(&client, s, 5).await;

    let fwd = client.read(s, &ReadOptions::default()).await.unwrap();
    assert_eq!(numbers(&fwd), ["0", "1", "2", "3", "4"]);

    let rev = client
        .read(
            s,
            &ReadOptions {
                reverse: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(numbers(&rev), ["4", "3", "2", "1", "0"]);

    // Bounds mean lower/upper whatever the direction; XREVRANGE wants them swapped.
    let bounded = ReadOptions {
        start: ids[1].clone(),
        end: ids[3].clone(),
        count: Some(2),
        reverse: true,
    };
    assert_eq!(
        numbers(&client.read(s, &bounded).await.unwrap()),
        ["3", "2"]
    );
    let bounded = ReadOptions {
        reverse: false,
        ..bounded
    };
    assert_eq!(
        numbers(&client.read(s, &bounded).await.unwrap()),
        ["1", "2"]
    );
    let exclusive = ReadOptions {
        start: format!("({}", ids[3]),
        ..Default::default()
    };
    assert_eq!(numbers(&client.read(s, &exclusive).await.unwrap()), ["4"]);
}

#[tokio::test]
async fn pending_summary_and_detail_follow_reads_and_acks() {
    let server = RedisServer::start();
    let client = admin(&server);
    let s = "nova:task:client:pending";
    assert!(
        client.create_group(s, "workers", "0").await.unwrap(),
        "created"
    );
    assert!(
        !client.create_group(s, "workers", "0").await.unwrap(),
        "BUSYGROUP is success"
    );
    let ids = publish_n(&client, s, 3).await;

    let mut reader = client
        .group_reader(s, "workers", "c1", Duration::from_secs(1))
        .unwrap();
    let got = reader.read(ReadFrom::New, 10, None).await.unwrap();
    assert_eq!(got.entries.len(), 3);

    let summary = client.pending_summary(s, "workers").await.unwrap();
    assert_eq!(summary.count, 3);
    assert_eq!(summary.min_id.as_deref(), Some(ids[0].as_str()));
    assert_eq!(summary.max_id.as_deref(), Some(ids[2].as_str()));
    assert_eq!(summary.consumers, vec![("c1".to_string(), 3)]);

    let rows = client
        .pending(s, "workers", &PendingQuery::default())
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r.consumer == "c1" && r.deliveries == 1));
    assert_eq!(rows[0].id, ids[0]);

    // Re-reading our own PEL is not another delivery: the counts stay, and come with the entries.
    // Only a claim counts (here: one entry claimed back and forth, as after a handler failure).
    for to in ["c2", "c1"] {
        client
            .claim(s, "workers", to, Duration::ZERO, &ids[1..2])
            .await
            .unwrap();
    }
    for _ in 0..3 {
        let again = reader.read(ReadFrom::Pending("0"), 10, None).await.unwrap();
        assert_eq!(again.entries.len(), 3);
        assert_eq!(again.entries[0].fields, got.entries[0].fields);
        let counts: Vec<u64> = ids.iter().map(|id| again.deliveries[id]).collect();
        assert_eq!(counts, [1, 3, 1]);
    }
    let rows = client
        .pending(s, "workers", &PendingQuery::default())
        .await
        .unwrap();
    let counts: Vec<u64> = rows.iter().map(|r| r.deliveries).collect();
    assert_eq!(counts, [1, 3, 1], "{rows:?}");
    // Paged after an id; an entry deleted while pending comes back without fields.
    client.delete(s, &ids[2..]).await.unwrap();
    let rest = reader
        .read(ReadFrom::Pending(&ids[0]), 10, None)
        .await
        .unwrap();
    let got_ids: Vec<&str> = rest.entries.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(got_ids, [ids[1].as_str()]);
    assert_eq!(rest.deleted, [ids[2].clone()]);

    // (The deleted one left the PEL with that read.)
    assert_eq!(client.ack(s, "workers", &ids).await.unwrap(), 2);
    let summary = client.pending_summary(s, "workers").await.unwrap();
    assert_eq!(summary.count, 0);
    assert!(summary.consumers.is_empty());

    let groups = client.groups(s).await.unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(
        (
            groups[0].name.as_str(),
            groups[0].consumers,
            groups[0].pending
        ),
        ("workers", 2, 0),
        "c1, and c2 from the claim"
    );
    assert_eq!(groups[0].last_delivered_id, ids[2]);
    let info = client.stream_info(s).await.unwrap();
    assert_eq!((info.length, info.groups), (2, 1), "one entry was deleted");
    assert_eq!(
        info.last_id.as_deref(),
        Some(ids[1].as_str()),
        "the last entry left"
    );
    let consumers = client.consumers(s, "workers").await.unwrap();
    assert_eq!(consumers[0].name, "c1");
}

#[tokio::test]
async fn group_start_id_decides_what_is_delivered() {
    let server = RedisServer::start();
    let client = admin(&server);
    let s = "nova:task:client:start";
    publish_n(&client, s, 2).await;
    client.create_group(s, "from-start", "0").await.unwrap();
    client.create_group(s, "from-now", "$").await.unwrap();
    let mut a = client
        .group_reader(s, "from-start", "c", Duration::from_secs(1))
        .unwrap();
    let mut b = client
        .group_reader(s, "from-now", "c", Duration::from_secs(1))
        .unwrap();
    assert_eq!(
        a.read(ReadFrom::New, 10, None).await.unwrap().entries.len(),
        2
    );
    assert_eq!(
        b.read(ReadFrom::New, 10, None).await.unwrap().entries.len(),
        0
    );
    // A missing group is a typed error a loop can branch on.
    let mut c = client
        .group_reader(s, "missing", "c", Duration::from_secs(1))
        .unwrap();
    match c.read(ReadFrom::New, 10, None).await {
        Err(Error::NoGroup { stream, group }) => {
            assert_eq!((stream.as_str(), group.as_str()), (s, "missing"))
        }
        other => panic!("expected NoGroup, got {other:?}"),
    }
}

// Two workers: the blocked read runs on one while this test waits on Redis state from the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_read_outlives_the_command_timeout_and_does_not_stall_others() {
    let server = RedisServer::start();
    // Short command timeout: a BLOCK read sharing that timeout (the crate's default is 500 ms) would fail.
    let toml = config_toml(&server.url(), "")
        .replace("command_timeout = \"2s\"", "command_timeout = \"300ms\"");
    let settings = settings_from(&toml).unwrap();
    let identity = Identity {
        subject: "t".into(),
        roles: Roles::parse(&["admin"]).unwrap(),
    };
    let client = Client::connect(settings.redis.clone(), settings.naming.clone(), identity)
        .expect("valid connection settings");
    let s = "nova:task:client:block";
    client.create_group(s, "g", "$").await.unwrap();
    let mut reader = client
        .group_reader(s, "g", "c", Duration::from_millis(1500))
        .unwrap();
    assert!(reader.response_timeout() > Duration::from_millis(1500));

    let started = Instant::now();
    let got = reader
        .read(ReadFrom::New, 10, Some(Duration::from_millis(1200)))
        .await;
    let waited = started.elapsed();
    assert!(
        got.expect("an empty BLOCK read is not a timeout")
            .entries
            .is_empty()
    );
    assert!(
        waited >= Duration::from_millis(1100),
        "it really blocked: {waited:?}"
    );

    // While a read blocks, the shared connection keeps serving, and the read sees the new entry.
    let blocked = tokio::spawn(async move {
        let r = reader
            .read(ReadFrom::New, 10, Some(Duration::from_millis(1400)))
            .await;
        (r, reader)
    });
    wait_for("the read to block in Redis", Duration::from_secs(5), || {
        (server.blocked_clients() == 1).then_some(())
    });
    // A command on the shared connection completes while the read is still blocked in Redis.
    client
        .publish(
            "nova:task:client:elsewhere",
            Fields::from_iter([("n", "x")]),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        server.blocked_clients(),
        1,
        "publish was not stuck behind the BLOCK"
    );
    client
        .publish(
            s,
            Fields::from_iter([("n", "x")]),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    let (r, _) = blocked.await.unwrap();
    assert_eq!(r.unwrap().entries.len(), 1);
}

#[tokio::test]
async fn autoclaim_moves_delivery_counts_and_reports_deleted_entries() {
    let server = RedisServer::start();
    let client = admin(&server);
    let s = "nova:task:client:claim";
    client.create_group(s, "g", "0").await.unwrap();
    let ids = publish_n(&client, s, 3).await;
    let mut dead = client
        .group_reader(s, "g", "dead", Duration::from_secs(1))
        .unwrap();
    assert_eq!(
        dead.read(ReadFrom::New, 10, None)
            .await
            .unwrap()
            .entries
            .len(),
        3
    );

    // An entry deleted while pending.
    let mut conn = server.conn();
    let _: i64 = redis::cmd("XDEL")
        .arg(s)
        .arg(&ids[1])
        .query(&mut conn)
        .unwrap();

    let claimed = client
        .autoclaim(s, "g", "alive", Duration::ZERO, "0", 10)
        .await
        .unwrap();
    assert_eq!(claimed.next, "0-0");
    assert_eq!(
        claimed
            .entries
            .iter()
            .map(|e| e.id.clone())
            .collect::<Vec<_>>(),
        vec![ids[0].clone(), ids[2].clone()]
    );
    assert_eq!(
        claimed.deleted,
        vec![ids[1].clone()],
        "deleted entries are reported, not dispatched"
    );
    let rows = client
        .pending(s, "g", &PendingQuery::default())
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter()
            .all(|r| r.consumer == "alive" && r.deliveries == 2),
        "{rows:?}"
    );

    // XCLAIM of specific ids, and re-reading one's own PEL where an entry vanished.
    let back = client
        .claim(s, "g", "dead", Duration::ZERO, &[&ids[0], &ids[2]])
        .await
        .unwrap();
    assert_eq!(back.entries.len(), 2);
    let _: i64 = redis::cmd("XDEL")
        .arg(s)
        .arg(&ids[2])
        .query(&mut conn)
        .unwrap();
    let own = dead.read(ReadFrom::Pending("0"), 10, None).await.unwrap();
    assert_eq!(own.entries.len(), 1);
    assert_eq!(own.deleted, vec![ids[2].clone()]);
}

#[tokio::test]
async fn maxlen_trims_and_listing_respects_roles() {
    let server = RedisServer::start();
    let client = admin(&server);
    let s = "nova:task:client:trim";
    for i in 0..300 {
        let f = Fields::from_iter([("n", i.to_string())]);
        client
            .publish(s, f, PublishOptions { maxlen: Some(10) })
            .await
            .unwrap();
    }
    let len = client.stream_info(s).await.unwrap().length;
    assert!(
        (10..300).contains(&len),
        "MAXLEN ~ 10 trimmed whole nodes: {len}"
    );

    client
        .publish(
            "nova:agent:x:inbox",
            Fields::from_iter([("a", "1")]),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    let mut conn = server.conn();
    let _: String = redis::cmd("XADD")
        .arg("not-a-stream-name")
        .arg("*")
        .arg("a")
        .arg("1")
        .query(&mut conn)
        .unwrap();
    let _: String = redis::cmd("SET")
        .arg("nova:task:plain:key")
        .arg("1")
        .query(&mut conn)
        .unwrap();

    let all = client.list_streams("*").await.unwrap();
    assert_eq!(all, ["not-a-stream-name", "nova:agent:x:inbox", s]);
    let reader = client_as(&server, "task-reader", &["task_read"]);
    assert_eq!(reader.list_streams("*").await.unwrap(), [s]);
    assert_eq!(
        reader.list_streams("nova:agent:*").await.unwrap(),
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn unreachable_redis_is_a_transient_connection_error() {
    let url = crate::util::UNREACHABLE.to_string();
    let toml =
        config_toml(&url, "").replace("connect_timeout = \"2s\"", "connect_timeout = \"300ms\"");
    let settings = settings_from(&toml).unwrap();
    let err = wait_ready(settings.redis.clone(), Duration::ZERO)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Connection { .. } | Error::Timeout { .. }),
        "{err:?}"
    );
    assert!(err.is_transient());
    let started = Instant::now();
    let err = wait_ready(settings.redis.clone(), Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn reconnects_after_redis_restarts_on_the_same_address() {
    let mut server = RedisServer::start();
    let client = admin(&server);
    let s = "nova:task:client:reconnect";
    publish_n(&client, s, 1).await;
    server.restart();
    // The first command may meet the dead connection; a reconnect follows without any help.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut failures = 0;
    loop {
        match client
            .publish(
                s,
                Fields::from_iter([("n", "after")]),
                PublishOptions::default(),
            )
            .await
        {
            Ok(_) => break,
            Err(e) => {
                assert!(e.is_transient(), "{e}");
                failures += 1;
                assert!(
                    Instant::now() < deadline,
                    "no reconnect within 10 s ({failures} failures): {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert!(
        failures <= 2,
        "reconnected promptly: {failures} failed attempts"
    );
    let got = client.read(s, &ReadOptions::default()).await.unwrap();
    assert_eq!(
        numbers(&got),
        ["after"],
        "the restarted server kept nothing; the new entry is there"
    );
}

/// A read cancelled while it waits (its reply still on the way) must not leave that reply behind for the
/// next read to take as its own.
#[tokio::test]
async fn a_cancelled_read_leaves_no_stale_reply_behind() {
    let server = RedisServer::start();
    let client = admin(&server);
    let s = "nova:task:client:cancel";
    client.create_group(s, "g", "$").await.unwrap();
    let block = Duration::from_millis(1500);
    let mut reader = client.group_reader(s, "g", "c", block).unwrap();
    let cancelled = tokio::time::timeout(
        Duration::from_millis(100),
        reader.read(ReadFrom::New, 10, Some(block)),
    )
    .await;
    assert!(cancelled.is_err(), "the read was still blocked");
    // The cancelled read is gone with its connection: an entry published now reaches no one until
    // the next read asks. (A connection kept with that read outstanding would hand the entry to it,
    // and each later read would return the reply meant for the one before.) Redis notices the closed
    // connection a moment later; wait for that, or the entry could reach the read being torn down.
    wait_for(
        "Redis to drop the cancelled read",
        Duration::from_secs(5),
        || (server.blocked_clients() == 0).then_some(()),
    );
    let id = publish_n(&client, s, 1).await.remove(0);
    let mine = reader.read(ReadFrom::Pending("0"), 10, None).await.unwrap();
    assert!(
        mine.entries.is_empty(),
        "nothing was delivered to the cancelled read: {mine:?}"
    );
    for round in 0..3 {
        let id = if round == 0 {
            id.clone()
        } else {
            publish_n(&client, s, 1).await.remove(0)
        };
        let got = reader
            .read(ReadFrom::New, 10, Some(Duration::from_millis(300)))
            .await
            .unwrap();
        let ids: Vec<&str> = got.entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, [id.as_str()], "round {round} reads its own reply");
    }
}
