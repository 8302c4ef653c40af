//! The token matrix: every token accepted or refused as it should be, with the reason.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use redstream::auth::Roles;
use redstream::auth::jwt::{Key, KeyAlgorithm, KeySet, TokenError};
use serde_json::{Value, json};

use crate::util::{TEST_SECRET, fixture};

const ISS: &str = "redstream-test";
const AUD: &str = "redstream-test-aud";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(fixture(&format!("keys/{name}"))).unwrap()
}

fn hs(id: &str) -> Key {
    Key::hmac(id, TEST_SECRET.as_bytes()).unwrap()
}

fn ed(id: &str) -> Key {
    Key::asymmetric(
        id,
        KeyAlgorithm::EdDsa,
        Some(&pem("ed25519.pub")),
        Some(&pem("ed25519.key")),
    )
    .unwrap()
}

fn rsa(id: &str) -> Key {
    Key::asymmetric(
        id,
        KeyAlgorithm::Rs256,
        Some(&pem("rsa.pub")),
        Some(&pem("rsa.key")),
    )
    .unwrap()
}

fn set(keys: Vec<Key>, signing: Option<&str>) -> KeySet {
    KeySet::new(keys, signing, ISS, AUD, Duration::from_secs(30)).unwrap()
}

fn claims() -> Value {
    json!({"sub": "svc-a", "roles": ["task_write", "task_read"], "iss": ISS, "aud": AUD,
           "exp": now() + 600, "iat": now()})
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().unwrap().remove(key);
    claims
}

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(Into::into);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn hs_token(kid: Option<&str>, claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        kid,
        claims,
        &EncodingKey::from_secret(TEST_SECRET.as_bytes()),
    )
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

#[test]
fn valid_tokens_of_each_algorithm_are_accepted() {
    let keys = set(vec![hs("h"), ed("e"), rsa("r")], None);
    let cases = [
        hs_token(Some("h"), &claims()),
        sign(
            Algorithm::EdDSA,
            Some("e"),
            &claims(),
            &EncodingKey::from_ed_pem(&pem("ed25519.key")).unwrap(),
        ),
        sign(
            Algorithm::RS256,
            Some("r"),
            &claims(),
            &EncodingKey::from_rsa_pem(&pem("rsa.key")).unwrap(),
        ),
    ];
    for token in cases {
        let v = keys.verify(&token).unwrap();
        assert_eq!(v.identity.subject, "svc-a");
        assert_eq!(
            v.identity.roles,
            Roles::parse(&["task_read", "task_write"]).unwrap()
        );
    }
}

#[test]
fn issued_tokens_verify_and_carry_kid_identity_and_roles() {
    for (key, kid) in [(hs("h1"), "h1"), (ed("e1"), "e1"), (rsa("r1"), "r1")] {
        let keys = set(vec![key], Some(kid));
        let roles = Roles::parse(&["admin"]).unwrap();
        let (token, exp) = keys
            .issue("ops@host", &roles, Duration::from_secs(60))
            .unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.kid.as_deref(), Some(kid));
        let v = keys.verify(&token).unwrap();
        assert_eq!(
            (v.identity.subject.as_str(), v.key_id.as_str(), v.expires_at),
            ("ops@host", kid, exp)
        );
        assert!(v.identity.roles.is_admin());
    }
    // An Ed25519 key given only its private half still verifies (the public half is derived).
    let private_only =
        Key::asymmetric("p", KeyAlgorithm::EdDsa, None, Some(&pem("ed25519.key"))).unwrap();
    let keys = set(vec![private_only], Some("p"));
    let (token, _) = keys
        .issue("x", &Roles::default(), Duration::from_secs(60))
        .unwrap();
    assert!(keys.verify(&token).is_ok());
}

/// Whether a refusal gave the right reason.
type Expect = fn(&TokenError) -> bool;

#[test]
fn refused_tokens_say_why() {
    let keys = set(vec![hs("h"), ed("e")], None);
    let t = now();
    let ed_pub = pem("ed25519.pub");
    let rsa_pub = pem("rsa.pub");
    let other_ed = EncodingKey::from_ed_pem(&pem("ed25519-b.key")).unwrap();
    let valid = hs_token(Some("h"), &claims());
    let mut parts: Vec<&str> = valid.split('.').collect();
    let forged_payload = b64(&with(claims(), "roles", json!(["admin"])));
    parts[1] = &forged_payload;
    let tampered = parts.join(".");
    let none_token = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": "h"})),
        b64(&claims())
    );

    let cases: Vec<(&str, String, Expect)> = vec![
        (
            "expired",
            hs_token(Some("h"), &with(claims(), "exp", json!(t - 120))),
            |e| *e == TokenError::Expired,
        ),
        (
            "not yet valid",
            hs_token(Some("h"), &with(claims(), "nbf", json!(t + 300))),
            |e| *e == TokenError::NotYetValid,
        ),
        (
            "wrong aud",
            hs_token(Some("h"), &with(claims(), "aud", json!("someone-else"))),
            |e| *e == TokenError::WrongAudience,
        ),
        (
            "wrong iss",
            hs_token(Some("h"), &with(claims(), "iss", json!("evil"))),
            |e| *e == TokenError::WrongIssuer,
        ),
        (
            "missing aud",
            hs_token(Some("h"), &without(claims(), "aud")),
            |e| *e == TokenError::MissingClaim("aud".into()),
        ),
        (
            "missing iss",
            hs_token(Some("h"), &without(claims(), "iss")),
            |e| *e == TokenError::MissingClaim("iss".into()),
        ),
        (
            "missing exp",
            hs_token(Some("h"), &without(claims(), "exp")),
            |e| *e == TokenError::MissingClaim("exp".into()),
        ),
        (
            "missing sub",
            hs_token(Some("h"), &without(claims(), "sub")),
            |e| *e == TokenError::MissingClaim("sub".into()),
        ),
        // CVE-2026-25537: before jsonwebtoken 10.3 a string exp skipped the expiry check.
        (
            "exp as a string",
            hs_token(Some("h"), &with(claims(), "exp", json!("9999999999"))),
            |e| matches!(e, TokenError::InvalidClaim(_)),
        ),
        (
            "nbf as a string",
            hs_token(Some("h"), &with(claims(), "nbf", json!("0"))),
            |e| matches!(e, TokenError::InvalidClaim(_)),
        ),
        ("alg none", none_token, |e| {
            matches!(e, TokenError::Malformed(_))
        }),
        (
            "HS256 keyed with the Ed25519 public key",
            sign(
                Algorithm::HS256,
                Some("e"),
                &claims(),
                &EncodingKey::from_secret(&ed_pub),
            ),
            |e| matches!(e, TokenError::AlgorithmMismatch { .. }),
        ),
        ("unknown kid", hs_token(Some("nope"), &claims()), |e| {
            *e == TokenError::UnknownKeyId("nope".into())
        }),
        (
            "no kid among several keys",
            hs_token(None, &claims()),
            |e| *e == TokenError::MissingKeyId,
        ),
        ("tampered payload", tampered, |e| {
            *e == TokenError::BadSignature
        }),
        (
            "signed by another Ed25519 key",
            sign(Algorithm::EdDSA, Some("e"), &claims(), &other_ed),
            |e| *e == TokenError::BadSignature,
        ),
        (
            "roles not roles",
            hs_token(Some("h"), &with(claims(), "roles", json!(["root"]))),
            |e| matches!(e, TokenError::InvalidClaim(_)),
        ),
        ("garbage", "not.a.token".into(), |e| {
            matches!(e, TokenError::Malformed(_))
        }),
    ];
    for (name, token, expected) in cases {
        match keys.verify(&token) {
            Ok(v) => panic!("{name}: accepted as {v:?}"),
            Err(e) => assert!(
                expected(&e),
                "{name}: refused, but for the wrong reason: {e}"
            ),
        }
    }

    // The same confusion attacks against single-key sets, where no kid is needed.
    let only_rsa = set(vec![rsa("r")], None);
    let attack = sign(
        Algorithm::HS256,
        None,
        &claims(),
        &EncodingKey::from_secret(&rsa_pub),
    );
    assert!(matches!(
        only_rsa.verify(&attack),
        Err(TokenError::AlgorithmMismatch { .. })
    ));
    let only_ed = set(vec![ed("e")], None);
    let attack = sign(
        Algorithm::HS256,
        None,
        &claims(),
        &EncodingKey::from_secret(&ed_pub),
    );
    assert!(matches!(
        only_ed.verify(&attack),
        Err(TokenError::AlgorithmMismatch { .. })
    ));
}

#[test]
fn leeway_is_configurable() {
    let token = hs_token(Some("h"), &with(claims(), "exp", json!(now() - 10)));
    let lenient = KeySet::new(vec![hs("h")], None, ISS, AUD, Duration::from_secs(30)).unwrap();
    assert!(
        lenient.verify(&token).is_ok(),
        "10 s past exp is within 30 s of leeway"
    );
    let strict = KeySet::new(vec![hs("h")], None, ISS, AUD, Duration::ZERO).unwrap();
    assert_eq!(strict.verify(&token).unwrap_err(), TokenError::Expired);
}

#[test]
fn rotation_accepts_the_old_key_during_overlap_and_refuses_it_after() {
    let old = set(vec![hs("2026-10")], Some("2026-10"));
    let (old_token, _) = old
        .issue("svc", &Roles::default(), Duration::from_secs(600))
        .unwrap();

    // During the overlap: the new key signs, the old one still verifies.
    let overlap_end = SystemTime::now() + Duration::from_secs(3600);
    let during = set(
        vec![hs("2026-10").retiring_at(Some(overlap_end)), ed("2026-11")],
        Some("2026-11"),
    );
    assert_eq!(during.verify(&old_token).unwrap().key_id, "2026-10");
    let (new_token, _) = during
        .issue("svc", &Roles::default(), Duration::from_secs(600))
        .unwrap();
    assert_eq!(
        jsonwebtoken::decode_header(&new_token)
            .unwrap()
            .kid
            .as_deref(),
        Some("2026-11")
    );
    assert_eq!(during.verify(&new_token).unwrap().key_id, "2026-11");

    // After the overlap the old kid is refused, by date or because it is gone.
    let after_date = SystemTime::now() + Duration::from_secs(7200);
    assert_eq!(
        during.verify_at(&old_token, after_date).unwrap_err(),
        TokenError::RetiredKey("2026-10".into())
    );
    let after = set(vec![ed("2026-11")], Some("2026-11"));
    assert_eq!(
        after.verify(&old_token).unwrap_err(),
        TokenError::UnknownKeyId("2026-10".into())
    );
    assert!(after.verify(&new_token).is_ok());
}

#[test]
fn key_set_refuses_bad_keys() {
    assert!(
        Key::hmac("short", b"too short").is_err(),
        "HS256 secrets need 32 bytes"
    );
    assert!(Key::asymmetric("x", KeyAlgorithm::EdDsa, Some(b"not pem"), None).is_err());
    assert!(KeySet::new(vec![hs("h")], Some("missing"), ISS, AUD, Duration::ZERO).is_err());
    let verify_only =
        Key::asymmetric("v", KeyAlgorithm::EdDsa, Some(&pem("ed25519.pub")), None).unwrap();
    assert!(
        KeySet::new(vec![verify_only], Some("v"), ISS, AUD, Duration::ZERO).is_err(),
        "cannot sign without a private key"
    );
}

/// A token cannot be valid for longer than `auth.max_token_ttl` from the moment it is verified: one
/// minted with `exp = u64::MAX` (or just a long life) is refused, naming the limit.
#[test]
fn tokens_valid_for_longer_than_the_max_ttl_are_refused() {
    let keys = set(vec![hs("h")], None).with_max_ttl(Duration::from_secs(3600));
    for exp in [u64::MAX, i64::MAX as u64, now() + 2 * 3600] {
        let token = hs_token(Some("h"), &with(claims(), "exp", json!(exp)));
        match keys.verify(&token) {
            Err(TokenError::InvalidClaim(m)) => assert!(m.contains("max_token_ttl"), "{m}"),
            other => panic!("exp {exp}: {other:?}"),
        }
    }
    let fine = hs_token(Some("h"), &with(claims(), "exp", json!(now() + 3500)));
    assert!(keys.verify(&fine).is_ok());
    // The default is a day.
    let day = set(vec![hs("h")], None);
    let long = hs_token(Some("h"), &with(claims(), "exp", json!(now() + 2 * 86_400)));
    assert!(day.verify(&long).is_err());
}

/// A message signature is bound to its stream and fields, short-lived, and never an identity token;
/// an identity token is never a message signature.
#[test]
fn message_signatures_bind_content_and_are_not_tokens() {
    use redstream::auth::Identity;
    use redstream::model::envelope::Fields;
    let keys = set(vec![hs("h")], Some("h"));
    let who = Identity {
        subject: "ops".into(),
        roles: Roles::parse(&["system_write"]).unwrap(),
    };
    let fields: Fields = [("type", "shutdown"), ("target", "all")]
        .into_iter()
        .collect();
    let stream = "nova:system:mcp:control";
    let sig = keys
        .sign_message(&who, stream, &fields, Duration::from_secs(60))
        .unwrap();
    let ok = keys.verify_message(&sig, stream, &fields).unwrap();
    assert_eq!(ok.identity, who);
    assert_eq!(ok.jti.len(), 32);
    let other: Fields = [("type", "reload_config"), ("target", "all")]
        .into_iter()
        .collect();
    for (s, f) in [(stream, &other), ("nova:system:mcp:other", &fields)] {
        let e = keys.verify_message(&sig, s, f).unwrap_err();
        assert!(matches!(e, TokenError::InvalidClaim(_)), "{e}");
    }
    let e = keys.verify(&sig).unwrap_err();
    assert!(e.to_string().contains("message signature"), "{e}");
    let (token, _) = keys
        .issue("ops", &who.roles, Duration::from_secs(60))
        .unwrap();
    assert!(keys.verify_message(&token, stream, &fields).is_err());
    // Longer than auth.signature_ttl is capped at signing, and refused at verification.
    let strict = set(vec![hs("h")], Some("h")).with_signature_ttl(Duration::from_secs(10));
    let long = keys
        .sign_message(&who, stream, &fields, Duration::from_secs(300))
        .unwrap();
    let e = strict.verify_message(&long, stream, &fields).unwrap_err();
    assert!(e.to_string().contains("auth.signature_ttl"), "{e}");
    let capped = strict
        .sign_message(&who, stream, &fields, Duration::from_secs(300))
        .unwrap();
    assert!(strict.verify_message(&capped, stream, &fields).is_ok());
}
