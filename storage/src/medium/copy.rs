//! The copy engine under clone, compact, resize and merge: reads a source's ranges on
//! several threads, drops all-zero grains (holes stay holes), and writes what is left into a
//! target layer in order, on the calling thread (layers serialize writes on their own lock, and
//! streamOptimized VMDKs must be written front to back).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Condvar, Mutex};

use crate::error::Result;
use crate::layer::{Layer, LowerLayers};

/// Unit of work: a piece read by one thread and written in one go (a multiple of every
/// format's block size up to VHD's 2 MiB, so pieces start on block boundaries).
pub const PIECE: u64 = 2 << 20;
/// Zero detection granularity: the smallest block any format allocates (a VMDK grain).
pub const GRAIN: usize = 64 << 10;

/// Where a copy reads from.
pub struct Source<'a> {
    /// Reads the source's content (holes read as zeros).
    pub read: &'a (dyn Fn(&mut [u8], u64) -> Result<()> + Sync),
    /// The ranges that may hold data, in order, not overlapping; the rest is left a hole.
    pub ranges: Vec<(u64, u64)>,
    /// The source's bytes in memory, where a piece lies whole in a mapped file
    /// ([`super::mapped::MappedFile`]): such a piece is used in place, not read.
    pub mapped: Option<&'a (dyn Fn(u64, usize) -> Option<&'a [u8]> + Sync)>,
    /// For a differencing target: what the target's parents read. An all-zero grain is then
    /// written only where the parents are not zero there (the zeros hide their data).
    pub below: Option<&'a (dyn LowerLayers + Sync)>,
}

/// Bytes written between background syncs of the target's files.
const SYNC_EVERY: u64 = 64 << 20;

/// Starts the write-back of the target's dirty pages while the copy goes on (through its own
/// handles, so no layer lock is held), so that the final flush finds little left to do: the
/// disk writes overlap the copy instead of following it. Only started, never waited for: an
/// fdatasync here would commit the file system's journal and flush the disk's cache each
/// time, and hold up the writers on the inode.
struct Syncer {
    files: Vec<std::fs::File>,
    /// Bytes written so far, and whether the copy is over.
    state: Mutex<(u64, bool)>,
    cv: Condvar,
}

impl Syncer {
    fn new(paths: &[std::path::PathBuf]) -> Self {
        let paths = if crate::host_file::durable() {
            paths
        } else {
            &[]
        };
        Self {
            files: paths
                .iter()
                .filter_map(|p| std::fs::File::open(p).ok())
                .collect(),
            state: Mutex::new((0, false)),
            cv: Condvar::new(),
        }
    }

    fn wrote(&self, n: u64) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 += n;
        self.cv.notify_one();
    }

    fn stop(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.cv.notify_one();
    }

    fn run(&self) {
        let mut synced = 0u64;
        loop {
            {
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                while !st.1 && st.0 < synced + SYNC_EVERY {
                    st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                if st.1 {
                    return;
                }
                synced = st.0;
            }
            for f in &self.files {
                // Best effort: the layer's own flush is what makes the copy durable.
                let _ = crate::io::start_writeback(f);
            }
        }
    }
}

/// Reports progress: the byte count to go through, then bytes done as they are done.
pub trait Progress: Sync {
    fn start(&self, _total: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}

/// No progress output.
pub struct Silent;
impl Progress for Silent {}

/// What a copy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes read from the source.
    pub read: u64,
    /// Bytes written to the target (all-zero grains not counted).
    pub written: u64,
}

/// How many reader threads: every core (the writer mostly waits on them).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8))
}

struct Piece<'a> {
    index: usize,
    offset: u64,
    data: Data<'a>,
    /// (start, len) within the data to write.
    runs: Vec<(usize, usize)>,
}

/// A piece's bytes: read into a buffer (returned to the pool once written), or borrowed from
/// the mapped source.
enum Data<'a> {
    Read(Vec<u8>),
    Mapped(&'a [u8]),
}

impl Data<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Data::Read(v) => v,
            Data::Mapped(m) => m,
        }
    }
}

/// Pieces the readers may run ahead of the writer, per reader: bounds memory (each piece is a
/// buffer, and fresh buffers cost page faults), yet keeps every reader busy.
const WINDOW_PER_READER: usize = 2;

/// Copies `src` into `dst` (writes go through `lower`, the target's copy-on-write source).
pub fn copy(
    src: &Source<'_>,
    dst: &dyn Layer,
    lower: &(dyn LowerLayers + Sync),
    threads: usize,
    progress: &dyn Progress,
) -> Result<CopyStats> {
    let threads = threads.max(1);
    let window = WINDOW_PER_READER * threads + 1;
    let pieces = split(&src.ranges);
    progress.start(pieces.iter().map(|p| p.1).sum());
    // A raw target has no block map and no lock: readers write their own pieces, so the
    // page-cache copies run on every core. Other formats allocate in order, on one thread.
    let parallel_writes = dst.format() == crate::layer::FormatKind::Raw;
    let next = AtomicUsize::new(0);
    let abort = AtomicBool::new(false);
    // How many pieces the writer has finished: readers stay within `window` of it.
    let written = (Mutex::new(0usize), Condvar::new());
    let pool: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
    let (tx, rx) = mpsc::sync_channel::<Result<Piece<'_>>>(window);
    let mut stats = CopyStats::default();
    let syncer = Syncer::new(&dst.files());

    let result = std::thread::scope(|s| {
        // Owned here so that an early return drops it and readers blocked on a full channel
        // wake up and end.
        let rx = rx;
        let syncer = &syncer;
        s.spawn(move || syncer.run());
        for _ in 0..threads {
            let tx = tx.clone();
            let (next, abort, written, pool, pieces) = (&next, &abort, &written, &pool, &pieces);
            s.spawn(move || loop {
                let index = next.fetch_add(1, Ordering::SeqCst);
                if index >= pieces.len() || abort.load(Ordering::SeqCst) {
                    return;
                }
                {
                    let (lock, cv) = written;
                    let mut done = lock.lock().unwrap_or_else(|e| e.into_inner());
                    while index >= *done + window && !abort.load(Ordering::SeqCst) {
                        done = cv.wait(done).unwrap_or_else(|e| e.into_inner());
                    }
                }
                let (offset, len) = pieces[index];
                let buf = pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let mut piece = read_piece(src, index, offset, len as usize, buf);
                if parallel_writes {
                    if let Ok(p) = &mut piece {
                        if let Err(e) = write_runs(dst, lower, p, syncer) {
                            piece = Err(e);
                        }
                    }
                }
                let failed = piece.is_err();
                if tx.send(piece).is_err() || failed {
                    return;
                }
            });
        }
        drop(tx);
        let mut waiting: BTreeMap<usize, Piece<'_>> = BTreeMap::new();
        let mut want = 0usize;
        let fail = |e| {
            syncer.stop();
            abort.store(true, Ordering::SeqCst);
            written.1.notify_all();
            Err(e)
        };
        while want < pieces.len() {
            let Ok(got) = rx.recv() else {
                return fail(crate::error::StorageError::Invalid(
                    "the copy's reader threads stopped early".into(),
                ));
            };
            let piece = match got {
                Ok(p) => p,
                Err(e) => return fail(e),
            };
            stats.read += piece.data.bytes().len() as u64;
            waiting.insert(piece.index, piece);
            while let Some(p) = waiting.remove(&want) {
                let bytes = p.data.bytes();
                for &(at, n) in &p.runs {
                    // A raw target's pieces were written by their readers already.
                    if !parallel_writes {
                        dst.reserve(p.offset + at as u64, n as u64);
                        if let Err(e) =
                            dst.write_at(&bytes[at..at + n], p.offset + at as u64, lower)
                        {
                            return fail(e);
                        }
                        syncer.wrote(n as u64);
                    }
                    stats.written += n as u64;
                }
                progress.advance(bytes.len() as u64);
                if let Data::Read(buf) = p.data {
                    pool.lock().unwrap_or_else(|e| e.into_inner()).push(buf);
                }
                want += 1;
                *written.0.lock().unwrap_or_else(|e| e.into_inner()) = want;
                written.1.notify_all();
            }
        }
        syncer.stop();
        Ok(())
    });
    progress.finish();
    result.map(|()| stats)
}

fn write_runs(
    dst: &dyn Layer,
    lower: &dyn LowerLayers,
    p: &mut Piece<'_>,
    syncer: &Syncer,
) -> Result<()> {
    let bytes = p.data.bytes();
    for &(at, n) in &p.runs {
        dst.reserve(p.offset + at as u64, n as u64);
        dst.write_at(&bytes[at..at + n], p.offset + at as u64, lower)?;
        syncer.wrote(n as u64);
    }
    Ok(())
}

/// Cuts ranges into pieces that start on PIECE boundaries.
fn split(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(start, len) in ranges {
        let end = start + len;
        let mut off = start;
        while off < end {
            let stop = ((off / PIECE + 1) * PIECE).min(end);
            out.push((off, stop - off));
            off = stop;
        }
    }
    out
}

fn read_piece<'a>(
    src: &Source<'a>,
    index: usize,
    offset: u64,
    len: usize,
    buf: Option<Vec<u8>>,
) -> Result<Piece<'a>> {
    let in_map = src.mapped.and_then(|m| m(offset, len));
    let data = match in_map {
        Some(m) => Data::Mapped(m),
        None => {
            let mut buf = buf.unwrap_or_default();
            buf.resize(len, 0);
            (src.read)(&mut buf, offset)?;
            Data::Read(buf)
        }
    };
    let buf = data.bytes();
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut below_buf = Vec::new();
    // Grains are aligned to the disk, not to the piece, so that a hole in the source stays
    // a hole at the same place in the target.
    let mut at = 0usize;
    while at < len {
        let disk_off = offset + at as u64;
        let n = (GRAIN - (disk_off % GRAIN as u64) as usize).min(len - at);
        let grain = &buf[at..at + n];
        let keep = !is_zero(grain)
            || match src.below {
                Some(below) => {
                    below_buf.resize(n, 0);
                    below.read_at(&mut below_buf, disk_off)?;
                    !is_zero(&below_buf)
                }
                None => false,
            };
        if keep {
            match runs.last_mut() {
                Some((s, l)) if *s + *l == at => *l += n,
                _ => runs.push((at, n)),
            }
        }
        at += n;
    }
    Ok(Piece {
        index,
        offset,
        data,
        runs,
    })
}

/// Whether `buf` is all zeros (OR-folded so the compiler vectorizes it).
pub fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(4096)
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// The ranges a layer itself holds (data or explicit zeros), below `limit`.
pub fn layer_ranges(layer: &dyn Layer, limit: u64) -> Result<Vec<(u64, u64)>> {
    let size = layer.virtual_size().min(limit);
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut off = 0u64;
    while off < size {
        let (state, run) = layer.block_status(off, size - off)?;
        let run = run.clamp(1, size - off);
        if state != crate::layer::Allocation::Unallocated {
            match out.last_mut() {
                Some((s, l)) if *s + *l == off => *l += run,
                _ => out.push((off, run)),
            }
        }
        off += run;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_start_on_piece_boundaries() {
        let p = split(&[(PIECE - 10, PIECE + 20), (5 * PIECE, 1)]);
        assert_eq!(
            p,
            vec![
                (PIECE - 10, 10),
                (PIECE, PIECE),
                (2 * PIECE, 10),
                (5 * PIECE, 1)
            ]
        );
    }

    /// A raw target counting the bytes written into it.
    struct Counting {
        size: u64,
        written: AtomicUsize,
        path: std::path::PathBuf,
    }

    impl Layer for Counting {
        fn format(&self) -> crate::layer::FormatKind {
            crate::layer::FormatKind::Raw
        }
        fn variant(&self) -> crate::layer::Variant {
            crate::layer::Variant::Fixed
        }
        fn path(&self) -> &std::path::Path {
            &self.path
        }
        fn files(&self) -> Vec<std::path::PathBuf> {
            vec![]
        }
        fn host_files(&self) -> Vec<std::sync::Arc<dyn crate::HostFile>> {
            vec![]
        }
        fn virtual_size(&self) -> u64 {
            self.size
        }
        fn uuid(&self) -> Option<uuid::Uuid> {
            None
        }
        fn parent(&self) -> Option<crate::layer::ParentRef> {
            None
        }
        fn writable(&self) -> bool {
            true
        }
        fn block_status(&self, _: u64, len: u64) -> Result<(crate::layer::Allocation, u64)> {
            Ok((crate::layer::Allocation::Data, len))
        }
        fn read_at(&self, buf: &mut [u8], _: u64) -> Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], _: u64, _: &dyn LowerLayers) -> Result<()> {
            self.written.fetch_add(buf.len(), Ordering::SeqCst);
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
    }

    /// A raw target is written by the readers, each byte once (the writer thread only
    /// keeps the order of the others).
    #[test]
    fn raw_targets_are_written_once() {
        let size = 8 * PIECE;
        let read = |buf: &mut [u8], off: u64| {
            // Data in every other grain, zeros between.
            for (i, b) in buf.iter_mut().enumerate() {
                let at = off + i as u64;
                *b = u8::from((at / GRAIN as u64).is_multiple_of(2));
            }
            Ok(())
        };
        let src = Source {
            read: &read,
            ranges: vec![(0, size)],
            below: None,
            mapped: None,
        };
        let dst = Counting {
            size,
            written: AtomicUsize::new(0),
            path: "counting".into(),
        };
        let stats = copy(&src, &dst, &crate::layer::NoLowerLayers, 2, &Silent).unwrap();
        assert_eq!(stats.written, size / 2);
        assert_eq!(dst.written.load(Ordering::SeqCst) as u64, size / 2);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 10000]));
        let mut b = vec![0u8; 10000];
        b[9999] = 1;
        assert!(!is_zero(&b));
    }
}
