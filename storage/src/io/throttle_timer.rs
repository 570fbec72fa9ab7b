//! Wakes the event loop when a request held back by its bandwidth group may go.

use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// Wakes the event loop when a request held back by its bandwidth group may go.
pub(crate) struct Timer {
    shared: Arc<(Mutex<TimerState>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct TimerState {
    deadline: Option<Instant>,
    stop: bool,
}

impl Timer {
    pub(crate) fn new(eventfd: EventFd) -> io::Result<Self> {
        let shared: Arc<(Mutex<TimerState>, Condvar)> = Arc::default();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-io-throttle".into())
            .spawn(move || {
                let (m, cv) = &*s;
                let mut st = m.lock().unwrap_or_else(|e| e.into_inner());
                while !st.stop {
                    match st.deadline {
                        None => st = cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                        Some(d) => {
                            let now = Instant::now();
                            if now >= d {
                                st.deadline = None;
                                let _ = eventfd.write(1);
                            } else {
                                st = cv
                                    .wait_timeout(st, d - now)
                                    .unwrap_or_else(|e| e.into_inner())
                                    .0;
                            }
                        }
                    }
                }
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Signals the eventfd after `after` (or earlier, if already armed for earlier).
    pub(crate) fn arm(&self, after: Duration) {
        let (m, cv) = &*self.shared;
        let mut st = m.lock().unwrap_or_else(|e| e.into_inner());
        let at = Instant::now() + after;
        if st.deadline.is_none_or(|d| at < d) {
            st.deadline = Some(at);
            cv.notify_one();
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        let (m, cv) = &*self.shared;
        m.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
