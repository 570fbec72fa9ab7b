//! The portable engine: worker threads that make blocking calls. Used for the image layer's
//! calls always, and for raw files where the kernel has no io_uring.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::request::IoError;
use super::work::Work;

pub(crate) type Finished = (usize, Work, Result<u64, IoError>);

struct Queue {
    jobs: VecDeque<(usize, Work)>,
    stop: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    done: Mutex<Vec<Finished>>,
    eventfd: EventFd,
    /// Set when the eventfd was written and the engine has not reaped since: one write per
    /// wake is enough, and spares a system call per job.
    signalled: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A worker never panics while holding these locks (the work runs outside them).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) struct ThreadPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl ThreadPool {
    /// `threads` workers that signal `eventfd` after each finished job.
    pub(crate) fn new(threads: usize, eventfd: EventFd) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                stop: false,
            }),
            ready: Condvar::new(),
            done: Mutex::new(Vec::new()),
            eventfd,
            signalled: AtomicBool::new(false),
        });
        let mut pool = Self {
            shared,
            threads: Vec::new(),
        };
        for i in 0..threads.max(1) {
            let shared = pool.shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("ferry-io-{i}"))
                .spawn(move || worker(&shared))?;
            pool.threads.push(t);
        }
        Ok(pool)
    }

    pub(crate) fn submit(&self, id: usize, work: Work) {
        lock(&self.shared.queue).jobs.push_back((id, work));
        self.shared.ready.notify_one();
    }

    pub(crate) fn reap(&self, out: &mut Vec<Finished>) {
        // Cleared before taking the jobs: one finished after this signals again.
        self.shared.signalled.store(false, Ordering::SeqCst);
        out.append(&mut lock(&self.shared.done));
    }
}

fn worker(shared: &Shared) {
    loop {
        let (id, mut work) = {
            let mut q = lock(&shared.queue);
            loop {
                // Jobs still queued at stop are finished first: their buffers are in flight.
                if let Some(job) = q.jobs.pop_front() {
                    break job;
                }
                if q.stop {
                    return;
                }
                q = shared.ready.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        let result = work.run();
        lock(&shared.done).push((id, work, result));
        if shared.signalled.swap(true, Ordering::SeqCst) {
            continue;
        }
        if let Err(e) = shared.eventfd.write(1) {
            tracing::error!("I/O engine: cannot signal a completion: {e}");
        }
    }
}

impl Drop for ThreadPool {
    /// Waits for every queued job: they may point into guest memory and bounce buffers.
    fn drop(&mut self) {
        lock(&self.shared.queue).stop = true;
        self.shared.ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
