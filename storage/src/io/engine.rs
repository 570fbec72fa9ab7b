//! The I/O engine of one attached disk: devices submit requests from the event loop thread,
//! the host performs them (io_uring, or a thread pool), and finished requests are collected
//! on the same thread after the engine's eventfd fires.
//!
//! Raw images are the fast path: reads and writes go straight between the image file and
//! guest memory (no copy), through io_uring where the kernel has it. Dynamic formats and
//! chains need their block maps and copy-on-write, so their requests run on pool threads
//! through [`Disk`], with one copy between guest memory and an aligned host buffer.
//!
//! Host cache off (`hostiocache=off`) means O_DIRECT for every file of every layer: the
//! raw fast path opens its own O_DIRECT descriptor; for the image layer the engine asks
//! each layer's host files to bypass the cache (see [`crate::host_file`]), which covers
//! data and metadata of every format through one descriptor per file.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::bwgroup::BandwidthGroup;
use super::iovec::{AlignedBuf, Iovecs};
use super::raw_file::{open_raw, RawFiles};
use super::request::{Completion, IoError, IoOp, Request, SECTOR};
use super::thread_pool::{Finished, ThreadPool};
use super::throttle_timer::Timer;
use super::uring::{DeferredSubmit, Uring};
use super::work::Work;
use crate::layer::FormatKind;
use crate::Disk;

/// The largest read or write one request may move (the controllers' own limits are lower);
/// it bounds the host buffers a guest can make the engine allocate.
pub const MAX_TRANSFER: u64 = 64 << 20;

/// How often a request held back by its bandwidth group looks again: a changed limit
/// applies within this.
const THROTTLE_RECHECK: Duration = Duration::from_millis(50);

/// Buffered reads from this size up are copied by io_uring's workers (see
/// `IoEngine::copies_on_worker`).
const WORKER_READ_MIN: u64 = 128 << 10;

/// The most iovecs one readv/writev takes (Linux UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// Alignment of image-layer buffers: a page, which every O_DIRECT file accepts.
const LAYER_BUF_ALIGN: usize = 4096;

/// Which engine performs the host I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    IoUring,
    ThreadPool,
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::IoUring => "io_uring",
            Self::ThreadPool => "thread pool",
        }
    }
}

/// What the engine is asked to use: `Auto` takes io_uring where the kernel offers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    #[default]
    Auto,
    IoUring,
    ThreadPool,
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// The controller's `hostiocache`: on = the host page cache, off = O_DIRECT.
    pub host_cache: bool,
    /// The attachment's `discard=on`.
    pub discard: bool,
    pub bwgroup: Option<Arc<BandwidthGroup>>,
    /// Requests in flight on the host at once; more wait in the engine.
    pub queue_depth: u32,
    /// Pool threads (image-layer requests, or everything without io_uring).
    pub threads: usize,
    pub engine: EngineChoice,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            host_cache: true,
            discard: false,
            bwgroup: None,
            queue_depth: 128,
            threads: 8,
            engine: EngineChoice::Auto,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: cannot open the image for I/O: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot create the I/O engine's eventfd: {0}")]
    EventFd(io::Error),
    #[error("cannot start the I/O engine's threads: {0}")]
    Threads(io::Error),
    #[error("io_uring was asked for but the host kernel does not offer it: {0}")]
    Uring(io::Error),
}

/// A request that passed validation, waiting for the host (bandwidth group, full queue).
struct Pending {
    req: Request,
    iov: Option<Iovecs>,
}

/// A request on the host.
struct Slot {
    user_data: u64,
    op: IoOp,
    offset: u64,
    len: u64,
    /// Kept here while io_uring may use its buffers (pool work travels with the job).
    work: Option<Work>,
    /// A read's scatter-gather list (a write's is done with once the host has it).
    sg: Vec<(GuestAddress, usize)>,
    /// O_DIRECT bounce buffer (or the image layer's buffer); for a read, copied to `sg` at
    /// completion when `copy_back`.
    bounce: Option<AlignedBuf>,
    copy_back: bool,
}

/// How the engine moved data so far: lets a test (or a curious user) see that the fast path
/// copies nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoStats {
    /// Reads and writes straight between the file and guest memory.
    pub zero_copy: u64,
    /// Of those, through O_DIRECT (host cache off).
    pub direct: u64,
    /// Copied through an aligned bounce buffer (O_DIRECT, guest buffer not aligned).
    pub bounced: u64,
    /// Copied through the image layer (dynamic formats, chains).
    pub image_layer: u64,
    /// Reads handed to io_uring's worker threads (large ones through the page cache).
    pub on_workers: u64,
}

pub struct IoEngine {
    // Field order is drop order: the ring and the pool stop before buffers and files go.
    uring: Option<Uring>,
    pool: ThreadPool,
    timer: Option<Timer>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    raw: Option<RawFiles>,
    disk: Arc<Disk>,
    mem: GuestMemoryMmap,
    eventfd: EventFd,
    waiting: VecDeque<Pending>,
    done: Vec<Completion>,
    /// Scratch space for reaping, kept to spare an allocation per wake.
    ring_done: Vec<(usize, i32)>,
    pool_done: Vec<Finished>,
    /// Written since the last flush: a flush with nothing to sync completes at once.
    dirty: bool,
    writes_in_flight: usize,
    flushes_in_flight: usize,
    discard: bool,
    writable: bool,
    group: Option<Arc<BandwidthGroup>>,
    max_in_flight: usize,
    kind: EngineKind,
    path: PathBuf,
    stats: IoStats,
}

impl IoEngine {
    /// An engine for `disk`, moving data to and from `mem`. Logs which engine it chose.
    pub fn new(
        disk: Arc<Disk>,
        mem: GuestMemoryMmap,
        opts: EngineOptions,
    ) -> Result<Self, EngineError> {
        let top = &disk.layers()[0];
        let path = top.path().to_path_buf();
        let writable = top.writable();
        let is_raw =
            disk.layers().len() == 1 && matches!(top.format(), FormatKind::Raw | FormatKind::Iso);
        let raw = if is_raw {
            Some(open_raw(&path, writable, opts.host_cache)?)
        } else {
            None
        };
        let layer_cache = match (&raw, opts.host_cache) {
            (None, false) => Some(bypass_layer_caches(&disk)?),
            _ => None,
        };
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(EngineError::EventFd)?;
        let depth = opts.queue_depth.clamp(1, 4096);
        let uring = match (opts.engine, &raw) {
            (EngineChoice::ThreadPool, _) | (EngineChoice::Auto, None) => None,
            (EngineChoice::IoUring, _) => {
                Some(Uring::new(depth, &eventfd).map_err(EngineError::Uring)?)
            }
            (EngineChoice::Auto, Some(_)) => match Uring::new(depth, &eventfd) {
                Ok(u) => Some(u),
                Err(e) => {
                    tracing::info!(
                        "io_uring is not available on this host ({e}); using a thread pool"
                    );
                    None
                }
            },
        };
        // A ring on an image-layer disk would carry nothing: those requests need threads.
        let uring = if raw.is_some() { uring } else { None };
        let pool_eventfd = eventfd.try_clone().map_err(EngineError::EventFd)?;
        // With io_uring carrying a raw image the pool is idle: one thread is enough.
        let threads = if uring.is_some() { 1 } else { opts.threads };
        let pool = ThreadPool::new(threads, pool_eventfd).map_err(EngineError::Threads)?;
        let timer = match &opts.bwgroup {
            Some(_) => Some(
                Timer::new(eventfd.try_clone().map_err(EngineError::EventFd)?)
                    .map_err(EngineError::Threads)?,
            ),
            None => None,
        };
        let kind = if uring.is_some() {
            EngineKind::IoUring
        } else {
            EngineKind::ThreadPool
        };
        let cache = match (&raw, opts.host_cache, layer_cache) {
            (_, true, _) => "on (host page cache)".to_string(),
            (Some(RawFiles { direct: Some(_), mem_align, off_align, .. }), false, _) => {
                format!("off (O_DIRECT, memory aligned to {mem_align}, offsets to {off_align})")
            }
            (None, false, Some((direct, all))) if direct > 0 => format!(
                "off (O_DIRECT on {direct} of {all} layer files, unaligned pieces through aligned buffers)"
            ),
            _ => "off requested, but the file system has no O_DIRECT: host page cache".into(),
        };
        let route = if raw.is_some() {
            "raw fast path".to_string()
        } else {
            format!(
                "{} image layer, {} threads",
                top.format().name(),
                opts.threads.max(1)
            )
        };
        tracing::info!(
            "{}: I/O engine {} ({route}), queue depth {depth}, host cache {cache}{}{}",
            path.display(),
            kind.name(),
            if opts.discard { ", discard on" } else { "" },
            opts.bwgroup
                .as_ref()
                .map(|g| format!(", bandwidth group {}", g.name()))
                .unwrap_or_default(),
        );
        Ok(Self {
            uring,
            pool,
            timer,
            slots: Vec::new(),
            free: Vec::new(),
            raw,
            disk,
            mem,
            eventfd,
            waiting: VecDeque::new(),
            done: Vec::new(),
            ring_done: Vec::new(),
            pool_done: Vec::new(),
            dirty: true,
            writes_in_flight: 0,
            flushes_in_flight: 0,
            discard: opts.discard,
            writable,
            group: opts.bwgroup,
            max_in_flight: depth as usize,
            kind,
            path,
            stats: IoStats::default(),
        })
    }

    pub fn kind(&self) -> EngineKind {
        self.kind
    }

    /// Fires when completions may be ready: the event loop registers it and calls
    /// [`completions`](Self::completions) when it does.
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }

    pub fn stats(&self) -> IoStats {
        self.stats
    }

    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// Requests submitted and not yet returned by `completions`.
    pub fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len() + self.waiting.len() + self.done.len()
    }

    /// Takes a request. A bad one (past the end of the disk, empty, not whole sectors, a
    /// scatter-gather entry outside guest memory, a write to a read-only disk) is refused
    /// here and never performed; anything else completes later, through `completions`.
    pub fn submit(&mut self, req: Request) -> Result<(), IoError> {
        let iov = self.validate(&req)?;
        let p = Pending { req, iov };
        if self.waiting.is_empty() {
            if let Err(p) = self.dispatch(p) {
                self.waiting.push_back(p);
            }
        } else {
            // Requests keep their order: a flush never overtakes writes held back before it.
            self.waiting.push_back(p);
        }
        Ok(())
    }

    /// Takes back the requests among `user_data` that are still waiting for the host (held
    /// by a bandwidth group or a full queue): they complete with [`IoError::Cancelled`],
    /// having read or written nothing. Requests already on the host run to their end. Returns
    /// how many were taken back.
    pub fn cancel_waiting(&mut self, user_data: &[u64]) -> usize {
        let before = self.waiting.len();
        let mut kept = VecDeque::with_capacity(before);
        for p in self.waiting.drain(..) {
            if user_data.contains(&p.req.user_data) {
                self.done.push(Completion {
                    user_data: p.req.user_data,
                    result: Err(IoError::Cancelled),
                });
            } else {
                kept.push_back(p);
            }
        }
        self.waiting = kept;
        let cancelled = before - self.waiting.len();
        if cancelled > 0 {
            // The device collects them on its next wake, as any completion.
            let _ = self.eventfd.write(1);
        }
        cancelled
    }

    /// Holds submissions back until [`unplug`](Self::unplug): a device that takes several
    /// requests off its queue in one pass hands them to the kernel in one system call
    /// (io_uring; the thread pool starts each at once anyway). Every `plug` must be followed
    /// by `unplug` before the caller waits for completions, or the held requests never start.
    pub fn plug(&mut self) {
        if let Some(u) = &mut self.uring {
            u.plug();
        }
    }

    /// Submits what `plug` held back.
    pub fn unplug(&mut self) {
        if let Some(u) = &mut self.uring {
            u.unplug();
        }
    }

    /// Ends a `plug` as [`unplug`](Self::unplug) does, but leaves the system call that
    /// starts the held requests to the caller: [`DeferredSubmit::submit`], made once the
    /// caller has let go of the lock it holds on its device. `None` when nothing is held.
    pub fn unplug_deferred(&mut self) -> Option<DeferredSubmit> {
        self.uring.as_mut()?.unplug_deferred()
    }

    /// Finished requests, in the order they finished. Also clears the eventfd and lets
    /// requests that were waiting go on.
    pub fn completions(&mut self) -> std::vec::Drain<'_, Completion> {
        // Clear first: a completion signalled after this is picked up now or on the next wake.
        let _ = self.eventfd.read();
        self.reap();
        self.resume();
        self.done.drain(..)
    }

    /// Blocks until the eventfd fires or `timeout` passes (benchmarks and tests; a VM's
    /// event loop waits in epoll instead).
    #[allow(unsafe_code)]
    pub fn wait(&self, timeout: Duration) {
        use rustix::event::{poll, PollFd, PollFlags};
        let fd = self.eventfd.as_raw_fd();
        // SAFETY: the eventfd lives as long as `self`, which outlives this call.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let mut fds = [PollFd::new(&borrowed, PollFlags::IN)];
        let ts = rustix::event::Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: timeout.subsec_nanos() as _,
        };
        let _ = poll(&mut fds, Some(&ts));
    }

    fn validate(&self, r: &Request) -> Result<Option<Iovecs>, IoError> {
        if r.op == IoOp::Flush {
            return Ok(None);
        }
        if matches!(r.op, IoOp::Write | IoOp::Discard) && !self.writable {
            return Err(IoError::ReadOnly);
        }
        if r.op == IoOp::Discard && !self.discard {
            return Err(IoError::DiscardDisabled);
        }
        if r.len == 0 {
            return Err(IoError::ZeroLength { op: r.op });
        }
        if !r.offset.is_multiple_of(SECTOR) || !r.len.is_multiple_of(SECTOR) {
            return Err(IoError::Misaligned {
                op: r.op,
                offset: r.offset,
                len: r.len,
            });
        }
        let size = self.disk.size();
        if r.offset.checked_add(r.len).is_none_or(|end| end > size) {
            return Err(IoError::OutOfRange {
                offset: r.offset,
                len: r.len,
                size,
            });
        }
        if r.op == IoOp::Discard {
            return Ok(None);
        }
        let sg_len =
            r.sg.iter()
                .fold(0u64, |a, &(_, l)| a.saturating_add(l as u64));
        if sg_len != r.len {
            return Err(IoError::LengthMismatch { len: r.len, sg_len });
        }
        if r.len > MAX_TRANSFER {
            return Err(IoError::TooLarge {
                len: r.len,
                max: MAX_TRANSFER,
            });
        }
        Iovecs::from_guest(&self.mem, &r.sg).map(Some)
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Starts `p` on the host, or gives it back when it must wait.
    fn dispatch(&mut self, p: Pending) -> Result<(), Pending> {
        let on_ring = self.uring.is_some();
        let room = match &self.uring {
            Some(u) => u.has_room(),
            None => true,
        };
        if !room || self.in_flight() >= self.max_in_flight {
            return Err(p);
        }
        if let (Some(g), IoOp::Read | IoOp::Write | IoOp::Discard) = (&self.group, p.req.op) {
            let bytes = if p.req.op == IoOp::Discard {
                0
            } else {
                p.req.len
            };
            if let Err(wait) = g.try_take(bytes) {
                if let Some(t) = &self.timer {
                    t.arm(wait.min(THROTTLE_RECHECK));
                }
                return Err(p);
            }
        }
        let Pending { req, iov } = p;
        match req.op {
            // Nothing written since a flush that has finished: nothing to sync.
            IoOp::Flush
                if !self.dirty && self.writes_in_flight == 0 && self.flushes_in_flight == 0 =>
            {
                self.complete_now(req.user_data, Ok(0));
                return Ok(());
            }
            IoOp::Flush => {
                // Writes still in flight are not covered by this sync: the next flush syncs.
                self.dirty = self.writes_in_flight > 0;
                self.flushes_in_flight += 1;
            }
            IoOp::Write | IoOp::Discard => {
                self.dirty = true;
                self.writes_in_flight += 1;
            }
            IoOp::Read => {}
        }
        let mut slot = Slot {
            user_data: req.user_data,
            op: req.op,
            offset: req.offset,
            len: req.len,
            work: None,
            bounce: None,
            sg: Vec::new(),
            copy_back: false,
        };
        let work = match self.prepare(&req, iov, &mut slot) {
            Ok(w) => w,
            Err(e) => {
                match req.op {
                    IoOp::Write | IoOp::Discard => self.writes_in_flight -= 1,
                    IoOp::Flush => self.flushes_in_flight -= 1,
                    IoOp::Read => {}
                }
                self.complete_now(req.user_data, Err(e));
                return Ok(());
            }
        };
        if req.op == IoOp::Read {
            slot.sg = req.sg;
        }
        match &work {
            Work::Readv { fd, .. } | Work::Writev { fd, .. } => {
                if slot.bounce.is_some() {
                    self.stats.bounced += 1;
                } else {
                    self.stats.zero_copy += 1;
                    let direct = self.raw.as_ref().and_then(|r| r.direct.as_ref());
                    if direct.is_some_and(|f| f.as_raw_fd() == *fd) {
                        self.stats.direct += 1;
                    }
                }
            }
            Work::DiskRead { .. } | Work::DiskWrite { .. } => self.stats.image_layer += 1,
            _ => {}
        }
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let worker = self.copies_on_worker(&slot, &work);
        match (&mut self.uring, on_ring && work.is_file_op()) {
            (Some(ring), true) => {
                self.stats.on_workers += u64::from(worker);
                slot.work = Some(work);
                let pushed = slot.work.as_ref().map(|w| ring.push(id, w, worker));
                self.slots[id] = Some(slot);
                if let Some(Err(e)) = pushed {
                    self.finish(id, None, Err(IoError::Host(e)));
                }
            }
            _ => {
                self.slots[id] = Some(slot);
                self.pool.submit(id, work);
            }
        }
        Ok(())
    }

    /// Whether a read goes to io_uring's workers: a large read through the page cache is a
    /// copy the kernel would make inline, in the submitting thread, one request after another;
    /// on workers several copy at once, as with QEMU's aio=threads. Small reads stay inline,
    /// where handing them over costs more than the copy.
    fn copies_on_worker(&self, slot: &Slot, work: &Work) -> bool {
        slot.op == IoOp::Read
            && slot.len >= WORKER_READ_MIN
            && matches!((work, &self.raw),
                (Work::Readv { fd, .. }, Some(raw)) if *fd == raw.buffered.as_raw_fd())
    }

    /// The host operation for a validated request.
    fn prepare(
        &self,
        req: &Request,
        iov: Option<Iovecs>,
        slot: &mut Slot,
    ) -> Result<Work, IoError> {
        let (offset, len) = (req.offset, req.len);
        let Some(raw) = &self.raw else {
            let disk = self.disk.clone();
            return Ok(match req.op {
                IoOp::Read => {
                    slot.copy_back = true;
                    Work::DiskRead {
                        disk,
                        offset,
                        buf: AlignedBuf::new(len as usize, LAYER_BUF_ALIGN),
                    }
                }
                IoOp::Write => {
                    let mut buf = AlignedBuf::new(len as usize, LAYER_BUF_ALIGN);
                    gather(&self.mem, &req.sg, buf.as_mut_slice())?;
                    Work::DiskWrite { disk, offset, buf }
                }
                IoOp::Flush => Work::DiskFlush { disk },
                IoOp::Discard => Work::DiskDiscard { disk, offset, len },
            });
        };
        let buffered = raw.buffered.as_raw_fd();
        match req.op {
            IoOp::Flush => return Ok(Work::Sync { fd: buffered }),
            IoOp::Discard => {
                return Ok(Work::Punch {
                    fd: buffered,
                    offset,
                    len,
                })
            }
            IoOp::Read | IoOp::Write => {}
        }
        let iov = iov.ok_or(IoError::ZeroLength { op: req.op })?;
        let direct = raw
            .direct
            .as_ref()
            .filter(|_| offset.is_multiple_of(raw.off_align) && len.is_multiple_of(raw.off_align));
        // Offsets O_DIRECT cannot take (a 512-byte sector on a 4K-sector host disk) go
        // through the page cache; a flush syncs both, as they are one file.
        let fd = direct.map_or(buffered, |f| f.as_raw_fd());
        // A bounce buffer where O_DIRECT cannot take the guest's buffers as they are, or where
        // the list is longer than one system call takes (IOV_MAX).
        let bounce = iov.count() > IOV_MAX
            || (direct.is_some() && !iov.aligned(raw.mem_align, raw.off_align as usize));
        let iov = if bounce {
            let mut buf = AlignedBuf::new(len as usize, raw.mem_align);
            if req.op == IoOp::Write {
                gather(&self.mem, &req.sg, buf.as_mut_slice())?;
            } else {
                slot.copy_back = true;
            }
            let iov = Iovecs::from_buf(&mut buf);
            slot.bounce = Some(buf);
            iov
        } else {
            iov
        };
        Ok(match req.op {
            IoOp::Read => Work::Readv { fd, offset, iov },
            _ => Work::Writev { fd, offset, iov },
        })
    }

    fn complete_now(&mut self, user_data: u64, result: Result<u64, IoError>) {
        self.done.push(Completion { user_data, result });
        // The event loop collects it on its next wake.
        let _ = self.eventfd.write(1);
    }

    fn reap(&mut self) {
        let mut ring_done = std::mem::take(&mut self.ring_done);
        if let Some(u) = &mut self.uring {
            u.reap(&mut ring_done);
        }
        for (id, res) in ring_done.drain(..) {
            let result = if res < 0 {
                Err(IoError::Host(io::Error::from_raw_os_error(-res)))
            } else {
                Ok(res as u64)
            };
            self.finish(id, None, result);
        }
        self.ring_done = ring_done;
        let mut pool_done = std::mem::take(&mut self.pool_done);
        self.pool.reap(&mut pool_done);
        for (id, work, result) in pool_done.drain(..) {
            self.finish(id, Some(work), result);
        }
        self.pool_done = pool_done;
    }

    fn resume(&mut self) {
        while let Some(p) = self.waiting.pop_front() {
            if let Err(p) = self.dispatch(p) {
                self.waiting.push_front(p);
                break;
            }
        }
    }

    /// Ends the request in slot `id`: copies read data to the guest and queues its completion.
    fn finish(&mut self, id: usize, work: Option<Work>, result: Result<u64, IoError>) {
        let Some(mut slot) = self.slots.get_mut(id).and_then(Option::take) else {
            tracing::error!("I/O engine: completion for unknown request {id}");
            return;
        };
        self.free.push(id);
        match slot.op {
            IoOp::Write | IoOp::Discard => self.writes_in_flight -= 1,
            IoOp::Flush => self.flushes_in_flight -= 1,
            IoOp::Read => {}
        }
        let work = work.or(slot.work.take());
        let mut result = result;
        if let (Ok(n), IoOp::Read) = (&result, slot.op) {
            let n = *n;
            if n < slot.len && self.raw_ends_at(slot.offset + n) {
                // The file was cut shorter than the disk: past its end the disk reads zeros,
                // as through the image layer.
                match &mut slot.bounce {
                    Some(b) => b.as_mut_slice()[n as usize..].fill(0),
                    None => zero_from(&self.mem, &slot.sg, n as usize),
                }
                result = Ok(slot.len);
            }
        }
        let result = result.and_then(|n| match slot.op {
            IoOp::Read | IoOp::Write if n != slot.len => {
                // On a regular file a write stops short when the file system is full, and a
                // read when the file was cut shorter than the disk under us.
                tracing::debug!("short transfer: {n} of {} bytes", slot.len);
                let errno = if slot.op == IoOp::Write {
                    libc::ENOSPC
                } else {
                    libc::EIO
                };
                Err(IoError::Host(io::Error::from_raw_os_error(errno)))
            }
            IoOp::Read if slot.copy_back => {
                let data = match (&slot.bounce, &work) {
                    (Some(b), _) => b.as_slice(),
                    (None, Some(Work::DiskRead { buf, .. })) => buf.as_slice(),
                    _ => &[],
                };
                scatter(&self.mem, &slot.sg, data).map(|_| n)
            }
            IoOp::Discard => Ok(slot.len),
            _ => Ok(n),
        });
        if let Err(e) = &result {
            self.log_failure(&slot, e);
        }
        self.done.push(Completion {
            user_data: slot.user_data,
            result,
        });
    }

    /// Whether the raw file ends at or before `pos` (a short read there is its end).
    fn raw_ends_at(&self, pos: u64) -> bool {
        self.raw
            .as_ref()
            .and_then(|r| r.buffered.metadata().ok())
            .is_some_and(|m| m.len() <= pos)
    }

    fn log_failure(&self, slot: &Slot, e: &IoError) {
        let what = format!(
            "{}: {:?} at {:#x}+{:#x} failed: {e}",
            self.path.display(),
            slot.op,
            slot.offset,
            slot.len
        );
        if e.is_no_space() {
            tracing::error!(
                "{what}. The host file system holding the image is full: free space on it \
                 (the guest saw a write error; it may retry, or need its file system checked)"
            );
        } else {
            tracing::error!("{what}; the guest sees an I/O error and the VM keeps running");
        }
    }
}

impl Drop for IoEngine {
    fn drop(&mut self) {
        if let Some(u) = &mut self.uring {
            let mut sink = Vec::new();
            if !u.drain(&mut sink) {
                // The kernel may still use these buffers, guest memory and files: keep them.
                std::mem::forget(std::mem::take(&mut self.slots));
                std::mem::forget(self.raw.take());
                std::mem::forget(self.mem.clone());
            }
        }
        // The pool (next field) finishes its queued jobs when it drops.
    }
}

/// Turns the host cache off for every file of every layer (O_DIRECT): how many took it, of
/// how many. A file system without O_DIRECT keeps its files buffered, said once per file.
fn bypass_layer_caches(disk: &Disk) -> Result<(usize, usize), EngineError> {
    let (mut direct, mut all) = (0, 0);
    for layer in disk.layers() {
        for f in layer.host_files() {
            all += 1;
            match f.bypass_host_cache() {
                Ok(Some(_)) => direct += 1,
                Ok(None) => tracing::warn!(
                    "{}: the host file system does not support O_DIRECT; hostiocache=off uses the page cache for this file",
                    f.path().display()
                ),
                Err(source) => {
                    return Err(EngineError::Open {
                        path: f.path().to_path_buf(),
                        source,
                    })
                }
            }
        }
    }
    Ok((direct, all))
}

/// Copies the guest's scatter-gather list into `buf`.
fn gather(
    mem: &GuestMemoryMmap,
    sg: &[(GuestAddress, usize)],
    buf: &mut [u8],
) -> Result<(), IoError> {
    let mut pos = 0usize;
    for &(addr, len) in sg {
        let dst = buf
            .get_mut(pos..pos + len)
            .ok_or(IoError::BadGuestMemory { addr: addr.0, len })?;
        mem.read_slice(dst, addr)
            .map_err(|_| IoError::BadGuestMemory { addr: addr.0, len })?;
        pos += len;
    }
    Ok(())
}

/// Zeroes the guest's scatter-gather list from byte `from` on.
fn zero_from(mem: &GuestMemoryMmap, sg: &[(GuestAddress, usize)], from: usize) {
    let mut pos = 0usize;
    for &(addr, len) in sg {
        let skip = from.saturating_sub(pos).min(len);
        if skip < len {
            // Checked at submit: the range is guest memory.
            let _ = mem.write_slice(&vec![0u8; len - skip], addr.unchecked_add(skip as u64));
        }
        pos += len;
    }
}

/// Copies `data` out to the guest's scatter-gather list.
fn scatter(
    mem: &GuestMemoryMmap,
    sg: &[(GuestAddress, usize)],
    data: &[u8],
) -> Result<(), IoError> {
    let mut pos = 0usize;
    for &(addr, len) in sg {
        let src = data
            .get(pos..pos + len)
            .ok_or(IoError::BadGuestMemory { addr: addr.0, len })?;
        mem.write_slice(src, addr)
            .map_err(|_| IoError::BadGuestMemory { addr: addr.0, len })?;
        pos += len;
    }
    Ok(())
}
