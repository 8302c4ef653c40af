//! The role matrix: every operation × role, allowed or denied, through the real client and Redis.
//! Denied operations must not reach Redis at all (checked by their absent effects).

use std::time::Duration;

use redstream::auth::Op;
use redstream::client::Error;
use redstream::client::{Client, PendingQuery, PublishOptions, ReadFrom, ReadOptions};
use redstream::model::envelope::Fields;

use crate::util::{RedisServer, admin, client_as};

const STREAM: &str = "nova:task:rbac:jobs";

/// Performs `op` on `stream` as `client`; every client method that maps to `op` is exercised.
async fn attempt(client: &Client, op: Op, stream: &str) -> Vec<Result<(), Error>> {
    let min = Duration::ZERO;
    match op {
        Op::Publish => vec![
            client
                .publish(
                    stream,
                    Fields::from_iter([("a", "1")]),
                    PublishOptions::default(),
                )
                .await
                .map(drop),
        ],
        Op::Read => vec![client.read(stream, &ReadOptions::default()).await.map(drop)],
        Op::ReadGroup => vec![
            match client.group_reader(stream, "g", "c", Duration::from_secs(1)) {
                Ok(mut r) => r.read(ReadFrom::Pending("0"), 1, None).await.map(drop),
                Err(e) => Err(e),
            },
        ],
        Op::Ack => vec![client.ack(stream, "g", &["0-1"]).await.map(drop)],
        Op::Claim => vec![
            client
                .claim(stream, "g", "c", min, &["0-1"])
                .await
                .map(drop),
            client
                .autoclaim(stream, "g", "c", min, "0", 1)
                .await
                .map(drop),
        ],
        Op::Pending => vec![
            client.pending_summary(stream, "g").await.map(drop),
            client
                .pending(stream, "g", &PendingQuery::default())
                .await
                .map(drop),
        ],
        Op::CreateGroup => vec![
            client
                .create_group(stream, "new-group", "$")
                .await
                .map(drop),
        ],
        Op::Info => vec![
            client.stream_info(stream).await.map(drop),
            client.groups(stream).await.map(drop),
            client.consumers(stream, "g").await.map(drop),
        ],
        Op::Delete => vec![client.delete(stream, &["0-1"]).await.map(drop)],
    }
}

#[tokio::test]
async fn every_operation_times_every_role() {
    let server = RedisServer::start();
    let setup = admin(&server);
    setup.create_group(STREAM, "g", "0").await.unwrap();
    setup
        .publish(
            STREAM,
            Fields::from_iter([("seed", "1")]),
            PublishOptions::default(),
        )
        .await
        .unwrap();

    use Op::*;
    let matrix: [(&[&str], &[Op]); 7] = [
        (&["admin"], &Op::ALL),
        (
            &["task_read"],
            &[Read, ReadGroup, Ack, Claim, Pending, Info],
        ),
        (&["task_write"], &[Publish, CreateGroup, Delete]),
        (&["task_read", "task_write"], &Op::ALL),
        (&["agent_read", "agent_write"], &[]),
        (&["system_write", "devops_read"], &[]),
        (&[], &[]),
    ];
    for (roles, allowed) in matrix {
        let client = client_as(&server, "who", roles);
        for op in Op::ALL {
            let length_before = setup.stream_info(STREAM).await.unwrap().length;
            let groups_before = setup.groups(STREAM).await.unwrap().len();
            for result in attempt(&client, op, STREAM).await {
                let expect_allowed = allowed.contains(&op);
                match result {
                    Err(Error::Unauthorized {
                        op: denied,
                        stream,
                        identity,
                        needed,
                    }) => {
                        assert!(
                            !expect_allowed,
                            "{roles:?} {op}: refused but should be allowed"
                        );
                        assert_eq!(
                            (denied, stream.as_str(), identity.as_str()),
                            (op, STREAM, "who")
                        );
                        let half = if op.access() == redstream::auth::Access::Read {
                            "task_read"
                        } else {
                            "task_write"
                        };
                        assert_eq!(needed.to_string(), half);
                    }
                    Err(other) => panic!("{roles:?} {op}: unexpected error {other}"),
                    Ok(()) => assert!(
                        expect_allowed,
                        "{roles:?} {op}: allowed but should be refused"
                    ),
                }
            }
            if !allowed.contains(&op) {
                // Nothing reached Redis: no entry added, no group created.
                assert_eq!(
                    setup.stream_info(STREAM).await.unwrap().length,
                    length_before,
                    "{roles:?} {op}"
                );
                assert_eq!(
                    setup.groups(STREAM).await.unwrap().len(),
                    groups_before,
                    "{roles:?} {op}"
                );
            }
        }
    }
}

#[tokio::test]
async fn legacy_names_count_as_task_and_bad_names_never_reach_redis() {
    let server = RedisServer::start();
    let writer = client_as(&server, "w", &["task_write"]);
    writer
        .publish(
            "devops.cline.direct",
            Fields::from_iter([("a", "1")]),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    let agent = client_as(&server, "a", &["agent_write"]);
    let err = agent
        .publish(
            "devops.cline.direct",
            Fields::from_iter([("a", "1")]),
            PublishOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");

    let root = admin(&server);
    for op in Op::ALL {
        for result in attempt(&root, op, "nova:devops:general").await {
            match result {
                Err(Error::InvalidStreamName(e)) => assert_eq!(e.name, "nova:devops:general"),
                other => panic!("{op}: expected InvalidStreamName, got {other:?}"),
            }
        }
    }
    let mut conn = server.conn();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    assert_eq!(keys, ["devops.cline.direct"]);
}

/// A hash-tagged stream belongs to its domain like any other: task_write publishes to
/// `nova:task:{boomerang}:tasks`, devops_write may not, and the entry lands under the tagged key.
#[tokio::test]
async fn hash_tagged_streams_are_governed_by_their_domain() {
    let server = RedisServer::start();
    let tagged = "nova:task:{boomerang}:tasks";
    let writer = client_as(&server, "w", &["task_write"]);
    writer
        .publish(
            tagged,
            Fields::from_iter([("n", "1")]),
            PublishOptions::default(),
        )
        .await
        .expect("task_write covers a tagged task stream");
    let other = client_as(&server, "o", &["devops_write"]);
    let denied = other
        .publish(
            tagged,
            Fields::from_iter([("n", "2")]),
            PublishOptions::default(),
        )
        .await;
    assert!(denied.is_err(), "{denied:?}");
    assert_eq!(server.xlen(tagged), 1);
}
