//! The worker threads that run handler calls: a fixed set fed from one queue.
//!
//! Owns only the threads and the hand-off; what a job does is [`super::runtime`]'s. A call runs with
//! the synchronous wasmtime API on a worker's native stack (sized above the guest's stack bound), so
//! the async runtime never blocks on a guest.

use crossbeam_channel::{Sender, unbounded};

pub(super) type Job = Box<dyn FnOnce() + Send>;

/// Worker threads running handler calls, fed from one multi-consumer queue (no lock between workers).
#[derive(Clone)]
pub(super) struct Pool {
    pub(super) tx: Sender<Job>,
    pub(super) workers: usize,
}

impl Pool {
    pub(super) fn new(workers: usize, stack: usize) -> std::io::Result<Pool> {
        let (tx, rx) = unbounded::<Job>();
        for i in 0..workers {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("redstream-wasm-{i}"))
                .stack_size(stack)
                // Until every sender is gone.
                .spawn(move || {
                    for job in rx.iter() {
                        job();
                    }
                })?;
        }
        Ok(Pool { tx, workers })
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
