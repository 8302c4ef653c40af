//! `retry = { backoff, jitter }`, of a consumer (`consumers[i].retry`) or of a handler
//! (`handlers[i].retry`, which takes precedence for that handler's messages).

use super::checker::Checker;
use super::raw::RawRetry;
use crate::engine::RetrySchedule;

/// `retry`: its backoff steps (at least one, each positive) and jitter (a percentage, 20% if not
/// given). Some(None) when there is no `retry`; None when it is wrong.
pub(super) fn schedule(
    c: &mut Checker<'_>,
    p: &dyn Fn(&str) -> String,
    retry: Option<&RawRetry>,
) -> Option<Option<RetrySchedule>> {
    let Some(r) = retry else {
        return Some(None);
    };
    let mut ok = true;
    if r.backoff.is_empty() {
        c.problem(
            &p("retry.backoff"),
            "empty: give the waits before each retry, e.g. [\"1s\", \"5s\", \"30s\", \"2m\", \"10m\"]",
        );
        ok = false;
    }
    let mut backoff = Vec::new();
    for (j, step) in r.backoff.iter().enumerate() {
        match c.positive_duration(&p(&format!("retry.backoff[{j}]")), step) {
            Some(d) => backoff.push(d),
            None => ok = false,
        }
    }
    let jitter_percent = match &r.jitter {
        None => Some(20),
        Some(j) => c.percent(&p("retry.jitter"), j, 0, "20%"),
    };
    let jitter_percent = jitter_percent?;
    ok.then_some(Some(RetrySchedule {
        backoff,
        jitter_percent,
    }))
}
