//! `[heartbeat]`, `[control]` and `[retention]`: the daemon's system streams and trimming rules.

use super::checker::Checker;
use super::raw::{Loose, RawConfig};
use super::settings::{ControlSettings, DaemonIdentity, HeartbeatSettings, Retention};
use crate::auth::Op;
use crate::model::naming::Naming;

/// A stream name for `path`, and (when the daemon will run) a check that its identity may `ops` on it.
fn system_stream(
    c: &mut Checker<'_>,
    path: &str,
    v: &Loose<String>,
    naming: &Naming,
    identity: Option<&DaemonIdentity>,
    ops: &[Op],
    disable_hint: &str,
) -> Option<String> {
    let stream = c.parse(path, v, "a stream name", |s| {
        naming
            .parse(s)
            .map(|_| s.to_owned())
            .map_err(|e| e.to_string())
    })?;
    if let Some(id) = identity {
        for op in ops {
            if let Err(e) = crate::auth::authorize(naming, &id.identity, *op, &stream) {
                c.problem(path, format!("{e} ({disable_hint})"));
                break;
            }
        }
    }
    Some(stream)
}

pub(super) fn heartbeat_settings(
    raw: &RawConfig,
    c: &mut Checker<'_>,
    naming: &Naming,
    identity: Option<&DaemonIdentity>,
) -> Option<Option<HeartbeatSettings>> {
    let h = &raw.heartbeat;
    let enabled = c.get("heartbeat.enabled", &h.enabled, "true or false")?;
    let interval = c.positive_duration("heartbeat.interval", &h.interval);
    let max_len = c.get("heartbeat.max_len", &h.max_len, "a positive integer");
    if !enabled {
        return Some(None);
    }
    let stream = system_stream(
        c,
        "heartbeat.stream",
        &h.stream,
        naming,
        identity,
        &[Op::Publish],
        "or set heartbeat.enabled = false",
    );
    Some(Some(HeartbeatSettings {
        stream: stream?,
        interval: interval?,
        max_len: u64::from(max_len?.max(1)),
    }))
}

pub(super) fn control_settings(
    raw: &RawConfig,
    c: &mut Checker<'_>,
    naming: &Naming,
    identity: Option<&DaemonIdentity>,
) -> Option<Option<ControlSettings>> {
    let k = &raw.control;
    if !c.get("control.enabled", &k.enabled, "true or false")? {
        return Some(None);
    }
    let hint = "or set control.enabled = false";
    let reads = [
        Op::CreateGroup,
        Op::ReadGroup,
        Op::Ack,
        Op::Claim,
        Op::Pending,
    ];
    let stream = system_stream(
        c,
        "control.stream",
        &k.stream,
        naming,
        identity,
        &reads,
        hint,
    );
    let dead_letter = system_stream(
        c,
        "control.dead_letter",
        &k.dead_letter,
        naming,
        identity,
        &[Op::Publish],
        hint,
    );
    if raw.heartbeat.enabled.value.as_ref().is_ok_and(|e| !e) {
        // Status replies go to the heartbeat stream: it must be writable even if beats are off.
        system_stream(
            c,
            "heartbeat.stream",
            &raw.heartbeat.stream,
            naming,
            identity,
            &[Op::Publish],
            hint,
        );
    }
    let reply_to = raw.heartbeat.stream.value.clone().ok()?;
    Some(Some(ControlSettings {
        stream: stream?,
        dead_letter: dead_letter?,
        reply_to,
    }))
}

pub(super) fn retention(
    raw: &RawConfig,
    c: &mut Checker<'_>,
    naming: &Naming,
    identity: Option<&DaemonIdentity>,
) -> Vec<Retention> {
    let mut out = Vec::new();
    for (i, r) in raw.retention.streams.iter().enumerate() {
        let p = |k: &str| format!("retention.streams[{i}].{k}");
        let stream = match &r.stream {
            Some(s) => system_stream(
                c,
                &p("stream"),
                s,
                naming,
                identity,
                &[Op::Delete, Op::Info, Op::Pending],
                "the janitor trims it",
            ),
            None => {
                c.problem(&p("stream"), "missing: the stream to trim");
                None
            }
        };
        let max_len = r
            .max_len
            .as_ref()
            .and_then(|m| c.get(&p("max_len"), m, "a positive integer"));
        if max_len == Some(0) {
            c.problem(&p("max_len"), "expected a positive integer, found 0");
        }
        let max_age = r
            .max_age
            .as_ref()
            .and_then(|a| c.positive_duration(&p("max_age"), a));
        if r.max_len.is_none() && r.max_age.is_none() {
            c.problem(
                &format!("retention.streams[{i}]"),
                "give max_len, max_age or both",
            );
        }
        if let Some(stream) = stream {
            out.push(Retention {
                stream,
                max_len: max_len.filter(|n| *n > 0),
                max_age,
            });
        }
    }
    out
}
