//! `redstream status`: what the daemons on one Redis (or cluster) are doing now, on one screen.
//!
//! Owns gathering and presenting it. Everything comes from Redis, so it works from any host with a
//! token: per configured group XINFO (consumers, pending, lag), and the heartbeat stream, where every
//! daemon publishes its status, uptime, per-loop counters and per-handler latency quantiles
//! ([`crate::daemon::control::Vitals`]). Rates over the last minute are the difference between a
//! daemon's newest heartbeat and its oldest one of the minute before.
//!
//! A heartbeat's age is judged by its entry id, which Redis stamps with its own clock, against Redis's
//! TIME — never by a field the writer chose. A daemon whose newest heartbeat is older than two
//! intervals (plus a second), and that did not say it stopped, is `missing`. Its author is judged by its
//! signature: a daemon that holds the signing key signs its heartbeats, and one whose newest heartbeat
//! is not signed by the identity its `server_id` names is shown `unverified` (anyone who may XADD to
//! the heartbeat stream could have written it); a daemon that has signed beats is judged by those only.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::auth::jwt::KeySet;
use crate::auth::signature;
use crate::client::{Client, ConsumerInfo, ReadOptions};
use crate::config::Settings;
use crate::model::StreamId;
use crate::model::envelope::{Entry, now_ms};

/// One screen's worth.
#[derive(Debug, Serialize)]
pub struct Report {
    pub redis: String,
    pub taken_at_ms: u64,
    pub groups: Vec<GroupRow>,
    pub handlers: Vec<HandlerRow>,
    pub daemons: Vec<DaemonRow>,
    /// Streams with delayed messages held for them (`publish --delay`), those this identity may read.
    pub delayed: Vec<DelayedRow>,
}

#[derive(Debug, Serialize)]
pub struct DelayedRow {
    pub stream: String,
    pub held: u64,
    /// When the next is due, ms from the report's time (negative: overdue — no daemon moving it).
    pub next_in_ms: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct GroupRow {
    pub stream: String,
    pub group: String,
    /// None when the group does not exist (yet).
    pub exists: bool,
    pub consumers: Vec<ConsumerInfo>,
    pub pending: u64,
    pub lag: Option<u64>,
    /// Why the group could not be read (the key is of another type, the ACL refuses XINFO, …); None
    /// when it was read or simply does not exist yet.
    pub error: Option<String>,
    /// Over the last minute, from the heartbeats of every daemon running this group; None without two
    /// heartbeats a while apart.
    pub per_minute: Option<Rates>,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Rates {
    pub processed: f64,
    pub retried: f64,
    pub dead_lettered: f64,
}

#[derive(Debug, Serialize)]
pub struct HandlerRow {
    pub handler: String,
    /// Calls since each daemon started, summed over the live ones.
    pub calls: u64,
    /// The highest of the live daemons' (bucket bounds, ms).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Failed calls (retries, and dead letters it decided) since each daemon started, summed.
    pub failed: u64,
}

#[derive(Debug, Serialize)]
pub struct DaemonRow {
    pub server_id: String,
    /// healthy, degraded, stopping, stopped or missing.
    pub status: String,
    pub degraded_reasons: Option<String>,
    /// Whether its newest heartbeat is signed by the identity its server id names.
    pub verified: bool,
    pub last_seen_ms_ago: u64,
    pub uptime_s: u64,
    pub consumers: u64,
    /// Times it started again in the last hour, as its kept heartbeats show (uptime going back).
    pub restarts_1h: u64,
}

/// A heartbeat, decoded.
struct Beat {
    /// When Redis added it (its entry id).
    at_ms: u64,
    verified: bool,
    status: String,
    reasons: Option<String>,
    uptime_s: u64,
    /// The process's start (ms, its host's clock): a new value is a new process.
    started_ms: Option<u64>,
    consumers: u64,
    groups: Vec<serde_json::Value>,
    handlers: Vec<serde_json::Value>,
}

fn beat(e: &Entry, stream: &str, keys: &KeySet) -> Option<(String, Beat)> {
    let text = |k: &str| e.fields.get_str(k).map(str::to_owned);
    let num = |k: &str| text(k).and_then(|v| v.parse::<u64>().ok());
    let json = |k: &str| {
        text(k)
            .and_then(|v| serde_json::from_str::<Vec<serde_json::Value>>(&v).ok())
            .unwrap_or_default()
    };
    let server_id = text("server_id")?;
    let verified = text(signature::FIELD)
        .and_then(|sig| keys.signer_of(&sig, stream, &e.fields).ok())
        .is_some_and(|who| server_id.split('@').next() == Some(who.subject.as_str()));
    Some((
        server_id,
        Beat {
            at_ms: StreamId::parse(&e.id).ok()?.ms,
            verified,
            status: text("status")?,
            reasons: text("degraded_reasons"),
            uptime_s: num("uptime").unwrap_or(0),
            started_ms: num("started"),
            consumers: num("consumers").unwrap_or(0),
            groups: json("groups"),
            handlers: json("handlers"),
        },
    ))
}

/// Gathers one report.
pub async fn gather(client: &Client, settings: &Settings) -> crate::client::Result<Report> {
    // Redis's clock, which stamped the heartbeats' ids (this host's may differ).
    let now = client.server_time_ms().await.unwrap_or_else(|_| now_ms());
    // Every daemon's heartbeats, newest first (the stream is trimmed to its max_len).
    let mut beats: BTreeMap<String, Vec<Beat>> = BTreeMap::new();
    let mut interval = Duration::from_secs(10);
    if let Some(h) = &settings.heartbeat {
        interval = h.interval;
        let opts = ReadOptions {
            count: Some(h.max_len.max(1)),
            reverse: true,
            ..ReadOptions::default()
        };
        for e in client.read(&h.stream, &opts).await? {
            if let Some((id, b)) = beat(&e, &h.stream, &settings.auth.keys) {
                beats.entry(id).or_default().push(b);
            }
        }
    }
    let mut daemons = Vec::new();
    let mut rates: BTreeMap<(String, String), Rates> = BTreeMap::new();
    let mut handlers: BTreeMap<String, HandlerRow> = BTreeMap::new();
    for (id, list) in &beats {
        // A daemon that signs is judged by its own beats: an unsigned entry in its name (anyone's
        // XADD) neither keeps it alive nor speaks for it.
        let signs = list.iter().any(|b| b.verified);
        let list: Vec<&Beat> = list.iter().filter(|b| b.verified || !signs).collect();
        let newest = list[0];
        let age = now.saturating_sub(newest.at_ms);
        let missing_after = missing_after_ms(interval);
        let status = if newest.status != "stopped" && age > missing_after {
            "missing".to_owned()
        } else {
            newest.status.clone()
        };
        let live = status == "healthy" || status == "degraded";
        let restarts_1h = restarts_since(&list, now.saturating_sub(3_600_000));
        daemons.push(DaemonRow {
            server_id: id.clone(),
            status,
            degraded_reasons: newest.reasons.clone(),
            verified: newest.verified,
            last_seen_ms_ago: age,
            uptime_s: newest.uptime_s,
            consumers: newest.consumers,
            restarts_1h,
        });
        if !live {
            continue;
        }
        // The oldest heartbeat of the minute before the newest: counters moved between the two.
        if let Some(old) = list
            .iter()
            .rev()
            .find(|b| b.at_ms < newest.at_ms && newest.at_ms - b.at_ms <= 60_000)
        {
            let span_min = (newest.at_ms - old.at_ms) as f64 / 60_000.0;
            for g in &newest.groups {
                let key = (
                    g["stream"].as_str().unwrap_or_default().to_owned(),
                    g["group"].as_str().unwrap_or_default().to_owned(),
                );
                let before = old.groups.iter().find(|o| {
                    o["stream"] == g["stream"]
                        && o["group"] == g["group"]
                        && o["consumer"] == g["consumer"]
                });
                // A counter that went down was restarted (a reload): count from zero.
                let delta = |k: &str| {
                    let now = g[k].as_u64().unwrap_or(0);
                    let then = before.and_then(|b| b[k].as_u64()).unwrap_or(0);
                    (if now >= then { now - then } else { now }) as f64 / span_min
                };
                let r = rates.entry(key).or_default();
                r.processed += delta("processed");
                r.retried += delta("retried");
                r.dead_lettered += delta("dead_lettered");
            }
        }
        for h in &newest.handlers {
            let name = h["handler"].as_str().unwrap_or_default().to_owned();
            let row = handlers.entry(name.clone()).or_insert(HandlerRow {
                handler: name,
                calls: 0,
                p50_ms: None,
                p99_ms: None,
                failed: 0,
            });
            row.calls += h["calls"].as_u64().unwrap_or(0);
            row.failed += h["failed"].as_u64().unwrap_or(0);
            let max = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            row.p50_ms = max(row.p50_ms, h["p50_ms"].as_f64());
            row.p99_ms = max(row.p99_ms, h["p99_ms"].as_f64());
        }
    }
    let mut groups = Vec::new();
    for c in &settings.consumers {
        // A stream not created yet has no groups; any other error is the operator's to see, not a
        // group that "does not exist".
        let (info, error) = match client.groups(&c.stream).await {
            Ok(gs) => (gs.into_iter().find(|g| g.name == c.group), None),
            Err(e) if e.is_missing_key() => (None, None),
            // Redis's own words for its refusals (the row names the stream and group).
            Err(crate::client::Error::Redis { source, .. }) => (None, Some(source.to_string())),
            Err(e) => (None, Some(e.to_string())),
        };
        let consumers = match &info {
            Some(_) => client.consumers(&c.stream, &c.group).await?,
            None => Vec::new(),
        };
        groups.push(GroupRow {
            stream: c.stream.to_string(),
            group: c.group.clone(),
            exists: info.is_some(),
            consumers,
            pending: info.as_ref().map_or(0, |g| g.pending),
            lag: info.as_ref().and_then(|g| g.lag),
            error,
            per_minute: rates.get(&(c.stream.to_string(), c.group.clone())).copied(),
        });
    }
    let redis = if settings.redis.cluster.is_empty() {
        crate::client::redact_url(&settings.redis.url)
    } else {
        format!(
            "cluster {}",
            settings
                .redis
                .cluster
                .iter()
                .map(|u| crate::client::redact_url(u))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let mut delayed = Vec::new();
    for stream in client.delayed_streams().await.unwrap_or_default() {
        if let Ok((held, next)) = client.delayed_summary(&stream).await
            && held > 0
        {
            let next_in_ms = next.map(|at| at as i64 - now as i64);
            delayed.push(DelayedRow {
                stream,
                held,
                next_in_ms,
            });
        }
    }
    delayed.sort_by(|a, b| a.stream.cmp(&b.stream));
    Ok(Report {
        redis,
        taken_at_ms: now,
        groups,
        handlers: handlers.into_values().collect(),
        daemons,
        delayed,
    })
}

/// How long without a heartbeat before a daemon counts as missing: two intervals (and a second).
fn missing_after_ms(interval: Duration) -> u64 {
    2 * interval.as_millis() as u64 + 1000
}

/// `s` cut to `width` characters (the last one an ellipsis when cut).
fn fit(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(width - 1).collect();
    out.push('…');
    out
}

/// A row whose first column is `name`: on one line when the name fits `width`, else the whole name
/// on a line of its own (up to 100 columns) and the rest of the row under it.
fn row(name: &str, width: usize, rest: &str) -> String {
    if name.chars().count() <= width {
        format!("{name:<width$} {rest}\n")
    } else {
        format!("{}\n{:<width$} {rest}\n", fit(name, 100), "")
    }
}

/// How often a daemon started again after `since_ms`, from its beats (newest first): each beat whose
/// process start differs from the one before it (or, from a daemon that does not send `started`,
/// whose uptime is below it) is a new process.
fn restarts_since(beats: &[&Beat], since_ms: u64) -> u64 {
    beats
        .windows(2)
        .filter(|w| {
            let new_process = match (w[0].started_ms, w[1].started_ms) {
                (Some(now), Some(before)) => now != before,
                _ => w[0].uptime_s < w[1].uptime_s,
            };
            w[0].at_ms >= since_ms && new_process
        })
        .count() as u64
}

fn ago(ms: u64) -> String {
    match ms / 1000 {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s => format!("{}h ago", s / 3600),
    }
}

fn uptime(s: u64) -> String {
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

/// The report as text, at most 100 columns wide.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let rate = |v: Option<f64>| v.map_or("—".to_owned(), |v| format!("{v:.0}"));
    out.push_str(&fit(&format!("redis {}", r.redis), 100));
    out.push_str("\n\n");
    out.push_str(&format!(
        "{:<46} {:>4} {:>8} {:>8} {:>9} {:>9} {:>9}\n",
        "STREAM / GROUP", "CONS", "PENDING", "LAG", "DONE/MIN", "RETRY/MIN", "DLQ/MIN"
    ));
    for g in &r.groups {
        let name = format!("{} / {}", g.stream, g.group);
        if let Some(e) = &g.error {
            out.push_str(&row(&name, 46, &fit(&format!("cannot read: {e}"), 53)));
            continue;
        }
        if !g.exists {
            out.push_str(&row(&name, 46, "(no such group yet)"));
            continue;
        }
        let figures = format!(
            "{:>4} {:>8} {:>8} {:>9} {:>9} {:>9}",
            g.consumers.len(),
            g.pending,
            g.lag.map_or("?".to_owned(), |l| l.to_string()),
            rate(g.per_minute.map(|p| p.processed)),
            rate(g.per_minute.map(|p| p.retried)),
            rate(g.per_minute.map(|p| p.dead_lettered)),
        );
        out.push_str(&row(&name, 46, &figures));
    }
    out.push('\n');
    out.push_str(&format!(
        "{:<46} {:>12} {:>10} {:>10} {:>10}\n",
        "HANDLER", "CALLS", "P50 MS", "P99 MS", "FAILED"
    ));
    if r.handlers.is_empty() {
        out.push_str(
            "(no handler calls reported yet: each heartbeat reports the calls since start)\n",
        );
    }
    let ms = |v: Option<f64>| v.map_or("—".to_owned(), |v| format!("≤{v:.2}"));
    for h in &r.handlers {
        let figures = format!(
            "{:>12} {:>10} {:>10} {:>10}",
            h.calls,
            ms(h.p50_ms),
            ms(h.p99_ms),
            h.failed
        );
        out.push_str(&row(&h.handler, 46, &figures));
    }
    out.push('\n');
    out.push_str(&format!(
        "{:<36} {:<20} {:>10} {:>10} {:>6} {:>9}\n",
        "DAEMON", "STATUS", "SEEN", "UPTIME", "LOOPS", "RESTARTS"
    ));
    if r.daemons.is_empty() {
        out.push_str("(no heartbeats: is [heartbeat] enabled, and a daemon running?)\n");
    }
    for d in &r.daemons {
        out.push_str(&format!(
            "{:<36} {:<20} {:>10} {:>10} {:>6} {:>9}\n",
            fit(&d.server_id, 36),
            if d.verified {
                d.status.clone()
            } else {
                format!("{} (unverified)", d.status)
            },
            ago(d.last_seen_ms_ago),
            uptime(d.uptime_s),
            d.consumers,
            format!("{}/1h", d.restarts_1h)
        ));
        if let (Some(why), "degraded") = (&d.degraded_reasons, d.status.as_str()) {
            out.push_str(&format!("  {}\n", fit(why, 98)));
        }
    }
    if !r.delayed.is_empty() {
        out.push('\n');
        out.push_str(&format!(
            "{:<46} {:>12} {:>20}\n",
            "DELAYED FOR STREAM", "HELD", "NEXT DUE"
        ));
        for d in &r.delayed {
            let next = match d.next_in_ms {
                Some(ms) if ms >= 0 => format!(
                    "in {}",
                    humantime::format_duration(Duration::from_secs((ms as u64).div_ceil(1000)))
                ),
                Some(ms) => format!("{} s overdue", (-ms) / 1000),
                None => "—".into(),
            };
            out.push_str(&row(&d.stream, 46, &format!("{:>12} {next:>20}", d.held)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_killed_daemon_with_default_settings_is_missing_within_a_minute() {
        let defaults = crate::config::raw::RawHeartbeat::default();
        let interval =
            humantime::parse_duration(defaults.interval.value.as_ref().unwrap()).unwrap();
        assert!(super::missing_after_ms(interval) <= 60_000, "{interval:?}");
    }

    use super::*;

    #[test]
    fn the_screen_fits_100_columns_whatever_the_names() {
        let long = "nova:task:an-entity-with-a-very-long-name-indeed:and-a-long-function-too";
        let r = Report {
            redis: format!("redis://{}:6379/0", "h".repeat(200)),
            taken_at_ms: 0,
            groups: vec![GroupRow {
                stream: long.into(),
                group: "workers-with-a-long-name".into(),
                exists: true,
                consumers: vec![],
                pending: 12_345_678,
                lag: Some(99_999_999),
                error: None,
                per_minute: Some(Rates {
                    processed: 123_456_789.0,
                    retried: 1.0,
                    dead_lettered: 0.0,
                }),
            }],
            delayed: vec![DelayedRow {
                stream: long.into(),
                held: 12_345_678_901,
                next_in_ms: Some(-86_400_000),
            }],
            handlers: vec![HandlerRow {
                handler: long.into(),
                calls: 123_456_789_012,
                p50_ms: Some(0.05),
                p99_ms: Some(6553.6),
                failed: 9_876_543_210,
            }],
            daemons: vec![DaemonRow {
                server_id: long.into(),
                status: "degraded".into(),
                degraded_reasons: Some("x".repeat(300)),
                verified: false,
                last_seen_ms_ago: 3_000,
                uptime_s: 90_061,
                consumers: 3,
                restarts_1h: 12,
            }],
        };
        let text = render(&r);
        for line in text.lines() {
            assert!(line.chars().count() <= 100, "{} > 100: {line}", line.len());
        }
        assert!(text.contains("1d 1h") && text.contains("3s ago"), "{text}");
        assert!(text.contains("degraded (unverified)"), "{text}");
        assert!(text.contains("12/1h"), "{text}");
        // Long names are shown whole, on a line of their own, their figures under them.
        let group_name = format!("{long} / workers-with-a-long-name");
        assert!(text.lines().any(|l| l == group_name), "{text}");
        assert!(
            text.lines().any(|l| l == long),
            "the handler's name: {text}"
        );
    }

    fn beat(at_ms: u64, uptime_s: u64) -> Beat {
        Beat {
            at_ms,
            verified: true,
            status: "healthy".into(),
            reasons: None,
            uptime_s,
            started_ms: None,
            consumers: 1,
            groups: vec![],
            handlers: vec![],
        }
    }

    #[test]
    fn restarts_are_counted_where_uptime_goes_back() {
        // Newest first: up 5 s (after a restart), 40 s and 20 s (after another), 70 s, 50 s.
        let beats = [
            beat(200_000, 5),
            beat(180_000, 40),
            beat(160_000, 20),
            beat(140_000, 70),
            beat(120_000, 50),
        ];
        let list: Vec<&Beat> = beats.iter().collect();
        assert_eq!(restarts_since(&list, 0), 2);
        assert_eq!(
            restarts_since(&list, 170_000),
            1,
            "only the last hour counts"
        );
        assert_eq!(restarts_since(&list[..1], 0), 0);
        // With `started`: a restart within the same second of uptime is still a new process.
        let mut quick = [beat(3_000, 0), beat(2_000, 0), beat(1_000, 0)];
        quick[0].started_ms = Some(2_500);
        quick[1].started_ms = Some(500);
        quick[2].started_ms = Some(500);
        let list: Vec<&Beat> = quick.iter().collect();
        assert_eq!(restarts_since(&list, 0), 1);
    }
}
