//! The worker threads that run handler calls: a fixed set fed from one queue.
//!
//! Owns only the threads and the hand-off; what a job does is [`super::runtime`]'s. A call runs with
//! the synchronous wasmtime API on a worker's native stack (sized above the guest's stack bound), so
//! the async runtime never blocks on a guest.

use crossbeam_channel::{Receiver, Sender, select, unbounded};

pub(super) type Job = Box<dyn FnOnce() + Send>;

/// Worker threads running handler calls, fed from one multi-consumer queue (no lock between workers).
/// Each worker also has a queue of its own for "retire handler N": warm instances live in the
/// workers' thread-local state, and every worker must drop those of a handler that is gone.
#[derive(Clone)]
pub(super) struct Pool {
    pub(super) tx: Sender<Job>,
    pub(super) workers: usize,
    pub(super) retire: Retirer,
}

/// Tells every worker that a handler is gone.
#[derive(Clone)]
pub(super) struct Retirer(Vec<Sender<u64>>);

impl Retirer {
    /// Every worker drops its warm instance of handler `id` (before its next call).
    pub(super) fn retire(&self, id: u64) {
        for worker in &self.0 {
            let _ = worker.send(id);
        }
    }
}

impl Pool {
    /// `workers` threads with `stack` bytes of native stack; `on_retire` runs on each worker for every
    /// retired handler id.
    pub(super) fn new(workers: usize, stack: usize, on_retire: fn(u64)) -> std::io::Result<Pool> {
        let (tx, rx) = unbounded::<Job>();
        let mut retire = Vec::with_capacity(workers);
        for i in 0..workers {
            let rx = rx.clone();
            let (retire_tx, retired) = unbounded::<u64>();
            retire.push(retire_tx);
            std::thread::Builder::new()
                .name(format!("redstream-wasm-{i}"))
                .stack_size(stack)
                .spawn(move || work(rx, retired, on_retire))?;
        }
        Ok(Pool {
            tx,
            workers,
            retire: Retirer(retire),
        })
    }

    /// Runs `f` on a worker; None if the pool is gone or `f` panicked.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(result.ok());
        });
        self.tx.send(job).ok()?;
        rx.await.ok().flatten()
    }
}

/// A worker: retirements first (they free pool slots the next call may need), then jobs, until every
/// job sender is gone.
fn work(jobs: Receiver<Job>, retired: Receiver<u64>, on_retire: fn(u64)) {
    loop {
        while let Ok(id) = retired.try_recv() {
            on_retire(id);
        }
        select! {
            recv(retired) -> id => match id {
                Ok(id) => on_retire(id),
                Err(_) => return,
            },
            recv(jobs) -> job => match job {
                Ok(job) => job(),
                Err(_) => return,
            },
        }
    }
}
