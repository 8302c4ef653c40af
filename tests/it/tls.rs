//! `rediss://` with a private CA, and mutual TLS with a client certificate, against redis-server's own TLS.

use figment::Figment;
use figment::providers::{Format, Toml};
use redstream::client::{Client, PublishOptions, ReadFrom, ReadOptions};
use redstream::config;
use redstream::model::envelope::Fields;

use crate::util::redis_server::free_port;
use crate::util::{RedisServer, config_toml, fixture};

fn tls_server(require_client_cert: bool) -> (RedisServer, u16) {
    let port = free_port();
    let (p, cert, key, ca) = (
        port.to_string(),
        fixture("tls/server.pem"),
        fixture("tls/server.key"),
        fixture("tls/ca.pem"),
    );
    let server = RedisServer::start_with(&[
        "--tls-port",
        &p,
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
        "--tls-ca-cert-file",
        ca.to_str().unwrap(),
        "--tls-auth-clients",
        if require_client_cert { "yes" } else { "no" },
    ]);
    (server, port)
}

fn client(port: u16, tls_keys: &str) -> Client {
    let url = format!("rediss://127.0.0.1:{port}/0");
    let toml = config_toml(&url, "").replace("[redis]\n", &format!("[redis]\n{tls_keys}\n"));
    let settings = config::from_figment(&Figment::from(Toml::string(&toml)), None, None).unwrap();
    let me = settings.identity.unwrap().identity;
    Client::connect(settings.redis.clone(), settings.naming.clone(), me)
        .expect("valid connection settings")
}

/// `key = { file = … }` for a fixture. A private key is copied to a file only its owner may read
/// (the config refuses one others may read; git keeps no such mode).
fn file_key(key: &str, rel: &str) -> String {
    use std::os::unix::fs::PermissionsExt as _;
    static PRIVATE: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let mut path = fixture(rel);
    if key == "tls_key" {
        let dir = PRIVATE.get_or_init(|| tempfile::tempdir().unwrap());
        let copy = dir.path().join(rel.replace('/', "-"));
        std::fs::copy(&path, &copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600)).unwrap();
        path = copy;
    }
    format!("{key} = {{ file = \"{}\" }}", path.display())
}

#[tokio::test]
async fn rediss_with_a_private_ca() {
    let (_server, port) = tls_server(false);
    let c = client(port, &file_key("tls_ca", "tls/ca.pem"));
    c.publish(
        "nova:task:tls:x",
        Fields::from_iter([("a", "1")]),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        c.read("nova:task:tls:x", &ReadOptions::default())
            .await
            .unwrap()
            .len(),
        1
    );

    // Group reads under TLS go over the crate's dedicated connection (the plain fast path is not TLS).
    c.create_group("nova:task:tls:x", "g", "0").await.unwrap();
    let block = std::time::Duration::from_millis(200);
    let mut reader = c.group_reader("nova:task:tls:x", "g", "c1", block).unwrap();
    let got = reader.read(ReadFrom::New, 10, Some(block)).await.unwrap();
    assert_eq!(got.entries.len(), 1);

    // Without our CA the server's certificate is not trusted: an error, not a silent plaintext fallback.
    let untrusted = client(port, "");
    assert!(untrusted.ping().await.is_err());
}

#[tokio::test]
async fn mutual_tls_with_a_client_certificate() {
    let (_server, port) = tls_server(true);
    let keys = [
        file_key("tls_ca", "tls/ca.pem"),
        file_key("tls_cert", "tls/client.pem"),
        file_key("tls_key", "tls/client.key"),
    ]
    .join("\n");
    let c = client(port, &keys);
    c.ping().await.unwrap();
    let no_cert = client(port, &file_key("tls_ca", "tls/ca.pem"));
    assert!(
        no_cert.ping().await.is_err(),
        "the server requires a client certificate"
    );
}
