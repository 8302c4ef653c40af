//! JWT issue and verification over a key set with rotation.
//!
//! Owns the token rules: HS256, RS256 or EdDSA (each key pinned to one algorithm, so an HS256 token can
//! never be checked against a public key), `exp`, `iss`, `aud` and `sub` required, `nbf` honoured,
//! configurable leeway, `kid` selecting the key. Rotation is a key set: new tokens are signed with the
//! signing key, old keys keep verifying until their `retire_after` moment. Reading key material from
//! config is [`crate::config`]'s job.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::{Identity, Roles};

/// The algorithms a key may be pinned to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAlgorithm {
    Hs256,
    Rs256,
    EdDsa,
}

impl KeyAlgorithm {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "HS256" => Ok(KeyAlgorithm::Hs256),
            "RS256" => Ok(KeyAlgorithm::Rs256),
            "EdDSA" => Ok(KeyAlgorithm::EdDsa),
            _ => Err("unknown algorithm".into()),
        }
    }

    pub(super) fn jwt(self) -> Algorithm {
        match self {
            KeyAlgorithm::Hs256 => Algorithm::HS256,
            KeyAlgorithm::Rs256 => Algorithm::RS256,
            KeyAlgorithm::EdDsa => Algorithm::EdDSA,
        }
    }
}

/// Why a token was refused. The text is the reason operators see.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token has no kid and the key set holds several keys")]
    MissingKeyId,
    #[error("unknown key id {0:?}")]
    UnknownKeyId(String),
    #[error("key {0:?} is retired")]
    RetiredKey(String),
    #[error("token algorithm {found} does not match key {kid:?}, which is {expected}")]
    AlgorithmMismatch {
        kid: String,
        expected: String,
        found: String,
    },
    #[error("bad signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid (nbf)")]
    NotYetValid,
    #[error("wrong issuer")]
    WrongIssuer,
    #[error("wrong audience")]
    WrongAudience,
    #[error("missing required claim {0:?}")]
    MissingClaim(String),
    #[error("invalid claim: {0}")]
    InvalidClaim(String),
    #[error("no signing key is configured (auth.signing_key)")]
    NoSigningKey,
    #[error("signing failed: {0}")]
    Signing(String),
}

/// One verification key, optionally able to sign.
pub struct Key {
    pub id: String,
    pub algorithm: KeyAlgorithm,
    decoding: DecodingKey,
    encoding: Option<EncodingKey>,
    /// After this moment tokens with this `kid` are refused: the end of a rotation overlap.
    pub retire_after: Option<SystemTime>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("algorithm", &self.algorithm)
            .field("can_sign", &self.encoding.is_some())
            .field("retire_after", &self.retire_after)
            .finish_non_exhaustive()
    }
}

impl Key {
    /// An HS256 key from its shared secret (at least 32 bytes, RFC 7518 §3.2).
    pub fn hmac(id: &str, secret: &[u8]) -> Result<Key, String> {
        if secret.len() < 32 {
            return Err(format!(
                "an HS256 secret needs at least 32 bytes, found {}",
                secret.len()
            ));
        }
        Ok(Key {
            id: id.to_owned(),
            algorithm: KeyAlgorithm::Hs256,
            decoding: DecodingKey::from_secret(secret),
            encoding: Some(EncodingKey::from_secret(secret)),
            retire_after: None,
        })
    }

    /// An RS256 or EdDSA key from PEM: a public key verifies, a private key also signs. With only the
    /// private key the public half is derived from it.
    pub fn asymmetric(
        id: &str,
        algorithm: KeyAlgorithm,
        public_pem: Option<&[u8]>,
        private_pem: Option<&[u8]>,
    ) -> Result<Key, String> {
        let encoding = match (algorithm, private_pem) {
            (_, None) => None,
            (KeyAlgorithm::Rs256, Some(pem)) => Some(EncodingKey::from_rsa_pem(pem)),
            (KeyAlgorithm::EdDsa, Some(pem)) => Some(EncodingKey::from_ed_pem(pem)),
            (KeyAlgorithm::Hs256, Some(_)) => return Err("HS256 keys take a secret".into()),
        }
        .transpose()
        .map_err(|e| format!("private key is not a valid PEM key: {e}"))?;
        let decoding = match (algorithm, public_pem, &encoding) {
            (KeyAlgorithm::Rs256, Some(pem), _) => DecodingKey::from_rsa_pem(pem),
            (KeyAlgorithm::EdDsa, Some(pem), _) => DecodingKey::from_ed_pem(pem),
            (_, None, Some(enc)) => jsonwebtoken::jwk::Jwk::from_encoding_key(enc, algorithm.jwt())
                .and_then(|jwk| DecodingKey::from_jwk(&jwk)),
            (_, None, None) => return Err("needs a public_key or a private_key".into()),
            (KeyAlgorithm::Hs256, Some(_), _) => return Err("HS256 keys take a secret".into()),
        }
        .map_err(|e| format!("public key is not a valid PEM key: {e}"))?;
        Ok(Key {
            id: id.to_owned(),
            algorithm,
            decoding,
            encoding,
            retire_after: None,
        })
    }

    pub fn retiring_at(mut self, at: Option<SystemTime>) -> Key {
        self.retire_after = at;
        self
    }

    pub fn can_sign(&self) -> bool {
        self.encoding.is_some()
    }
}

/// The claims RedStream writes and requires.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The identity; becomes `_source` on everything it publishes. (Absence is reported by the
    /// library's required-claims check, hence the serde defaults.)
    #[serde(default)]
    pub sub: String,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub iss: String,
    /// Checked by the library against the configured audience; a string or a list on the wire.
    #[serde(skip_deserializing, default)]
    pub aud: String,
    #[serde(default)]
    pub exp: u64,
    #[serde(default)]
    pub iat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// Set on message signatures ([`super::signature`]), which are never identity tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typ: Option<String>,
}

/// A verified token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub identity: Identity,
    pub key_id: String,
    /// Seconds since the epoch.
    pub expires_at: u64,
}

/// Keys plus the rules every token must meet.
#[derive(Debug)]
pub struct KeySet {
    keys: Vec<Key>,
    signing: Option<usize>,
    issuer: String,
    audience: String,
    leeway: Duration,
    /// The longest a token may be valid from the moment it is verified (`auth.max_token_ttl`): a
    /// token minted with a far `exp` (or `u64::MAX`) is refused, not trusted forever.
    max_ttl: Duration,
    /// The longest a message signature may be valid (`auth.signature_ttl`): minutes, not hours.
    signature_ttl: Duration,
}

/// `typ` of a message signature ([`super::signature`]): a token carrying it is never an identity.
pub const SIGNATURE_TYP: &str = "redstream-message";

/// `signature_ttl` when none is configured.
const DEFAULT_SIGNATURE_TTL: Duration = Duration::from_secs(300);

/// `max_ttl` when none is configured: `auth.max_token_ttl`'s default.
const DEFAULT_MAX_TTL: Duration = Duration::from_secs(24 * 3600);

impl KeySet {
    /// `signing` names the key new tokens are signed with; it must exist and hold private material.
    pub fn new(
        keys: Vec<Key>,
        signing: Option<&str>,
        issuer: &str,
        audience: &str,
        leeway: Duration,
    ) -> Result<KeySet, String> {
        let signing = match signing {
            None => None,
            Some(kid) => {
                let i = keys
                    .iter()
                    .position(|k| k.id == kid)
                    .ok_or_else(|| format!("signing key {kid:?} is not among the keys"))?;
                if !keys[i].can_sign() {
                    return Err(format!(
                        "signing key {kid:?} has no private key or secret to sign with"
                    ));
                }
                Some(i)
            }
        };
        Ok(KeySet {
            keys,
            signing,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            leeway,
            max_ttl: DEFAULT_MAX_TTL,
            signature_ttl: DEFAULT_SIGNATURE_TTL,
        })
    }

    /// The longest a message signature may still be valid when it is verified.
    pub fn with_signature_ttl(mut self, ttl: Duration) -> KeySet {
        self.signature_ttl = ttl;
        self
    }

    /// The longest a token may still be valid when it is verified.
    pub fn with_max_ttl(mut self, max_ttl: Duration) -> KeySet {
        self.max_ttl = max_ttl;
        self
    }

    pub fn can_sign(&self) -> bool {
        self.signing.is_some()
    }

    fn key_for(&self, header: &Header) -> Result<&Key, TokenError> {
        match &header.kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| &k.id == kid)
                .ok_or_else(|| TokenError::UnknownKeyId(kid.clone())),
            None if self.keys.len() == 1 => Ok(&self.keys[0]),
            None => Err(TokenError::MissingKeyId),
        }
    }

    /// Verifies `token` now.
    pub fn verify(&self, token: &str) -> Result<Verified, TokenError> {
        self.verify_at(token, SystemTime::now())
    }

    /// Verifies `token` as of `now` (the key-retirement check; the library reads the clock for `exp`).
    pub fn verify_at(&self, token: &str, now: SystemTime) -> Result<Verified, TokenError> {
        let (claims, key) = self.decode::<Claims>(token, now)?;
        if claims.typ.as_deref() == Some(SIGNATURE_TYP) {
            return Err(TokenError::InvalidClaim(
                "this is a message signature, not an identity token".into(),
            ));
        }
        self.fresh(claims.exp, now, self.max_ttl, "auth.max_token_ttl")?;
        Ok(Verified {
            identity: identity(claims.sub, &claims.roles)?,
            key_id: key.id.clone(),
            expires_at: claims.exp,
        })
    }

    /// Checks a token's header, key and signature and the claims every token shares (`exp`, `nbf`,
    /// `iss`, `aud`, `sub` present), and returns its claims and the key that verified it.
    pub(super) fn decode<T: serde::de::DeserializeOwned>(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<(T, &Key), TokenError> {
        self.decode_checking(token, now, true)
    }

    /// [`KeySet::decode`], with the expiry checked or not (authorship of an old record).
    pub(super) fn decode_checking<T: serde::de::DeserializeOwned>(
        &self,
        token: &str,
        now: SystemTime,
        check_exp: bool,
    ) -> Result<(T, &Key), TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::Json(_) => TokenError::Malformed(
                "header is not valid JSON or names an unsupported algorithm (alg \"none\" is never accepted)"
                    .into(),
            ),
            _ => TokenError::Malformed(e.to_string()),
        })?;
        let key = self.key_for(&header)?;
        if header.alg != key.algorithm.jwt() {
            return Err(TokenError::AlgorithmMismatch {
                kid: key.id.clone(),
                expected: format!("{:?}", key.algorithm.jwt()),
                found: format!("{:?}", header.alg),
            });
        }
        if key.retire_after.is_some_and(|t| now > t) {
            return Err(TokenError::RetiredKey(key.id.clone()));
        }
        let mut validation = Validation::new(key.algorithm.jwt());
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.validate_nbf = true;
        validation.validate_exp = check_exp;
        if !check_exp {
            validation.required_spec_claims.remove("exp");
        }
        validation.leeway = self.leeway.as_secs();
        let data = jsonwebtoken::decode::<T>(token, &key.decoding, &validation)
            .map_err(|e| map_error(e.into_kind()))?;
        Ok((data.claims, key))
    }

    /// Refuses an `exp` further from `now` than `max` (plus the leeway): a token minted with a far
    /// `exp` (or `u64::MAX`) is refused, not trusted forever.
    pub(super) fn fresh(
        &self,
        exp: u64,
        now: SystemTime,
        max: Duration,
        setting: &str,
    ) -> Result<(), TokenError> {
        let now_s = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let latest = now_s
            .saturating_add(max.as_secs())
            .saturating_add(self.leeway.as_secs());
        if exp > latest {
            return Err(TokenError::InvalidClaim(format!(
                "exp is {} s from now, longer than {setting} ({} s) allows",
                exp.saturating_sub(now_s),
                max.as_secs()
            )));
        }
        Ok(())
    }

    /// The signing key and its encoder, and the issuer and audience tokens carry.
    pub(super) fn signer(&self) -> Result<(&Key, &EncodingKey), TokenError> {
        let key = &self.keys[self.signing.ok_or(TokenError::NoSigningKey)?];
        let encoding = key.encoding.as_ref().ok_or(TokenError::NoSigningKey)?;
        Ok((key, encoding))
    }

    pub(super) fn issuer(&self) -> &str {
        &self.issuer
    }

    pub(super) fn audience(&self) -> &str {
        &self.audience
    }

    pub(super) fn signature_ttl(&self) -> Duration {
        self.signature_ttl
    }

    /// How far past `exp` a token or signature is still accepted (`auth.leeway`).
    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    /// Signs a token for `subject` with `roles`, valid from now for `ttl`. Returns it with its expiry.
    pub fn issue(
        &self,
        subject: &str,
        roles: &Roles,
        ttl: Duration,
    ) -> Result<(String, u64), TokenError> {
        let (key, encoding) = self.signer()?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = Claims {
            sub: subject.to_owned(),
            roles: roles.to_strings(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            exp: now + ttl.as_secs().max(1),
            iat: now,
            nbf: Some(now),
            jti: Some(uuid::Uuid::new_v4().to_string()),
            typ: None,
        };
        let mut header = Header::new(key.algorithm.jwt());
        header.kid = Some(key.id.clone());
        let token = jsonwebtoken::encode(&header, &claims, encoding)
            .map_err(|e| TokenError::Signing(e.to_string()))?;
        Ok((token, claims.exp))
    }
}

/// The identity verified claims name: a non-empty `sub` and roles that parse.
pub(super) fn identity(sub: String, roles: &[String]) -> Result<Identity, TokenError> {
    let roles = Roles::parse(roles).map_err(TokenError::InvalidClaim)?;
    if sub.is_empty() {
        return Err(TokenError::InvalidClaim("sub is empty".into()));
    }
    Ok(Identity {
        subject: sub,
        roles,
    })
}

fn map_error(kind: ErrorKind) -> TokenError {
    match kind {
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) => TokenError::MissingClaim(c),
        ErrorKind::InvalidClaimFormat(c) => {
            TokenError::InvalidClaim(format!("{c} has the wrong type"))
        }
        ErrorKind::InvalidAlgorithm => TokenError::Malformed("algorithm not allowed".into()),
        ErrorKind::Json(e) => TokenError::InvalidClaim(e.to_string()),
        other => TokenError::Malformed(format!("{other:?}")),
    }
}
