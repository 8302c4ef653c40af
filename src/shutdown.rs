//! Signals and shutdown: one source of OS signals turned into an enum, one fan-out to every task.
//!
//! Owns the translation SIGTERM/SIGINT → [`Signal::Stop`], SIGHUP → [`Signal::Reload`], and the
//! [`Shutdown`] handle tasks wait on. No task reads OS signals itself; the daemon's main task does, and
//! triggers the fan-out. Handles form a tree ([`Shutdown::child`]): a consumer's own stop (used by
//! reload) is a child of the daemon's, so it fires on either without a helper task per consumer.

use futures_util::stream::{Stream, StreamExt};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio_util::sync::CancellationToken;

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

/// The sending half: triggers every [`Shutdown`] made from it, and their children. Dropping it
/// triggers them too, so a task whose owner is gone never runs on unsupervised.
#[derive(Debug)]
pub struct Trigger(CancellationToken);

/// The receiving half, cloned into every task. Waiting is cancel-safe.
#[derive(Clone, Debug)]
pub struct Shutdown(CancellationToken);

/// A connected trigger and shutdown handle.
pub fn channel() -> (Trigger, Shutdown) {
    let token = CancellationToken::new();
    (Trigger(token.clone()), Shutdown(token))
}

impl Trigger {
    pub fn trigger(&self) {
        self.0.cancel();
    }
}

impl Drop for Trigger {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl Shutdown {
    pub fn is_triggered(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Resolves once shutdown is triggered (at once if it already was).
    pub async fn wait(&mut self) {
        self.0.cancelled().await
    }

    /// A handle that fires with this one or on its own trigger, whichever comes first (a consumer's
    /// own stop, used by reload, under the daemon's).
    pub fn child(&self) -> (Trigger, Shutdown) {
        let token = self.0.child_token();
        (Trigger(token.clone()), Shutdown(token))
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

    #[tokio::test]
    async fn a_child_fires_with_its_parent_or_alone() {
        let (parent_trigger, parent) = channel();
        let (own_trigger, mut own) = parent.child();
        let (_other_trigger, mut other) = parent.child();
        own_trigger.trigger();
        own.wait().await;
        assert!(!parent.is_triggered(), "a child's trigger stays below it");
        assert!(!other.is_triggered());
        parent_trigger.trigger();
        other.wait().await;
    }

    #[tokio::test]
    async fn a_dropped_trigger_stops_its_tasks() {
        let (trigger, mut shutdown) = channel();
        drop(trigger);
        shutdown.wait().await;
    }
}
