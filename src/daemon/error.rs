//! How the running daemon ended ([`Stopped`]), or why it could not run ([`RunError`]).

use crate::client::Error;

/// How the daemon stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Every message in flight was finished and committed.
    Drained,
    /// `drain_timeout` passed first; unfinished entries stay pending.
    DrainTimedOut,
    /// A second stop signal: exited at once; unfinished entries stay pending.
    Forced,
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Redis did not answer within `redis.startup_wait`.
    #[error("redis unavailable at start: {0}")]
    Unavailable(Error),
    #[error("{0}")]
    Failed(Error),
    /// The metrics address could not be bound (taken, or not ours to bind).
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// The credential exchange's socket could not be bound.
    #[error("cannot serve the credential exchange at {path:?} (auth.endpoint): {source}")]
    Exchange {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
