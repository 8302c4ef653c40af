//! Redis's own ACL behind RedStream's: a Redis user limited to `~nova:task:*` publishes there and gets a
//! clear, typed error elsewhere — even when RedStream's roles would allow it. The password comes from a
//! systemd-style credentials directory, as in production.

use figment::Figment;
use figment::providers::{Format, Toml};
use redstream::Error;
use redstream::auth::{Identity, Roles};
use redstream::client::{Client, PublishOptions, ReadOptions};
use redstream::config;
use redstream::conn::Redis;
use redstream::envelope::Fields;

use crate::util::{RedisServer, config_toml};

fn client_for(server: &RedisServer, user: &str, credentials: &std::path::Path) -> Client {
    let extra = "";
    let toml = config_toml(&server.url(), extra).replace(
        "[redis]\n",
        &format!(
            "[redis]\nusername = \"{user}\"\npassword = {{ credential = \"redis-password\" }}\n"
        ),
    );
    let settings =
        config::from_figment(&Figment::from(Toml::string(&toml)), None, Some(credentials)).unwrap();
    let redis = Redis::open(settings.redis.clone()).unwrap();
    let identity = Identity {
        subject: "ops".into(),
        roles: Roles::parse(&["admin"]).unwrap(),
    };
    Client::new(redis, settings.naming.clone(), identity)
}

#[tokio::test]
async fn redis_acl_user_is_confined_to_its_keys_with_a_clear_error() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let _: String = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "taskbot",
            "on",
            ">s3cret-pw",
            "~nova:task:*",
            "+@all",
            "-@dangerous",
            "+info",
        ])
        .query(&mut conn)
        .unwrap();
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
    let _: String = redis::cmd("ACL")
        .arg(&["SETUSER", "taskbot", "on", ">right", "~*", "+@all"])
        .query(&mut conn)
        .unwrap();
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("redis-password"), "wrong").unwrap();
    let client = client_for(&server, "taskbot", creds.path());
    let started = std::time::Instant::now();
    let err = client
        .redis()
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
