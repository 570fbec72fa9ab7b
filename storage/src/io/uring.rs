//! The fast engine on Linux: an io_uring per disk, submitted from the event loop thread, its
//! completions signalled on the engine's eventfd (registered with the ring).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::EventFd;

use super::work::Work;

pub(crate) struct Uring {
    ring: IoUring,
    /// A second descriptor of the ring, for [`DeferredSubmit`]: it keeps the kernel's side of
    /// the ring alive if the engine goes first.
    enter_fd: Arc<OwnedFd>,
    in_flight: usize,
    capacity: usize,
    /// Entries are queued without a system call until `unplug` (see `IoEngine::plug`).
    plugged: bool,
}

impl Uring {
    /// A ring with room for `depth` requests, or why the kernel has none (old kernel, or
    /// io_uring disabled by sysctl or seccomp).
    pub(crate) fn new(depth: u32, eventfd: &EventFd) -> io::Result<Self> {
        // Cooperative task running (Linux 5.19): a completion from io_uring's workers does
        // not interrupt the event loop thread with an IPI; it is posted on the thread's next
        // entry into the kernel, and a thread asleep in epoll is still woken for it. Older
        // kernels refuse the flag: build the ring without it.
        let build = |coop: bool| {
            let mut b = IoUring::builder();
            // Twice the submission queue: completions never overflow.
            b.setup_cqsize(depth * 2);
            if coop {
                b.setup_coop_taskrun();
            }
            b.build(depth)
        };
        let ring = match build(true) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => build(false)?,
            r => r?,
        };
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let capacity = ring.params().sq_entries() as usize;
        // SAFETY: the ring's descriptor is open for as long as `ring`, which is borrowed here.
        let enter_fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(ring.as_raw_fd()) }
            .try_clone_to_owned()?;
        Ok(Self {
            ring,
            enter_fd: Arc::new(enter_fd),
            in_flight: 0,
            capacity,
            plugged: false,
        })
    }

    pub(crate) fn has_room(&self) -> bool {
        self.in_flight < self.capacity
    }

    /// Queues `work` (a file operation) under `id`; `worker`: performed by one of io_uring's
    /// worker threads rather than inline in the submit call. The caller keeps `work` and its
    /// buffers alive and unmoved until `reap` returns `id`.
    pub(crate) fn push(&mut self, id: usize, work: &Work, worker: bool) -> io::Result<()> {
        let entry = match work {
            Work::Readv { fd, offset, iov } => {
                opcode::Readv::new(types::Fd(*fd), iov.as_ptr(), iov.count() as u32)
                    .offset(*offset)
                    .build()
            }
            Work::Writev { fd, offset, iov } => {
                opcode::Writev::new(types::Fd(*fd), iov.as_ptr(), iov.count() as u32)
                    .offset(*offset)
                    .build()
            }
            Work::Sync { fd } => opcode::Fsync::new(types::Fd(*fd))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Work::Punch { fd, offset, len } => opcode::Fallocate::new(types::Fd(*fd), *len)
                .offset(*offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
        .user_data(id as u64);
        let entry = if worker {
            entry.flags(squeue::Flags::ASYNC)
        } else {
            entry
        };
        // SAFETY: the entry's fd and iovec array (and the memory the iovecs name: guest memory
        // held mapped by the engine, or a bounce buffer in the same in-flight slot) stay valid
        // until its completion is reaped, which the engine guarantees (it drains the ring
        // before dropping anything).
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::from_raw_os_error(libc::EBUSY))?;
        self.in_flight += 1;
        if !self.plugged {
            self.submit_queued();
        }
        Ok(())
    }

    /// Holds entries back from the kernel until `unplug`, so that a batch goes in one call.
    pub(crate) fn plug(&mut self) {
        self.plugged = true;
    }

    pub(crate) fn unplug(&mut self) {
        self.plugged = false;
        if !self.ring.submission().is_empty() {
            self.submit_queued();
        }
    }

    /// As `unplug`, but the system call that starts the queued entries is the caller's to
    /// make, through the returned handle (`None`: nothing is queued).
    pub(crate) fn unplug_deferred(&mut self) -> Option<DeferredSubmit> {
        self.plugged = false;
        if self.ring.submission().is_empty() {
            return None;
        }
        Some(DeferredSubmit(self.enter_fd.clone()))
    }

    fn submit_queued(&mut self) {
        // Once queued an entry belongs to the ring: if the kernel refuses the submit call now,
        // it goes with the next one (every reap retries), and completes from there.
        if let Err(e) = self.submit() {
            tracing::error!("I/O engine: io_uring submit failed: {e}");
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        loop {
            if let Some(r) = submit_outcome(self.ring.submit()) {
                return r;
            }
        }
    }

    /// Finished requests: (id, result as the kernel gives it: bytes, or -errno).
    pub(crate) fn reap(&mut self, out: &mut Vec<(usize, i32)>) {
        if !self.ring.submission().is_empty() {
            let _ = self.submit();
        }
        for cqe in self.ring.completion() {
            self.in_flight -= 1;
            out.push((cqe.user_data() as usize, cqe.result()));
        }
    }

    /// Waits until every submitted request has finished (before buffers are freed).
    pub(crate) fn drain(&mut self, out: &mut Vec<(usize, i32)>) -> bool {
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    tracing::error!("I/O engine: waiting for io_uring requests failed: {e}");
                    // Leaking is the only safe answer: the kernel may still write the buffers.
                    return false;
                }
            }
            self.reap(out);
        }
        true
    }
}

/// Entries queued on an engine's ring whose system call is still to be made. A buffered read
/// of data the host has cached is copied inside that call, on the calling thread: a device
/// makes it after letting go of its lock, so that a vCPU touching the device's registers
/// meanwhile does not wait for megabytes to be copied. Until then the entries are in the
/// ring, and any later submit or reap of the engine starts them too.
#[must_use = "the queued requests start only when submitted"]
pub struct DeferredSubmit(Arc<OwnedFd>);

impl DeferredSubmit {
    /// Hands the queued entries to the kernel.
    pub fn submit(self) {
        let outcome = loop {
            // SAFETY: io_uring_enter on a descriptor of a live ring (this handle keeps it
            // open), with no signal mask or argument pointers. The kernel takes entries up to
            // the tail the engine published with release ordering when it queued them.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_uring_enter,
                    self.0.as_raw_fd(),
                    u32::MAX,
                    0u32,
                    0u32,
                    std::ptr::null::<libc::c_void>(),
                    0usize,
                )
            };
            let r = if r >= 0 {
                Ok(r as usize)
            } else {
                Err(io::Error::last_os_error())
            };
            if let Some(o) = submit_outcome(r) {
                break o;
            }
        };
        if let Err(e) = outcome {
            tracing::error!("I/O engine: io_uring submit failed: {e}");
        }
    }
}

/// What one submit call's result means: `None` to call again (a signal interrupted it).
/// Short of memory or of completion room (EAGAIN, EBUSY) counts as done: the entries stay
/// queued and go with the engine's next submit or reap.
fn submit_outcome(r: io::Result<usize>) -> Option<io::Result<()>> {
    match r {
        Ok(_) => Some(Ok(())),
        Err(e) => match e.raw_os_error() {
            Some(libc::EINTR) => None,
            Some(libc::EAGAIN | libc::EBUSY) => Some(Ok(())),
            _ => Some(Err(e)),
        },
    }
}
