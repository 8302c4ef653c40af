//! The daemon's proof of identity kept valid while it runs: a self-issued token is renewed once four
//! fifths of its lifetime have passed; a configured one cannot be, so the daemon turns `degraded`
//! (heartbeat, STATUS, log) when less than a quarter of its lifetime — at most an hour — remains, and
//! says so until it is rotated (a new `identity.token` and a restart).

use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::auth::jwt::KeySet;
use crate::config::DaemonIdentity;
use crate::health::Health;
use crate::shutdown::Shutdown;

/// What the degraded reasons of this service start with.
const CONDITION: &str = "identity token";

/// The service: checks every second until `stop`.
pub async fn watch(
    mut id: DaemonIdentity,
    keys: Arc<KeySet>,
    health: Arc<Health>,
    mut stop: Shutdown,
) {
    let lifetime = until(id.expires_at);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.wait() => return,
            _ = tick.tick() => check(&mut id, &keys, &health, lifetime),
        }
    }
}

fn check(id: &mut DaemonIdentity, keys: &KeySet, health: &Health, lifetime: Duration) {
    let left = until(id.expires_at);
    if id.renewable {
        if left > lifetime / 5 {
            return;
        }
        match keys.issue(&id.identity.subject, &id.identity.roles, lifetime) {
            Ok((token, expires_at)) => {
                id.token = token;
                id.expires_at = expires_at;
                health.recover(CONDITION);
                info!(expires_in = ?until(expires_at), "renewed the daemon's identity token");
            }
            Err(e) => {
                let reason = format!("cannot renew the daemon's identity token: {e}");
                if health.degraded().iter().all(|r| *r != reason) {
                    error!(error = %e, "cannot renew the daemon's identity token");
                }
                health.degrade(CONDITION, reason);
            }
        }
        return;
    }
    let window = (lifetime / 4).min(Duration::from_secs(3600));
    if left > window {
        // Never close (a rotated token takes a restart, which starts this over).
        health.recover(CONDITION);
        return;
    }
    let reason = if left.is_zero() {
        "the daemon's identity token has expired: rotate identity.token and restart".to_string()
    } else {
        format!(
            "the daemon's identity token expires in {}: rotate identity.token and restart",
            humantime::format_duration(Duration::from_secs(left.as_secs()))
        )
    };
    if !health.degraded().iter().any(|r| r.contains(CONDITION)) {
        warn!(expires_in = ?left, "the daemon's identity token is about to lapse; the daemon is degraded until it is rotated");
    }
    health.degrade(CONDITION, reason);
}

/// How long from now until `epoch_secs` (zero once it has passed).
fn until(epoch_secs: u64) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_secs(epoch_secs).saturating_sub(now)
}
