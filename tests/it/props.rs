//! Property tests over what strangers write: stream names, entry ids, field values, tokens and message
//! signatures, config files. Arbitrary input ends in an answer or a typed error, never a panic. (The
//! RESP group-read decoder has its own, with the limits, in `src/client/wire.rs`.)

use std::time::Duration;

use proptest::prelude::*;
use redstream::auth::jwt::{Key, KeySet};
use redstream::model::StreamId;
use redstream::model::envelope::Fields;
use redstream::model::naming::{NameKind, Naming, validate_name};

use crate::util::{TEST_SECRET, settings_from};

fn keys() -> KeySet {
    let key = Key::hmac("k", TEST_SECRET.as_bytes()).unwrap();
    KeySet::new(vec![key], Some("k"), "iss", "aud", Duration::from_secs(30)).unwrap()
}

/// Text that looks like what it is meant to be often enough to reach the deep paths.
fn texty() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,80}",
        "(nova:[a-z_*]{0,8}(:[a-z0-9_.-]{0,8}){0,4})",
        "[a-zA-Z0-9_.-]{0,20}\\.[a-zA-Z0-9_.-]{0,40}\\.[a-zA-Z0-9_-]{0,40}",
    ]
}

proptest! {
    #[test]
    fn names_and_ids_never_panic(s in texty()) {
        let naming = Naming::default();
        let _ = naming.parse(&s);
        let _ = naming.domain_of(&s);
        for kind in [NameKind::Group, NameKind::Consumer] {
            let _ = validate_name(kind, &s);
        }
        let _ = StreamId::parse(&s);
    }

    #[test]
    fn field_values_of_any_bytes_round_trip_through_the_json_view(
        pairs in proptest::collection::vec((".{0,12}", proptest::collection::vec(any::<u8>(), 0..40)), 0..10),
    ) {
        let fields: Fields = pairs.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        let view = fields.to_json();
        if let serde_json::Value::Object(map) = &view {
            let _ = Fields::from_json_object(map);
        }
    }

    #[test]
    fn tokens_and_signatures_of_any_shape_are_refused_without_panicking(t in texty()) {
        let keys = keys();
        prop_assert!(keys.verify(&t).is_err());
        let fields: Fields = [("a", "1")].into_iter().collect();
        prop_assert!(keys.verify_message(&t, "nova:task:a:b", &fields).is_err());
    }

    #[test]
    fn config_files_of_any_content_load_or_report_without_panicking(
        text in prop_oneof![
            ".{0,200}",
            "(\\[[a-z_.]{1,12}\\]\n([a-z_]{1,12} = (\"[^\"\n]{0,12}\"|[0-9]{1,6}|true|\\[\\])\n){0,4}){0,4}",
        ],
    ) {
        let _ = settings_from(&text);
    }
}
