//! A destination's blocking half, on a thread of its own.
//!
//! File and stdout writes block (an `fsync` takes milliseconds; a pipe or a FIFO whose reader
//! stalls blocks forever). They run on a dedicated thread per destination, never on the async
//! workers: a stuck write holds only its own sink, and the runtime can always shut down.

use std::sync::mpsc;
use tokio::sync::oneshot;

type Job<T> = Box<dyn FnOnce(&mut T) + Send>;

/// Owns `T` on a thread named after the sink and runs jobs on it, one at a time, in order.
pub(super) struct IoThread<T> {
    jobs: mpsc::Sender<Job<T>>,
}

impl<T: Send + 'static> IoThread<T> {
    /// Starts the thread, which owns `state` until the `IoThread` is dropped.
    pub fn spawn(name: &str, mut state: T) -> std::io::Result<IoThread<T>> {
        let (jobs, rx) = mpsc::channel::<Job<T>>();
        std::thread::Builder::new()
            .name(format!("weir-sink-{name}"))
            .spawn(move || {
                for job in rx {
                    job(&mut state);
                }
            })?;
        Ok(IoThread { jobs })
    }

    /// Runs `f` on the thread and waits for its result; `None` if the thread is gone (a job
    /// panicked).
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut T) -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = oneshot::channel();
        let job: Job<T> = Box::new(move |state| {
            // The sender may have stopped waiting (its task was dropped): nothing to do then.
            let _ = tx.send(f(state));
        });
        self.jobs.send(job).ok()?;
        rx.await.ok()
    }
}
