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

proptest! {
    /// "A jti is obeyed at most once, whatever the clocks": daemon A accepts a signed message (its
    /// clock at most `exp` + leeway) and commits it a handler's deadline later at most, writing the use
    /// record with the relative expiry the code computes; Redis counts that expiry on its own clock,
    /// which does not enter (it is relative). Daemon B, whose clock differs from A's by less than the
    /// margin, accepts a copy as late as its clock allows and commits it as late as its handler may:
    /// the record must still be there — over every exp, leeway, skew and delay.
    #[test]
    fn a_signature_is_obeyed_at_most_once_whatever_the_clocks(
        exp_s in 1_000_000u64..2_000_000_000,
        leeway_s in 0u64..300,
        skew_a_ms in -3_600_000i64..3_600_000,
        skew_ab_ms in -59_000i64..59_000,
        accepted_early_ms in 0u64..600_000,
        handler_ms in 0u64..30_000,
        commit_a_ms in 0u64..30_000,
    ) {
        use redstream::auth::signature::{marker_ttl_ms, remember_until_ms};
        let leeway = Duration::from_secs(leeway_s);
        let last_ms = (exp_s + leeway_s) * 1000; // the last acceptance, by any verifier's clock
        let true_of = |clock_ms: u64, skew: i64| (clock_ms as i64 - skew) as i128;
        let skew_b_ms = skew_a_ms + skew_ab_ms;
        // A accepts at its clock's last_ms - accepted_early_ms, commits commit_a_ms later (within its
        // handler deadline), with the record kept until remember_until + the deadline (as dispatch does).
        let deadline_ms = 30_000;
        let a_accept = last_ms.saturating_sub(accepted_early_ms);
        let a_commit = a_accept + commit_a_ms;
        let until = remember_until_ms(exp_s, leeway) + deadline_ms;
        let ttl = marker_ttl_ms(until, a_commit);
        let record_gone_at = true_of(a_commit, skew_a_ms) + ttl as i128;
        // B accepts its copy at its clock's last moment and commits it handler_ms later.
        let b_commit_true = true_of(last_ms, skew_b_ms) + handler_ms as i128;
        let a_commit_true = true_of(a_commit, skew_a_ms);
        // Obeyed twice would need B's commit after A's and after the record is gone.
        prop_assert!(
            b_commit_true <= a_commit_true || b_commit_true < record_gone_at,
            "B commits at {b_commit_true}, the record is gone at {record_gone_at}"
        );
    }
}
