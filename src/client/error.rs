//! The error type of the authorized client, typed where callers branch.
//!
//! Owns the classification of everything that can go wrong between a caller and Redis: bad names,
//! refused identities, missing permissions, and the Redis failures a consumer loop must tell apart
//! (transient connection trouble, a missing group, a server-side ACL denial). Config errors live in
//! [`crate::config`]; exit codes in [`crate::cli`].

use std::time::Duration;

use crate::auth::apikey::InvalidApiKey;
use crate::auth::jwt::TokenError;
use crate::auth::{Denied, Op, Role};
use crate::model::naming::{InvalidName, InvalidStreamName};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    InvalidStreamName(#[from] InvalidStreamName),

    #[error(transparent)]
    InvalidName(#[from] InvalidName),

    #[error("invalid token: {0}")]
    InvalidToken(#[from] TokenError),

    #[error(transparent)]
    InvalidApiKey(#[from] InvalidApiKey),

    /// RedStream's own check refused the operation before it reached Redis.
    #[error("{identity} may not {op} on {stream:?}: that needs role {needed} or admin")]
    Unauthorized {
        op: Op,
        stream: String,
        identity: String,
        needed: Role,
    },

    /// The connection cannot be set up as configured: a malformed URL (shown redacted), or TLS material
    /// that does not fit together. Not worth retrying.
    #[error("{0}")]
    InvalidConnection(String),

    /// An operator asked for something that is not there (e.g. a dead letter by an unknown id), or that
    /// is not what the command needs.
    #[error("{what} {key:?}: {detail}")]
    NotFound {
        what: &'static str,
        key: String,
        detail: String,
    },

    /// An operation that must be atomic over keys a Redis Cluster keeps in different slots.
    #[error(
        "{command} needs {a:?} and {b:?} in one hash slot on a Redis Cluster (they are in {slot_a} and {slot_b}): give their entity a hash tag, e.g. nova:task:{{entity}}:name"
    )]
    CrossSlot {
        command: &'static str,
        a: String,
        b: String,
        slot_a: u16,
        slot_b: u16,
    },

    /// A task of the client's caller ended without an answer (it panicked or was cancelled).
    #[error("{command} on {key:?}: the task running it ended early: {detail}")]
    Aborted {
        command: &'static str,
        key: String,
        detail: String,
    },

    /// Redis could not be reached, or the connection broke.
    #[error("redis at {addr} is unavailable during {command}: {source}")]
    Connection {
        addr: String,
        command: &'static str,
        source: redis::RedisError,
    },

    /// Redis did not answer within the command timeout (a stopped or overloaded server).
    #[error("{command} on {key:?} timed out after {after:?}")]
    Timeout {
        command: &'static str,
        key: String,
        after: Duration,
    },

    /// Redis refused the configured user or password: a config problem, not worth retrying.
    #[error(
        "redis at {addr} refused the credentials of user {user}: {detail} (check redis.username and redis.password)"
    )]
    RedisAuth {
        addr: String,
        user: String,
        detail: String,
    },

    /// Redis's own ACL refused the command (NOPERM): the Redis user lacks a key or command permission.
    #[error(
        "redis refused {command} on {key:?} for redis user {user}: {detail} \
         (the ACL of that user does not cover this key or command)"
    )]
    RedisDenied {
        command: &'static str,
        key: String,
        user: String,
        detail: String,
    },

    /// The consumer group does not exist (deleted, or the server lost its data).
    #[error("consumer group {group:?} does not exist on stream {stream:?}")]
    NoGroup { stream: String, group: String },

    /// Any other error Redis returned.
    #[error("{command} on {key:?} failed: {source}")]
    Redis {
        command: &'static str,
        key: String,
        source: redis::RedisError,
    },

    /// Redis answered with a shape we do not understand.
    #[error("unexpected reply to {command} on {key:?}: {detail}")]
    Protocol {
        command: &'static str,
        key: String,
        detail: String,
    },
}

impl Error {
    /// A short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidStreamName(_) | Error::InvalidName(_) => "invalid_name",
            Error::InvalidToken(_) | Error::InvalidApiKey(_) => "unauthenticated",
            Error::Unauthorized { .. } => "unauthorized",
            Error::InvalidConnection(_) => "config",
            Error::NotFound { .. } => "not_found",
            Error::Aborted { .. } => "aborted",
            Error::CrossSlot { .. } => "cross_slot",
            Error::Connection { .. } => "connection",
            Error::Timeout { .. } => "timeout",
            Error::RedisAuth { .. } => "redis_auth",
            Error::RedisDenied { .. } => "redis_denied",
            Error::NoGroup { .. } => "no_group",
            Error::Redis { .. } => "redis",
            Error::Protocol { .. } => "protocol",
        }
    }

    /// Whether retrying later may succeed without anyone changing anything: the connection or server
    /// trouble a loop backs off from, as opposed to a permission or naming problem.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Connection { .. } | Error::Timeout { .. } | Error::NoGroup { .. }
        ) || matches!(self, Error::Redis { source, .. } if source.is_unrecoverable_error()
            || source.code() == Some("LOADING")
            || source.code() == Some("BUSY")
            || source.code() == Some("MASTERDOWN")
            // A cluster failing over, resharding or not yet agreed: the slot map settles.
            || matches!(source.code(), Some("CLUSTERDOWN" | "TRYAGAIN" | "MOVED" | "ASK"))
            || source.kind() == redis::ErrorKind::ClusterConnectionNotFound
            // Out of memory under `noeviction`: nothing was written, and memory comes back.
            || source.code() == Some("OOM"))
    }
}

impl Error {
    /// Redis cannot be reached or cannot serve now (connection lost or refused, no answer in time, a
    /// server loading, busy or without its cluster): an outage, as opposed to an answer.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Error::Connection { .. } | Error::Timeout { .. })
            || matches!(self, Error::Redis { source, .. } if source.is_unrecoverable_error()
                || matches!(source.code(), Some("LOADING" | "BUSY" | "MASTERDOWN" | "CLUSTERDOWN")))
    }

    /// Redis's answer to XINFO (and other commands that need it) for a key that does not exist.
    pub fn is_missing_key(&self) -> bool {
        matches!(self, Error::Redis { source, .. } if source.detail() == Some("no such key"))
    }

    /// Errors about this connection's rights, which no retry and no other batch can fix: the loop
    /// stops and says so.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Error::Unauthorized { .. } | Error::InvalidStreamName(_)
        ) || matches!(self, Error::Redis { source, .. }
                if matches!(source.code(), Some("NOPERM" | "NOAUTH" | "WRONGPASS")))
    }
}

impl From<Denied> for Error {
    fn from(d: Denied) -> Self {
        match d {
            Denied::InvalidStream(e) => Error::InvalidStreamName(e),
            Denied::Unauthorized {
                op,
                stream,
                identity,
                needed,
            } => Error::Unauthorized {
                op,
                stream,
                identity,
                needed,
            },
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
