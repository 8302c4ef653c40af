//! The outbox relay of one source stream on a Redis Cluster (docs/design.md, "Redis Cluster").
//!
//! Owns the loop that empties a source's outbox into the streams its replies were meant for: this
//! relay consumer's own pending entries first (a crash's leftovers), then new entries as they come,
//! and every `claim_interval` the entries other relays left idle longer than `claim_min_idle` (a dead
//! daemon, or a target that refused). What one pass writes and why it is effectively-once is
//! [`crate::client::outbox`]'s business. The loop retries Redis trouble with backoff and returns
//! when stopped; an entry it cannot deliver stays pending and is counted, never dropped.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::client::{Client, ReadFrom, Result};
use crate::model::envelope::Entry;
use crate::model::id::StreamId;
use crate::shutdown::Shutdown;

/// How a relay runs.
#[derive(Clone, Debug)]
pub struct RelaySettings {
    /// The stream whose outbox this relay empties.
    pub source: Arc<str>,
    /// This daemon's consumer name (stable and unique per daemon, as for its groups).
    pub consumer: String,
    pub batch_size: usize,
    pub block: Duration,
    pub claim_min_idle: Duration,
    pub claim_interval: Duration,
    /// How long a delivery's record outlives a crash between delivering and settling.
    pub keep: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
}

/// Runs the relay until `stop`; Redis trouble is retried with backoff.
pub async fn run(client: Client, s: RelaySettings, mut stop: Shutdown) {
    // Deliveries wait for a replica (WAIT blocks its connection): on a connection of the relay's own.
    let client = match client.dedicated(crate::client::outbox::REPLICA_WAIT) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(stream = %s.source, error = %e, "cannot open the outbox relay's connection");
            return;
        }
    };
    crate::metrics::global().relay_started(&s.source);
    let mut backoff = Backoff::new(s.retry_min, s.retry_max);
    loop {
        match pass(&client, &s, &mut stop, &mut backoff).await {
            Ok(()) => return,
            Err(e) => {
                let delay = backoff.fail();
                if backoff.failures() == 1 || backoff.failures().is_multiple_of(10) {
                    warn!(stream = %s.source, error = %e, failures = backoff.failures(), "outbox relay failed; retrying");
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.wait() => return,
                }
            }
        }
    }
}

/// One run of the loop until stopped (Ok) or Redis fails it (Err).
async fn pass(
    client: &Client,
    s: &RelaySettings,
    stop: &mut Shutdown,
    backoff: &mut Backoff,
) -> Result<()> {
    client.outbox_group(&s.source).await?;
    // An entry read at the end of a long BLOCK still needs most of its deadline (see [`deadline`]):
    // block at most a quarter of claim_min_idle.
    let block = s.block.min(s.claim_min_idle / 4);
    let mut reader = client.outbox_reader(&s.source, &s.consumer, block)?;
    let count = s.batch_size as u64;
    // Our own pending entries: what a crash left between delivering and settling.
    let mut after = "0".to_owned();
    loop {
        let asked = deadline(s);
        let got = reader.read(ReadFrom::Pending(&after), count, None).await?;
        // Ids whose entries are gone (deleted or trimmed by hand while pending): nothing to deliver.
        client.outbox_forget(&s.source, &got.deleted).await?;
        let last = [got.entries.last().map(|e| &e.id), got.deleted.last()]
            .into_iter()
            .flatten()
            .max_by_key(|id| StreamId::parse(id).unwrap_or(StreamId::MIN));
        let Some(last) = last else {
            break;
        };
        after = last.clone();
        if !got.entries.is_empty() {
            relay(client, s, &got.entries, asked).await?;
        }
    }
    if backoff.failures() > 0 {
        info!(stream = %s.source, "outbox relay running again");
        backoff.succeed();
    }
    let mut next_claim = tokio::time::Instant::now() + s.claim_interval;
    loop {
        if stop.is_triggered() {
            return Ok(());
        }
        let asked = deadline(s);
        let got = tokio::select! {
            got = reader.read(ReadFrom::New, count, Some(block)) => got?,
            _ = stop.wait() => return Ok(()),
        };
        if !got.entries.is_empty() {
            relay(client, s, &got.entries, asked).await?;
        }
        if tokio::time::Instant::now() >= next_claim {
            claim_idle(client, s).await?;
            next_claim = tokio::time::Instant::now() + s.claim_interval;
        }
    }
}

/// Claims and relays every entry idle longer than `claim_min_idle`.
async fn claim_idle(client: &Client, s: &RelaySettings) -> Result<()> {
    let mut start = "0-0".to_owned();
    loop {
        let asked = deadline(s);
        let got = client
            .outbox_claim(
                &s.source,
                &s.consumer,
                s.claim_min_idle,
                &start,
                s.batch_size as u64,
            )
            .await?;
        if !got.entries.is_empty() {
            info!(stream = %s.source, entries = got.entries.len(), "claimed idle outbox entries");
            relay(client, s, &got.entries, asked).await?;
        }
        if got.next == "0-0" {
            return Ok(());
        }
        start = got.next;
    }
}

/// When this relay's hold on entries asked for now ends: half of `claim_min_idle` from now, so it
/// ends before any other relay may claim them (which needs them idle `claim_min_idle`, counted from
/// when Redis handed them over: after the asking). Reads block at most a quarter of it, so an entry
/// arriving late in a read keeps at least a quarter for its delivery.
fn deadline(s: &RelaySettings) -> u64 {
    crate::model::envelope::now_ms() + (s.claim_min_idle / 2).as_millis() as u64
}

async fn relay(client: &Client, s: &RelaySettings, entries: &[Entry], deadline: u64) -> Result<()> {
    let done = client.relay(&s.source, entries, deadline, s.keep).await?;
    let m = crate::metrics::global();
    let count = |outcome: &str, n: usize| {
        if n > 0 {
            m.relayed
                .get_or_create(&crate::metrics::RelayLabels {
                    stream: s.source.to_string(),
                    outcome: outcome.to_owned(),
                })
                .inc_by(n as u64);
        }
    };
    count("delivered", done.delivered);
    count("repeated", done.repeated);
    count("refused", done.refused.len());
    count("unreplicated", done.unreplicated);
    if done.unreplicated > 0 {
        warn!(stream = %s.source, entries = done.unreplicated, "delivered replies have not reached a replica of their target's master yet; they stay pending and are checked again after claim_min_idle");
    }
    if done.repeated > 0 {
        info!(stream = %s.source, entries = done.repeated, "outbox entries delivered before were settled without writing them again");
    }
    for (id, why) in done.refused.iter().take(3) {
        warn!(stream = %s.source, id = %id, reason = %why, "an outbox entry cannot be delivered now; it stays pending");
    }
    Ok(())
}
