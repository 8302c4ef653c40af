//! Signed messages: a signature bound to one message's content, used once.
//!
//! Owns the `_sig` field. A bearer token read off a stream can be replayed by anyone who reads the
//! stream; a message signature cannot. It is a JWS over claims that name the signer (`sub`, `roles`),
//! the stream the message is for, a digest of the message's fields, a unique `jti` and a short `exp`
//! (`auth.signature_ttl`, minutes). Verification recomputes the digest from the fields as they arrived,
//! so a copied signature authorizes no other content and no other stream; the `jti` is what makes a
//! verbatim copy of the whole message detectable — [`crate::client::commit`] records it in Redis with the
//! message's commit, and the control handler before it acts, so each signed message takes effect once
//! per consumer group.
//!
//! Single use holds whatever the clocks: a signature is accepted until `exp` + `auth.leeway` by the
//! verifying daemon's clock, and its use record must outlive that by Redis's. It is therefore written
//! with a *relative* expiry (`SET … NX PX`, [`marker_ttl_ms`]): the time left until `exp` + leeway +
//! [`SKEW_MARGIN`] by the daemon's own clock, so a daemon whose clock differs from Redis's keeps the
//! record exactly as long as it would accept the signature (an absolute `PXAT` computed from `exp`
//! would be in the past for Redis as soon as `exp` passed — and Redis deletes such a key at once —
//! while the leeway still accepted copies). The margin covers clocks of different daemons that differ
//! from one another by up to a minute.
//!
//! The digest is SHA-256 over the stream name and every field but `_sig` and `_token`, in the order
//! sent, each as a 4-byte big-endian length and the bytes: no separator can be forged, and names and
//! values are bytes exact.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::Header;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::Identity;
use super::jwt::{KeySet, TokenError};
use crate::model::envelope::Fields;

/// How much longer than its acceptance window a signature's use is remembered: the most two daemons'
/// clocks may differ for single use to hold across them.
pub const SKEW_MARGIN: Duration = Duration::from_secs(60);

/// The relative expiry (ms) of a use record that must be kept until `until_ms` (the daemon's clock),
/// written at `now_ms` (the same clock): the time left, and never less than [`SKEW_MARGIN`] — a commit
/// made late (a slow handler) still keeps the record past every acceptance of a copy.
pub fn marker_ttl_ms(until_ms: u64, now_ms: u64) -> u64 {
    until_ms
        .saturating_sub(now_ms)
        .max(SKEW_MARGIN.as_millis() as u64)
}

/// Until when (ms since the epoch) the use of a signature expiring at `exp_s` must be remembered, by
/// the clock of a daemon accepting it with `leeway`: its last acceptance, plus [`SKEW_MARGIN`].
pub fn remember_until_ms(exp_s: u64, leeway: Duration) -> u64 {
    (Duration::from_secs(exp_s) + leeway + SKEW_MARGIN).as_millis() as u64
}

/// The field carrying a message's signature.
pub const FIELD: &str = "_sig";
/// The bearer-token field of earlier versions: never obeyed, always stripped.
pub const TOKEN_FIELD: &str = "_token";
/// `typ` of a message signature, so one is never taken for an identity token.
pub const TYP: &str = super::jwt::SIGNATURE_TYP;

#[derive(Debug, Serialize, Deserialize)]
struct MessageClaims {
    sub: String,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    iss: String,
    /// Checked by the library against the configured audience.
    #[serde(skip_deserializing, default)]
    aud: String,
    exp: u64,
    #[serde(default)]
    iat: u64,
    jti: String,
    typ: String,
    stream: String,
    dig: String,
}

/// A verified message signature: who signed, and what makes this use of it unique.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signed {
    pub identity: Identity,
    pub jti: String,
    /// Until when its `jti` must be remembered, in milliseconds since the epoch by this daemon's
    /// clock: `exp` + `auth.leeway` + [`SKEW_MARGIN`] (no copy is accepted after `exp` + leeway).
    pub remember_until_ms: u64,
}

/// The digest a signature covers: base64url SHA-256 of the stream and the fields (see the module doc).
pub fn digest(stream: &str, fields: &Fields) -> String {
    let mut h = Sha256::new();
    let mut put = |bytes: &[u8]| {
        h.update((bytes.len() as u32).to_be_bytes());
        h.update(bytes);
    };
    put(stream.as_bytes());
    for (name, value) in fields.iter() {
        if name == FIELD.as_bytes() || name == TOKEN_FIELD.as_bytes() {
            continue;
        }
        put(name);
        put(value);
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(h.finalize())
}

impl KeySet {
    /// Signs the message `fields` for `stream` as `identity`, valid for `ttl` (at most
    /// `auth.signature_ttl`). The fields must be final (envelope stamped): any change voids it.
    pub fn sign_message(
        &self,
        identity: &Identity,
        stream: &str,
        fields: &Fields,
        ttl: Duration,
    ) -> Result<String, TokenError> {
        self.sign_digest(identity, stream, &digest(stream, fields), ttl)
    }

    /// [`KeySet::sign_message`] for a message whose [`digest`] the caller computed (the credential
    /// exchange signs for hosts that do not hold the key, and never sees the fields).
    pub fn sign_digest(
        &self,
        identity: &Identity,
        stream: &str,
        dig: &str,
        ttl: Duration,
    ) -> Result<String, TokenError> {
        if dig.len() != 43
            || !dig
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(TokenError::InvalidClaim(
                "the digest is not a base64url SHA-256".into(),
            ));
        }
        let (key, encoding) = self.signer()?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let ttl = ttl.min(self.signature_ttl()).as_secs().max(1);
        let claims = MessageClaims {
            sub: identity.subject.clone(),
            roles: identity.roles.to_strings(),
            iss: self.issuer().to_owned(),
            aud: self.audience().to_owned(),
            exp: now + ttl,
            iat: now,
            jti: uuid::Uuid::new_v4().simple().to_string(),
            typ: TYP.to_owned(),
            stream: stream.to_owned(),
            dig: dig.to_owned(),
        };
        let mut header = Header::new(key.algorithm.jwt());
        header.kid = Some(key.id.clone());
        jsonwebtoken::encode(&header, &claims, encoding)
            .map_err(|e| TokenError::Signing(e.to_string()))
    }

    /// Who signed the entry `fields` of `stream` (a heartbeat), expired or not: the signature must be
    /// a message signature by the key set, for that stream and exactly those fields. Says nothing about
    /// when it was written — the entry's id does.
    pub fn signer_of(
        &self,
        signature: &str,
        stream: &str,
        fields: &Fields,
    ) -> Result<Identity, TokenError> {
        let (claims, _) =
            self.decode_checking::<MessageClaims>(signature, SystemTime::now(), false)?;
        if claims.typ != TYP || claims.stream != stream || claims.dig != digest(stream, fields) {
            return Err(TokenError::InvalidClaim(
                "not a signature of this entry".into(),
            ));
        }
        super::jwt::identity(claims.sub, &claims.roles)
    }

    /// Verifies `signature` for the message `fields` as read from `stream`.
    pub fn verify_message(
        &self,
        signature: &str,
        stream: &str,
        fields: &Fields,
    ) -> Result<Signed, TokenError> {
        let now = SystemTime::now();
        let (claims, _) = self.decode::<MessageClaims>(signature, now)?;
        if claims.typ != TYP {
            return Err(TokenError::InvalidClaim(format!(
                "typ is {:?}, not a message signature",
                claims.typ
            )));
        }
        self.fresh(claims.exp, now, self.signature_ttl(), "auth.signature_ttl")?;
        if claims.stream != stream {
            return Err(TokenError::InvalidClaim(format!(
                "signed for stream {:?}, read from {stream:?}",
                claims.stream
            )));
        }
        if claims.dig != digest(stream, fields) {
            return Err(TokenError::InvalidClaim(
                "the message's fields are not the ones signed".into(),
            ));
        }
        if claims.jti.is_empty() || claims.jti.len() > 64 {
            return Err(TokenError::InvalidClaim("jti is empty or too long".into()));
        }
        Ok(Signed {
            identity: super::jwt::identity(claims.sub, &claims.roles)?,
            jti: claims.jti,
            remember_until_ms: remember_until_ms(claims.exp, self.leeway()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_use_record_outlives_the_acceptance_window_by_the_margin_and_never_less() {
        let until = remember_until_ms(1_000, Duration::from_secs(30));
        assert_eq!(until, (1_000 + 30 + 60) * 1000);
        // Written 2 s after exp (inside the leeway): kept 88 s more, relative to now.
        assert_eq!(marker_ttl_ms(until, 1_002_000), 88_000);
        // Written late (a slow handler): never less than the margin.
        assert_eq!(marker_ttl_ms(until, 2_000_000), 60_000);
    }

    #[test]
    fn the_digest_binds_stream_names_values_and_order_and_skips_the_signature() {
        let f = |pairs: &[(&str, &str)]| pairs.iter().copied().collect::<Fields>();
        let base = digest("nova:task:a:b", &f(&[("a", "1"), ("b", "2")]));
        assert_ne!(base, digest("nova:task:a:c", &f(&[("a", "1"), ("b", "2")])));
        assert_ne!(base, digest("nova:task:a:b", &f(&[("b", "2"), ("a", "1")])));
        assert_ne!(base, digest("nova:task:a:b", &f(&[("a", "12"), ("b", "")])));
        assert_ne!(
            base,
            digest("nova:task:a:b", &f(&[("a", "1"), ("b", "2"), ("c", "")]))
        );
        assert_eq!(
            base,
            digest(
                "nova:task:a:b",
                &f(&[("a", "1"), ("_sig", "x"), ("b", "2"), ("_token", "t")])
            )
        );
    }
}
