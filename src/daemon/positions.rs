//! Where each consumer group stood, kept on disk across restarts (docs/design.md, "When Redis forgets").
//!
//! A loop that finds its group gone re-creates it where nothing is skipped, judging the stream against
//! the position it last knew ([`crate::client::restore`]). A daemon that starts afresh knew nothing:
//! had Redis lost its data while the daemon was down (or just before it restarted) and a producer
//! written again, the new process would create the group at its configured `start` — `$` skips every
//! message published since Redis came back. So the daemon writes each group's position to a small file
//! every second, and a new process starts each loop with the position the file has for it, as a
//! reload's successor starts with its predecessor's.
//!
//! The file lives in systemd's `$STATE_DIRECTORY` (the units set `StateDirectory=redstream`), else
//! `$XDG_STATE_HOME/redstream` or `~/.local/state/redstream`; one per Redis target and daemon identity
//! (`positions-<hash>`), lines of `stream<TAB>group<TAB>id`, replaced whole by a rename. A missing or
//! unreadable file only means the old behaviour: groups that exist are unaffected either way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::model::StreamId;
use crate::shutdown::Shutdown;

/// A group: its stream and name.
pub type Group = (String, String);

/// The positions file of one daemon against one Redis.
#[derive(Clone, Debug)]
pub struct Positions {
    path: Option<PathBuf>,
}

impl Positions {
    /// The file for this Redis target (`redis.url`, or the cluster seeds) and daemon identity.
    pub fn new(redis_target: &str, server_id: &str) -> Positions {
        let digest = Sha256::digest(format!("{redis_target}\n{server_id}").as_bytes());
        let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Positions {
            path: state_dir().map(|d| d.join(format!("positions-{name}"))),
        }
    }

    /// Where the file is (None: nowhere to keep it).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// What the file holds; empty when it does not exist or cannot be read.
    pub fn load(&self) -> HashMap<Group, StreamId> {
        let Some(path) = &self.path else {
            return HashMap::new();
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return HashMap::new(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the groups' last positions; groups Redis lost are re-created at their configured start");
                return HashMap::new();
            }
        };
        text.lines()
            .filter_map(|line| {
                let mut parts = line.split('\t');
                let (stream, group, id) = (parts.next()?, parts.next()?, parts.next()?);
                let id = StreamId::parse(id).ok()?;
                Some(((stream.to_owned(), group.to_owned()), id))
            })
            .collect()
    }

    /// Replaces the file with `positions` (written beside it, then renamed over it).
    pub fn save(&self, positions: &[(Group, StreamId)]) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let text: String = positions
            .iter()
            .map(|((stream, group), id)| format!("{stream}\t{group}\t{id}\n"))
            .collect();
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    }

    /// Every second, writes what `positions` says when it changed, until `shutdown`; once more at the
    /// end.
    pub async fn keep(
        self,
        positions: impl Fn() -> Vec<(Group, StreamId)> + Send + 'static,
        mut shutdown: Shutdown,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut written: Vec<(Group, StreamId)> = Vec::new();
        let mut failed = false;
        loop {
            let stop = tokio::select! {
                _ = tick.tick() => false,
                _ = shutdown.wait() => true,
            };
            let mut now = positions();
            now.sort();
            if now != written {
                match self.save(&now) {
                    Ok(()) => {
                        written = now;
                        failed = false;
                    }
                    Err(e) if !failed => {
                        failed = true;
                        let path = self.path.as_deref().unwrap_or(Path::new("-"));
                        tracing::warn!(path = %path.display(), error = %e, "cannot write the groups' last positions");
                    }
                    Err(_) => {}
                }
            }
            if stop {
                return;
            }
        }
    }
}

/// systemd's `$STATE_DIRECTORY`, else `$XDG_STATE_HOME/redstream`, else `~/.local/state/redstream`.
fn state_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("STATE_DIRECTORY") {
        return std::env::split_paths(&d).next();
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("redstream"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state/redstream"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_survive_a_round_trip_and_a_broken_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let p = Positions {
            path: Some(dir.path().join("sub/positions-x")),
        };
        assert!(p.load().is_empty(), "no file yet");
        let a = (
            ("nova:task:a:b".to_owned(), "g".to_owned()),
            StreamId::parse("5-1").unwrap(),
        );
        let b = (
            ("nova:task:a:c".to_owned(), "h".to_owned()),
            StreamId::parse("7-0").unwrap(),
        );
        p.save(&[a.clone(), b.clone()]).unwrap();
        let mut text = std::fs::read_to_string(p.path().unwrap()).unwrap();
        text.push_str("garbage line\nnova:task:a:d\tg\tnot-an-id\n");
        std::fs::write(p.path().unwrap(), text).unwrap();
        let loaded = p.load();
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded[&a.0], a.1);
        assert_eq!(loaded[&b.0], b.1);
    }
}
