//! The on-disk cache of compiled handlers, which must never run what it did not write.
//!
//! Owns the artifact files. Deserializing a compiled artifact runs its machine code as trusted, so a
//! file swapped into the cache is code execution in the daemon. Each artifact is therefore trusted
//! only if the cache directory and the file belong to this process's user and nobody else may write
//! (or, for the file, read) them, the file is a regular file (not a link), and its header carries the
//! SHA-256 of the component it was compiled from (the one being loaded, not another one's artifact
//! under this name) and of the artifact bytes that follow. The bytes are read into memory, checked, and
//! deserialized from there, so the file cannot change between the check and the use. Artifacts are
//! written to a new file of an unpredictable name (O_EXCL, mode 0600) and renamed into place. Anything
//! that fails a check is logged, removed when it is ours, and compiled again.

use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// The first bytes of every artifact file.
const MAGIC: &[u8; 16] = b"REDSTREAM-CWASM1";
const HEADER: usize = MAGIC.len() + 32 + 32;

/// Where compiled artifacts of one engine configuration are kept.
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    pub fn new(dir: PathBuf) -> Cache {
        Cache { dir }
    }

    /// The file for the component whose SHA-256 is `source`, under this engine's settings.
    pub fn path(&self, source: &[u8; 32], engine_hash: u64) -> PathBuf {
        self.dir
            .join(format!("{}-{engine_hash:016x}.cwasm", hex::encode(source)))
    }

    /// The cached artifact at `path` for the component `source`, if one is there and passes every
    /// check; None (with the reason logged) otherwise.
    pub fn load(&self, engine: &Engine, path: &Path, source: &[u8; 32]) -> Option<Component> {
        let meta = std::fs::symlink_metadata(path).ok()?;
        let bytes = match self.trusted_bytes(path, &meta, source) {
            Ok(bytes) => bytes,
            Err(why) => {
                tracing::warn!(path = %path.display(), reason = %why, "cached artifact not trusted; recompiling");
                if meta.uid() == euid() && meta.file_type().is_file() {
                    let _ = std::fs::remove_file(path);
                }
                return None;
            }
        };
        // SAFETY: the bytes are an artifact this user's process wrote for exactly this component (the
        // header's digests match, the file and directory are writable by this user only) and were
        // read into memory before the check, so they are what was checked.
        match unsafe { Component::deserialize(engine, &bytes[HEADER..]) } {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unusable cached artifact; recompiling");
                let _ = std::fs::remove_file(path);
                None
            }
        }
    }

    fn trusted_bytes(
        &self,
        path: &Path,
        meta: &std::fs::Metadata,
        source: &[u8; 32],
    ) -> Result<Vec<u8>, String> {
        private_dir(&self.dir)?;
        if !meta.file_type().is_file() {
            return Err("not a regular file".into());
        }
        if meta.uid() != euid() {
            return Err(format!("owned by uid {}, not this process's", meta.uid()));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!("mode {mode:04o}: others may read or change it"));
        }
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        if bytes.len() < HEADER || &bytes[..MAGIC.len()] != MAGIC {
            return Err("not an artifact of this cache".into());
        }
        if &bytes[MAGIC.len()..MAGIC.len() + 32] != source {
            return Err("compiled from another component".into());
        }
        let digest: [u8; 32] = Sha256::digest(&bytes[HEADER..]).into();
        if bytes[MAGIC.len() + 32..HEADER] != digest {
            return Err("its content does not match its digest".into());
        }
        Ok(bytes)
    }

    /// Writes the artifact of `component` (compiled from `source`) to `path`.
    pub fn store(
        &self,
        component: &Component,
        path: &Path,
        source: &[u8; 32],
    ) -> Result<(), String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| e.to_string())?;
        let _ = std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700));
        private_dir(&self.dir)?;
        let artifact = component.serialize().map_err(|e| e.to_string())?;
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|e| e.to_string())?;
        let tmp = self.dir.join(format!(".tmp-{}", hex::encode(nonce)));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| e.to_string())?;
        let digest: [u8; 32] = Sha256::digest(&artifact).into();
        let written = file
            .write_all(MAGIC)
            .and_then(|()| file.write_all(source))
            .and_then(|()| file.write_all(&digest))
            .and_then(|()| file.write_all(&artifact))
            .and_then(|()| file.sync_all());
        if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.to_string());
        }
        Ok(())
    }
}

/// The cache directory must be this user's, and no one else's to write into. A symlink to it is
/// followed when root or this user owns the link: systemd's `CacheDirectory=` under `DynamicUser=` is
/// `/var/cache/<name>`, a root-owned link into `/var/cache/private/`.
fn private_dir(dir: &Path) -> Result<(), String> {
    let mut meta = std::fs::symlink_metadata(dir).map_err(|e| e.to_string())?;
    if meta.file_type().is_symlink() {
        if meta.uid() != 0 && meta.uid() != euid() {
            return Err(format!(
                "the cache directory {} is a symlink owned by uid {}, neither root nor this process",
                dir.display(),
                meta.uid()
            ));
        }
        meta = std::fs::metadata(dir).map_err(|e| e.to_string())?;
    }
    if !meta.file_type().is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    if meta.uid() != euid() {
        return Err(format!(
            "the cache directory {} is owned by uid {}, not this process's",
            dir.display(),
            meta.uid()
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "the cache directory {} has mode {mode:04o}: others may write into it",
            dir.display()
        ));
    }
    Ok(())
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::private_dir;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_link_to_a_private_directory_is_followed_and_judged_by_its_target() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("private/redstream");
        std::fs::create_dir_all(&real).unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = tmp.path().join("redstream");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        // As systemd's CacheDirectory= under DynamicUser= lays it out.
        assert_eq!(private_dir(&link), Ok(()));
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = private_dir(&link).unwrap_err();
        assert!(err.contains("others may write"), "{err}");
        let file = tmp.path().join("file");
        std::fs::write(&file, "").unwrap();
        std::os::unix::fs::symlink(&file, tmp.path().join("to-file")).unwrap();
        let err = private_dir(&tmp.path().join("to-file")).unwrap_err();
        assert!(err.contains("not a directory"), "{err}");
    }
}
