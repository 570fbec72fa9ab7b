//! format-bench: the image layer's throughput on the host (no guest), per image format, against
//! a raw file in the same folder (so on the same host file system).
//!
//! For each format (raw, vdi, vhd, vmdk, parallels; dynamic images, raw as a sparse file), on a
//! fresh image of --size bytes, through `ferry_storage::Disk`:
//!   1. sequential 1 MiB writes over the whole image (every write allocates), then flush;
//!   2. sequential 1 MiB reads of the now fully allocated image;
//!   3. random 4 KiB reads (--ops of them, 4 KiB aligned, fixed --seed);
//!   4. random 4 KiB writes into the allocated image (overwrites), then flush;
//!   5. random 4 KiB writes into a second, fresh image (allocating), then flush.
//!
//! Write phases are timed up to and including the final flush (fsync): the writes themselves
//! land in the host page cache. Before each phase the image's files are synced and the host page
//! cache is dropped (`echo 3 > /proc/sys/vm/drop_caches`, root only), so that reads come from
//! the disk through the format's path; where that is not possible the output says so. A format
//! whose image cannot be created is skipped, with the reason. The result is a table of MB/s and
//! IOPS, the ratios format/raw, and the issue's goal check, which is text only: a slow number
//! never fails the run. The exit status is non-zero only on a usage error, when raw itself cannot
//! be measured, or when a format returned wrong data.
//!
//! Driver: tests/bench/formats/run.sh.

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use ferry_storage::{
    create_image, open_image, CreateOptions, Disk, FormatKind, StorageError, Variant,
};

const USAGE: &str = "\
Usage: format-bench [options]

Measures ferry's image formats on the host (no guest) against a raw file in the
same folder: sequential 1 MiB writes (allocating) and reads, random 4 KiB reads,
random 4 KiB overwrites, and random 4 KiB writes into a fresh image.

Options:
  --dir DIR          scratch folder for the images (default target/bench/formats);
                     every image lives there, so all share the raw file's file system
  --size SIZE        virtual size of each image, with an optional K, M or G suffix
                     (default 1G; a multiple of 1 MiB)
  --ops N            operations per random 4 KiB phase (default 20000)
  --seed N           seed of the random offsets (default 1)
  --runs N           repeat everything N times, formats taking turns; the tables
                     show medians (default 1)
  --formats LIST     comma-separated subset of raw,vdi,vhd,vmdk,parallels
                     (default all; raw is always measured, as the reference)
  --no-drop-caches   do not drop the host page cache between phases
  --keep             keep the images (default: each format's images are removed
                     once it has been measured)
  --json             print the results as JSON instead of the table
  --json-out FILE    also write the JSON results to FILE
  -h, --help         this text

Exit status: 0 whatever the numbers, 1 when raw could not be measured or a format
returned wrong data, 2 on a usage error.";

const MIB: u64 = 1 << 20;
const SEQ_BLOCK: usize = 1 << 20;
const RAND_BLOCK: usize = 4096;
/// Random offsets read back after the run to check the data.
const VERIFY_SAMPLES: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    SeqWrite,
    SeqRead,
    RandRead,
    RandOverwrite,
    RandAlloc,
}

impl Phase {
    const ALL: [Phase; 5] = [
        Phase::SeqWrite,
        Phase::SeqRead,
        Phase::RandRead,
        Phase::RandOverwrite,
        Phase::RandAlloc,
    ];

    fn key(self) -> &'static str {
        match self {
            Phase::SeqWrite => "seq_write_1m",
            Phase::SeqRead => "seq_read_1m",
            Phase::RandRead => "rand_read_4k",
            Phase::RandOverwrite => "rand_overwrite_4k",
            Phase::RandAlloc => "rand_alloc_write_4k",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Phase::SeqWrite => "seq write 1M (alloc)",
            Phase::SeqRead => "seq read 1M",
            Phase::RandRead => "rand read 4K",
            Phase::RandOverwrite => "rand overwrite 4K",
            Phase::RandAlloc => "rand write 4K (alloc)",
        }
    }

    /// Sequential phases report MB/s, random ones IOPS.
    fn unit(self) -> &'static str {
        match self {
            Phase::SeqWrite | Phase::SeqRead => "MB/s",
            _ => "IOPS",
        }
    }
}

const ALL_FORMATS: [FormatKind; 5] = [
    FormatKind::Raw,
    FormatKind::Vdi,
    FormatKind::Vhd,
    FormatKind::Vmdk,
    FormatKind::Parallels,
];

fn extension(kind: FormatKind) -> &'static str {
    match kind {
        FormatKind::Parallels => "hds",
        FormatKind::Raw => "img",
        other => other.name(),
    }
}

struct Config {
    dir: PathBuf,
    size: u64,
    ops: usize,
    seed: u64,
    runs: usize,
    formats: Vec<FormatKind>,
    drop_caches: bool,
    keep: bool,
    json: bool,
    json_out: Option<PathBuf>,
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        (i, 't' | 'T') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

fn parse_number<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("{name} needs a number, not '{v}'"))
}

fn parse_args() -> Result<Config, String> {
    let mut args = std::env::args_os().skip(1);
    let mut cfg = Config {
        dir: PathBuf::from("target/bench/formats"),
        size: 1 << 30,
        ops: 20_000,
        seed: 1,
        runs: 1,
        formats: ALL_FORMATS.to_vec(),
        drop_caches: true,
        keep: false,
        json: false,
        json_out: None,
    };
    while let Some(arg) = args.next() {
        let arg = arg
            .into_string()
            .map_err(|a| format!("argument {a:?} is not UTF-8"))?;
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| format!("{name} needs a value"))?
                .into_string()
                .map_err(|a| format!("the value {a:?} of {name} is not UTF-8"))
        };
        match arg.as_str() {
            "--dir" => cfg.dir = PathBuf::from(value(&arg)?),
            "--size" => {
                let v = value(&arg)?;
                cfg.size = parse_size(&v).ok_or_else(|| format!("--size: cannot read '{v}'"))?;
            }
            "--ops" => cfg.ops = parse_number(&arg, &value(&arg)?)?,
            "--seed" => cfg.seed = parse_number(&arg, &value(&arg)?)?,
            "--runs" => cfg.runs = parse_number(&arg, &value(&arg)?)?,
            "--formats" => {
                let mut list = vec![FormatKind::Raw];
                for name in value(&arg)?.split(',').filter(|s| !s.is_empty()) {
                    let kind = ALL_FORMATS
                        .into_iter()
                        .find(|k| k.name() == name)
                        .ok_or_else(|| {
                            format!("unknown format '{name}' (choose from raw, vdi, vhd, vmdk, parallels)")
                        })?;
                    if !list.contains(&kind) {
                        list.push(kind);
                    }
                }
                cfg.formats = list;
            }
            "--no-drop-caches" => cfg.drop_caches = false,
            "--keep" => cfg.keep = true,
            "--json" => cfg.json = true,
            "--json-out" => cfg.json_out = Some(PathBuf::from(value(&arg)?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    if cfg.size == 0 || !cfg.size.is_multiple_of(MIB) {
        return Err("--size must be a non-zero multiple of 1 MiB".into());
    }
    if cfg.ops == 0 {
        return Err("--ops must be at least 1".into());
    }
    if cfg.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    Ok(cfg)
}

/// xorshift64*: a small, fixed, seedable generator (the offsets must be the same for every
/// format and every run).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // Never zero; mix the seed a little so that seeds 1, 2, ... differ at once.
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// `n` offsets of 4 KiB blocks inside `size`.
    fn offsets(seed: u64, n: usize, size: u64) -> Vec<u64> {
        let blocks = size / RAND_BLOCK as u64;
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|_| (rng.next() % blocks) * RAND_BLOCK as u64)
            .collect()
    }
}

/// What every written byte holds: a pseudo-random 1 MiB pattern tiled over the disk, so any
/// write (of any size, at any offset) stores `pattern[offset % 1 MiB ..]` and the expected
/// content of every byte is known. Not zeros, so that no layer can take a zero shortcut.
fn pattern() -> Vec<u8> {
    let mut rng = Rng::new(0xF0F0);
    let mut p = vec![0u8; SEQ_BLOCK];
    for chunk in p.chunks_mut(8) {
        let v = rng.next().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    p
}

fn expected(pattern: &[u8], offset: u64, len: usize) -> &[u8] {
    let at = (offset % SEQ_BLOCK as u64) as usize;
    &pattern[at..at + len]
}

/// One format's numbers for one run: the rate per phase (MB/s or IOPS) and what went wrong.
#[derive(Default)]
struct RunResult {
    rates: Vec<(Phase, f64)>,
    /// The host's allocated bytes of the images after phase 1 and after phase 5.
    allocated_full: Option<u64>,
    allocated_fresh: Option<u64>,
    error: Option<String>,
    wrong_data: Option<String>,
}

struct Series {
    kind: FormatKind,
    runs: Vec<RunResult>,
    /// Why the format was skipped (its image could not be created).
    skipped: Option<String>,
}

impl Series {
    fn rates(&self, phase: Phase) -> Vec<f64> {
        self.runs
            .iter()
            .flat_map(|r| r.rates.iter().filter(|(p, _)| *p == phase).map(|(_, v)| *v))
            .collect()
    }

    fn median(&self, phase: Phase) -> Option<f64> {
        median(self.rates(phase))
    }

    /// Fastest over slowest run for `phase` (1.00 = no spread).
    fn spread(&self, phase: Phase) -> Option<f64> {
        let v = self.rates(phase);
        let max = v.iter().copied().reduce(f64::max)?;
        let min = v.iter().copied().reduce(f64::min)?;
        (min > 0.0).then(|| max / min)
    }

    fn errors(&self) -> Vec<&str> {
        self.runs
            .iter()
            .filter_map(|r| r.error.as_deref())
            .collect()
    }

    fn wrong_data(&self) -> Vec<&str> {
        self.runs
            .iter()
            .filter_map(|r| r.wrong_data.as_deref())
            .collect()
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// Drops the host page cache, after syncing `files`. Ok(false) when dropping is switched off.
fn drop_caches(cfg: &Config, files: &[PathBuf]) -> Result<bool, String> {
    if !cfg.drop_caches {
        return Ok(false);
    }
    for f in files {
        // Clean pages only are dropped: make the image's pages clean first.
        if let Ok(file) = std::fs::File::open(f) {
            file.sync_all()
                .map_err(|e| format!("cannot sync {}: {e}", f.display()))?;
        }
    }
    std::fs::write("/proc/sys/vm/drop_caches", "3\n")
        .map(|()| true)
        .map_err(|e| format!("cannot write /proc/sys/vm/drop_caches: {e}"))
}

/// How cache dropping went over the whole benchmark (reported once).
#[derive(Default)]
struct CacheLog {
    dropped: usize,
    failed: Option<String>,
}

impl CacheLog {
    fn drop(&mut self, cfg: &Config, files: &[PathBuf]) {
        match drop_caches(cfg, files) {
            Ok(true) => self.dropped += 1,
            Ok(false) => {}
            Err(e) => {
                if self.failed.is_none() {
                    eprintln!("format-bench: {e}; reads may come from the page cache");
                    self.failed = Some(e);
                }
            }
        }
    }
}

/// Bytes the host has allocated for `files` (st_blocks), not their apparent size.
fn allocated(files: &[PathBuf]) -> Option<u64> {
    let mut total = 0;
    for f in files {
        total += std::fs::metadata(f).ok()?.blocks() * 512;
    }
    Some(total)
}

fn remove(path: &Path) {
    if path.is_dir() {
        let _ = std::fs::remove_dir_all(path);
    } else {
        let _ = std::fs::remove_file(path);
    }
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

fn create(cfg: &Config, kind: FormatKind, path: &Path) -> Result<Disk, String> {
    remove(path);
    let opts = CreateOptions {
        size: cfg.size,
        // Raw: a sparse file (the host file system allocates on first write).
        variant: Variant::Dynamic,
        parent: None,
    };
    let layer = create_image(path, kind, &opts).map_err(|e| e.to_string())?;
    Disk::from_layers(vec![layer]).map_err(|e| e.to_string())
}

fn files_of(disk: &Disk) -> Vec<PathBuf> {
    disk.layers().iter().flat_map(|l| l.files()).collect()
}

/// Checks `VERIFY_SAMPLES` of `offsets` (4 KiB each) against the pattern, through a fresh open.
fn verify(path: &Path, pattern: &[u8], offsets: &[u64]) -> Result<(), String> {
    let layer = open_image(path, false).map_err(|e| format!("reopening: {e}"))?;
    let disk = Disk::from_layers(vec![layer]).map_err(|e| e.to_string())?;
    let step = (offsets.len() / VERIFY_SAMPLES).max(1);
    let mut buf = vec![0u8; RAND_BLOCK];
    for &off in offsets.iter().step_by(step) {
        disk.read_at(&mut buf, off)
            .map_err(|e| format!("reading back offset {off}: {e}"))?;
        if buf != expected(pattern, off, RAND_BLOCK) {
            return Err(format!("offset {off} does not hold what was written there"));
        }
    }
    Ok(())
}

/// Runs the five phases on one format. The series' `skipped` is set when the image cannot be
/// created at all.
fn run_format(
    cfg: &Config,
    kind: FormatKind,
    pattern: &[u8],
    offsets: &[u64],
    cache: &mut CacheLog,
) -> Result<RunResult, String> {
    let mut res = RunResult::default();
    let path = cfg.dir.join(format!("bench.{}", extension(kind)));
    let fresh = cfg.dir.join(format!("bench-fresh.{}", extension(kind)));
    let disk = create(cfg, kind, &path)?;
    let files = files_of(&disk);
    let result = phases(
        cfg, &disk, &files, &fresh, kind, pattern, offsets, cache, &mut res,
    );
    drop(disk);
    if let Err(e) = result {
        res.error = Some(e);
    } else {
        // Everything the image holds is the tiled pattern: sample it through a fresh open.
        let all: Vec<u64> = (0..cfg.size / RAND_BLOCK as u64)
            .step_by(97)
            .map(|b| b * RAND_BLOCK as u64)
            .chain(offsets.iter().copied())
            .collect();
        if let Err(e) = verify(&path, pattern, &all) {
            res.wrong_data = Some(format!("{}: {e}", path.display()));
        } else if let Err(e) = verify(&fresh, pattern, offsets) {
            res.wrong_data = Some(format!("{}: {e}", fresh.display()));
        }
    }
    if !cfg.keep {
        for f in files.iter().chain(std::iter::once(&path)) {
            remove(f);
        }
        remove(&fresh);
    }
    Ok(res)
}

#[allow(clippy::too_many_arguments)]
fn phases(
    cfg: &Config,
    disk: &Disk,
    files: &[PathBuf],
    fresh: &Path,
    kind: FormatKind,
    pattern: &[u8],
    offsets: &[u64],
    cache: &mut CacheLog,
    res: &mut RunResult,
) -> Result<(), String> {
    let name = kind.name();
    let e = |what: &'static str| move |err: StorageError| format!("{what}: {err}");

    // 1. Sequential 1 MiB writes over the whole (empty) image, then flush.
    cache.drop(cfg, files);
    let t = Instant::now();
    let mut off = 0;
    while off < cfg.size {
        disk.write_at(pattern, off).map_err(e("sequential write"))?;
        off += SEQ_BLOCK as u64;
    }
    disk.flush().map_err(e("flush after sequential writes"))?;
    res.rates
        .push((Phase::SeqWrite, mbps(cfg.size, t.elapsed().as_secs_f64())));
    res.allocated_full = allocated(files);
    eprintln!("format-bench: {name}: sequential write done");

    // 2. Sequential 1 MiB reads of the fully allocated image.
    cache.drop(cfg, files);
    let mut buf = vec![0u8; SEQ_BLOCK];
    let t = Instant::now();
    let mut off = 0;
    while off < cfg.size {
        disk.read_at(&mut buf, off).map_err(e("sequential read"))?;
        off += SEQ_BLOCK as u64;
    }
    res.rates
        .push((Phase::SeqRead, mbps(cfg.size, t.elapsed().as_secs_f64())));
    if buf != pattern {
        return Err("the last sequential read does not hold what was written".into());
    }

    // 3. Random 4 KiB reads.
    cache.drop(cfg, files);
    let mut small = vec![0u8; RAND_BLOCK];
    let t = Instant::now();
    for &off in offsets {
        disk.read_at(&mut small, off).map_err(e("random read"))?;
    }
    res.rates.push((
        Phase::RandRead,
        offsets.len() as f64 / t.elapsed().as_secs_f64(),
    ));

    // 4. Random 4 KiB overwrites of the allocated image, then flush.
    cache.drop(cfg, files);
    let t = Instant::now();
    for &off in offsets {
        disk.write_at(expected(pattern, off, RAND_BLOCK), off)
            .map_err(e("random overwrite"))?;
    }
    disk.flush().map_err(e("flush after random overwrites"))?;
    res.rates.push((
        Phase::RandOverwrite,
        offsets.len() as f64 / t.elapsed().as_secs_f64(),
    ));
    eprintln!("format-bench: {name}: reads and overwrites done");

    // 5. Random 4 KiB writes into a fresh image (each first write to a block allocates), then
    //    flush. The first image stays: same file system, same free space for every format.
    let disk2 =
        create(cfg, kind, fresh).map_err(|err| format!("creating {}: {err}", fresh.display()))?;
    let files2 = files_of(&disk2);
    cache.drop(cfg, &files2);
    let t = Instant::now();
    for &off in offsets {
        disk2
            .write_at(expected(pattern, off, RAND_BLOCK), off)
            .map_err(e("random allocating write"))?;
    }
    disk2
        .flush()
        .map_err(e("flush after random allocating writes"))?;
    res.rates.push((
        Phase::RandAlloc,
        offsets.len() as f64 / t.elapsed().as_secs_f64(),
    ));
    res.allocated_fresh = allocated(&files2);
    eprintln!("format-bench: {name}: allocating random writes done");
    Ok(())
}

fn main() -> ExitCode {
    let cfg = match parse_args() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("format-bench: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = std::fs::create_dir_all(&cfg.dir) {
        eprintln!("format-bench: cannot create {}: {e}", cfg.dir.display());
        return ExitCode::from(2);
    }
    let dir = cfg.dir.canonicalize().unwrap_or_else(|_| cfg.dir.clone());
    eprintln!(
        "format-bench: scratch images in {} ({}; {} x 2 per format)",
        dir.display(),
        if cfg.keep {
            "kept"
        } else {
            "each format's removed after it is measured"
        },
        human(cfg.size)
    );

    let pattern = pattern();
    let offsets = Rng::offsets(cfg.seed, cfg.ops, cfg.size);
    let mut cache = CacheLog::default();
    let mut series: Vec<Series> = cfg
        .formats
        .iter()
        .map(|&kind| Series {
            kind,
            runs: Vec::new(),
            skipped: None,
        })
        .collect();

    for run in 1..=cfg.runs {
        for s in series.iter_mut() {
            if s.skipped.is_some() {
                continue;
            }
            eprintln!(
                "format-bench: run {run}/{}: {} ...",
                cfg.runs,
                s.kind.name()
            );
            match run_format(&cfg, s.kind, &pattern, &offsets, &mut cache) {
                Ok(r) => {
                    if let Some(e) = &r.error {
                        eprintln!("format-bench: {}: FAILED: {e}", s.kind.name());
                    }
                    if let Some(e) = &r.wrong_data {
                        eprintln!("format-bench: {}: WRONG DATA: {e}", s.kind.name());
                    }
                    s.runs.push(r);
                }
                Err(e) => {
                    eprintln!(
                        "format-bench: {}: skipped: cannot create the image: {e}",
                        s.kind.name()
                    );
                    s.skipped = Some(e);
                }
            }
        }
    }

    let report = Report {
        cfg: &cfg,
        dir,
        series: &series,
        cache: &cache,
    };
    let json = report.json();
    if let Some(path) = &cfg.json_out {
        if let Err(e) = std::fs::write(path, format!("{json}\n")) {
            eprintln!("format-bench: cannot write {}: {e}", path.display());
        }
    }
    if cfg.json {
        println!("{json}");
    } else {
        print!("{}", report.text());
    }

    let raw_ok = series
        .iter()
        .any(|s| s.kind == FormatKind::Raw && Phase::ALL.iter().all(|&p| s.median(p).is_some()));
    let wrong = series.iter().any(|s| !s.wrong_data().is_empty());
    if !raw_ok || wrong {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", bytes as f64 / MIB as f64)
    }
}

struct Report<'a> {
    cfg: &'a Config,
    dir: PathBuf,
    series: &'a [Series],
    cache: &'a CacheLog,
}

/// The goal from the issue, per dynamic format: reads through a fully allocated image within
/// 5% of raw (phases 2 and 3), writes that allocate within 15% of raw (phase 1; phase 5 is
/// shown beside it).
struct Goal {
    seq_read: Option<bool>,
    rand_read: Option<bool>,
    seq_alloc: Option<bool>,
    rand_alloc: Option<bool>,
}

impl Report<'_> {
    fn raw(&self) -> Option<&Series> {
        self.series.iter().find(|s| s.kind == FormatKind::Raw)
    }

    /// The format's median divided by raw's, for `phase` (higher is better for both units).
    fn ratio(&self, s: &Series, phase: Phase) -> Option<f64> {
        let raw = self.raw()?.median(phase)?;
        let v = s.median(phase)?;
        (raw > 0.0).then(|| v / raw)
    }

    fn goal(&self, s: &Series) -> Goal {
        let at_least = |phase, min: f64| self.ratio(s, phase).map(|r| r >= min);
        Goal {
            seq_read: at_least(Phase::SeqRead, 0.95),
            rand_read: at_least(Phase::RandRead, 0.95),
            seq_alloc: at_least(Phase::SeqWrite, 0.85),
            rand_alloc: at_least(Phase::RandAlloc, 0.85),
        }
    }

    fn cache_text(&self) -> String {
        if !self.cfg.drop_caches {
            "the host page cache was NOT dropped (--no-drop-caches): reads may be served from it"
                .into()
        } else if let Some(e) = &self.cache.failed {
            format!(
                "the host page cache could not be dropped ({e}): reads may be served from it, \
                 so they measure the format's CPU path more than the disk"
            )
        } else {
            format!(
                "the host page cache was dropped before every phase ({} times: fsync of the \
                 image files, then echo 3 > /proc/sys/vm/drop_caches): reads come from the disk",
                self.cache.dropped
            )
        }
    }

    fn text(&self) -> String {
        let cfg = self.cfg;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "\nImage formats on the host (no guest): {} images, {} random 4 KiB ops per random \
             phase (seed {}), {} run(s), medians",
            human(cfg.size),
            cfg.ops,
            cfg.seed,
            cfg.runs
        );
        let _ = writeln!(
            o,
            "scratch folder: {} (every image there, on the raw file's file system)",
            self.dir.display()
        );
        let _ = writeln!(o, "cache: {}", self.cache_text());
        let _ = writeln!(
            o,
            "write phases are timed up to and including the final flush (fsync); dynamic \
             images, raw as a sparse file"
        );
        let _ = writeln!(o);
        let _ = write!(o, "{:<10}", "format");
        for p in Phase::ALL {
            let _ = write!(o, " {:>22}", format!("{} {}", p.label(), p.unit()));
        }
        let _ = writeln!(o);
        for s in self.series {
            let _ = write!(o, "{:<10}", s.kind.name());
            if s.skipped.is_some() {
                let _ = writeln!(o, " skipped (see below)");
                continue;
            }
            for p in Phase::ALL {
                let _ = write!(o, " {:>22}", fmt_opt(s.median(p), 0));
            }
            let _ = writeln!(o);
        }
        let _ = writeln!(
            o,
            "\nratio format/raw (higher is better; 1.00 = as fast as raw):"
        );
        let _ = write!(o, "{:<10}", "format");
        for p in Phase::ALL {
            let _ = write!(o, " {:>22}", p.label());
        }
        let _ = writeln!(o);
        for s in self
            .series
            .iter()
            .filter(|s| s.kind != FormatKind::Raw && s.skipped.is_none())
        {
            let _ = write!(o, "{:<10}", s.kind.name());
            for p in Phase::ALL {
                let _ = write!(o, " {:>22}", fmt_opt(self.ratio(s, p), 2));
            }
            let _ = writeln!(o);
        }

        if cfg.runs > 1 {
            let _ = writeln!(
                o,
                "\nrun-to-run spread (fastest/slowest of {} runs; the noise the ratios sit in):",
                cfg.runs
            );
            for s in self.series.iter().filter(|s| s.skipped.is_none()) {
                let _ = write!(o, "{:<10}", s.kind.name());
                for p in Phase::ALL {
                    let _ = write!(o, " {:>22}", fmt_opt(s.spread(p), 2));
                }
                let _ = writeln!(o);
            }
        }

        let _ = writeln!(o, "\nhost space used (st_blocks) after the sequential fill / after the random allocating writes:");
        for s in self.series.iter().filter(|s| s.skipped.is_none()) {
            let full = s.runs.iter().find_map(|r| r.allocated_full);
            let fresh = s.runs.iter().find_map(|r| r.allocated_fresh);
            let _ = writeln!(
                o,
                "  {:<10} {:>10} / {:>10}",
                s.kind.name(),
                full.map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / MIB as f64)),
                fresh.map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / MIB as f64)),
            );
        }

        let _ = writeln!(
            o,
            "\nGoal (reads through a fully allocated dynamic image within 5% of raw; writes that \
             allocate within 15% of raw):"
        );
        for s in self
            .series
            .iter()
            .filter(|s| s.kind != FormatKind::Raw && s.skipped.is_none())
        {
            let g = self.goal(s);
            let _ = writeln!(
                o,
                "  {:<10} seq read: {:<12} rand read: {:<12} seq alloc write: {:<12} rand alloc write: {}",
                s.kind.name(),
                verdict(g.seq_read),
                verdict(g.rand_read),
                verdict(g.seq_alloc),
                verdict(g.rand_alloc)
            );
        }
        if let Some(raw) = self.raw() {
            let noisy: Vec<String> = Phase::ALL
                .iter()
                .filter_map(|&p| {
                    raw.spread(p)
                        .filter(|&x| x > 1.05)
                        .map(|x| format!("{} {x:.2}", p.label()))
                })
                .collect();
            if !noisy.is_empty() {
                let _ = writeln!(
                    o,
                    "  note: raw's own run-to-run spread is over 5% ({}): verdicts that close to \
                     the margins are within this host's noise",
                    noisy.join(", ")
                );
            }
        }
        let _ = writeln!(
            o,
            "(information only: a slow figure does not fail the run. Random allocating 4 KiB \
             writes make a dynamic format allocate a whole block (1 MiB VDI/Parallels, 2 MiB VHD, \
             64 KiB VMDK grains), filled around the 4 KiB, where raw's sparse file allocates 4 KiB: \
             see the space used above)"
        );

        for s in self.series {
            if let Some(why) = &s.skipped {
                let _ = writeln!(
                    o,
                    "\n{}: skipped: cannot create the image: {why}",
                    s.kind.name()
                );
            }
            for e in s.errors() {
                let _ = writeln!(o, "\n{}: a run FAILED: {e}", s.kind.name());
            }
            for e in s.wrong_data() {
                let _ = writeln!(o, "\n{}: WRONG DATA: {e}", s.kind.name());
            }
        }
        o
    }

    fn json(&self) -> String {
        let cfg = self.cfg;
        let mut o = String::new();
        let _ = write!(
            o,
            "{{\"benchmark\":\"formats\",\"dir\":{},\"size\":{},\"ops\":{},\"seed\":{},\
             \"runs\":{},\"cache\":{{\"drop\":{},\"dropped\":{},\"error\":{},\"text\":{}}},\
             \"units\":{{",
            json_str(&self.dir.to_string_lossy()),
            cfg.size,
            cfg.ops,
            cfg.seed,
            cfg.runs,
            cfg.drop_caches,
            self.cache.dropped,
            self.cache.failed.as_deref().map_or("null".into(), json_str),
            json_str(&self.cache_text()),
        );
        for (i, p) in Phase::ALL.iter().enumerate() {
            if i > 0 {
                o.push(',');
            }
            let _ = write!(o, "{}:{}", json_str(p.key()), json_str(p.unit()));
        }
        o.push_str("},\"formats\":[");
        for (i, s) in self.series.iter().enumerate() {
            if i > 0 {
                o.push(',');
            }
            let _ = write!(
                o,
                "{{\"name\":{},\"skipped\":{},\"median\":{{",
                json_str(s.kind.name()),
                s.skipped.as_deref().map_or("null".into(), json_str)
            );
            for (j, p) in Phase::ALL.iter().enumerate() {
                if j > 0 {
                    o.push(',');
                }
                let _ = write!(o, "{}:{}", json_str(p.key()), json_num(s.median(*p)));
            }
            o.push_str("},\"ratio_to_raw\":{");
            for (j, p) in Phase::ALL.iter().enumerate() {
                if j > 0 {
                    o.push(',');
                }
                let _ = write!(o, "{}:{}", json_str(p.key()), json_num(self.ratio(s, *p)));
            }
            o.push_str("},\"spread\":{");
            for (j, p) in Phase::ALL.iter().enumerate() {
                if j > 0 {
                    o.push(',');
                }
                let _ = write!(o, "{}:{}", json_str(p.key()), json_num(s.spread(*p)));
            }
            o.push_str("},\"runs\":[");
            for (j, r) in s.runs.iter().enumerate() {
                if j > 0 {
                    o.push(',');
                }
                o.push('{');
                for (k, (p, v)) in r.rates.iter().enumerate() {
                    if k > 0 {
                        o.push(',');
                    }
                    let _ = write!(o, "{}:{}", json_str(p.key()), json_num(Some(*v)));
                }
                if !r.rates.is_empty() {
                    o.push(',');
                }
                let _ = write!(
                    o,
                    "\"allocated_bytes_full\":{},\"allocated_bytes_fresh\":{},\"error\":{},\
                     \"wrong_data\":{}}}",
                    r.allocated_full.map_or("null".into(), |b| b.to_string()),
                    r.allocated_fresh.map_or("null".into(), |b| b.to_string()),
                    r.error.as_deref().map_or("null".into(), json_str),
                    r.wrong_data.as_deref().map_or("null".into(), json_str),
                );
            }
            o.push_str("],\"goal\":");
            if s.kind == FormatKind::Raw || s.skipped.is_some() {
                o.push_str("null");
            } else {
                let g = self.goal(s);
                let _ = write!(
                    o,
                    "{{\"seq_read_within_5pct\":{},\"rand_read_within_5pct\":{},\
                     \"seq_alloc_write_within_15pct\":{},\"rand_alloc_write_within_15pct\":{}}}",
                    json_bool(g.seq_read),
                    json_bool(g.rand_read),
                    json_bool(g.seq_alloc),
                    json_bool(g.rand_alloc)
                );
            }
            o.push('}');
        }
        let _ = write!(
            o,
            "],\"goal_text\":{}}}",
            json_str(
                "reads through a fully allocated dynamic image within 5% of raw; writes that \
                 allocate within 15% of raw"
            )
        );
        o
    }
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

fn verdict(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "not measured",
    }
}

fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_num(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.3}"),
        _ => "null".into(),
    }
}

fn json_bool(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "true",
        Some(false) => "false",
        None => "null",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Some(256 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn offsets_are_fixed_aligned_and_inside() {
        let a = Rng::offsets(1, 1000, 64 << 20);
        assert_eq!(a, Rng::offsets(1, 1000, 64 << 20));
        assert_ne!(a, Rng::offsets(2, 1000, 64 << 20));
        assert!(a.iter().all(|&o| o % 4096 == 0 && o + 4096 <= 64 << 20));
    }

    #[test]
    fn pattern_tiles() {
        let p = pattern();
        assert_eq!(expected(&p, (3 << 20) + 8192, 4096), &p[8192..12288]);
        assert!(p.iter().any(|&b| b != 0));
    }

    #[test]
    fn median_and_json() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![]), None);
        assert_eq!(json_str("a\"b\n"), "\"a\\\"b\\n\"");
    }
}
