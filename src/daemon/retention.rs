//! Retention: trimming streams by length or age, never past what a group still needs.
//!
//! Owns the periodic janitor. For each configured stream it computes the oldest id that the rules
//! allow to keep (`max_len` newest entries, entries younger than `max_age`), then lowers it to what every
//! consumer group of the stream still needs — its oldest pending entry, and everything after its last
//! delivered one — and trims before that id (XTRIM MINID). A lagging group therefore never loses an entry
//! it has not acknowledged or not yet received.

use std::time::Duration;

use crate::client::{Client, ReadOptions};
use crate::config::Retention;
use crate::model::envelope::now_ms;
use crate::shutdown::Shutdown;

/// A stream id as (milliseconds, sequence).
type Id = (u64, u64);

fn parse(id: &str) -> Option<Id> {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

fn show(id: Id) -> String {
    format!("{}-{}", id.0, id.1)
}

/// Runs until shutdown, trimming every `every`.
pub async fn run(client: Client, rules: Vec<Retention>, every: Duration, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return,
        }
        for r in &rules {
            match trim(&client, r).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(stream = %r.stream, trimmed = n, "retention trimmed old entries")
                }
                Err(e) => {
                    tracing::warn!(stream = %r.stream, error = %e, "retention could not trim")
                }
            }
        }
    }
}

/// One pass over one stream; returns how many entries were removed.
pub async fn trim(client: &Client, r: &Retention) -> crate::client::Result<u64> {
    // What the rules allow: entries before `wanted` may go.
    let mut wanted: Option<Id> = None;
    if let Some(age) = r.max_age {
        let cutoff = now_ms().saturating_sub(age.as_millis() as u64);
        wanted = Some((cutoff, 0));
    }
    if let Some(n) = r.max_len {
        let newest = client
            .read(
                &r.stream,
                &ReadOptions {
                    count: Some(n),
                    reverse: true,
                    ..ReadOptions::default()
                },
            )
            .await?;
        if newest.len() as u64 == n
            && let Some(oldest_kept) = newest.last().and_then(|e| parse(&e.id))
        {
            wanted = Some(wanted.map_or(oldest_kept, |w| w.max(oldest_kept)));
        }
    }
    let Some(mut min_id) = wanted else {
        return Ok(0);
    };
    // What the groups still need: their oldest pending entry, and everything after the last delivered.
    for g in client.groups(&r.stream).await? {
        if let Some(delivered) = parse(&g.last_delivered_id) {
            min_id = min_id.min(delivered);
        }
        if g.pending > 0 {
            let summary = client.pending_summary(&r.stream, &g.name).await?;
            if let Some(oldest) = summary.min_id.as_deref().and_then(parse) {
                min_id = min_id.min(oldest);
            }
        }
    }
    if min_id == (0, 0) {
        return Ok(0);
    }
    client.trim_before(&r.stream, &show(min_id)).await
}
