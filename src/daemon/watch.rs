//! `wasm.watch`: a reload when a handler's component file, the config file or a drop-in changes.
//!
//! Owns the inotify watches (through the `notify` crate) and the quiet period. The directories holding
//! the watched files are watched, not the files, so a file replaced by rename (`mv new.wasm x.wasm`,
//! what build tools and package managers do) is seen like one written in place. A change starts a
//! quiet period: the reload is asked for once nothing has changed for [`QUIET`], so a file still being
//! copied is not compiled half-written. The reload itself is the daemon's, exactly as on SIGHUP.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::Settings;
use crate::shutdown::Shutdown;

/// How long nothing may change before a reload is asked for.
pub const QUIET: Duration = Duration::from_millis(300);

/// What is watched: files by path, and the drop-in directory (any `*.toml` in it, new ones included).
#[derive(Debug, Default, PartialEq, Eq)]
struct Targets {
    files: HashSet<PathBuf>,
    dropin_dir: Option<PathBuf>,
}

impl Targets {
    fn of(settings: &Settings) -> Targets {
        let mut files: HashSet<PathBuf> =
            settings.handlers.iter().map(|h| h.file.clone()).collect();
        files.extend(settings.file.clone());
        files.extend(settings.dropins.iter().cloned());
        Targets {
            files,
            dropin_dir: settings.file.as_deref().map(crate::config::dropin_dir),
        }
    }

    fn wants(&self, path: &Path) -> bool {
        // The drop-in directory itself too: one created after start is watched from the reload on.
        self.files.contains(path)
            || self.dropin_dir.as_deref().is_some_and(|d| {
                path == d
                    || (path.parent() == Some(d) && path.extension().is_some_and(|e| e == "toml"))
            })
    }

    fn dirs(&self) -> HashSet<PathBuf> {
        let mut dirs: HashSet<PathBuf> = self
            .files
            .iter()
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .collect();
        dirs.extend(self.dropin_dir.clone().filter(|d| d.is_dir()));
        dirs
    }
}

/// The live watches. Dropping it stops them.
pub struct Watch {
    watcher: notify::RecommendedWatcher,
    /// Where changes go (also the ones found by looking, see [`Watch::update`]).
    changed: mpsc::UnboundedSender<PathBuf>,
    targets: Arc<Mutex<Targets>>,
    dirs: HashSet<PathBuf>,
}

impl Watch {
    /// Watches what `settings` names; changes go to `changed`, one path per event.
    pub fn start(
        settings: &Settings,
        changed: mpsc::UnboundedSender<PathBuf>,
    ) -> notify::Result<Watch> {
        let targets = Arc::new(Mutex::new(Targets::default()));
        let seen = targets.clone();
        let found = changed.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if matches!(event.kind, EventKind::Access(_)) {
                return;
            }
            let targets = seen.lock().unwrap_or_else(|p| p.into_inner());
            for path in event.paths.iter().filter(|p| targets.wants(p)) {
                let _ = changed.send(path.clone());
            }
        })?;
        let mut watch = Watch {
            watcher,
            changed: found,
            targets,
            dirs: HashSet::new(),
        };
        watch.update(settings);
        Ok(watch)
    }

    /// Follows a refused reload: the component files its config named are watched too (until the next
    /// reload that applies), so that one arriving after the config that names it — a `.wasm` copied in
    /// after its drop-in — or one rebuilt after it failed to compile, reloads again.
    pub fn also(&mut self, files: &[PathBuf]) {
        let dirs = {
            let mut t = self.targets.lock().unwrap_or_else(|p| p.into_inner());
            t.files.extend(files.iter().cloned());
            t.dirs()
        };
        self.watch_dirs(dirs);
    }

    /// Follows a reloaded config: new handler files are watched, dropped ones no longer.
    pub fn update(&mut self, settings: &Settings) {
        let targets = Targets::of(settings);
        self.watch_dirs(targets.dirs());
        // A drop-in written after the config was read but before its directory was watched raised
        // no event: look, and reload again if the directory holds other drop-ins than were read.
        if let (Some(file), Some(dir)) = (settings.file.as_deref(), &targets.dropin_dir)
            && crate::config::dropins_of(file).is_ok_and(|now| now != settings.dropins)
        {
            let _ = self.changed.send(dir.clone());
        }
        *self.targets.lock().unwrap_or_else(|p| p.into_inner()) = targets;
    }

    fn watch_dirs(&mut self, dirs: HashSet<PathBuf>) {
        for gone in self.dirs.difference(&dirs) {
            let _ = self.watcher.unwatch(gone);
        }
        for dir in dirs.difference(&self.dirs) {
            if let Err(e) = self.watcher.watch(dir, RecursiveMode::NonRecursive) {
                warn!(dir = %dir.display(), error = %e, "wasm.watch: cannot watch this directory; changes in it need a reload (SIGHUP)");
            }
        }
        self.dirs = dirs;
    }
}

/// Turns changes into reload requests, one per quiet period, until `stop`.
pub async fn debounce(
    mut changed: mpsc::UnboundedReceiver<PathBuf>,
    reload: mpsc::UnboundedSender<super::control::Command>,
    mut stop: Shutdown,
) {
    loop {
        let first = tokio::select! {
            p = changed.recv() => match p { Some(p) => p, None => return },
            _ = stop.wait() => return,
        };
        let mut paths = vec![first];
        loop {
            tokio::select! {
                p = changed.recv() => match p {
                    Some(p) => if !paths.contains(&p) { paths.push(p) },
                    None => return,
                },
                _ = tokio::time::sleep(QUIET) => break,
                _ = stop.wait() => return,
            }
        }
        let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        info!(changed = ?shown, "wasm.watch: files changed; reloading");
        if reload.send(super::control::Command::Reload).is_err() {
            return;
        }
    }
}
