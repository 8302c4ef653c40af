//! The options of the `faults` test handler (builds with the `fault-injection` feature), for a
//! consumer's own (`consumers[i].faults`) and for `[[handlers]]` entries that are one
//! (`handlers[i].faults`).

use super::checker::Checker;
use crate::model::naming::Naming;

/// The options of a faults test handler, at `at` (`consumers[0].faults`, `handlers[1].faults`).
pub(super) fn faults_options(
    c: &mut Checker<'_>,
    at: &str,
    f: &super::raw::RawFaults,
    naming: &Naming,
) -> crate::engine::FaultSpec {
    let p = |k: &str| format!("{at}.{k}");
    let reply_to = f.reply_to.as_ref().and_then(|r| {
        c.parse(&p("reply_to"), r, "a stream name", |s| {
            naming
                .parse(s)
                .map(|_| s.to_owned())
                .map_err(|e| e.to_string())
        })
    });
    let fail_field = f
        .fail_field
        .as_ref()
        .and_then(|x| c.text(&p("fail_field"), x));
    let fail_deliveries = f
        .fail_deliveries
        .as_ref()
        .and_then(|x| c.get(&p("fail_deliveries"), x, "an integer"))
        .unwrap_or(0);
    let fail_every = f
        .fail_every
        .as_ref()
        .and_then(|x| c.get(&p("fail_every"), x, "an integer"))
        .unwrap_or(0);
    let sleep = f
        .sleep
        .as_ref()
        .and_then(|x| c.duration(&p("sleep"), x))
        .unwrap_or_default();
    let fail_while_file = f
        .fail_while_file
        .as_ref()
        .and_then(|x| c.text(&p("fail_while_file"), x))
        .map(std::path::PathBuf::from);
    crate::engine::FaultSpec {
        name: String::new(),
        reply_to,
        fail_field,
        fail_deliveries: u64::from(fail_deliveries),
        fail_every: u64::from(fail_every),
        sleep,
        fail_while_file,
    }
}
