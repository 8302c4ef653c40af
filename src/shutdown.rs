//! Signals and shutdown: one source of OS signals turned into an enum, one fan-out to every task.
//!
//! Owns the translation SIGTERM/SIGINT → [`Signal::Stop`], SIGHUP → [`Signal::Reload`], and the
//! [`Shutdown`] handle tasks wait on. No task reads OS signals itself; the daemon's main task does, and
//! triggers the fan-out (mini-redis's `Shutdown`, vector's `signal.rs`).

use futures_util::stream::{Stream, StreamExt};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::sync::watch;

/// What the operator asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT: drain and exit; a second one exits at once.
    Stop,
    /// SIGHUP: reload the config.
    Reload,
}

/// The process's signals as a stream. Registering replaces the default actions (SIGHUP would otherwise
/// kill the process).
pub fn signals() -> std::io::Result<impl Stream<Item = Signal> + Unpin> {
    let signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    Ok(signals.map(|s| {
        if s == SIGHUP {
            Signal::Reload
        } else {
            Signal::Stop
        }
    }))
}

/// The sending half: triggers every [`Shutdown`] made from it.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// The receiving half, cloned into every task. Waiting is cancel-safe.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

/// A connected trigger and shutdown handle.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn trigger(&self) {
        let _ = self.0.send(true);
    }
}

impl Shutdown {
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown is triggered (at once if it already was, or if the trigger is gone).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// A shutdown that follows whichever of `a` and `b` comes first (a consumer's own stop, used by
    /// reload, and the daemon's).
    pub fn either(mut a: Shutdown, mut b: Shutdown) -> Shutdown {
        let (trigger, both) = channel();
        if a.is_triggered() || b.is_triggered() {
            trigger.trigger();
            return both;
        }
        tokio::spawn(async move {
            tokio::select! {
                _ = a.wait() => {}
                _ = b.wait() => {}
            }
            trigger.trigger();
        });
        both
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_clone_sees_the_trigger() {
        let (trigger, shutdown) = channel();
        let mut a = shutdown.clone();
        let mut b = shutdown;
        assert!(!a.is_triggered());
        let waiter = tokio::spawn(async move { a.wait().await });
        trigger.trigger();
        waiter.await.unwrap();
        b.wait().await;
        assert!(b.is_triggered());
    }
}
