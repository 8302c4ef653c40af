//! `[[consumers]]`: each entry's group, limits, dead-letter stream and handler, checked against the
//! daemon's identity and the handlers and routes declared beside it.

use std::time::Duration;

use super::checker::{Checker, fmt_d};
use super::raw::{Loose, RawConfig, RawConsumer};
use super::settings::{DaemonIdentity, DaemonSettings};
use crate::auth::Op;
use crate::engine::flight::MAX_COMMIT;
use crate::engine::router::{Action, RouteSpec, Unmatched};
use crate::engine::{ConsumerSettings, HandlerSpec};
use crate::handlers::wasm::WasmSpec;
use crate::model::naming::{NameKind, Naming, StreamName, validate_name};
use crate::model::{EntryLimit, StreamId};

/// The consumer name used when a consumer entry names none: stable across restarts (never random),
/// distinct per host and per instance.
pub fn default_consumer(subject: &str, instance: Option<&str>) -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let mut name = if subject.contains('@') {
        subject.to_owned()
    } else {
        format!("{subject}@{host}")
    };
    if let Some(i) = instance {
        name.push('#');
        name.push_str(i);
    }
    name
}

/// The dead-letter stream used when a consumer entry names none: `<stream>-dlq` for ADAPT names.
pub fn default_dead_letter(name: &StreamName<'_>) -> String {
    match name {
        // A hash tag is kept: the dead letters share the slot of their stream.
        StreamName::Adapt {
            domain,
            entity,
            function,
            hash_tag,
        } => {
            let (open, close) = if *hash_tag { ("{", "}") } else { ("", "") };
            format!("nova:{domain}:{open}{entity}{close}:{function}-dlq")
        }
        StreamName::Legacy { service, name } => format!("nova:task:{service}-{name}:dlq"),
    }
}

/// Every `[[consumers]]` entry, checked alone and against the others (one loop per stream and group).
pub(super) fn consumers(
    raw: &RawConfig,
    c: &mut Checker<'_>,
    ctx: &Context<'_>,
) -> Vec<ConsumerSettings> {
    if !raw.consumers.is_empty() && ctx.identity.is_none() {
        c.problem(
            "identity",
            "consumers need an identity to act as: give identity.token, or identity.roles with auth.signing_key",
        );
    }
    let mut out = Vec::new();
    let mut seen: Vec<(String, String, usize)> = Vec::new();
    for (i, rc) in raw.consumers.iter().enumerate() {
        let p = |k: &str| format!("consumers[{i}].{k}");
        let (names, built) = consumer(c, i, rc, ctx);
        if let Some((s, g)) = names {
            if let Some((_, _, j)) = seen.iter().find(|(ss, gg, _)| *ss == s && *gg == g) {
                c.problem(
                    &p("group"),
                    format!("stream {s:?} group {g:?} is already consumed by consumers[{j}]"),
                );
            }
            seen.push((s, g, i));
        }
        out.extend(built);
    }
    out
}

/// What a consumer entry is checked against.
/// What consumers are checked against: the daemon, the handlers and routes declared beside them, and
/// `[limits]`.
pub(super) struct Context<'a> {
    pub naming: &'a Naming,
    pub identity: Option<&'a DaemonIdentity>,
    pub daemon: &'a DaemonSettings,
    pub handlers: &'a [WasmSpec],
    pub routes: &'a [RouteSpec],
    pub entry_limit: EntryLimit,
}

/// One `[[consumers]]` entry: every key read (each problem recorded with its path), the relations
/// between keys checked, then its stream and group (when both are valid, for the duplicate check) and
/// its settings (None if anything was wrong).
fn consumer(
    c: &mut Checker<'_>,
    i: usize,
    rc: &RawConsumer,
    ctx: &Context<'_>,
) -> (Option<(String, String)>, Option<ConsumerSettings>) {
    let p = |k: &str| format!("consumers[{i}].{k}");
    let (stream, group, consumer) = names(c, &p, rc, ctx);
    let t = timing(c, &p, rc);
    let dead_letter = dead_letter(c, &p, rc, ctx, &stream);
    let retry = super::retry::schedule(c, &p, rc.retry.as_ref());
    let handler = handler_spec(c, i, rc, ctx.naming, ctx.handlers);
    let (table, unmatched) = route_table(c, &p, rc, ctx, &stream, &handler, t.handler_timeout);
    permissions(c, &p, ctx, &stream, &dead_letter, &handler);
    let names = stream.clone().zip(group.clone());
    // Every key was read and every relation checked above; build only if all of it held.
    let built = (|| {
        let handler = handler?;
        let routes = if handler.is_some() { Vec::new() } else { table };
        Some(ConsumerSettings {
            stream: stream?.into(),
            group: group?,
            consumer: consumer?,
            start: t.start?,
            batch_size: t.batch_size? as usize,
            block: t.block?,
            claim_min_idle: t.claim_min_idle?,
            claim_interval: t.claim_interval?,
            max_deliveries: t.max_deliveries?,
            dead_letter: dead_letter?,
            in_flight: t.in_flight? as usize,
            order_by: t.order_by,
            handler,
            routes,
            unmatched: unmatched?,
            handler_timeout: t.handler_timeout?,
            retry: retry?,
            entry_limit: ctx.entry_limit,
        })
    })();
    (names, built)
}

/// A key's path in this consumer's table.
type KeyPath<'p> = &'p dyn Fn(&str) -> String;

/// The consumer's stream, group and consumer name (the consumer's defaults to the daemon's).
fn names(
    c: &mut Checker<'_>,
    p: KeyPath<'_>,
    rc: &RawConsumer,
    ctx: &Context<'_>,
) -> (Option<String>, Option<String>, Option<String>) {
    let Context {
        naming,
        identity,
        daemon,
        ..
    } = *ctx;
    let stream = match &rc.stream {
        Some(s) => c.parse(&p("stream"), s, "a stream name", |s| {
            naming
                .parse(s)
                .map(|_| s.to_owned())
                .map_err(|e| e.to_string())
        }),
        None => {
            c.problem(&p("stream"), "missing: the stream to consume");
            None
        }
    };
    let group = match &rc.group {
        Some(g) => c.parse(&p("group"), g, "a group name", |s| {
            validate_name(NameKind::Group, s)
                .map(|_| s.to_owned())
                .map_err(|e| e.to_string())
        }),
        None => {
            c.problem(&p("group"), "missing: the consumer group to read as");
            None
        }
    };
    let consumer = match &rc.consumer {
        Some(n) => c.parse(&p("consumer"), n, "a consumer name", |s| {
            validate_name(NameKind::Consumer, s)
                .map(|_| s.to_owned())
                .map_err(|e| e.to_string())
        }),
        None => {
            identity.map(|id| default_consumer(&id.identity.subject, daemon.instance.as_deref()))
        }
    };
    (stream, group, consumer)
}

/// Where the loop starts, how much it reads and holds, and its clocks.
struct Timing {
    start: Option<String>,
    batch_size: Option<u32>,
    block: Option<Duration>,
    claim_min_idle: Option<Duration>,
    claim_interval: Option<Duration>,
    max_deliveries: Option<u32>,
    in_flight: Option<u32>,
    handler_timeout: Option<Duration>,
    order_by: Option<String>,
}

/// The loop's start, sizes and clocks, and how they must relate: entries still being handled are
/// never claimed, and a read blocks at most 5 minutes.
fn timing(c: &mut Checker<'_>, p: KeyPath<'_>, rc: &RawConsumer) -> Timing {
    let start = c.parse(&p("start"), &rc.start, "\"$\", \"0\" or an entry id", |s| {
        if s == "$" || is_entry_id(s) {
            Ok(s.to_owned())
        } else {
            Err("not an id".into())
        }
    });
    let batch_size = at_most(c, &p("batch_size"), &rc.batch_size, MAX_BATCH_SIZE);
    let block = c.positive_duration(&p("block"), &rc.block);
    let claim_min_idle = c.positive_duration(&p("claim_min_idle"), &rc.claim_min_idle);
    let claim_interval = c.positive_duration(&p("claim_interval"), &rc.claim_interval);
    let max_deliveries = positive(c, &p("max_deliveries"), &rc.max_deliveries);
    let in_flight = at_most(c, &p("in_flight"), &rc.in_flight, MAX_IN_FLIGHT);
    let handler_timeout = c.positive_duration(&p("handler_timeout"), &rc.handler_timeout);
    let order_by = rc.order_by.as_ref().and_then(|o| c.text(&p("order_by"), o));
    if let (Some(idle), Some(timeout)) = (claim_min_idle, handler_timeout)
        && idle <= timeout
    {
        c.problem(
                &p("claim_min_idle"),
                format!(
                    "{} is not longer than {} ({}): another consumer would claim messages still being handled",
                    fmt_d(idle),
                    p("handler_timeout"),
                    fmt_d(timeout)
                ),
            );
    }
    if let Some(b) = block
        && b > Duration::from_secs(300)
    {
        c.problem(
            &p("block"),
            format!("{} is above the 5 min limit", fmt_d(b)),
        );
    }
    Timing {
        start,
        batch_size,
        block,
        claim_min_idle,
        claim_interval,
        max_deliveries,
        in_flight,
        handler_timeout,
        order_by,
    }
}

/// The dead-letter stream: given, or `<stream>-dlq`; never the stream consumed.
fn dead_letter(
    c: &mut Checker<'_>,
    p: KeyPath<'_>,
    rc: &RawConsumer,
    ctx: &Context<'_>,
    stream: &Option<String>,
) -> Option<String> {
    let naming = ctx.naming;
    let dead_letter = match (&rc.dead_letter, stream) {
        (Some(d), _) => c.parse(&p("dead_letter"), d, "a stream name", |s| {
            naming
                .parse(s)
                .map(|_| s.to_owned())
                .map_err(|e| e.to_string())
        }),
        (None, Some(s)) => naming.parse(s).ok().map(|n| default_dead_letter(&n)),
        (None, None) => None,
    };
    if let (Some(d), Some(s)) = (&dead_letter, stream)
        && d == s
    {
        c.problem(
            &p("dead_letter"),
            "the dead-letter stream must differ from the stream consumed",
        );
    }
    dead_letter
}

/// The consumer's route table — its own [[consumers.routes]], else the top-level routes for its
/// stream — and its unmatched policy; a consumer must have a handler or a route, and every WASM
/// handler it reaches must have a deadline that fits in the consumer's.
fn route_table(
    c: &mut Checker<'_>,
    p: KeyPath<'_>,
    rc: &RawConsumer,
    ctx: &Context<'_>,
    stream: &Option<String>,
    handler: &Option<Option<HandlerSpec>>,
    handler_timeout: Option<Duration>,
) -> (Vec<RouteSpec>, Option<Unmatched>) {
    let Context {
        naming,
        identity,
        handlers,
        routes,
        ..
    } = *ctx;
    let own_routes = !rc.routes.is_empty();
    if own_routes && rc.handler.is_some() {
        c.problem(
            &p("routes"),
            "give handler = NAME or [[consumers.routes]], not both",
        );
    }
    let table: Vec<RouteSpec> = match stream {
        Some(s) if own_routes => super::handlers::routes(
            &rc.routes,
            &p("routes"),
            Some(s),
            c,
            naming,
            identity,
            handlers,
        ),
        Some(s) => routes
            .iter()
            .filter(|r| r.stream.matches(s))
            .cloned()
            .collect(),
        None => Vec::new(),
    };
    let unmatched = c.parse(
        &p("unmatched"),
        &rc.unmatched,
        "\"ack\" or \"dead-letter\"",
        |s| match s {
            "ack" => Ok(Unmatched::Ack),
            "dead-letter" => Ok(Unmatched::DeadLetter),
            _ => Err("unknown policy".into()),
        },
    );
    if let (Some(None), Some(s)) = (handler, stream)
        && table.is_empty()
        && !own_routes
    {
        c.problem(
            &p("handler"),
            format!("missing, and no [[routes]] entry matches stream {s:?}: give a handler or add a route"),
        );
    }
    // A WASM handler's own deadline must fit in the consumer's.
    if let (Some(h), Some(s), Some(outer)) = (handler, stream, handler_timeout) {
        let reachable: Vec<String> = match h {
            Some(HandlerSpec::Wasm(name)) => vec![name.clone()],
            Some(_) => Vec::new(),
            None => table
                .iter()
                .filter(|r| r.stream.matches(s))
                .filter_map(|r| match &r.action {
                    Action::Handler(n) => Some(n.clone()),
                    _ => None,
                })
                .collect(),
        };
        let timeouts = handlers
            .iter()
            .filter(|w| reachable.contains(&w.name))
            .map(|w| (w.name.clone(), w.timeout));
        super::handlers::timeouts_fit(c, &p("handler_timeout"), outer, timeouts);
    }

    (table, unmatched)
}

/// Resolved before anything starts: the identity must be allowed every operation this consumer
/// performs, and every write its dead letters and handler make.
fn permissions(
    c: &mut Checker<'_>,
    p: KeyPath<'_>,
    ctx: &Context<'_>,
    stream: &Option<String>,
    dead_letter: &Option<String>,
    handler: &Option<Option<HandlerSpec>>,
) {
    let (naming, identity) = (ctx.naming, ctx.identity);
    if let (Some(id), Some(s)) = (identity, stream) {
        for op in [
            Op::ReadGroup,
            Op::Ack,
            Op::Claim,
            Op::Pending,
            Op::CreateGroup,
        ] {
            if let Err(e) = crate::auth::authorize(naming, &id.identity, op, s) {
                c.problem(&p("stream"), e.to_string());
                break;
            }
        }
        let writes = dead_letter
            .iter()
            .map(|d| (p("dead_letter"), d.as_str()))
            .chain(
                handler
                    .iter()
                    .flatten()
                    .flat_map(|h| h.writes())
                    .map(|w| (p("handler"), w)),
            );
        for (path, w) in writes.collect::<Vec<_>>() {
            if let Err(e) = crate::auth::authorize(naming, &id.identity, Op::Publish, w) {
                c.problem(&path, e.to_string());
            }
        }
    }
}

/// The most entries one read may ask for: what one commit call carries ([`MAX_COMMIT`]), so a read's
/// batch never needs two.
pub const MAX_BATCH_SIZE: u32 = MAX_COMMIT as u32;
/// The most messages a consumer may hold in flight. The commit script checks ownership with one
/// XPENDING over everything in flight; past this it would scan more than a commit is worth, and a
/// consumer holding that many is better split into several.
pub const MAX_IN_FLIGHT: u32 = 10 * MAX_COMMIT as u32;

/// A positive integer up to `max`.
fn at_most(c: &mut Checker<'_>, path: &str, v: &Loose<u32>, max: u32) -> Option<u32> {
    let n = positive(c, path, v)?;
    if n > max {
        c.problem(
            path,
            format!("{n} is more than {max}, the most one consumer's commits can carry"),
        );
        return None;
    }
    Some(n)
}

fn positive(c: &mut Checker<'_>, path: &str, v: &Loose<u32>) -> Option<u32> {
    let n = c.get(path, v, "a positive integer")?;
    if n == 0 {
        c.problem(path, "expected a positive integer, found 0");
        return None;
    }
    Some(n)
}

fn is_entry_id(s: &str) -> bool {
    StreamId::parse(s).is_ok()
}

/// The consumer's handler: Some(None) when it routes with [[routes]], None after a problem.
fn handler_spec(
    c: &mut Checker<'_>,
    i: usize,
    rc: &RawConsumer,
    naming: &Naming,
    handlers: &[WasmSpec],
) -> Option<Option<HandlerSpec>> {
    let path = format!("consumers[{i}].handler");
    let fpath = format!("consumers[{i}].forward_to");
    let Some(name) = &rc.handler else {
        if rc.forward_to.is_some() {
            c.problem(&fpath, "forward_to needs handler = \"forward\"");
        }
        return Some(None);
    };
    let name = c.text(&path, name)?;
    let forward_to = rc.forward_to.as_ref().and_then(|f| {
        c.parse(&fpath, f, "a stream name", |s| {
            naming
                .parse(s)
                .map(|_| s.to_owned())
                .map_err(|e| e.to_string())
        })
    });
    if name != "forward" && rc.forward_to.is_some() {
        c.problem(
            &fpath,
            format!("only the forward handler takes forward_to, not {name:?}"),
        );
    }
    if name != "faults" && rc.faults.is_some() {
        c.problem(
            &format!("consumers[{i}].faults"),
            format!("only the faults handler takes faults options, not {name:?}"),
        );
    }
    let spec = match name.as_str() {
        "drop" => HandlerSpec::Drop,
        "forward" => match (forward_to, &rc.forward_to) {
            (Some(to), _) => HandlerSpec::Forward { to },
            (None, None) => {
                c.problem(&fpath, "missing: the stream the forward handler copies to");
                return None;
            }
            (None, Some(_)) => return None,
        },
        "faults" => faults_spec(c, i, rc, naming)?,
        other if handlers.iter().any(|h| h.name == other) => HandlerSpec::Wasm(other.to_owned()),
        #[cfg(feature = "fault-injection")]
        other if c.faults_handlers.iter().any(|h| h == other) => {
            HandlerSpec::Faults(crate::engine::FaultSpec {
                name: other.to_owned(),
                ..Default::default()
            })
        }
        other => {
            let mut known: Vec<String> = vec!["drop".into(), "forward".into()];
            known.extend(handlers.iter().map(|h| h.name.clone()));
            c.problem(
                &path,
                format!(
                    "unknown handler {other:?}: expected one of {}",
                    known.join(", ")
                ),
            );
            return None;
        }
    };
    Some(Some(spec))
}

#[cfg(feature = "fault-injection")]
fn faults_spec(
    c: &mut Checker<'_>,
    i: usize,
    rc: &RawConsumer,
    naming: &Naming,
) -> Option<HandlerSpec> {
    let f = rc.faults.clone().unwrap_or_default();
    Some(HandlerSpec::Faults(super::faults::faults_options(
        c,
        &format!("consumers[{i}].faults"),
        &f,
        naming,
    )))
}

#[cfg(not(feature = "fault-injection"))]
fn faults_spec(
    c: &mut Checker<'_>,
    i: usize,
    _rc: &RawConsumer,
    _naming: &Naming,
) -> Option<HandlerSpec> {
    c.problem(
        &format!("consumers[{i}].handler"),
        "the faults test handler exists only in builds with the fault-injection feature",
    );
    None
}
