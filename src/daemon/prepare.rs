//! Everything a config needs built before anything runs: every WASM handler compiled and pre-linked,
//! and one router per consumer.
//!
//! Owns the step from validated settings to runnable parts ([`prepare`]); a handler that does not
//! compile or link is a config error naming its key path. Used at start, by `check`, and by reload
//! (which keeps the wasmtime engine and compiles the new set off the async runtime).

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{ConfigError, Problem, Settings};
use crate::engine::router::{Action, Route, RouteSpec, Router, Target};
use crate::engine::settings::HandlerSpec;
use crate::handlers::builtin;
use crate::handlers::wasm::{Runtime, WasmHandler};
use crate::model::message::Handler;

/// What the config needs built before anything runs: the WASM runtime with every handler compiled and
/// pre-linked, and one router per consumer.
pub struct Prepared {
    /// Kept alive for as long as handlers run (it drives their deadlines); reused across reloads.
    pub runtime: Option<Arc<Runtime>>,
    pub handlers: HashMap<String, WasmHandler>,
    /// One per `settings.consumers` entry, in order.
    pub routers: Vec<Arc<Router>>,
}

/// Where the daemon's handlers read their state: Redis, through the daemon's client, waited for on the
/// handler's worker thread within what is left of the call's time.
pub struct RedisState {
    client: crate::client::Client,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for RedisState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisState")
    }
}

impl crate::model::message::StateReader for RedisState {
    fn get(&self, key: &str, within: std::time::Duration) -> Result<Option<Vec<u8>>, String> {
        self.runtime.block_on(read_state(&self.client, key, within))
    }

    fn get_owned(
        &self,
        key: String,
        within: std::time::Duration,
    ) -> crate::model::message::BoxFuture<'static, Result<Option<Vec<u8>>, String>> {
        let client = self.client.clone();
        Box::pin(async move { read_state(&client, &key, within).await })
    }
}

async fn read_state(
    client: &crate::client::Client,
    key: &str,
    within: std::time::Duration,
) -> Result<Option<Vec<u8>>, String> {
    match tokio::time::timeout(within, client.state_get(key)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(format!("cannot read {key}: {e}")),
        Err(_) => Err(format!(
            "no answer from Redis for {key} within the call's time"
        )),
    }
}

impl Prepared {
    /// Lets its handlers read their state through `client` (called on the daemon's runtime).
    pub fn read_state_with(&self, client: &crate::client::Client) {
        if let Some(rt) = &self.runtime {
            rt.read_state_with(Arc::new(RedisState {
                client: client.clone(),
                runtime: tokio::runtime::Handle::current(),
            }));
        }
    }
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
        // A component that does not compile may be replaced by one that does.
        named: settings.handlers.iter().map(|h| h.file.clone()).collect(),
    };
    let mut handlers = HashMap::new();
    let runtime = if settings.handlers.is_empty() {
        runtime
    } else {
        let rt = match runtime {
            Some(rt) if rt.serves(&settings.wasm) => rt,
            _ => Arc::new(
                Runtime::new(&settings.wasm, settings.naming.clone())
                    .map_err(|m| fail("wasm".into(), m))?,
            ),
        };
        for (i, spec) in settings.handlers.iter().enumerate() {
            let h = rt
                .load(spec)
                .map_err(|m| fail(format!("handlers[{i}].file"), m))?;
            crate::metrics::global().handler_loaded(&spec.name);
            handlers.insert(spec.name.clone(), h);
        }
        Some(rt)
    };
    let resolve = |r: &RouteSpec| Route {
        stream: r.stream.clone(),
        when: r.when.clone(),
        target: match &r.action {
            #[cfg(feature = "fault-injection")]
            Action::Handler(name) if !handlers.contains_key(name) => Target::Handler {
                handler: build(
                    &HandlerSpec::Faults(crate::engine::FaultSpec {
                        name: name.clone(),
                        ..Default::default()
                    }),
                    &handlers,
                    settings,
                ),
                require_sender_token: false,
            },
            Action::Handler(name) => Target::Handler {
                handler: Arc::new(handlers[name].clone()),
                require_sender_token: handlers[name].require_sender_token,
            },
            Action::Forward(to) => Target::Handler {
                handler: Arc::new(builtin::Forward { to: to.clone() }),
                require_sender_token: false,
            },
            Action::Drop => Target::Drop,
        },
    };
    let routers = settings
        .consumers
        .iter()
        .map(|c| {
            Arc::new(match &c.handler {
                Some(spec) => {
                    let require =
                        matches!(spec, HandlerSpec::Wasm(n) if handlers[n].require_sender_token);
                    Router::single(build(spec, &handlers, settings), require)
                }
                None => {
                    let routes: Vec<Route> = c.routes.iter().map(resolve).collect();
                    Router::new(&c.stream, &routes, c.unmatched)
                }
            })
        })
        .collect();
    Ok(Prepared {
        runtime,
        handlers,
        routers,
    })
}

/// The handler of `spec`, with WASM handlers taken from `wasm` (validation made sure the name is there)
/// and a named faults handler's options from `settings`.
fn build(
    spec: &HandlerSpec,
    wasm: &HashMap<String, WasmHandler>,
    settings: &Settings,
) -> Arc<dyn Handler> {
    #[cfg(not(feature = "fault-injection"))]
    let _ = settings;
    match spec {
        HandlerSpec::Drop => Arc::new(builtin::Drop),
        HandlerSpec::Forward { to } => Arc::new(builtin::Forward { to: to.clone() }),
        HandlerSpec::Wasm(name) => Arc::new(wasm[name].clone()),
        #[cfg(feature = "fault-injection")]
        HandlerSpec::Faults(f) => {
            let named = settings
                .faults
                .iter()
                .find(|(n, _)| !f.name.is_empty() && *n == f.name);
            let f = named.map_or(f, |(_, spec)| spec);
            Arc::new(builtin::Faults {
                name: if f.name.is_empty() {
                    "faults".into()
                } else {
                    f.name.clone()
                },
                reply_to: f.reply_to.clone(),
                fail_field: f.fail_field.clone(),
                fail_deliveries: f.fail_deliveries,
                fail_every: f.fail_every,
                sleep: f.sleep,
                fail_while_file: f.fail_while_file.clone(),
                calls: Default::default(),
            })
        }
    }
}

/// What a reload changes, for its log line: handlers by name (a handler whose settings or component
/// file changed is "changed"), and the consumers (`stream/group`) whose route table or handler did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub handlers_added: Vec<String>,
    pub handlers_changed: Vec<String>,
    pub handlers_removed: Vec<String>,
    pub routes_changed: Vec<String>,
}

impl Changes {
    pub fn between(old: (&Settings, &Prepared), new: (&Settings, &Prepared)) -> Changes {
        let (old_settings, old_prepared) = old;
        let (new_settings, new_prepared) = new;
        let mut out = Changes::default();
        for spec in &new_settings.handlers {
            match old_settings.handlers.iter().find(|o| o.name == spec.name) {
                None => out.handlers_added.push(spec.name.clone()),
                Some(o) => {
                    let digest = |p: &Prepared| p.handlers.get(&spec.name).map(|h| h.digest);
                    if o != spec || digest(old_prepared) != digest(new_prepared) {
                        out.handlers_changed.push(spec.name.clone());
                    }
                }
            }
        }
        for o in &old_settings.handlers {
            if !new_settings.handlers.iter().any(|n| n.name == o.name) {
                out.handlers_removed.push(o.name.clone());
            }
        }
        for c in &new_settings.consumers {
            let before = old_settings
                .consumers
                .iter()
                .find(|o| o.stream == c.stream && o.group == c.group);
            if before.is_none_or(|o| o.routes != c.routes || o.handler != c.handler) {
                out.routes_changed.push(format!("{}/{}", c.stream, c.group));
            }
        }
        out
    }
}
