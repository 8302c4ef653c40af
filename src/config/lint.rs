//! Warnings: what a valid config allows but its author almost certainly did not mean. `check` prints
//! them, `run` and every reload log them; none stops the daemon.
//!
//! - a route that can never match, because an earlier route of the same table matches everything it
//!   would (routes are tried in order, the first match wins);
//! - a consumer whose every message goes to handlers another group on the same stream also runs, so
//!   each message is handled twice (the usual cause: two consumers sharing the top-level `[[routes]]`);
//! - a handler `config` value that names a stream the handler's roles do not let it publish to.

use super::checker::Checker;
use crate::auth::{Identity, Op};
use crate::engine::ConsumerSettings;
use crate::engine::HandlerSpec;
use crate::engine::router::{Action, RouteSpec};
use crate::handlers::wasm::WasmSpec;
use crate::model::naming::Naming;

/// Records every warning about an otherwise valid config.
pub(super) fn lint(
    c: &mut Checker<'_>,
    naming: &Naming,
    handlers: &[WasmSpec],
    routes: &[RouteSpec],
    consumers: &[ConsumerSettings],
    own_routes: &[bool],
) {
    // The top-level table, wherever its streams are consumed.
    let indexed: Vec<(String, &RouteSpec)> = routes
        .iter()
        .enumerate()
        .map(|(i, r)| (format!("routes[{i}]"), r))
        .collect();
    let mut shadowed = shadowed_routes(&indexed, None);
    for (k, cfg) in consumers.iter().enumerate() {
        if cfg.handler.is_some() {
            continue;
        }
        if own_routes.get(k).copied().unwrap_or(false) {
            let table: Vec<(String, &RouteSpec)> = cfg
                .routes
                .iter()
                .enumerate()
                .map(|(j, r)| (format!("consumers[{k}].routes[{j}]"), r))
                .collect();
            shadowed.extend(shadowed_routes(&table, Some((k, &cfg.stream))));
        } else {
            // Top-level routes filtered to this stream: a wildcard route may shadow an exact one here.
            let table: Vec<(String, &RouteSpec)> = indexed
                .iter()
                .filter(|(_, r)| r.stream.matches(&cfg.stream))
                .map(|(p, r)| (p.clone(), *r))
                .collect();
            for w in shadowed_routes(&table, Some((k, &cfg.stream))) {
                if !shadowed.iter().any(|(p, _)| *p == w.0) {
                    shadowed.push(w);
                }
            }
        }
    }
    for (path, message) in shadowed {
        c.warn(&path, message);
    }
    shared_handlers(c, consumers, own_routes);
    config_streams(c, naming, handlers);
}

/// Routes of one table that an earlier route leaves nothing to match. With `consumer`, every route of
/// the table matches that consumer's stream (its own routes, or the top-level ones filtered to it).
fn shadowed_routes(
    table: &[(String, &RouteSpec)],
    consumer: Option<(usize, &str)>,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (j, (later_path, later)) in table.iter().enumerate() {
        let Some((first_path, first)) = table[..j].iter().find(|(_, first)| {
            let stream_covered = consumer.is_some() || first.stream.covers(&later.stream);
            stream_covered && first.when.implied_by(&later.when)
        }) else {
            continue;
        };
        let scope = match consumer {
            Some((k, stream)) => format!(" for consumers[{k}] (stream {stream})"),
            None => String::new(),
        };
        out.push((
            later_path.clone(),
            format!(
                "can never match{scope}: {first_path} ({}, {}) comes first and matches every message \
                 this route would, so {} never runs here; put the narrower route first",
                first.stream, first.action, later.action
            ),
        ));
    }
    out
}

/// The WASM handlers a consumer's routes (or its one handler) run, one entry per route that can match.
fn reachable(cfg: &ConsumerSettings) -> Vec<&str> {
    match &cfg.handler {
        Some(HandlerSpec::Wasm(name)) => vec![name.as_str()],
        Some(_) => Vec::new(),
        None => live_routes(cfg)
            .filter_map(|r| match &r.action {
                Action::Handler(name) => Some(name.as_str()),
                _ => None,
            })
            .collect(),
    }
}

/// The routes of a consumer's table that can match: those no earlier route shadows (every route of
/// the table matches the consumer's stream, so only the field conditions decide).
fn live_routes(cfg: &ConsumerSettings) -> impl Iterator<Item = &RouteSpec> {
    let table = &cfg.routes;
    table
        .iter()
        .enumerate()
        .filter(|(j, r)| !table[..*j].iter().any(|f| f.when.implied_by(&r.when)))
        .map(|(_, r)| r)
}

/// Consumers whose every route runs a handler that another group of the same stream runs as well.
fn shared_handlers(c: &mut Checker<'_>, consumers: &[ConsumerSettings], own_routes: &[bool]) {
    for (k, cfg) in consumers.iter().enumerate() {
        if cfg.handler.is_some() || cfg.routes.is_empty() {
            continue;
        }
        let mine = reachable(cfg);
        if mine.len() != live_routes(cfg).count() {
            continue; // some messages are forwarded or dropped: not the same work
        }
        let shares_top_level = !own_routes.get(k).copied().unwrap_or(false);
        let other = consumers.iter().enumerate().find(|(m, o)| {
            *m != k
                && o.stream == cfg.stream
                && o.group != cfg.group
                // Two consumers on the same top-level routes: warn once, at the later one.
                && !(shares_top_level && o.handler.is_none() && o.routes == cfg.routes && *m > k)
                && {
                    let theirs = reachable(o);
                    mine.iter().all(|h| theirs.contains(h))
                }
        });
        if let Some((m, o)) = other {
            let mut names = mine.clone();
            names.sort_unstable();
            names.dedup();
            c.warn(
                &format!("consumers[{k}]"),
                format!(
                    "every message of {} goes to {}, which consumers[{m}] (group {}) runs on the same \
                     stream: each message is handled twice, once per group; give this consumer its \
                     own handler = NAME or [[consumers.routes]]",
                    cfg.stream,
                    names.join(", "),
                    o.group
                ),
            );
        }
    }
}

/// Handler config values that are stream names the handler may not publish to.
fn config_streams(c: &mut Checker<'_>, naming: &Naming, handlers: &[WasmSpec]) {
    for (i, h) in handlers.iter().enumerate() {
        let id = Identity {
            subject: format!("handler {}", h.name),
            roles: h.roles.clone(),
        };
        for (key, value) in &h.config {
            if naming.parse(value).is_err() {
                continue; // not a stream name
            }
            if let Err(e) = crate::auth::authorize(naming, &id, Op::Publish, value) {
                c.warn(
                    &format!("handlers[{i}].config.{key}"),
                    format!(
                        "names stream {value}, which this handler's roles ({}) do not let it publish \
                         to: a publish there will be denied ({e}); add the role to handlers[{i}].roles",
                        h.roles
                    ),
                );
            }
        }
    }
}
