//! Retention: trimming streams by length or age, never past what a group still needs.
//!
//! Owns the periodic janitor: every `interval`, each configured stream is trimmed by
//! [`Client::trim_retained`], which keeps the `max_len` newest entries and entries younger than
//! `max_age`, lowered to what every consumer group of the stream still needs — its oldest pending entry,
//! and everything from its last delivered one on. A lagging group therefore never loses an entry it has
//! not acknowledged or not yet received. The cut is computed inside Redis; no entry is fetched.

use std::time::Duration;

use crate::client::Client;
use crate::config::Retention;
use crate::model::StreamId;
use crate::model::envelope::now_ms;
use crate::shutdown::Shutdown;

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
                Ok((0, cut)) => {
                    tracing::debug!(stream = %r.stream, cut = ?cut.map(|c| c.to_string()), "retention pass: nothing to trim")
                }
                Ok((n, cut)) => {
                    tracing::info!(stream = %r.stream, trimmed = n, cut = ?cut.map(|c| c.to_string()), "retention trimmed old entries")
                }
                Err(e) => {
                    tracing::warn!(stream = %r.stream, error = %e, "retention could not trim")
                }
            }
        }
    }
}

/// One pass over one stream; returns how many entries were removed and the id trimmed before.
pub async fn trim(
    client: &Client,
    r: &Retention,
) -> crate::client::Result<(u64, Option<StreamId>)> {
    let older_than = r.max_age.map(|age| StreamId {
        ms: now_ms().saturating_sub(age.as_millis() as u64),
        seq: 0,
    });
    if r.max_len.is_none() && older_than.is_none() {
        return Ok((0, None));
    }
    client.trim_retained(&r.stream, r.max_len, older_than).await
}
