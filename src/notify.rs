//! systemd's notify protocol: READY, STATUS, WATCHDOG, STOPPING, EXTEND_TIMEOUT and RELOADING.
//!
//! Owns a thin wrapper over `sd-notify` (a no-op when `NOTIFY_SOCKET` is unset) whose sends never block:
//! a service manager that stops reading must not stall the daemon. When to ping the watchdog is decided
//! by [`crate::health`].

use std::time::Duration;

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
