//! Reading secrets: inline, from a file, from a systemd credential, or from an environment variable.
//!
//! Owns only the lookup; which keys are secrets is decided by [`super::raw`]. Errors name the place that
//! was tried, never the secret.

use std::path::{Path, PathBuf};

use super::raw::{RawSecret, SecretFrom};

/// Reads `secret`. `credentials_dir` is `$CREDENTIALS_DIRECTORY`, passed in so tests need not set the
/// process environment. A trailing newline (as left by `echo` or an editor) is removed.
pub fn resolve(secret: &RawSecret, credentials_dir: Option<&Path>) -> Result<Vec<u8>, String> {
    let mut bytes = match secret {
        RawSecret::Inline(s) => s.clone().into_bytes(),
        RawSecret::From(from) => read(from, credentials_dir)?,
    };
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err("the secret is empty".into());
    }
    Ok(bytes)
}

fn read(from: &SecretFrom, credentials_dir: Option<&Path>) -> Result<Vec<u8>, String> {
    match (&from.file, &from.credential, &from.env) {
        (Some(file), None, None) => {
            std::fs::read(file).map_err(|e| format!("cannot read secret file {file}: {e}"))
        }
        (None, Some(name), None) => {
            if name.contains('/') || name.is_empty() {
                return Err(format!(
                    "credential name {name:?} must be a plain file name"
                ));
            }
            let dir = credentials_dir.ok_or_else(|| {
                format!(
                    "credential {name:?} needs $CREDENTIALS_DIRECTORY, which is not set \
                     (run under systemd with LoadCredential={name}:/path, or use {{ file = … }})"
                )
            })?;
            let path: PathBuf = dir.join(name);
            std::fs::read(&path)
                .map_err(|e| format!("cannot read credential {}: {e}", path.display()))
        }
        (None, None, Some(var)) => std::env::var_os(var)
            .map(|v| v.into_encoded_bytes())
            .ok_or_else(|| format!("environment variable {var} is not set")),
        _ => Err("give exactly one of file, credential, env".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(file: Option<&str>, credential: Option<&str>) -> RawSecret {
        RawSecret::From(SecretFrom {
            file: file.map(Into::into),
            credential: credential.map(Into::into),
            env: None,
        })
    }

    #[test]
    fn reads_files_and_credentials_and_trims_the_newline() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("redis-password"), "hunter2\n").unwrap();
        let file = dir.path().join("redis-password");
        assert_eq!(
            resolve(&from(file.to_str(), None), None).unwrap(),
            b"hunter2"
        );
        assert_eq!(
            resolve(&from(None, Some("redis-password")), Some(dir.path())).unwrap(),
            b"hunter2"
        );
        let err = resolve(&from(None, Some("redis-password")), None).unwrap_err();
        assert!(err.contains("CREDENTIALS_DIRECTORY"), "{err}");
        assert!(resolve(&from(None, Some("../etc/passwd")), Some(dir.path())).is_err());
        assert!(resolve(&from(Some("/x"), Some("y")), None).is_err());
    }
}
