//! Hot reload: SIGHUP (or a control message, or `wasm.watch`) re-reads and validates the config and
//! recompiles handlers off the runtime; then every unchanged consumer's routes are swapped atomically
//! (messages in flight finish on the old handlers), removed or changed consumers are stopped after
//! they drain (a changed one's successor starts then: never two loops on one PEL), and new ones
//! start. An invalid config is refused and the running one stays.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tracing::{error, info, warn};

use super::loops::{Daemon, Key, key};
use super::prepare::{Changes, Prepared, prepare_with};
use crate::config::{self, ConfigError, Settings};
use crate::engine::ConsumerSettings;
use crate::engine::router::Router;

/// A config being read and prepared on a blocking thread.
pub type Reading = tokio::task::JoinHandle<Result<(Settings, Prepared), Refused>>;

/// Why a reload's config was not applied, and the component files it named.
pub struct Refused {
    message: String,
    named: Vec<PathBuf>,
}

impl From<ConfigError> for Refused {
    fn from(e: ConfigError) -> Self {
        Refused {
            message: e.to_string(),
            named: e.named,
        }
    }
}

/// The health condition of a reload that changed what only a restart applies.
const RESTART_NEEDED: &str = "restart needed";

impl Daemon {
    /// A config read for a reload came back: applied, or refused with the running one staying.
    pub(super) async fn reloaded(
        &mut self,
        read: Result<Result<(Settings, Prepared), Refused>, tokio::task::JoinError>,
    ) {
        match read {
            Ok(Ok((new, prepared))) => self.reload(new, prepared).await,
            Ok(Err(refused)) => {
                error!(error = %refused.message, "reload refused: the running config stays");
                // A file it named that is missing or broken now may arrive or be fixed: try again then.
                if let Some(watch) = &mut self.watch
                    && !refused.named.is_empty()
                {
                    let files: Vec<String> = (refused.named.iter())
                        .map(|f| f.display().to_string())
                        .collect();
                    info!(
                        ?files,
                        "wasm.watch: reloading again when one of these files appears or changes"
                    );
                    watch.also(&refused.named);
                }
            }
            Err(e) => error!(error = %e, "reload failed; this is a bug: the running config stays"),
        }
    }

    /// Starts reading and compiling the config on a blocking thread (it reads files and compiles
    /// WASM: milliseconds to seconds), so signals and watchdog pings keep being served meanwhile.
    pub(super) fn begin_reload(&self) -> Reading {
        let path = self.settings.file.clone();
        let runtime = self.prepared.runtime.clone();
        tokio::task::spawn_blocking(move || {
            let new = config::load(path.as_deref())?;
            if new.consumers.is_empty() {
                return Err(Refused {
                    message: "the new config has no [[consumers]]".into(),
                    named: Vec::new(),
                });
            }
            let prepared = prepare_with(&new, runtime)?;
            Ok((new, prepared))
        })
    }

    /// Applies a config that [`Daemon::begin_reload`] read and prepared.
    async fn reload(&mut self, new: Settings, prepared: Prepared) {
        // A new runtime's handlers read their state as the old ones did, before any message reaches them.
        prepared.read_state_with(&self.client);
        self.note_restart_needed(&new);
        let wanted: HashMap<Key, (ConsumerSettings, Arc<Router>)> = new
            .consumers
            .iter()
            .cloned()
            .zip(prepared.routers.iter().cloned())
            .map(|(c, r)| (key(&c), (c, r)))
            .collect();
        let changes = Changes::between((&self.settings, &self.prepared), (&new, &prepared));
        self.guards.configure(&new.guards);
        for w in &new.warnings {
            warn!(key = %w.path, "config: {}", w.message);
        }
        let (mut swapped, mut restarted, mut stopped, mut started) = (0, 0, 0, 0);
        for (k, run) in self.running.iter_mut() {
            match wanted.get(k) {
                // Same consumer: swap its routes and handlers; messages in flight keep theirs.
                Some((cfg, router)) if cfg.same_loop(&run.cfg) => {
                    run.router.store(router.clone());
                    run.cfg = cfg.clone();
                    swapped += 1;
                }
                // Changed settings: drain it, then start its successor (never two loops on one PEL).
                Some((cfg, router)) => {
                    run.trigger.trigger();
                    self.waiting
                        .insert(k.clone(), (cfg.clone(), router.clone()));
                    restarted += 1;
                }
                None => {
                    run.trigger.trigger();
                    stopped += 1;
                }
            }
        }
        for (k, (cfg, router)) in wanted {
            if !self.running.contains_key(&k) {
                match self.start(cfg, router, None).await {
                    Ok(()) => started += 1,
                    Err(e) => error!(error = %e, "cannot start a consumer added by the reload"),
                }
            }
        }
        // The new runtime if the reload needed one (the old one lives on in handlers still finishing).
        let runtime = prepared.runtime.clone().or(self.prepared.runtime.clone());
        self.prepared = Prepared {
            runtime,
            ..prepared
        };
        // The running connections and identity stay what they were made with until a restart.
        let (file, redis, identity) = (
            self.settings.file.clone(),
            self.settings.redis.clone(),
            self.settings.identity.clone(),
        );
        self.settings = Settings {
            file,
            redis,
            identity,
            ..new
        };
        self.polled.send_replace(self.settings.consumers.clone());
        self.rewatch();
        // Said once everything is in place, the watches included.
        let Changes {
            handlers_added,
            handlers_changed,
            handlers_removed,
            routes_changed,
        } = &changes;
        info!(
            ?handlers_added,
            ?handlers_changed,
            ?handlers_removed,
            ?routes_changed,
            swapped,
            restarted,
            stopped,
            started,
            "reloaded the config"
        );
    }

    /// `[redis]` and `[identity]` cannot change under a running daemon: when the reloaded file's
    /// differ from the running ones, the daemon says "restart needed: <keys>" (warning, degraded
    /// reason in status and heartbeat, `redstream_restart_needed`) until a restart — or a reload of a
    /// file that matches again.
    fn note_restart_needed(&self, new: &Settings) {
        let mut keys = self.settings.redis.differing_keys(&new.redis);
        if new.identity.as_ref().map(|i| &i.identity)
            != self.settings.identity.as_ref().map(|i| &i.identity)
        {
            keys.push("identity");
        }
        crate::metrics::global()
            .restart_needed
            .set(i64::from(!keys.is_empty()));
        if keys.is_empty() {
            self.health.recover(RESTART_NEEDED);
            return;
        }
        let keys = keys.join(", ");
        warn!(keys = %keys, "the reloaded config changes settings a running daemon cannot apply; they take effect at the next restart");
        self.health
            .degrade(RESTART_NEEDED, format!("restart needed: {keys}"));
    }

    /// Starts, follows or stops the `wasm.watch` watches to match the settings.
    pub(super) fn rewatch(&mut self) {
        if !self.settings.watch {
            self.watch = None;
            return;
        }
        match &mut self.watch {
            Some(w) => w.update(&self.settings),
            None => match super::watch::Watch::start(&self.settings, self.watch_tx.clone()) {
                Ok(w) => {
                    info!(
                        "wasm.watch: reloading when a handler file, the config or a drop-in changes"
                    );
                    self.watch = Some(w);
                }
                Err(e) => {
                    warn!(error = %e, "wasm.watch: cannot watch files; reload with SIGHUP instead")
                }
            },
        }
    }
}
