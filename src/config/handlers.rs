//! Validation of `[wasm]`, `[[handlers]]` and `[[routes]]`: files, limits, roles within the daemon's,
//! route patterns, predicates and actions — every problem with its key path.
//!
//! Compiling the handler files is left to [`crate::engine::prepare`], which `check` and `run` call right
//! after loading the config, so a broken component is a config error too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::checker::Checker;
use super::raw::{RawBreaker, RawConfig, RawRoute};
use super::settings::DaemonIdentity;
use crate::auth::Op;
use crate::engine::guard::{BreakerSpec, GuardSpec, RateSpec};
use crate::engine::router::{Action, Predicates, RouteSpec, StreamPattern};
use crate::handlers::wasm::{Origin, Outbound, RuntimeSettings, WasmSpec};
use crate::model::ReplyLimit;
use crate::model::naming::Naming;

/// Names a `[[handlers]]` entry may not take: the built-in handlers.
pub const BUILT_IN: [&str; 3] = ["drop", "forward", "faults"];

/// Largest memory limit a handler may have.
const MAX_MEMORY: usize = 4 << 30;

pub(super) fn handlers(
    raw: &RawConfig,
    c: &mut Checker<'_>,
    naming: &Naming,
    identity: Option<&DaemonIdentity>,
    base_dir: Option<&Path>,
) -> Vec<WasmSpec> {
    let handlers_dir = raw
        .wasm
        .handlers_dir
        .as_ref()
        .and_then(|d| c.text("wasm.handlers_dir", d))
        .map(|d| match base_dir {
            Some(base) if Path::new(&d).is_relative() => base.join(d),
            _ => PathBuf::from(d),
        });
    let mut out: Vec<WasmSpec> = Vec::new();
    for (i, h) in raw.handlers.iter().enumerate() {
        if h.faults.is_some() {
            continue; // a faults test handler: [`faults_handlers`]
        }
        let p = |k: &str| format!("handlers[{i}].{k}");
        let name = match &h.name {
            Some(n) => c.parse(&p("name"), n, "a handler name", |s| {
                if s.is_empty() || s.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
                    Err("it must be non-empty, without whitespace".into())
                } else if BUILT_IN.contains(&s) {
                    Err(format!("{s:?} is a built-in handler"))
                } else {
                    Ok(s.to_owned())
                }
            }),
            None => {
                c.problem(&p("name"), "missing: the name routes and consumers use");
                None
            }
        };
        if let Some(n) = &name
            && out.iter().any(|o| &o.name == n)
        {
            c.problem(&p("name"), format!("handler {n:?} is defined twice"));
        }
        let file = match &h.file {
            Some(f) => {
                // Relative to wasm.handlers_dir, else to the file (main or drop-in) that names it.
                let dir = handlers_dir
                    .clone()
                    .or_else(|| c.source_dir(f.tag))
                    .or_else(|| base_dir.map(Path::to_path_buf));
                let mut named = None;
                let file = c.parse(&p("file"), f, "a .wasm component file", |s| {
                    let path = match &dir {
                        Some(base) if Path::new(s).is_relative() => base.join(s),
                        _ => Path::new(s).to_path_buf(),
                    };
                    named = Some(path.clone());
                    if path.is_file() {
                        Ok(path)
                    } else {
                        Err(format!(
                            "{} does not exist; build it: `redstream handler build PROJECT` for a \
                             project made by `redstream handler new`, scripts/build-handlers for the \
                             examples in this repository",
                            path.display()
                        ))
                    }
                });
                c.named.extend(named);
                file
            }
            None => {
                c.problem(&p("file"), "missing: the component file");
                None
            }
        };
        let roles = c.roles(&p("roles"), &h.roles, naming);
        if let Some(id) = identity
            && !id.identity.roles.covers(&roles)
        {
            c.problem(
                &p("roles"),
                format!(
                    "{roles} is more than the daemon holds ({}); a handler never gets more than the daemon",
                    id.identity.roles
                ),
            );
        }
        let memory = c.parse(&p("memory"), &h.memory, "a size like \"64MiB\"", parse_size);
        if let Some(m) = memory
            && !(1 << 16..=MAX_MEMORY).contains(&m)
        {
            c.problem(&p("memory"), format!("{m} bytes is outside 64KiB..4GiB"));
        }
        let timeout = c.positive_duration(&p("timeout"), &h.timeout);
        let reuse_limit = c.get(&p("reuse_limit"), &h.reuse_limit, "a positive integer");
        let reuse = c.parse(
            &p("instance"),
            &h.instance,
            "\"fresh\" or \"reuse\"",
            |s| match s {
                "fresh" => Ok(None),
                "reuse" => Ok(Some(())),
                _ => Err("unknown instance mode".into()),
            },
        );
        let require = c.get(
            &p("require_sender_token"),
            &h.require_sender_token,
            "true or false",
        );
        let state = h.state.as_ref().and_then(|ns| {
            c.parse(
                &p("state"),
                ns,
                "a key namespace named like a stream (nova:{domain}:{entity}:{function})",
                |s| {
                    // Its own namespace, which it alone writes: the right to write the domain.
                    let domain = naming.domain_of(s).map_err(|e| e.to_string())?;
                    if !roles.allows(Op::Publish, domain) {
                        return Err(format!(
                            "the handler's roles ({roles}) do not allow its state under {s}: that needs \
                             role {} or admin",
                            crate::auth::Roles::needed(Op::Publish, domain)
                        ));
                    }
                    Ok(s.to_owned())
                },
            )
        });
        if h.state.is_some() && state.is_none() {
            // Reported above; the entry is not built without its state.
            continue;
        }
        let outbound = outbound(h, &p, timeout, c);
        if h.allowed_outbound_hosts.is_some() && outbound.is_none() {
            // Reported in `outbound`; not built without what it was granted.
            continue;
        }
        if outbound.is_some() && reuse.flatten().is_some() {
            c.problem(
                &p("instance"),
                "\"reuse\" does not apply to a handler granted outbound HTTP: its calls run as tasks, \
                 each in a fresh instance",
            );
            continue;
        }
        let mut config = BTreeMap::new();
        for (k, v) in &h.config {
            if let Some(v) = c.get(&p(&format!("config.{k}")), v, "a string") {
                config.insert(k.clone(), v);
            }
        }
        if let (
            Some(name),
            Some(file),
            Some(memory),
            Some(timeout),
            Some(reuse),
            Some(limit),
            Some(require),
        ) = (name, file, memory, timeout, reuse, reuse_limit, require)
        {
            out.push(WasmSpec {
                name,
                file,
                roles,
                memory,
                timeout,
                reuse: reuse.map(|()| u64::from(limit.max(1))),
                require_sender_token: require,
                config,
                state,
                outbound,
            });
        }
    }
    out
}

/// Calls of one handler in flight at once when it is granted outbound HTTP, unless its entry says.
pub const DEFAULT_CONCURRENCY: u32 = 32;

/// A handler's outbound HTTP grant: `allowed_outbound_hosts` and its limits. None when it has none
/// (the limits alone are then a problem: they would do nothing), or when any of it is wrong.
fn outbound(
    h: &super::raw::RawHandler,
    p: &dyn Fn(&str) -> String,
    timeout: Option<Duration>,
    c: &mut Checker<'_>,
) -> Option<Outbound> {
    let Some(hosts) = &h.allowed_outbound_hosts else {
        for (key, set) in [
            ("http_timeout", h.http_timeout.is_some()),
            ("http_max_response", h.http_max_response.is_some()),
            ("concurrency", h.concurrency.is_some()),
        ] {
            if set {
                c.problem(
                    &p(key),
                    "applies only to a handler granted outbound HTTP: give it allowed_outbound_hosts too",
                );
            }
        }
        return None;
    };
    let before = c.problems.len();
    let mut allowed = Vec::new();
    for (i, v) in hosts.iter().enumerate() {
        if let Some(origin) = c.parse(
            &p(&format!("allowed_outbound_hosts[{i}]")),
            v,
            "an origin like \"https://api.example.com\" or \"http://127.0.0.1:8080\"",
            Origin::parse,
        ) {
            allowed.push(origin);
        }
    }
    if hosts.is_empty() {
        c.problem(
            &p("allowed_outbound_hosts"),
            "empty: name the origins the handler may call, or leave the key out",
        );
    }
    let request_timeout = match &h.http_timeout {
        Some(v) => c.positive_duration(&p("http_timeout"), v),
        // A request may take the whole call.
        None => timeout,
    };
    let max_response = match &h.http_max_response {
        Some(v) => c.parse(
            &p("http_max_response"),
            v,
            "a size like \"1MiB\"",
            parse_size,
        ),
        None => Some(1 << 20),
    };
    let concurrency = match &h.concurrency {
        Some(v) => c.get(&p("concurrency"), v, "a positive integer"),
        None => Some(DEFAULT_CONCURRENCY),
    };
    if let Some(n) = concurrency
        && !(1..=1024).contains(&n)
    {
        c.problem(&p("concurrency"), format!("{n} is outside 1..1024"));
    }
    if c.problems.len() > before {
        return None;
    }
    Some(Outbound {
        allowed,
        timeout: request_timeout?,
        max_response: u64::try_from(max_response?).unwrap_or(u64::MAX),
        concurrency: concurrency? as usize,
    })
}

#[cfg(feature = "fault-injection")]
pub(super) type NamedFaults = Vec<(String, crate::engine::FaultSpec)>;
#[cfg(not(feature = "fault-injection"))]
pub(super) type NamedFaults = Vec<()>;

/// `[[handlers]]` entries with `faults = {…}`: the faults test handler under their own names (in
/// builds without fault-injection, a problem). Their names go to the checker for routes and consumers.
pub(super) fn faults_handlers(
    raw: &RawConfig,
    c: &mut Checker<'_>,
    naming: &Naming,
) -> NamedFaults {
    #[cfg_attr(not(feature = "fault-injection"), allow(unused_mut))]
    let mut out = Vec::new();
    for (i, h) in raw.handlers.iter().enumerate() {
        let Some(f) = &h.faults else { continue };
        let at = format!("handlers[{i}]");
        let Some(name) = h
            .name
            .as_ref()
            .and_then(|n| c.text(&format!("{at}.name"), n))
        else {
            c.problem(
                &format!("{at}.name"),
                "missing: the name routes and consumers use",
            );
            continue;
        };
        if h.file.is_some() {
            c.problem(&format!("{at}.file"), "a faults handler has no file");
        }
        #[cfg(feature = "fault-injection")]
        {
            let mut spec = super::faults::faults_options(c, &format!("{at}.faults"), f, naming);
            spec.name.clone_from(&name);
            c.faults_handlers.push(name.clone());
            out.push((name, spec));
        }
        #[cfg(not(feature = "fault-injection"))]
        {
            let _ = (f, naming, name);
            c.problem(
                &format!("{at}.faults"),
                "the faults test handler exists only in builds with the fault-injection feature",
            );
        }
    }
    out
}

/// Each `[[handlers]]` entry's `breaker`, `rate` and `retry`, by name (entries with none are left
/// out).
pub(super) fn guards(raw: &RawConfig, c: &mut Checker<'_>) -> Vec<(String, GuardSpec)> {
    let mut out = Vec::new();
    for (i, h) in raw.handlers.iter().enumerate() {
        let p = |k: &str| format!("handlers[{i}].{k}");
        let Some(Ok(name)) = h.name.as_ref().map(|n| n.value.clone()) else {
            continue;
        };
        let breaker = h
            .breaker
            .as_ref()
            .and_then(|b| breaker(c, &p("breaker"), b));
        let rate = h.rate.as_ref().and_then(|r| {
            c.parse(
                &p("rate"),
                r,
                "calls per second, minute or hour, e.g. \"200/s\"",
                parse_rate,
            )
        });
        let retry = super::retry::schedule(c, &p, h.retry.as_ref()).flatten();
        if breaker.is_some() || rate.is_some() || retry.is_some() {
            out.push((
                name,
                GuardSpec {
                    breaker,
                    rate,
                    retry,
                },
            ));
        }
    }
    out
}

/// `breaker = { failures = "50%", min_calls = 20, window = "30s", open_for = "30s" }`, each key
/// optional (those are the defaults).
fn breaker(c: &mut Checker<'_>, at: &str, b: &RawBreaker) -> Option<BreakerSpec> {
    let d = BreakerSpec::default();
    let p = |k: &str| format!("{at}.{k}");
    let failure_percent = match &b.failures {
        None => Some(d.failure_percent),
        Some(f) => c.percent(&p("failures"), f, 1, "50%"),
    };
    let min_calls = match &b.min_calls {
        None => Some(d.min_calls),
        Some(n) => match c.get(&p("min_calls"), n, "a positive integer") {
            Some(0) => {
                c.problem(&p("min_calls"), "0: give at least 1 call");
                None
            }
            n => n,
        },
    };
    let window = match &b.window {
        None => Some(d.window),
        Some(w) => c.positive_duration(&p("window"), w),
    };
    let open_for = match &b.open_for {
        None => Some(d.open_for),
        Some(o) => c.positive_duration(&p("open_for"), o),
    };
    Some(BreakerSpec {
        failure_percent: failure_percent?,
        min_calls: min_calls?,
        window: window?,
        open_for: open_for?,
    })
}

/// `"200/s"`, `"30/m"`, `"1000/h"`: a positive count per second, minute or hour.
fn parse_rate(s: &str) -> Result<RateSpec, String> {
    let (count, unit) = s
        .split_once('/')
        .ok_or_else(|| "no \"/\": write a count per s, m or h".to_string())?;
    let count: u32 = count
        .trim()
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{:?} is not a positive count", count.trim()))?;
    let per = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        other => return Err(format!("unknown unit {other:?}: s, m or h")),
    };
    if per.as_micros() / u128::from(count) == 0 {
        return Err("more than one call per microsecond".into());
    }
    Ok(RateSpec { count, per })
}

pub(super) fn wasm_settings(
    raw: &RawConfig,
    c: &mut Checker<'_>,
    handlers: &[WasmSpec],
    reply_limit: ReplyLimit,
) -> Option<RuntimeSettings> {
    let w = &raw.wasm;
    let cache_dir = match &w.cache_dir {
        Some(d) => c.text("wasm.cache_dir", d).map(Into::into),
        None => crate::handlers::wasm::default_cache_dir(),
    };
    let workers = match &w.workers {
        Some(n) => c.get("wasm.workers", n, "a positive integer")? as usize,
        None => std::thread::available_parallelism().map_or(2, |n| n.get()),
    };
    let max_stack = c.parse(
        "wasm.max_stack",
        &w.max_stack,
        "a size like \"512KiB\"",
        parse_size,
    )?;
    if !(16 << 10..=64 << 20).contains(&max_stack) {
        c.problem(
            "wasm.max_stack",
            format!("{max_stack} bytes is outside 16KiB..64MiB"),
        );
    }
    Some(RuntimeSettings {
        cache_dir,
        workers: workers.max(1),
        max_stack,
        max_memory: handlers.iter().map(|h| h.memory).max().unwrap_or(64 << 20),
        reused: handlers.iter().filter(|h| h.reuse.is_some()).count(),
        concurrent: handlers
            .iter()
            .filter_map(|h| h.outbound.as_ref())
            .map(|o| o.concurrency)
            .sum(),
        reply_limit,
    })
}

/// A route table: the top-level `[[routes]]` (`at` = "routes") or a consumer's own
/// (`at` = "consumers[N].routes").
pub(super) fn routes(
    table: &[RawRoute],
    at: &str,
    // A consumer's own routes apply to its stream: `stream` may be left out, and must match it.
    consumer_stream: Option<&str>,
    c: &mut Checker<'_>,
    naming: &Naming,
    identity: Option<&DaemonIdentity>,
    handlers: &[WasmSpec],
) -> Vec<RouteSpec> {
    let mut out = Vec::new();
    for (i, r) in table.iter().enumerate() {
        let p = |k: &str| format!("{at}[{i}].{k}");
        let stream = match &r.stream {
            Some(s) => c.parse(
                &p("stream"),
                s,
                "a stream name or pattern like nova:task:*:tasks",
                |s| {
                    // A pattern is valid when every name it can match is: check it with `*` as a segment.
                    let probe = s.replace('*', "x");
                    if s.contains('*') && !s.starts_with("nova:") {
                        return Err("only ADAPT names take * segments".into());
                    }
                    if s.split(':').any(|seg| seg.contains('*') && seg != "*") {
                        return Err("* stands for a whole segment".into());
                    }
                    if s.starts_with("nova:*:") {
                        Ok(StreamPattern::new(s))
                    } else {
                        naming
                            .parse(&probe)
                            .map(|_| StreamPattern::new(s))
                            .map_err(|e| e.to_string())
                    }
                },
            ),
            None => match consumer_stream {
                Some(s) => Some(StreamPattern::new(s)),
                None => {
                    c.problem(
                        &p("stream"),
                        "missing: the stream (or pattern) this route applies to",
                    );
                    None
                }
            },
        };
        if let (Some(pattern), Some(own)) = (&stream, consumer_stream)
            && !pattern.matches(own)
        {
            c.problem(
                &p("stream"),
                format!("{pattern} never matches this consumer's stream {own:?}"),
            );
        }
        let mut when = Predicates::default();
        for (field, v) in &r.equals {
            if let Some(v) = c.get(&p(&format!("equals.{field}")), v, "a string") {
                when.equals.push((field.clone(), v.into_bytes()));
            }
        }
        for (j, f) in r.exists.iter().enumerate() {
            when.exists.extend(c.text(&p(&format!("exists[{j}]")), f));
        }
        for (j, f) in r.absent.iter().enumerate() {
            when.absent.extend(c.text(&p(&format!("absent[{j}]")), f));
        }
        let action = route_action(c, &format!("{at}[{i}]"), r, naming, identity, handlers);
        if let (Some(stream), Some(action)) = (stream, action) {
            out.push(RouteSpec {
                stream,
                when,
                action,
            });
        }
    }
    out
}

fn route_action(
    c: &mut Checker<'_>,
    at: &str,
    r: &RawRoute,
    naming: &Naming,
    identity: Option<&DaemonIdentity>,
    handlers: &[WasmSpec],
) -> Option<Action> {
    let p = |k: &str| format!("{at}.{k}");
    let drop = match &r.drop {
        Some(d) => c.get(&p("drop"), d, "true")?,
        None => false,
    };
    match (&r.handler, &r.forward, drop) {
        (Some(h), None, false) => {
            let name = c.text(&p("handler"), h)?;
            let known = handlers.iter().any(|x| x.name == name)
                || c.faults_handlers.contains(&name)
                || name == "drop";
            if known {
                Some(if name == "drop" {
                    Action::Drop
                } else {
                    Action::Handler(name)
                })
            } else {
                c.problem(
                    &p("handler"),
                    format!("no [[handlers]] entry is named {name:?}"),
                );
                None
            }
        }
        (None, Some(f), false) => {
            let to = c.parse(&p("forward"), f, "a stream name", |s| {
                naming
                    .parse(s)
                    .map(|_| s.to_owned())
                    .map_err(|e| e.to_string())
            })?;
            if let Some(id) = identity
                && let Err(e) = crate::auth::authorize(naming, &id.identity, Op::Publish, &to)
            {
                c.problem(&p("forward"), e.to_string());
            }
            Some(Action::Forward(to))
        }
        (None, None, true) => Some(Action::Drop),
        _ => {
            c.problem(
                at,
                "give exactly one action: handler = NAME, forward = STREAM, or drop = true",
            );
            None
        }
    }
}

/// `"64MiB"`, `"512 KiB"`, `"1GiB"`, `"4096"` (bytes); also KB/MB/GB as powers of 1000.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|ch: char| !ch.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| "expected a number of bytes with an optional unit".to_string())?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => return Err(format!("unknown unit {other:?} (use B, KiB, MiB, GiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| "too large".into())
}

/// Names of handlers reachable from a consumer, to check their timeouts against its handler_timeout.
pub(super) fn timeouts_fit(
    c: &mut Checker<'_>,
    path: &str,
    outer: Duration,
    reachable: impl Iterator<Item = (String, Duration)>,
) {
    for (name, t) in reachable {
        if t > outer {
            c.problem(
                path,
                format!(
                    "handler {name:?} may run {} but this consumer's handler_timeout is {}",
                    humantime::format_duration(t),
                    humantime::format_duration(outer)
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }
}
