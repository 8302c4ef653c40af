//! How much one consumer loop reads at once and holds in flight, adapted as it runs.
//!
//! The config gives caps (`batch_size`, `in_flight`); within them the loop's [`Pace`] starts small and
//! follows the stream:
//!
//! - **Read size** doubles each time a read comes back full (there is a backlog) and halves when one
//!   comes back less than a quarter full (the stream is keeping up with itself), never below
//!   [`FLOOR`]. An idle stream's reads return what has arrived at once, whatever the size, so a
//!   small read adds no latency; a large one only pays when there is a backlog to drain.
//! - **Window** (entries in flight) is four reads, so that one read, the handlers and one commit can
//!   each have a batch — and at most what the handlers finish in a quarter of `claim_min_idle`
//!   (Little's law: an entry waits about window ÷ throughput). A slow handler therefore never queues
//!   entries long enough for another consumer to claim them while they wait — and at most
//!   [`BUDGET`] bytes of entries of the size the reads have been bringing, so that wide or large
//!   messages are not held by the thousand.
//! - A read asks for at most [`READ_BUDGET`] bytes of such entries (never fewer than [`FLOOR`]):
//!   500 entries of 4 KiB would make one 2 MiB reply for Redis to build and the daemon to hold;
//!   128 of them drain as fast (within the benchmark's noise) with about half the daemon's memory
//!   (docs/performance.md).
//! - **After a read times out** the next asks for one entry, and each read that comes back doubles
//!   that again until the pace's own size rules once more. A read times out when its reply is too
//!   much to build and send within `command_timeout` — a claim of a dead consumer's 100 MB entries
//!   on a busy host — and asking for as many again would time out again, for ever.
//!
//! Plain arithmetic, no I/O: the loop reports reads and finished messages, and asks for sizes.

use std::time::{Duration, Instant};

/// The smallest read and window the pace goes down to (or the caps, if they are smaller).
pub const FLOOR: usize = 16;

/// About how many bytes of entries the window may hold.
pub const BUDGET: usize = 64 << 20;

/// About how many bytes of entries one read brings.
pub const READ_BUDGET: usize = 512 << 10;

/// How often the finishing rate is sampled.
const SAMPLE: Duration = Duration::from_millis(250);

#[derive(Debug)]
pub struct Pace {
    read: usize,
    read_cap: usize,
    window_cap: usize,
    /// A quarter of claim_min_idle: how long an entry should at most wait in the window.
    wait: Duration,
    /// Messages finished per second, smoothed; None until the first sample.
    rate: Option<f64>,
    finished: u64,
    since: Instant,
    /// Bytes per entry of recent reads, smoothed.
    entry_bytes: usize,
    /// Since a read timed out: at most this many entries a read, doubled by each read that returns.
    after_timeout: Option<usize>,
}

impl Pace {
    pub fn new(read_cap: usize, window_cap: usize, claim_min_idle: Duration) -> Pace {
        let read_cap = read_cap.max(1);
        Pace {
            read: FLOOR.min(read_cap),
            read_cap,
            window_cap: window_cap.max(1),
            wait: claim_min_idle / 4,
            rate: None,
            finished: 0,
            since: Instant::now(),
            entry_bytes: 0,
            after_timeout: None,
        }
    }

    /// How many entries the next read asks for (before the room in the window bounds it).
    pub fn read(&self) -> usize {
        let read = match READ_BUDGET.checked_div(self.entry_bytes) {
            Some(by_bytes) => self.read.min(by_bytes.max(FLOOR)),
            None => self.read,
        };
        self.after_timeout.map_or(read, |most| read.min(most))
    }

    /// A read (or claim) got no answer within the command timeout: the next ones ask for one entry.
    pub fn read_timed_out(&mut self) {
        self.after_timeout = Some(1);
    }

    /// How many entries may be in flight now.
    pub fn window(&self) -> usize {
        let mut w = self.read.saturating_mul(4);
        if let Some(rate) = self.rate {
            // Rounded up, so that a handler finishing a few a second still keeps a few in flight.
            let drained = (rate * self.wait.as_secs_f64()).ceil() as usize;
            w = w.min(drained);
        }
        if let Some(by_bytes) = BUDGET.checked_div(self.entry_bytes) {
            w = w.min(by_bytes);
        }
        w.clamp(FLOOR.min(self.window_cap), self.window_cap)
    }

    /// A read asked for `asked` entries and brought `got`, of `bytes` in all.
    pub fn read_returned(&mut self, asked: usize, got: usize, bytes: usize) {
        if asked == 0 {
            return;
        }
        if let Some(most) = self.after_timeout {
            let most = most * 2;
            self.after_timeout = (most < self.read_cap).then_some(most);
        }
        if let Some(per) = bytes.checked_div(got) {
            let per = per.max(1);
            self.entry_bytes = if self.entry_bytes == 0 {
                per
            } else {
                (self.entry_bytes + per) / 2
            };
        }
        // Full and asked for all the pace allows: a backlog, grow. (A read bounded by the room in
        // the window says nothing about the stream.)
        if got >= asked && asked >= self.read {
            self.read = (self.read * 2).min(self.read_cap);
        } else if got * 4 < asked {
            self.read = (self.read / 2).max(FLOOR).min(self.read_cap);
        }
    }

    /// `n` messages were decided (their handler finished, or they settled without one).
    pub fn finished(&mut self, n: usize, now: Instant) {
        self.finished += n as u64;
        let elapsed = now.saturating_duration_since(self.since);
        if elapsed >= SAMPLE {
            let sample = self.finished as f64 / elapsed.as_secs_f64();
            self.rate = Some(match self.rate {
                // Faster rates are believed at once (a backlog has arrived), slower ones halfway.
                Some(r) if sample < r => (r + sample) / 2.0,
                _ => sample,
            });
            self.finished = 0;
            self.since = now;
        }
    }

    /// Nothing is in flight or waiting: forget the rate (the next burst measures its own).
    pub fn idle(&mut self, now: Instant) {
        self.rate = None;
        self.finished = 0;
        self.since = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_grows_the_read_to_its_cap_and_a_quiet_stream_shrinks_it() {
        let mut p = Pace::new(500, 2000, Duration::from_secs(60));
        assert_eq!((p.read(), p.window()), (16, 64));
        for _ in 0..10 {
            let asked = p.read();
            p.read_returned(asked, asked, asked * 200);
        }
        assert_eq!((p.read(), p.window()), (500, 2000));
        // A read bounded by the window's room, coming back full, is no sign of anything.
        p.read_returned(10, 10, 2000);
        assert_eq!(p.read(), 500);
        for _ in 0..10 {
            p.read_returned(p.read(), 1, 200);
        }
        assert_eq!((p.read(), p.window()), (16, 64));
        // Half full: stays.
        let mut q = Pace::new(500, 2000, Duration::from_secs(60));
        q.read_returned(16, 8, 1600);
        assert_eq!(q.read(), 16);
    }

    #[test]
    fn caps_bound_everything_and_in_flight_one_stays_one() {
        let mut p = Pace::new(8, 1, Duration::from_secs(60));
        assert_eq!((p.read(), p.window()), (8, 1));
        p.read_returned(8, 8, 800);
        assert_eq!((p.read(), p.window()), (8, 1));
        let p = Pace::new(100, 64, Duration::from_secs(60));
        assert_eq!(p.window(), 64);
    }

    #[test]
    fn large_entries_hold_the_window_to_the_byte_budget() {
        let mut p = Pace::new(500, 2000, Duration::from_secs(60));
        for _ in 0..10 {
            p.read_returned(p.read(), p.read(), p.read() << 20);
        }
        assert_eq!(p.window(), 64, "64 one-MiB entries");
        // Small ones again: the budget follows (smoothed).
        for _ in 0..20 {
            p.read_returned(p.read(), p.read(), p.read() * 100);
        }
        assert_eq!(p.window(), 2000);
    }

    #[test]
    fn wide_entries_hold_each_read_to_the_read_budget() {
        let mut p = Pace::new(500, 2000, Duration::from_secs(60));
        for _ in 0..10 {
            p.read_returned(p.read(), p.read(), p.read() * 4096);
        }
        assert_eq!(p.read(), READ_BUDGET / 4096, "128 entries of 4 KiB a read");
        // Entries past the budget alone: still the floor, not nothing.
        for _ in 0..10 {
            p.read_returned(p.read(), p.read(), p.read() << 20);
        }
        assert_eq!(p.read(), FLOOR);
        // Small entries again: the read goes back to where the backlog had taken it.
        for _ in 0..20 {
            p.read_returned(p.read(), p.read(), p.read() * 200);
        }
        assert_eq!(p.read(), 500);
    }

    #[test]
    fn a_read_that_timed_out_is_followed_by_reads_of_one_that_grow_back() {
        let mut p = Pace::new(500, 2000, Duration::from_secs(60));
        for _ in 0..10 {
            p.read_returned(p.read(), p.read(), p.read() * 200);
        }
        assert_eq!(p.read(), 500);
        p.read_timed_out();
        assert_eq!(
            p.read(),
            1,
            "below the floor: one entry may be all a reply can carry in time"
        );
        p.read_timed_out();
        assert_eq!(p.read(), 1);
        let mut asked = vec![];
        for _ in 0..10 {
            asked.push(p.read());
            p.read_returned(p.read(), p.read(), p.read() * 200);
        }
        assert_eq!(asked, [1, 2, 4, 8, 16, 32, 64, 128, 256, 500]);
        assert_eq!(p.read(), 500);
        // The window is not what timed out: it stays.
        p.read_timed_out();
        assert_eq!(p.window(), 2000);
    }

    #[test]
    fn a_slow_handler_keeps_the_window_to_a_quarter_of_claim_min_idle() {
        let start = Instant::now();
        let mut p = Pace::new(500, 2000, Duration::from_secs(8));
        for _ in 0..10 {
            p.read_returned(p.read(), p.read(), p.read() * 200);
        }
        assert_eq!(p.window(), 2000);
        // 10 messages a second, 2 s of waiting allowed: 20 in flight (21 as the pace was made a
        // moment after `start`).
        p.finished(5, start + Duration::from_millis(500));
        assert!(matches!(p.window(), 20 | 21), "{}", p.window());
        // Never below the floor, whatever the rate.
        p.finished(0, start + Duration::from_secs(10));
        assert_eq!(p.window(), FLOOR);
        // A fast burst is believed at once.
        p.finished(100_000, start + Duration::from_secs(11));
        assert_eq!(p.window(), 2000);
        p.idle(start + Duration::from_secs(12));
        assert_eq!(p.window(), 2000);
    }
}
