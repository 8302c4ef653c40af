//! Reading secrets: inline, from a file, from a systemd credential, or from an environment variable.
//!
//! Owns only the lookup; which keys are secrets is decided by [`super::raw`]. Errors name the place that
//! was tried, never the secret.

use std::path::{Path, PathBuf};

use super::raw::{RawSecret, SecretFrom};

/// Whether a file secret must be private to its owner: true for passwords, keys and tokens; false for
/// material that is public by nature (CA and client certificates, public keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Privacy {
    Private,
    Public,
}

/// Reads `secret`. `credentials_dir` is `$CREDENTIALS_DIRECTORY`, passed in so tests need not set the
/// process environment. A trailing newline (as left by `echo` or an editor) is removed. A private
/// secret's file must not be readable or writable by group or others (as ssh insists for its keys);
/// systemd credentials are exempt, systemd keeps them private itself.
pub fn resolve(
    secret: &RawSecret,
    credentials_dir: Option<&Path>,
    privacy: Privacy,
) -> Result<Vec<u8>, String> {
    let mut bytes = match secret {
        RawSecret::Inline(s) => s.clone().into_bytes(),
        RawSecret::From(from) => {
            if let (Some(file), Privacy::Private) = (&from.file, privacy) {
                private_to_owner(Path::new(file))?;
            }
            read(from, credentials_dir)?
        }
    };
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    if bytes.is_empty() {
        if let RawSecret::From(SecretFrom {
            credential: Some(name),
            ..
        }) = secret
        {
            // The shipped units give an absent credential file an empty fallback.
            return Err(format!(
                "credential {name:?} is empty: its file (LoadCredential={name}:…) is absent or empty"
            ));
        }
        return Err("the secret is empty".into());
    }
    Ok(bytes)
}

/// Refuses a secret file others may read or change, naming the file and its mode.
fn private_to_owner(file: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(file)
        .map_err(|e| format!("cannot read secret file {}: {e}", file.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "secret file {} has mode {mode:04o}: group or others may read or change it; \
             chmod 600 it (or use a systemd credential)",
            file.display()
        ));
    }
    Ok(())
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
    fn an_absent_credential_the_units_fill_with_a_newline_is_named() {
        let dir = tempfile::tempdir().unwrap();
        // What SetCredential=redis-password:\n leaves when the LoadCredential= file is absent.
        std::fs::write(dir.path().join("redis-password"), "\n").unwrap();
        let err = resolve(
            &from(None, Some("redis-password")),
            Some(dir.path()),
            Privacy::Private,
        )
        .unwrap_err();
        assert!(
            err.contains("\"redis-password\" is empty") && err.contains("absent"),
            "{err}"
        );
    }

    #[test]
    fn reads_files_and_credentials_and_trims_the_newline() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("redis-password");
        std::fs::write(&file, "hunter2\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let private = Privacy::Private;
        assert_eq!(
            resolve(&from(file.to_str(), None), None, private).unwrap(),
            b"hunter2"
        );
        assert_eq!(
            resolve(
                &from(None, Some("redis-password")),
                Some(dir.path()),
                private
            )
            .unwrap(),
            b"hunter2"
        );
        let err = resolve(&from(None, Some("redis-password")), None, private).unwrap_err();
        assert!(err.contains("CREDENTIALS_DIRECTORY"), "{err}");
        assert!(
            resolve(
                &from(None, Some("../etc/passwd")),
                Some(dir.path()),
                private
            )
            .is_err()
        );
        assert!(resolve(&from(Some("/x"), Some("y")), None, private).is_err());
    }

    #[test]
    fn a_private_secret_others_may_read_is_refused_naming_file_and_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("jwt.secret");
        std::fs::write(&file, "s3cret").unwrap();
        for mode in [0o644, 0o640, 0o606, 0o620] {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = resolve(&from(file.to_str(), None), None, Privacy::Private).unwrap_err();
            assert!(
                err.contains(&format!("{mode:04o}")) && err.contains("jwt.secret"),
                "{err}"
            );
            assert!(!err.contains("s3cret"));
            // A certificate is public: its mode is its owner's business.
            assert!(resolve(&from(file.to_str(), None), None, Privacy::Public).is_ok());
        }
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(resolve(&from(file.to_str(), None), None, Privacy::Private).is_ok());
    }
}
