//! The envelope against a real Redis: round trips, binary values, the `id` field, JSON encoding.

use redstream::client::{PublishOptions, ReadOptions};
use redstream::model::envelope::{self, Fields};
use serde_json::json;

use crate::util::{RedisServer, admin};

#[tokio::test]
async fn round_trip_keeps_bytes_and_stamps_the_envelope() {
    let server = RedisServer::start();
    let client = admin(&server);
    let stream = "nova:task:envelope:roundtrip";
    let binary: Vec<u8> = vec![0xff, 0x00, 0xfe, b'\n', 0x80];
    let mut fields = Fields::new();
    fields.push("type", "task_created");
    fields.push("blob", binary.clone());
    fields.push("id", "user-supplied-id");
    fields.push("_source", "someone-else");
    fields.push("_trace_id", "trace-123");
    let before = envelope::now_ms();
    let id = client
        .publish(stream, fields, PublishOptions::default())
        .await
        .unwrap();

    let got = client.read(stream, &ReadOptions::default()).await.unwrap();
    assert_eq!(got.len(), 1);
    let e = &got[0];
    assert_eq!(
        e.id, id,
        "the entry id is Redis's, not the user's `id` field"
    );
    assert_eq!(e.fields.get("id"), Some(&b"user-supplied-id"[..]));
    assert_eq!(
        e.fields.get("blob"),
        Some(binary.as_slice()),
        "non-UTF-8 bytes survive"
    );
    assert_eq!(
        e.fields.get_str("_source"),
        Some("test-admin"),
        "_source is the verified identity"
    );
    assert_eq!(
        e.fields.get_str("_trace_id"),
        Some("trace-123"),
        "a given trace id is kept"
    );
    let ts: u64 = e.fields.get_str("_timestamp").unwrap().parse().unwrap();
    assert!(
        ts >= before && ts <= envelope::now_ms(),
        "_timestamp is epoch ms"
    );

    let view = e.to_json(stream);
    assert_eq!(view["id"], json!(id));
    assert_eq!(view["stream"], json!(stream));
    assert_eq!(view["fields"]["id"], json!("user-supplied-id"));
    assert_eq!(
        view["binary"]["blob"],
        json!("/wD+CoA="),
        "binary values are base64 in the JSON view"
    );
    assert!(view["fields"].get("blob").is_none());
}

#[tokio::test]
async fn trace_id_is_generated_when_absent() {
    let server = RedisServer::start();
    let client = admin(&server);
    let stream = "nova:task:envelope:trace";
    for _ in 0..2 {
        client
            .publish(
                stream,
                Fields::from_iter([("a", "1")]),
                PublishOptions::default(),
            )
            .await
            .unwrap();
    }
    let got = client.read(stream, &ReadOptions::default()).await.unwrap();
    let t0 = got[0].fields.get_str("_trace_id").unwrap();
    let t1 = got[1].fields.get_str("_trace_id").unwrap();
    assert_eq!(t0.len(), 36, "a UUID: {t0}");
    assert_ne!(t0, t1);
}

#[test]
fn json_objects_encode_like_the_original() {
    let obj = json!({"s": "text", "n": 5, "f": 1.5, "b": true, "o": {"x": 1}, "a": [1, "two"], "z": null});
    let fields = Fields::from_json_object(obj.as_object().unwrap());
    assert_eq!(fields.get_str("s"), Some("text"));
    assert_eq!(fields.get_str("n"), Some("5"));
    assert_eq!(fields.get_str("f"), Some("1.5"));
    assert_eq!(fields.get_str("b"), Some("true"));
    assert_eq!(fields.get_str("o"), Some(r#"{"x":1}"#));
    assert_eq!(fields.get_str("a"), Some(r#"[1,"two"]"#));
    assert_eq!(fields.get_str("z"), Some("null"));
    // And the JSON view decodes exactly those back.
    let view = fields.to_json();
    assert_eq!(view["fields"]["o"], json!({"x": 1}));
    assert_eq!(view["fields"]["a"], json!([1, "two"]));
    assert_eq!(view["fields"]["z"], json!(null));
    assert_eq!(
        view["fields"]["n"],
        json!("5"),
        "scalars stay text, as on the wire"
    );
    assert_eq!(view["fields"]["s"], json!("text"));
}

#[tokio::test]
async fn reads_what_the_typescript_publisher_wrote() {
    // The original's XADD: flat fields, objects as JSON, envelope fields as text.
    let server = RedisServer::start();
    let mut conn = server.conn();
    let stream = "nova:task:boomerang:tasks";
    let id: String = redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg(&[
            "type",
            "task_updated",
            "task",
            r#"{"id":"t1","status":"done"}"#,
        ])
        .arg(&[
            "_timestamp",
            "1732550000000",
            "_source",
            "boomerang-mcp",
            "_trace_id",
            "abc",
        ])
        .query(&mut conn)
        .unwrap();
    let got = admin(&server)
        .read(stream, &ReadOptions::default())
        .await
        .unwrap();
    let view = got[0].to_json(stream);
    assert_eq!(view["id"], json!(id));
    assert_eq!(
        view["fields"]["task"],
        json!({"id": "t1", "status": "done"})
    );
    assert_eq!(view["fields"]["_source"], json!("boomerang-mcp"));
}
