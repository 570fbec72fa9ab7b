//! io-bench: ferry's I/O engine on the host (no guest) against fio on the same file with the
//! same queue depth, printed as ratios.
//!
//! Jobs: 4 KiB random reads and writes, 1 MiB sequential reads and writes, each with the host
//! cache on (buffered) and off (O_DIRECT). ferry keeps --qd requests in flight through
//! `ferry_storage::io::IoEngine` on a raw image, from guest memory in a plain
//! `GuestMemoryMmap` (buffers aligned, so the fast path moves no data through a copy); fio runs
//! `--ioengine=io_uring` (ferry's engine on a host with io_uring) with the same block size,
//! pattern, queue depth and run time, one job. fio and ferry take turns per job. The result is a
//! table of IOPS and MB/s and the ratio ferry/fio; the goal (>= 0.90) is text only.
//!
//! `--format vdi` measures a dynamic VDI instead (every block allocated), which goes through
//! the image layer on pool threads, with O_DIRECT on the image file when the cache is off.
//! fio cannot read VDI, so the peer is `qemu-img bench -f vdi` with the same block size,
//! queue depth and cache mode (`-t none` / `writeback`): it moves a fixed count of requests,
//! by a fixed stride through the image for the random jobs (4 KiB times a prime, wrapping).
//!
//! Driver: tests/bench/io/run.sh.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_storage::io::{EngineChoice, EngineOptions, IoEngine, Request};
use ferry_storage::{create_image, CreateOptions, Disk, FormatKind, Variant};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const USAGE: &str = "\
Usage: io-bench [options]

ferry's I/O engine against fio on the same raw file, same queue depth (no guest).

Options:
  --file FILE      the raw test file (default target/bench/io/bench.raw; made and
                   filled when missing or of another size)
  --size SIZE      its size, with K, M or G (default 1G)
  --runtime SECS   seconds per job and tool (default 3)
  --qd N           queue depth of the 4 KiB random jobs (default 32)
  --seq-qd N       queue depth of the 1 MiB sequential jobs (default 8)
  --cache LIST     on, off or on,off (default on,off)
  --jobs LIST      subset of randread,randwrite,read,write (default all)
  --engine E       auto, io_uring or threads (default auto)
  --runs N         measure each job N times, fio and ferry taking turns in
                   alternating order; the table shows medians (default 3)
  --format F       raw (default) or vdi: the test file's format; vdi is measured
                   against qemu-img bench instead of fio
  --no-fio         measure ferry only (no fio, no qemu-img)
  -h, --help       this text

Exit status: 0 whatever the numbers; 1 when ferry's engine failed; 2 on a usage error.";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Job {
    RandRead,
    RandWrite,
    SeqRead,
    SeqWrite,
}

impl Job {
    const ALL: [Job; 4] = [Job::RandRead, Job::RandWrite, Job::SeqRead, Job::SeqWrite];
    fn fio_rw(self) -> &'static str {
        match self {
            Job::RandRead => "randread",
            Job::RandWrite => "randwrite",
            Job::SeqRead => "read",
            Job::SeqWrite => "write",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Job::RandRead => "random read 4K",
            Job::RandWrite => "random write 4K",
            Job::SeqRead => "sequential read 1M",
            Job::SeqWrite => "sequential write 1M",
        }
    }
    fn block(self) -> u64 {
        match self {
            Job::RandRead | Job::RandWrite => 4096,
            _ => 1 << 20,
        }
    }
    fn write(self) -> bool {
        matches!(self, Job::RandWrite | Job::SeqWrite)
    }
    fn random(self) -> bool {
        matches!(self, Job::RandRead | Job::RandWrite)
    }
}

struct Opts {
    file: PathBuf,
    size: u64,
    runtime: f64,
    qd: u32,
    seq_qd: u32,
    caches: Vec<bool>,
    jobs: Vec<Job>,
    engine: EngineChoice,
    fio: bool,
    runs: usize,
    vdi: bool,
}

fn parse_size(s: &str) -> Option<u64> {
    let (d, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    d.parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        file: PathBuf::from("target/bench/io/bench.raw"),
        size: 1 << 30,
        runtime: 3.0,
        qd: 32,
        seq_qd: 8,
        caches: vec![true, false],
        jobs: Job::ALL.to_vec(),
        engine: EngineChoice::Auto,
        fio: true,
        runs: 3,
        vdi: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--file" => o.file = PathBuf::from(val()?),
            "--size" => {
                o.size = parse_size(&val()?)
                    .filter(|s| *s >= 16 << 20 && s % (1 << 20) == 0)
                    .ok_or("--size needs a multiple of 1M, at least 16M")?
            }
            "--runtime" => {
                o.runtime = val()?
                    .parse()
                    .ok()
                    .filter(|r: &f64| *r > 0.0)
                    .ok_or("--runtime needs seconds")?
            }
            "--qd" => {
                o.qd = val()?
                    .parse()
                    .ok()
                    .filter(|q| *q > 0)
                    .ok_or("--qd needs a number")?
            }
            "--seq-qd" => {
                o.seq_qd = val()?
                    .parse()
                    .ok()
                    .filter(|q| *q > 0)
                    .ok_or("--seq-qd needs a number")?
            }
            "--cache" => {
                o.caches = val()?
                    .split(',')
                    .map(|c| match c {
                        "on" => Ok(true),
                        "off" => Ok(false),
                        _ => Err(format!("--cache: '{c}' is not on or off")),
                    })
                    .collect::<Result<_, _>>()?
            }
            "--jobs" => {
                o.jobs = val()?
                    .split(',')
                    .map(|j| {
                        Job::ALL
                            .into_iter()
                            .find(|k| k.fio_rw() == j)
                            .ok_or(format!("--jobs: unknown job '{j}'"))
                    })
                    .collect::<Result<_, _>>()?
            }
            "--engine" => {
                o.engine = match val()?.as_str() {
                    "auto" => EngineChoice::Auto,
                    "io_uring" => EngineChoice::IoUring,
                    "threads" => EngineChoice::ThreadPool,
                    e => return Err(format!("--engine: '{e}' is not auto, io_uring or threads")),
                }
            }
            "--no-fio" => o.fio = false,
            "--format" => {
                o.vdi = match val()?.as_str() {
                    "raw" => false,
                    "vdi" => true,
                    f => return Err(format!("--format: '{f}' is not raw or vdi")),
                }
            }
            "--runs" => {
                o.runs = val()?
                    .parse()
                    .ok()
                    .filter(|r| *r > 0)
                    .ok_or("--runs needs a number")?
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument '{a}' (see --help)")),
        }
    }
    Ok(o)
}

/// Makes the file fully allocated (so reads come from real blocks, not holes).
fn prepare(path: &Path, size: u64, vdi: bool) -> Result<(), String> {
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 + 3) as u8).collect();
    if vdi {
        // Reused when it is a VDI of this size already.
        if Disk::open(path, false, &[])
            .is_ok_and(|d| d.size() == size && d.layers()[0].format() == FormatKind::Vdi)
        {
            return Ok(());
        }
        let _ = std::fs::remove_file(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        let opts = CreateOptions {
            size,
            variant: Variant::Dynamic,
            parent: None,
        };
        let layer = create_image(path, FormatKind::Vdi, &opts).map_err(|e| e.to_string())?;
        let disk = Disk::from_layers(vec![layer]).map_err(|e| e.to_string())?;
        for i in 0..size >> 20 {
            disk.write_at(&chunk, i << 20).map_err(|e| e.to_string())?;
        }
        return disk.flush().map_err(|e| e.to_string());
    }
    if std::fs::metadata(path)
        .map(|m| m.len() == size)
        .unwrap_or(false)
    {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| e.to_string())?;
    for _ in 0..size >> 20 {
        f.write_all(&chunk).map_err(|e| e.to_string())?;
    }
    f.sync_all().map_err(|e| e.to_string())
}

/// Writes back what the previous job left dirty, so it does not slow the next one.
fn settle(path: &Path) {
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open(path) {
        let _ = f.sync_all();
    }
}

fn median(mut v: Vec<Result_>) -> Option<Result_> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.iops.total_cmp(&b.iops));
    Some(v.swap_remove(v.len() / 2))
}

/// A small deterministic generator for random offsets.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

struct Result_ {
    iops: f64,
    mbps: f64,
}

fn run_ferry(o: &Opts, job: Job, cache: bool, qd: u32) -> Result<(Result_, &'static str), String> {
    let disk = Arc::new(Disk::open(&o.file, true, &[]).map_err(|e| e.to_string())?);
    let bs = job.block();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (qd as u64 * bs) as usize)])
        .map_err(|e| e.to_string())?;
    let opts = EngineOptions {
        host_cache: cache,
        queue_depth: qd,
        engine: o.engine,
        ..Default::default()
    };
    let mut e = IoEngine::new(disk, mem, opts).map_err(|e| e.to_string())?;
    let kind = e.kind().name();
    let blocks = o.size / bs;
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut seq = 0u64;
    let mut next_off = |rng: &mut XorShift| {
        if job.random() {
            (rng.next() % blocks) * bs
        } else {
            let off = (seq % blocks) * bs;
            seq += 1;
            off
        }
    };
    let mut free: Vec<u64> = (0..qd as u64).collect();
    let (mut ops, mut bytes) = (0u64, 0u64);
    let dur = Duration::from_secs_f64(o.runtime);
    let start = Instant::now();
    loop {
        let elapsed = start.elapsed();
        if elapsed < dur {
            // One system call for the whole batch, as fio submits.
            e.plug();
            while let Some(slot) = free.pop() {
                let off = next_off(&mut rng);
                let sg = vec![(GuestAddress(slot * bs), bs as usize)];
                let r = if job.write() {
                    Request::write(off, sg, slot)
                } else {
                    Request::read(off, sg, slot)
                };
                e.submit(r).map_err(|e| e.to_string())?;
            }
            e.unplug();
        } else if e.outstanding() == 0 {
            break;
        }
        e.wait(Duration::from_millis(100));
        for c in e.completions() {
            let n = c.result.map_err(|e| e.to_string())?;
            ops += 1;
            bytes += n;
            free.push(c.user_data);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    // Aligned guest buffers: the fast path must not have copied anything.
    let st = e.stats();
    if !o.vdi && (st.bounced > 0 || st.image_layer > 0) {
        return Err(format!("the engine copied data on the fast path: {st:?}"));
    }
    Ok((
        Result_ {
            iops: ops as f64 / secs,
            mbps: bytes as f64 / secs / 1e6,
        },
        kind,
    ))
}

fn run_fio(o: &Opts, job: Job, cache: bool, qd: u32) -> Result<Result_, String> {
    let out = Command::new("fio")
        .args([
            "--name=ferry-bench",
            &format!("--filename={}", o.file.display()),
            &format!("--size={}", o.size),
            &format!("--rw={}", job.fio_rw()),
            &format!("--bs={}", job.block()),
            &format!("--iodepth={qd}"),
            "--ioengine=io_uring",
            &format!("--direct={}", u8::from(!cache)),
            &format!("--runtime={}", o.runtime),
            "--time_based",
            "--randrepeat=0",
            // Same page cache for both tools: fio would otherwise drop the file's cache first.
            "--invalidate=0",
            "--norandommap",
            "--output-format=terse",
            "--terse-version=3",
        ])
        .output()
        .map_err(|e| format!("cannot run fio ({e}); install it: apt-get install -y fio"))?;
    if !out.status.success() {
        return Err(format!(
            "fio failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("3;"))
        .ok_or("fio printed no terse line")?;
    let f: Vec<&str> = line.split(';').collect();
    // Terse v3: read bandwidth (KiB/s) and IOPS are fields 7 and 8, write's 48 and 49.
    let (bw, iops) = if job.write() { (47, 48) } else { (6, 7) };
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    Ok(Result_ {
        iops: num(iops).ok_or("fio's output has no IOPS")?,
        mbps: num(bw).ok_or("fio's output has no bandwidth")? * 1024.0 / 1e6,
    })
}

/// `qemu-img bench` on the VDI: a fixed count of requests (about --runtime at a few
/// thousand IOPS), timed by qemu-img itself.
fn run_qemu_bench(o: &Opts, job: Job, cache: bool, qd: u32) -> Result<Result_, String> {
    let bs = job.block();
    let count: u64 = if job.random() { 20_000 } else { o.size / bs };
    // Random jobs: a stride of 7919 blocks (prime, so it visits every block before
    // repeating); sequential: the next block.
    let step = if job.random() { 7919 * bs } else { bs };
    let mut c = Command::new("qemu-img");
    c.args(["bench", "-f", "vdi", "-q"])
        .args(["-t", if cache { "writeback" } else { "none" }])
        .args(["-c", &count.to_string(), "-d", &qd.to_string()])
        .args(["-s", &bs.to_string(), "-S", &step.to_string()]);
    if job.write() {
        c.arg("-w");
    }
    let start = Instant::now();
    let out = c
        .arg(&o.file)
        .output()
        .map_err(|e| format!("cannot run qemu-img ({e})"))?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(format!(
            "qemu-img bench failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(Result_ {
        iops: count as f64 / secs,
        mbps: (count * bs) as f64 / secs / 1e6,
    })
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("io-bench: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = prepare(&o.file, o.size, o.vdi) {
        eprintln!("io-bench: {}: {e}", o.file.display());
        return ExitCode::from(2);
    }
    println!(
        "io-bench: {} ({} MiB), {} s per job and tool, queue depth {} (4K random) / {} (1M sequential)",
        o.file.display(),
        o.size >> 20,
        o.runtime,
        o.qd,
        o.seq_qd
    );
    let mut rows = Vec::new();
    let mut failed = false;
    let mut engine_name = "";
    for &cache in &o.caches {
        for &job in &o.jobs {
            let qd = if job.random() { o.qd } else { o.seq_qd };
            let (mut fios, mut ferrys) = (Vec::new(), Vec::new());
            for run in 0..o.runs {
                // Alternate who goes first: the host's caches and writeback favour neither.
                for tool in if run % 2 == 0 { [0, 1] } else { [1, 0] } {
                    settle(&o.file);
                    if tool == 0 && o.fio {
                        let peer = match o.vdi {
                            true => run_qemu_bench(&o, job, cache, qd),
                            false => run_fio(&o, job, cache, qd),
                        };
                        match peer {
                            Ok(r) => fios.push(r),
                            Err(e) => eprintln!("io-bench: {e}"),
                        }
                    } else if tool == 1 {
                        match run_ferry(&o, job, cache, qd) {
                            Ok((r, kind)) => {
                                engine_name = kind;
                                ferrys.push(r);
                            }
                            Err(e) => {
                                eprintln!("io-bench: ferry {}: {e}", job.label());
                                failed = true;
                            }
                        }
                    }
                }
            }
            let (fio, ferry) = (median(fios), median(ferrys));
            rows.push((job, cache, qd, fio, ferry));
        }
    }
    let peer = if o.vdi { "qemu" } else { "fio" };
    if o.vdi {
        println!("ferry engine: {engine_name} through the VDI image layer; qemu-img bench -f vdi, same file, block size, queue depth and cache mode (stride, not random, offsets)");
    } else {
        println!("ferry engine: {engine_name} (no data copied: guest buffers aligned); fio: --ioengine=io_uring, same file, block size, pattern and queue depth");
    }
    println!(
        "{:<20} {:>5} {:>3} {:>11} {:>11} {:>9} {:>9} {:>6}",
        "job",
        "cache",
        "qd",
        format!("{peer} IOPS"),
        "ferry IOPS",
        format!("{peer} MB/s"),
        "ferry",
        "ratio"
    );
    let mut worst: Option<f64> = None;
    for (job, cache, qd, fio, ferry) in &rows {
        let f = |r: &Option<Result_>, iops: bool| match r {
            Some(r) if iops => format!("{:.0}", r.iops),
            Some(r) => format!("{:.1}", r.mbps),
            None => "-".into(),
        };
        let ratio = match (fio, ferry) {
            (Some(a), Some(b)) if a.iops > 0.0 => Some(b.iops / a.iops),
            _ => None,
        };
        if let Some(r) = ratio {
            worst = Some(worst.map_or(r, |w: f64| w.min(r)));
        }
        println!(
            "{:<20} {:>5} {:>3} {:>11} {:>11} {:>9} {:>9} {:>6}",
            job.label(),
            if *cache { "on" } else { "off" },
            qd,
            f(fio, true),
            f(ferry, true),
            f(fio, false),
            f(ferry, false),
            ratio.map_or("-".into(), |r| format!("{r:.2}"))
        );
    }
    if let Some(w) = worst {
        println!(
            "goal: ferry >= 0.90 of {peer}'s IOPS and throughput in every job: {} (lowest ratio {w:.2})",
            if w >= 0.9 { "met" } else { "NOT met" }
        );
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
