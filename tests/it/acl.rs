//! Redis's own ACL behind RedStream's: a Redis user limited to `~nova:task:*` publishes there and gets a
//! clear, typed error elsewhere — even when RedStream's roles would allow it. The password comes from a
//! systemd-style credentials directory, as in production.

use figment::Figment;
use figment::providers::{Format, Toml};
use redstream::auth::{Identity, Roles};
use redstream::client::Error;
use redstream::client::{Client, PublishOptions, ReadFrom, ReadOptions};
use redstream::config;
use redstream::model::envelope::Fields;

use crate::util::{RedisServer, config_toml};

fn client_for(server: &RedisServer, user: &str, credentials: &std::path::Path) -> Client {
    client_on_db(server, 0, user, credentials)
}

fn client_on_db(server: &RedisServer, db: u8, user: &str, credentials: &std::path::Path) -> Client {
    let extra = "";
    let url = server.url().replace("/0", &format!("/{db}"));
    let toml = config_toml(&url, extra).replace(
        "[redis]\n",
        &format!(
            "[redis]\nusername = \"{user}\"\npassword = {{ credential = \"redis-password\" }}\n"
        ),
    );
    let settings =
        config::from_figment(&Figment::from(Toml::string(&toml)), None, Some(credentials)).unwrap();
    let identity = Identity {
        subject: "ops".into(),
        roles: Roles::parse(&["admin"]).unwrap(),
    };
    Client::connect(settings.redis.clone(), settings.naming.clone(), identity)
        .expect("valid connection settings")
}

/// ACL SETUSER taskbot with these rules.
fn set_taskbot(conn: &mut redis::Connection, rules: &[&str]) {
    let _: String = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("taskbot")
        .arg(rules)
        .query(conn)
        .unwrap();
}

#[tokio::test]
async fn redis_acl_user_is_confined_to_its_keys_with_a_clear_error() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    set_taskbot(
        &mut conn,
        &[
            "on",
            ">s3cret-pw",
            "~nova:task:*",
            "+@all",
            "-@dangerous",
            "+info",
        ],
    );
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("redis-password"), "s3cret-pw\n").unwrap();
    let client = client_for(&server, "taskbot", creds.path());

    let id = client
        .publish(
            "nova:task:acl:jobs",
            Fields::from_iter([("a", "1")]),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    assert!(!id.is_empty());
    assert_eq!(
        client
            .read("nova:task:acl:jobs", &ReadOptions::default())
            .await
            .unwrap()
            .len(),
        1
    );

    let err = client
        .publish(
            "nova:agent:acl:jobs",
            Fields::from_iter([("a", "1")]),
            PublishOptions::default(),
        )
        .await
        .unwrap_err();
    match &err {
        Error::RedisDenied {
            command, key, user, ..
        } => {
            assert_eq!(
                (*command, key.as_str(), user.as_str()),
                ("XADD", "nova:agent:acl:jobs", "taskbot")
            );
        }
        other => panic!("expected RedisDenied, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("taskbot") && text.contains("nova:agent:acl:jobs") && text.contains("ACL"),
        "{text}"
    );
    assert!(!err.is_transient(), "retrying will not help");
    let err = client
        .read("nova:agent:acl:jobs", &ReadOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::RedisDenied {
                command: "XRANGE",
                ..
            }
        ),
        "{err:?}"
    );
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    assert_eq!(
        keys,
        ["nova:task:acl:jobs"],
        "nothing was written outside the user's keys"
    );
}

#[tokio::test]
async fn wrong_redis_password_is_reported_not_retried_forever() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    set_taskbot(&mut conn, &["on", ">right", "~*", "+@all"]);
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("redis-password"), "wrong").unwrap();
    let client = client_for(&server, "taskbot", creds.path());
    let started = std::time::Instant::now();
    let err = client
        .wait_ready(std::time::Duration::from_secs(20))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "gave up at once: {err}"
    );
    let text = err.to_string().to_lowercase();
    assert!(
        text.contains("wrongpass") || text.contains("auth") || text.contains("password"),
        "{text}"
    );
}

/// Group reads have their own connection (plain RESP, `redstream::client::wire`): it logs in as the ACL user,
/// selects the configured database, and reports a wrong password or a denied key as the shared
/// connection does.
#[tokio::test]
async fn group_reads_log_in_as_the_acl_user_on_the_configured_db() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    set_taskbot(&mut conn, &["on", ">s3cret-pw", "~nova:task:*", "+@all"]);
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("redis-password"), "s3cret-pw").unwrap();
    let client = client_on_db(&server, 3, "taskbot", creds.path());
    let stream = "nova:task:acl:work";
    client.create_group(stream, "g", "0").await.unwrap();
    client
        .publish(
            stream,
            Fields::from_iter([("a", "1")]),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    let block = std::time::Duration::from_millis(200);
    let mut reader = client.group_reader(stream, "g", "c1", block).unwrap();
    let got = reader.read(ReadFrom::New, 10, Some(block)).await.unwrap();
    assert_eq!(got.entries.len(), 1);
    assert_eq!(got.entries[0].fields.get("a"), Some(&b"1"[..]));
    // It really is database 3, as the ACL user.
    let _: () = redis::cmd("SELECT").arg(3).query(&mut conn).unwrap();
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(&[stream, "g"])
        .query(&mut conn)
        .unwrap();
    assert!(format!("{pending:?}").contains("c1"), "{pending:?}");

    // The key taken out of the user's ACL: refused, typed, not retried.
    set_taskbot(&mut conn, &["resetkeys", "~nova:task:other:*"]);
    let err = reader
        .read(ReadFrom::New, 10, Some(block))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::RedisDenied {
                command: "XREADGROUP",
                ..
            }
        ),
        "{err:?}"
    );

    // A wrong password: an authentication error naming the user.
    std::fs::write(creds.path().join("redis-password"), "wrong").unwrap();
    let wrong = client_on_db(&server, 3, "taskbot", creds.path());
    let mut reader = wrong.group_reader(stream, "g", "c1", block).unwrap();
    let err = reader
        .read(ReadFrom::New, 10, Some(block))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::RedisAuth { user, .. } if user == "taskbot"),
        "{err:?}"
    );
    assert!(!err.is_transient());
}
