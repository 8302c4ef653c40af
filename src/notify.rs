//! systemd's notify protocol, and the liveness of the consumer loops that the watchdog reports.
//!
//! Owns a thin wrapper over `sd-notify` (a no-op when `NOTIFY_SOCKET` is unset) and [`Health`]: each loop
//! publishes until when it is healthy — progressing, blocked in a read that will return, backing off, or
//! waiting for handlers within their deadline — and the daemon sends WATCHDOG=1 only while every loop is.
//! A wedged loop therefore stops the pings and systemd restarts the service; a Redis outage does not.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// Sends notifications to the service manager, if there is one.
#[derive(Clone, Copy, Debug, Default)]
pub struct Notifier;

impl Notifier {
    /// Sends without ever blocking: a manager that stops reading (its socket's queue full) must not
    /// stall the thread that reports — the daemon's runtime. A notification that finds the queue full
    /// is dropped; STATUS and WATCHDOG are repeated anyway.
    fn send(&self, states: &[NotifyState<'_>]) {
        let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
            return;
        };
        let mut msg = String::new();
        for s in states {
            msg.push_str(&s.to_string());
            msg.push('\n');
        }
        match send_nonblocking(&socket, msg.as_bytes()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tracing::debug!("the service manager's notify socket is full; notification dropped")
            }
            Err(e) => tracing::warn!(error = %e, "cannot notify the service manager"),
        }
    }

    /// READY=1 with a first status line.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// STOPPING=1.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
    }

    /// Asks for `more` time to finish stopping (EXTEND_TIMEOUT_USEC).
    pub fn extend_timeout(&self, more: Duration) {
        let usec = u32::try_from(more.as_micros()).unwrap_or(u32::MAX);
        self.send(&[NotifyState::ExtendTimeoutUsec(usec)]);
    }

    /// RELOADING=1 with MONOTONIC_USEC (required by systemd ≥ 253).
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    /// The watchdog interval systemd expects pings within, if it set one.
    pub fn watchdog_interval() -> Option<Duration> {
        sd_notify::watchdog_enabled()
    }
}

fn epoch() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn millis(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_millis() as u64
}

/// One datagram to `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace), non-blocking.
fn send_nonblocking(socket: &std::ffi::OsStr, msg: &[u8]) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};

    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    let addr = match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(std::path::Path::new(socket))?,
    };
    let sent = sock.send_to_addr(msg, &addr)?;
    if sent == msg.len() {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            "incomplete notification",
        ))
    }
}

/// One loop's liveness: until when it counts as healthy, and why it is degraded while it still turns
/// (its commits failing, Redis in trouble, restarts).
#[derive(Debug)]
pub struct Liveness {
    pub name: String,
    until_ms: AtomicU64,
    degraded: Mutex<Option<String>>,
}

impl Liveness {
    /// Healthy until `until` (set on every turn of the loop).
    pub fn healthy_until(&self, until: Instant) {
        self.until_ms.store(millis(until), Ordering::Relaxed);
    }

    /// The loop turns but does not do its work: says why, until [`Liveness::recover`].
    pub fn degrade(&self, reason: String) {
        *self.degraded.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
    }

    pub fn recover(&self) {
        self.degraded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    fn is_healthy(&self, now: Instant) -> bool {
        self.until_ms.load(Ordering::Relaxed) > millis(now)
    }
}

/// The liveness of every loop, and conditions that degrade the daemon without stopping a loop (an
/// identity token about to lapse). Only loops decide the watchdog; both decide `degraded`.
#[derive(Debug, Default)]
pub struct Health {
    loops: Mutex<Vec<Arc<Liveness>>>,
    conditions: Mutex<std::collections::BTreeMap<&'static str, String>>,
}

impl Health {
    /// Registers a loop, healthy for `grace` from now.
    pub fn register(&self, name: &str, grace: Duration) -> Arc<Liveness> {
        let l = Arc::new(Liveness {
            name: name.to_owned(),
            until_ms: AtomicU64::new(millis(Instant::now() + grace)),
            degraded: Mutex::new(None),
        });
        self.loops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(l.clone());
        l
    }

    /// Stops watching a loop (it was stopped on purpose).
    pub fn forget(&self, name: &str) {
        self.loops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|l| l.name != name);
    }

    /// Marks the daemon degraded for `what`, with a reason operators can act on.
    pub fn degrade(&self, what: &'static str, reason: String) {
        self.conditions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(what, reason);
    }

    /// Clears a condition set by [`Health::degrade`].
    pub fn recover(&self, what: &'static str) {
        self.conditions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(what);
    }

    /// Why the daemon is degraded: loops not making progress, then every condition (empty when it is
    /// healthy).
    pub fn degraded(&self) -> Vec<String> {
        let now = Instant::now();
        let mut out: Vec<String> = Vec::new();
        for l in self.loops.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if !l.is_healthy(now) {
                out.push(format!("loop {} is not making progress", l.name));
            } else if let Some(why) = &*l.degraded.lock().unwrap_or_else(|p| p.into_inner()) {
                out.push(format!("{}: {why}", l.name));
            }
        }
        out.extend(
            self.conditions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned(),
        );
        out
    }

    /// Names of the loops that are not healthy now (empty when all are).
    pub fn unhealthy(&self) -> Vec<String> {
        let now = Instant::now();
        self.loops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|l| !l.is_healthy(now))
            .map(|l| l.name.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_that_stops_reporting_becomes_unhealthy() {
        let h = Health::default();
        let a = h.register("a", Duration::from_secs(60));
        let b = h.register("b", Duration::from_secs(60));
        assert!(h.unhealthy().is_empty());
        b.healthy_until(Instant::now() - Duration::from_secs(1));
        assert_eq!(h.unhealthy(), ["b"]);
        a.healthy_until(Instant::now() - Duration::from_secs(1));
        assert_eq!(h.unhealthy().len(), 2);
    }

    #[test]
    fn conditions_degrade_without_touching_the_loops() {
        let h = Health::default();
        h.register("a", Duration::from_secs(60));
        assert!(h.degraded().is_empty());
        h.degrade("token", "the token lapses soon".into());
        assert_eq!(h.degraded(), ["the token lapses soon"]);
        assert!(h.unhealthy().is_empty(), "the watchdog is about loops only");
        h.recover("token");
        assert!(h.degraded().is_empty());
        let b = h.register("b", Duration::from_secs(60));
        b.degrade("commits failing".into());
        assert_eq!(h.degraded(), ["b: commits failing"]);
        assert!(
            h.unhealthy().is_empty(),
            "a degraded loop still feeds the watchdog"
        );
        b.recover();
        assert!(h.degraded().is_empty());
    }
}
