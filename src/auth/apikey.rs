//! API keys: how an operator proves who they are to `redstream token issue`.
//!
//! Owns the key format and its storage as a hash. Config holds only `sha256:<hex>` of each key, the identity
//! it stands for and the roles it may be issued; the key itself is shown once, at generation. Keys are 256
//! random bits, so a plain SHA-256 is the right hash (a slow password hash buys nothing against a key no one
//! can guess). Lookups compare every stored hash in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::Roles;

/// Prefix of generated keys, so they are recognisable in secret scanners and shell history.
pub const KEY_PREFIX: &str = "rsk_";

/// One stored API key.
#[derive(Clone, Debug)]
pub struct ApiKey {
    /// The config entry's name, for logs; not a secret.
    pub name: String,
    hash: [u8; 32],
    /// Subject of the tokens this key obtains.
    pub identity: String,
    /// The most a token issued for this key may carry.
    pub roles: Roles,
}

impl ApiKey {
    /// `hash` in the `sha256:<64 hex digits>` form that [`hash`] prints.
    pub fn new(name: &str, hash: &str, identity: &str, roles: Roles) -> Result<ApiKey, String> {
        Ok(ApiKey {
            name: name.to_owned(),
            hash: parse_hash(hash)?,
            identity: identity.to_owned(),
            roles,
        })
    }
}

/// The presented key matches no stored hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid API key")]
pub struct InvalidApiKey;

/// The stored keys.
#[derive(Clone, Debug, Default)]
pub struct ApiKeys(Vec<ApiKey>);

impl ApiKeys {
    pub fn new(keys: Vec<ApiKey>) -> Self {
        ApiKeys(keys)
    }

    /// The entry whose hash matches `presented`. Every entry is compared, matched or not.
    pub fn authenticate(&self, presented: &str) -> Result<&ApiKey, InvalidApiKey> {
        let digest: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
        let mut found = None;
        for key in &self.0 {
            if bool::from(key.hash.ct_eq(&digest)) && found.is_none() {
                found = Some(key);
            }
        }
        found.ok_or(InvalidApiKey)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `sha256:<hex>` of a key, the form config stores.
pub fn hash(key: &str) -> String {
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(key.trim().as_bytes()))
    )
}

/// A new random key: `rsk_` and 64 hex digits from the OS generator.
pub fn generate() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("the OS random generator failed: {e}"))?;
    Ok(format!("{KEY_PREFIX}{}", hex::encode(bytes)))
}

fn parse_hash(s: &str) -> Result<[u8; 32], String> {
    let hex_part = s.strip_prefix("sha256:").ok_or_else(|| {
        "expected \"sha256:<64 hex digits>\" (see `redstream token new-api-key`)".to_string()
    })?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).map_err(|_| {
        "expected \"sha256:<64 hex digits>\" (see `redstream token new-api-key`)".to_string()
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_authenticates_by_its_hash_only() {
        let key = generate().unwrap();
        let keys = ApiKeys::new(vec![
            ApiKey::new("ops", &hash(&key), "ops@host", Roles::default()).unwrap(),
        ]);
        assert_eq!(keys.authenticate(&key).unwrap().identity, "ops@host");
        assert_eq!(
            keys.authenticate(&generate().unwrap()).unwrap_err(),
            InvalidApiKey
        );
        assert!(
            ApiKey::new("x", &key, "x", Roles::default()).is_err(),
            "a raw key is not a hash"
        );
    }
}
