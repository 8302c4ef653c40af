//! The consumer loop's decisions, with no I/O: what a delivered entry becomes ([`dispatch`]), what a
//! handler's outcome commits ([`decide`]), what a commit's verdict means for each message ([`settle`]),
//! and what a failed commit calls for ([`on_commit_error`], [`isolate`]).
//!
//! The loop ([`super::consumer`]) does what these say — sends, waits, keeps the bookkeeping — and
//! reports each result as an event ([`super::events`]). The delivery rules live here alone, so each
//! can be tested without a redis-server (the table tests below).

use std::fmt::Display;
use std::sync::Arc;

use std::time::Duration;

use super::router::{Selection, Unmatched};
use crate::auth::jwt::KeySet;
use crate::client::Error;
use crate::model::decided::{Committed, Effect, Finished};
use crate::model::limits::{self, Size};
use crate::model::message::{Handler, Message, Once, Outcome, Sender};

/// Who decided a message no handler ran for, as `_dlq_handler` and the `handler` label say.
pub const ENGINE: &str = "redstream";

/// What a delivered entry is to become.
pub enum Dispatch {
    /// Decided without a handler: commit this effect in the name of `by`.
    Settle { effect: Effect, by: Arc<str> },
    /// Run this handler.
    Run(Arc<dyn Handler>),
}

/// A delivered message's fate before any handler runs. Delivered more often than `max_deliveries`:
/// dead-lettered. Then its route decides: dropped or acked unmatched (no replies), dead-lettered
/// unmatched, or run — once `verify` accepted its sender when the route wants a signed one (a refusal
/// dead-letters it with `verify`'s reason, in the handler's name).
pub fn dispatch(
    deliveries: u64,
    max_deliveries: u32,
    selection: Selection<'_>,
    verify: impl FnOnce() -> Result<(), String>,
) -> Dispatch {
    let settle = |effect, by: &str| Dispatch::Settle {
        effect,
        by: by.into(),
    };
    if deliveries > u64::from(max_deliveries) {
        let reason =
            format!("delivered {deliveries} times, more than max_deliveries ({max_deliveries})");
        return settle(Effect::DeadLetter(reason), ENGINE);
    }
    match selection {
        Selection::Drop => settle(Effect::Replies(Vec::new()), "drop"),
        Selection::Unmatched(Unmatched::Ack) => settle(Effect::Replies(Vec::new()), "unmatched"),
        Selection::Unmatched(Unmatched::DeadLetter) => settle(
            Effect::DeadLetter("unmatched: no route matches this message".into()),
            "router",
        ),
        Selection::Run {
            handler,
            require_sender_token,
        } => match require_sender_token.then(verify) {
            Some(Err(reason)) => settle(Effect::DeadLetter(reason), handler.name()),
            _ => Dispatch::Run(handler.clone()),
        },
    }
}

/// The sender of a message on a route that wants one: its signature (`_sig`, taken off the fields)
/// verified against its fields and stream, its signer's claims returned — the handler gets those,
/// never a credential. A bare `_token` is never obeyed (anyone who reads the stream could replay it).
/// The use of the signature is remembered until it expires, plus `grace` (a copy accepted at the last
/// moment may commit a handler's deadline later).
pub fn sender(
    keys: &KeySet,
    msg: &Message,
    signed: Option<Vec<u8>>,
    bare_token: bool,
    grace: Duration,
) -> Result<Sender, String> {
    let Some(signed) = signed else {
        return Err(if bare_token {
            "unauthenticated: the route requires a signed message (_sig); a bare _token is not \
             accepted, anyone who reads the stream could replay it"
                .to_string()
        } else {
            "unauthenticated: the route requires a signed message (_sig) and there is none"
                .to_string()
        });
    };
    let signed = std::str::from_utf8(&signed)
        .map_err(|_| "unauthenticated: _sig is not text".to_string())?;
    let verified = keys
        .verify_message(signed, &msg.stream, &msg.fields)
        .map_err(|e| format!("unauthenticated: {e}"))?;
    Ok(Sender {
        roles: verified.identity.roles.to_strings(),
        subject: verified.identity.subject,
        once: Some(Once {
            jti: verified.jti,
            until_ms: verified.remember_until_ms + grace.as_millis() as u64,
        }),
    })
}

/// What a handler's outcome commits, or the reason the entry stays pending for a retry (`Err`).
/// Replies go only where `may_publish` allows and must fit one commit write, or the message is
/// dead-lettered; a retry on the last allowed delivery dead-letters it; a rejection does at once.
pub fn decide<E: Display>(
    outcome: Outcome,
    deliveries: u64,
    max_deliveries: u32,
    may_publish: impl Fn(&str) -> Result<(), E>,
) -> Result<Effect, String> {
    match outcome {
        Outcome::Success(replies) => {
            // WASM handlers are checked (roles and `[limits]`) at publish time too: this is the last
            // line, for every handler kind.
            // Changes of state were checked against the handler's roles with its config.
            for r in replies.iter().filter(|r| !r.kind.is_state()) {
                if let Err(e) = may_publish(&r.stream) {
                    return Ok(Effect::DeadLetter(format!("reply refused: {e}")));
                }
                // One reply is one XADD in the commit script: it must fit in one call.
                if r.fields.len() > limits::MAX_FIELDS {
                    return Ok(Effect::DeadLetter(format!(
                        "reply refused: the reply to {} has {} fields, more than one commit writes ({})",
                        r.stream,
                        r.fields.len(),
                        limits::MAX_FIELDS
                    )));
                }
            }
            Ok(Effect::Replies(replies))
        }
        Outcome::Retry(reason) | Outcome::RetryAfter(reason, _)
            if deliveries >= u64::from(max_deliveries) =>
        {
            Ok(Effect::DeadLetter(format!(
                "{reason} (gave up after {deliveries} deliveries)"
            )))
        }
        Outcome::Retry(reason) | Outcome::RetryAfter(reason, _) => Err(reason),
        Outcome::Reject(reason) => Ok(Effect::DeadLetter(reason)),
    }
}

/// How a committed message ended: it leaves flight.
#[derive(Clone, Debug, PartialEq)]
pub enum Fate {
    /// Its replies (this many) were written and it was acked.
    Committed { replies: usize },
    /// Dead-lettered with this reason, and acked.
    DeadLettered(String),
    /// Over the consumer's limits: dead-lettered by reference, and acked.
    TooLarge(Size),
    /// Gone from the stream: acked.
    Vanished,
    /// Another consumer owned it by commit time: nothing written, the result discarded.
    NotOurs,
    /// Acked with some of its writes made (this error stopped the rest).
    Partial(String),
    /// The dead-letter stream refused it: it stays pending in Redis, claimed again later.
    Stranded(String),
}

impl Fate {
    /// The `outcome` label of `redstream_messages_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Fate::Committed { .. } => "success",
            Fate::DeadLettered(_) | Fate::TooLarge(_) => "dead_lettered",
            Fate::Vanished => "vanished",
            Fate::NotOurs => "not_ours",
            Fate::Partial(_) => "partial",
            Fate::Stranded(_) => "refused",
        }
    }
}

/// Why a message is committed again as a dead letter, nothing of it having been written.
#[derive(Clone, Debug, PartialEq)]
pub enum Redo {
    /// A reply target refused it (the reason names the key).
    ReplyRefused(String),
    /// A copy of a signed message that took effect as `original`.
    Replayed { original: String },
}

/// What happens to one message after its commit reported.
#[derive(Debug)]
pub enum Settle {
    /// It leaves flight.
    Done(Finished, Fate),
    /// Commit it again at once, as the dead letter it now carries.
    Redo(Finished, Redo),
    /// Nothing of it was written: commit it again after a backoff (with Redis's refusal, if it was
    /// refused rather than not tried).
    Again(Finished, Option<String>),
    /// Nothing of it was written, and the state its handler read has changed (the key named): run
    /// its handler again, on the state as it is now.
    Rerun(Finished, String),
}

/// What the commit's `verdict` means for `f`.
pub fn settle(verdict: Committed, f: Finished) -> Settle {
    let fate = match (verdict, &f.effect) {
        (Committed::Yes, Effect::Replies(r)) => Fate::Committed {
            replies: r.iter().filter(|r| !r.kind.is_state()).count(),
        },
        (Committed::Yes, Effect::DeadLetter(reason)) => Fate::DeadLettered(reason.clone()),
        (Committed::Yes, Effect::TooLarge(size)) => Fate::TooLarge(*size),
        (Committed::Yes, Effect::Vanished) => Fate::Vanished,
        (Committed::NotOurs, _) => Fate::NotOurs,
        (Committed::Partial(e), _) => Fate::Partial(e),
        (Committed::Refused(reason), Effect::Replies(_)) => {
            let effect = Effect::DeadLetter(format!("reply refused: {reason}"));
            return Settle::Redo(Finished { effect, ..f }, Redo::ReplyRefused(reason));
        }
        // The dead-letter stream itself cannot take it.
        (Committed::Refused(reason), _) => Fate::Stranded(reason),
        (Committed::Replayed(original), _) => {
            // Its dead letter records no use of the signature: that is the original's.
            let mut msg = f.msg;
            msg.sender = msg.sender.map(|s| {
                Arc::new(Sender {
                    once: None,
                    ..(*s).clone()
                })
            });
            let effect = Effect::DeadLetter(format!(
                "replayed: this signed message already took effect as {original}"
            ));
            let f = Finished {
                msg,
                effect,
                handler: f.handler,
            };
            return Settle::Redo(f, Redo::Replayed { original });
        }
        (Committed::Failed(e), _) => return Settle::Again(f, Some(e)),
        (Committed::NotTried, _) => return Settle::Again(f, None),
        (Committed::Conflict(key), _) => return Settle::Rerun(f, key),
    };
    Settle::Done(f, fate)
}

/// What a commit that failed as a whole calls for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitFailure {
    /// The group (or its stream) is gone, and with it every delivery of the batch: no commit of them
    /// can succeed. They leave flight unacked; what Redis still holds is delivered again.
    GroupGone,
    /// Redis does not know the script (restarted, SCRIPT FLUSH): load it, commit again.
    ScriptMissing,
    /// Retrying cannot help: the loop ends with the error.
    Fatal,
    /// Refused for a reason that is not the server's, with nothing written: one of the messages
    /// causes it ([`isolate`]).
    Isolate,
    /// Redis trouble: commit again after a backoff.
    Retry,
}

/// Classifies a commit's failure.
pub fn on_commit_error(e: &Error) -> CommitFailure {
    match e {
        Error::NoGroup { .. } => CommitFailure::GroupGone,
        Error::Redis { source, .. } if source.code() == Some("NOSCRIPT") => {
            CommitFailure::ScriptMissing
        }
        e if e.is_permanent() => CommitFailure::Fatal,
        e if !e.is_transient() => CommitFailure::Isolate,
        _ => CommitFailure::Retry,
    }
}

/// The next step in finding the message whose commit Redis refuses whatever it is batched with.
#[derive(Debug)]
pub enum Isolated {
    /// Commit the batch in halves, apart.
    Halves(Vec<Finished>),
    /// It is alone: commit it as this dead letter.
    DeadLetter(Finished),
    /// It is alone and already a dead letter: it leaves flight and stays pending in Redis.
    Stranded(Finished),
    /// Nothing to isolate.
    Empty,
}

/// Halves a refused batch until the message that makes it fail is alone; that one is dead-lettered
/// with the refusal, or — if even its dead letter is refused — left pending.
pub fn isolate(mut batch: Vec<Finished>, refusal: &impl Display) -> Isolated {
    if batch.len() > 1 {
        return Isolated::Halves(batch);
    }
    let Some(f) = batch.pop() else {
        return Isolated::Empty;
    };
    match f.effect {
        Effect::Replies(_) | Effect::Vanished => Isolated::DeadLetter(Finished {
            effect: Effect::DeadLetter(format!("commit refused: {refusal}")),
            ..f
        }),
        Effect::DeadLetter(_) | Effect::TooLarge(_) => Isolated::Stranded(f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::envelope::Fields;
    use crate::model::message::{Reply, ReplyKind};

    fn finished(effect: Effect, signed: bool) -> Finished {
        let sender = signed.then(|| {
            Arc::new(Sender {
                subject: "s".into(),
                roles: vec!["task_write".into()],
                once: Some(Once {
                    jti: "j".into(),
                    until_ms: 1,
                }),
            })
        });
        Finished {
            msg: Message {
                stream: "nova:task:m:in".into(),
                id: "1-1".into(),
                fields: Fields::default(),
                deliveries: 1,
                sender,
            },
            effect,
            handler: "h".into(),
        }
    }

    fn reply(fields: usize) -> Reply {
        let mut f = Fields::default();
        for i in 0..fields {
            f.push(format!("f{i}"), "v");
        }
        Reply {
            stream: "nova:task:m:out".into(),
            fields: f,
            kind: ReplyKind::Now,
        }
    }

    fn effects() -> Vec<(&'static str, Effect)> {
        vec![
            ("replies", Effect::Replies(vec![reply(1), reply(2)])),
            ("no replies", Effect::Replies(Vec::new())),
            ("dead letter", Effect::DeadLetter("r".into())),
            ("too large", Effect::TooLarge(Size::default())),
            ("vanished", Effect::Vanished),
        ]
    }

    /// Every verdict × effect: what the message becomes, as one word per case.
    #[test]
    fn every_verdict_on_every_effect() {
        let verdicts = [
            ("yes", Committed::Yes),
            ("not ours", Committed::NotOurs),
            ("refused", Committed::Refused("k is a string".into())),
            ("failed", Committed::Failed("OOM".into())),
            ("not tried", Committed::NotTried),
            ("replayed", Committed::Replayed("s/0-1".into())),
            ("partial", Committed::Partial("XADD".into())),
            ("conflict", Committed::Conflict("ns:k".into())),
        ];
        let expected = |verdict: &str, effect: &str| -> &'static str {
            match (verdict, effect) {
                ("yes", "replies" | "no replies") => "success",
                ("yes", "dead letter" | "too large") => "dead_lettered",
                ("yes", "vanished") => "vanished",
                ("not ours", _) => "not_ours",
                ("partial", _) => "partial",
                ("refused", "replies" | "no replies") => "redo: reply refused",
                ("refused", _) => "refused",
                ("replayed", _) => "redo: replayed",
                ("failed", _) => "again: refused",
                ("not tried", _) => "again",
                ("conflict", _) => "rerun",
                _ => unreachable!(),
            }
        };
        for (v, verdict) in &verdicts {
            for (e, effect) in effects() {
                for signed in [false, true] {
                    let got = match settle(verdict.clone(), finished(effect.clone(), signed)) {
                        Settle::Done(f, fate) => {
                            assert_eq!(f.effect, effect, "{v} × {e}: the effect stays");
                            if let (Fate::Committed { replies }, Effect::Replies(r)) =
                                (&fate, &effect)
                            {
                                assert_eq!(*replies, r.len());
                            }
                            fate.label()
                        }
                        Settle::Redo(f, Redo::ReplyRefused(reason)) => {
                            assert_eq!(reason, "k is a string");
                            assert_eq!(
                                f.effect,
                                Effect::DeadLetter("reply refused: k is a string".into())
                            );
                            assert_eq!(f.msg.sender.is_some(), signed, "the marker stays");
                            "redo: reply refused"
                        }
                        Settle::Redo(f, Redo::Replayed { original }) => {
                            assert_eq!(original, "s/0-1");
                            assert!(
                                matches!(&f.effect, Effect::DeadLetter(r) if r.contains("s/0-1"))
                            );
                            let once = f.msg.sender.as_ref().and_then(|s| s.once.as_ref());
                            assert!(once.is_none(), "a copy records no use of the signature");
                            assert_eq!(f.msg.sender.is_some(), signed, "the signer stays");
                            "redo: replayed"
                        }
                        Settle::Again(f, refusal) => {
                            assert_eq!(f.effect, effect, "retried as it was");
                            if refusal.is_some() {
                                "again: refused"
                            } else {
                                "again"
                            }
                        }
                        Settle::Rerun(f, key) => {
                            assert_eq!(key, "ns:k");
                            assert_eq!(f.msg.sender.is_some(), signed, "the signer stays");
                            "rerun"
                        }
                    };
                    assert_eq!(got, expected(v, e), "{v} × {e} (signed: {signed})");
                }
            }
        }
    }

    /// Every handler outcome × delivery count against max_deliveries 3.
    #[test]
    fn every_outcome_at_every_delivery() {
        let allow = |_: &str| Ok::<(), String>(());
        for deliveries in 1..=4 {
            let last = deliveries >= 3;
            let ok = decide(Outcome::Success(vec![reply(2)]), deliveries, 3, allow);
            assert_eq!(ok, Ok(Effect::Replies(vec![reply(2)])));
            let retry = decide(Outcome::Retry("down".into()), deliveries, 3, allow);
            if last {
                assert_eq!(
                    retry,
                    Ok(Effect::DeadLetter(format!(
                        "down (gave up after {deliveries} deliveries)"
                    )))
                );
            } else {
                assert_eq!(retry, Err("down".into()), "delivery {deliveries}");
            }
            let reject = decide(Outcome::Reject("bad".into()), deliveries, 3, allow);
            assert_eq!(reject, Ok(Effect::DeadLetter("bad".into())));
        }
    }

    #[test]
    fn replies_go_only_where_the_handler_may_publish_and_fit_one_write() {
        let deny = |s: &str| {
            if s.ends_with(":out") {
                Err(format!("{s} needs task_write"))
            } else {
                Ok(())
            }
        };
        let refused = decide(Outcome::Success(vec![reply(1)]), 1, 5, deny);
        assert_eq!(
            refused,
            Ok(Effect::DeadLetter(
                "reply refused: nova:task:m:out needs task_write".into()
            ))
        );
        let allow = |_: &str| Ok::<(), String>(());
        let wide = decide(
            Outcome::Success(vec![reply(limits::MAX_FIELDS + 1)]),
            1,
            5,
            allow,
        );
        assert!(
            matches!(wide, Ok(Effect::DeadLetter(r)) if r.contains("more than one commit writes"))
        );
        let widest = decide(
            Outcome::Success(vec![reply(limits::MAX_FIELDS)]),
            1,
            5,
            allow,
        );
        assert!(matches!(widest, Ok(Effect::Replies(_))));
    }

    struct Named;
    impl Handler for Named {
        fn name(&self) -> &str {
            "named"
        }
        fn handle<'a>(
            &'a self,
            _: &'a crate::model::message::Message,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send + 'a>> {
            Box::pin(async { Outcome::Success(Vec::new()) })
        }
    }

    /// Every route selection × sender check × delivery count against max_deliveries 2.
    #[test]
    fn every_selection_at_every_delivery() {
        let handler: Arc<dyn Handler> = Arc::new(Named);
        let describe = |d: Dispatch| match d {
            Dispatch::Run(h) => format!("run {}", h.name()),
            Dispatch::Settle {
                effect: Effect::Replies(r),
                by,
            } if r.is_empty() => format!("ack by {by}"),
            Dispatch::Settle {
                effect: Effect::DeadLetter(reason),
                by,
            } => format!("dead letter by {by}: {reason}"),
            Dispatch::Settle { effect, by } => format!("{effect:?} by {by}"),
        };
        for deliveries in 1..=3 {
            let cases: Vec<(Selection<'_>, Result<(), String>, &str)> = vec![
                (Selection::Drop, Ok(()), "ack by drop"),
                (
                    Selection::Unmatched(Unmatched::Ack),
                    Ok(()),
                    "ack by unmatched",
                ),
                (
                    Selection::Unmatched(Unmatched::DeadLetter),
                    Ok(()),
                    "dead letter by router: unmatched: no route matches this message",
                ),
                (
                    Selection::Run {
                        handler: &handler,
                        require_sender_token: false,
                    },
                    Err("never asked".into()),
                    "run named",
                ),
                (
                    Selection::Run {
                        handler: &handler,
                        require_sender_token: true,
                    },
                    Ok(()),
                    "run named",
                ),
                (
                    Selection::Run {
                        handler: &handler,
                        require_sender_token: true,
                    },
                    Err("unauthenticated: no _sig".into()),
                    "dead letter by named: unauthenticated: no _sig",
                ),
            ];
            for (selection, verified, want) in cases {
                let got = describe(dispatch(deliveries, 2, selection, || verified));
                if deliveries > 2 {
                    assert_eq!(
                        got,
                        "dead letter by redstream: delivered 3 times, more than max_deliveries (2)"
                    );
                } else {
                    assert_eq!(got, want, "delivery {deliveries}");
                }
            }
        }
    }

    #[test]
    fn a_refused_batch_is_halved_until_its_culprit_is_alone() {
        let two = vec![
            finished(Effect::Vanished, false),
            finished(Effect::Replies(Vec::new()), false),
        ];
        assert!(matches!(isolate(two, &"E"), Isolated::Halves(b) if b.len() == 2));
        assert!(matches!(isolate(Vec::new(), &"E"), Isolated::Empty));
        for (name, effect) in effects() {
            let got = isolate(vec![finished(effect.clone(), false)], &"ERR x");
            match (&effect, got) {
                (Effect::Replies(_) | Effect::Vanished, Isolated::DeadLetter(f)) => {
                    assert_eq!(f.effect, Effect::DeadLetter("commit refused: ERR x".into()))
                }
                (Effect::DeadLetter(_) | Effect::TooLarge(_), Isolated::Stranded(f)) => {
                    assert_eq!(f.effect, effect, "{name}")
                }
                (_, got) => panic!("{name}: {got:?}"),
            }
        }
    }

    #[test]
    fn a_commit_failure_is_classified() {
        use redis::{ErrorKind, ServerErrorKind};
        let redis = |kind: ServerErrorKind| Error::Redis {
            command: "EVALSHA",
            key: "k".into(),
            source: redis::RedisError::from((ErrorKind::Server(kind), "refused")),
        };
        let cases = [
            (
                Error::NoGroup {
                    stream: "s".into(),
                    group: "g".into(),
                },
                CommitFailure::GroupGone,
            ),
            (
                redis(ServerErrorKind::NoScript),
                CommitFailure::ScriptMissing,
            ),
            (redis(ServerErrorKind::NoPerm), CommitFailure::Fatal),
            (
                Error::Unauthorized {
                    op: crate::auth::Op::Ack,
                    stream: "s".into(),
                    identity: "i".into(),
                    needed: crate::auth::Role::Read("task".into()),
                },
                CommitFailure::Fatal,
            ),
            (
                redis(ServerErrorKind::ResponseError),
                CommitFailure::Isolate,
            ),
            (redis(ServerErrorKind::TryAgain), CommitFailure::Retry),
            (
                Error::Timeout {
                    command: "EVALSHA",
                    key: "k".into(),
                    after: std::time::Duration::from_secs(1),
                },
                CommitFailure::Retry,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(on_commit_error(&e), want, "{e}");
        }
    }
}
