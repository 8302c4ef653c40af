//! The daemon: a supervisor running one consumer loop per configured group.
//!
//! Owns start-up (Redis reachable, groups created), the supervision of loops (a loop that fails is
//! logged loudly and restarted with capped backoff; one that panics likewise), and the stop sequence:
//! the first SIGTERM/SIGINT stops reading and drains in-flight messages within `drain_timeout`; a second
//! one exits at once, leaving unfinished entries pending for the next start. What a loop does is
//! [`consumer`]'s; what a message does is [`handler`]'s; how results reach Redis is [`commit`]'s.

pub mod commit;
pub mod consumer;
pub mod control;
mod daemon;
pub mod handler;
pub mod janitor;
pub mod router;

pub use daemon::{Command, run};

use std::sync::Arc;
use std::time::Duration;

use crate::config::{ConfigError, Problem, Settings};
use crate::error::Error;
use crate::wasm::{Runtime, WasmHandler};
use handler::Handler;
use router::{Action, Route, Router, Target};
use std::collections::HashMap;

/// One consumer group to consume, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct ConsumerSettings {
    pub stream: Arc<str>,
    pub group: String,
    /// Stable across restarts: derived from the daemon identity, host and instance unless configured.
    pub consumer: String,
    /// Where a newly created group starts: `$` (new entries only), `0` (the whole stream) or an id.
    pub start: String,
    pub batch_size: usize,
    pub block: Duration,
    pub claim_min_idle: Duration,
    pub claim_interval: Duration,
    pub max_deliveries: u32,
    pub dead_letter: String,
    pub in_flight: usize,
    pub order_by: Option<String>,
    /// The one handler of every message; None routes them with `[[routes]]`.
    pub handler: Option<HandlerSpec>,
    /// What to do with a message no route matches.
    pub unmatched: router::Unmatched,
    pub handler_timeout: Duration,
}

/// Which handler a consumer runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandlerSpec {
    Drop,
    Forward {
        to: String,
    },
    /// A `[[handlers]]` entry by name.
    Wasm(String),
    #[cfg(feature = "fault-injection")]
    Faults(FaultSpec),
}

/// Options of the `faults` test handler.
#[cfg(feature = "fault-injection")]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultSpec {
    pub reply_to: Option<String>,
    pub fail_field: Option<String>,
    pub fail_deliveries: u64,
    pub fail_every: u64,
    pub sleep: Duration,
}

impl std::fmt::Display for HandlerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandlerSpec::Drop => f.write_str("drop"),
            HandlerSpec::Forward { to } => write!(f, "forward to {to}"),
            HandlerSpec::Wasm(name) => write!(f, "handler {name}"),
            #[cfg(feature = "fault-injection")]
            HandlerSpec::Faults(_) => f.write_str("faults (test handler)"),
        }
    }
}

impl HandlerSpec {
    /// The handler, with WASM handlers taken from `wasm` (validation made sure the name is there).
    fn build(&self, wasm: &HashMap<String, WasmHandler>) -> Arc<dyn Handler> {
        match self {
            HandlerSpec::Drop => Arc::new(handler::Drop),
            HandlerSpec::Forward { to } => Arc::new(handler::Forward { to: to.clone() }),
            HandlerSpec::Wasm(name) => Arc::new(wasm[name].clone()),
            #[cfg(feature = "fault-injection")]
            HandlerSpec::Faults(f) => Arc::new(handler::Faults {
                reply_to: f.reply_to.clone(),
                fail_field: f.fail_field.clone(),
                fail_deliveries: f.fail_deliveries,
                fail_every: f.fail_every,
                sleep: f.sleep,
                calls: Default::default(),
            }),
        }
    }

    /// Streams this handler writes to, for the start-up permission check.
    pub fn writes(&self) -> Vec<&str> {
        match self {
            HandlerSpec::Drop => Vec::new(),
            HandlerSpec::Forward { to } => vec![to.as_str()],
            // A WASM handler's replies are checked against its roles when it publishes.
            HandlerSpec::Wasm(_) => Vec::new(),
            #[cfg(feature = "fault-injection")]
            HandlerSpec::Faults(f) => f.reply_to.iter().map(String::as_str).collect(),
        }
    }
}

/// Daemon-wide settings.
#[derive(Clone, Debug)]
pub struct DaemonSettings {
    /// Distinguishes several daemons on one host in default consumer names.
    pub instance: Option<String>,
    /// How long a stop may take to finish and commit messages in flight.
    pub drain_timeout: Duration,
}

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
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What the config needs built before anything runs: the WASM runtime with every handler compiled and
/// pre-linked, and one router per consumer.
pub struct Prepared {
    /// Kept alive for as long as handlers run (it drives their deadlines); reused across reloads.
    pub runtime: Option<Arc<Runtime>>,
    pub handlers: HashMap<String, WasmHandler>,
    /// One per `settings.consumers` entry, in order.
    pub routers: Vec<Arc<Router>>,
}

/// Compiles every handler and resolves every route. A handler that does not compile or link is a
/// config error naming its key path.
pub fn prepare(settings: &Settings) -> Result<Prepared, ConfigError> {
    prepare_with(settings, None)
}

/// Like [`prepare`], compiling handlers with `runtime` when one is given (a reload keeps the engine).
pub fn prepare_with(
    settings: &Settings,
    runtime: Option<Arc<Runtime>>,
) -> Result<Prepared, ConfigError> {
    let fail = |path: String, message: String| ConfigError {
        file: settings.file.clone(),
        problems: vec![Problem {
            path,
            message,
            origin: None,
        }],
    };
    let mut handlers = HashMap::new();
    let runtime = if settings.handlers.is_empty() {
        runtime
    } else {
        let rt = match runtime {
            Some(rt) => rt,
            None => Arc::new(
                Runtime::new(&settings.wasm, settings.naming.clone())
                    .map_err(|m| fail("wasm".into(), m))?,
            ),
        };
        for (i, spec) in settings.handlers.iter().enumerate() {
            let h = rt
                .load(spec)
                .map_err(|m| fail(format!("handlers[{i}].file"), m))?;
            handlers.insert(spec.name.clone(), h);
        }
        Some(rt)
    };
    let routes: Vec<Route> = settings
        .routes
        .iter()
        .map(|r| Route {
            stream: r.stream.clone(),
            when: r.when.clone(),
            target: match &r.action {
                Action::Handler(name) => Target::Handler {
                    handler: Arc::new(handlers[name].clone()),
                    require_sender_token: handlers[name].require_sender_token,
                },
                Action::Forward(to) => Target::Handler {
                    handler: Arc::new(handler::Forward { to: to.clone() }),
                    require_sender_token: false,
                },
                Action::Drop => Target::Drop,
            },
        })
        .collect();
    let routers = settings
        .consumers
        .iter()
        .map(|c| {
            Arc::new(match &c.handler {
                Some(spec) => {
                    let require =
                        matches!(spec, HandlerSpec::Wasm(n) if handlers[n].require_sender_token);
                    Router::single(spec.build(&handlers), require)
                }
                None => Router::new(&c.stream, &routes, c.unmatched),
            })
        })
        .collect();
    Ok(Prepared {
        runtime,
        handlers,
        routers,
    })
}
