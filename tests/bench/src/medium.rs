//! medium-bench: `ferry medium clone` against `qemu-img convert`, same source, same target
//! format, same folder, taking turns.
//!
//! The source is a --size disk whose 1 MiB chunks are, in a fixed pseudo-random order, 50%
//! data, 15% written zeros and 35% holes (what a used guest disk looks like), converted by
//! qemu-img into each source format, so both tools read the very same file. Each pair
//! SRC:DST is timed --runs times per tool (alternating which goes first; the page cache is warm
//! for both: the source is read once before timing; every run starts after a `sync`, so none
//! pays for the write-back of the one before). Each tool runs twice per turn: qemu-img as
//! it comes (its default cache mode for the target, `unsafe`, never flushes) and with
//! `-t writeback` (flushed at the end); ferry as it comes (flushed) and with `--no-sync`. Both
//! tools' outputs are checked with
//! `qemu-img compare` against the source. The table shows median seconds and the ratios
//! qemu-img / ferry (above 1: ferry is faster), each against the same durability: qemu-img as
//! it comes against `ferry medium clone --no-sync`, qemu-img -t writeback against ferry as it
//! comes. The goal is a ratio of at least 1.5; a miss is reported, never an error.
//!
//! Driver: tests/bench/medium/run.sh.

use std::fmt::Write as _;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

const USAGE: &str = "\
Usage: medium-bench [options]

Times `ferry medium clone` against `qemu-img convert` for the same source and
target formats and prints the ratios (qemu-img seconds / ferry seconds).

Options:
  --ferry PATH       the ferry binary (default target/release/ferry)
  --dir DIR          scratch folder (default target/bench/medium)
  --size SIZE        virtual size of the source disk, K/M/G suffix (default 1G)
  --runs N           timed runs per tool and pair; medians (default 3)
  --pairs LIST       comma-separated SRC:DST pairs of raw,vdi,vmdk,vhd,parallels
                     (default: every format to itself, and vmdk:vdi, vdi:vmdk,
                     vhd:vdi, parallels:vmdk, raw:vdi, vdi:raw)
  --json-out FILE    also write the results as JSON
  -h, --help         this text

Exit status: 0 whatever the numbers; 1 when a tool failed or wrote wrong data;
2 on a usage error.";

const MIB: u64 = 1 << 20;
const DEFAULT_PAIRS: &str =
    "raw:raw,vdi:vdi,vmdk:vmdk,vhd:vhd,parallels:parallels,vmdk:vdi,vdi:vmdk,vhd:vdi,parallels:vmdk,raw:vdi,vdi:raw";

struct Opts {
    ferry: PathBuf,
    dir: PathBuf,
    size: u64,
    runs: usize,
    pairs: Vec<(String, String)>,
    json_out: Option<PathBuf>,
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()?.to_ascii_uppercase() {
        'K' => (&s[..s.len() - 1], 1u64 << 10),
        'M' => (&s[..s.len() - 1], 1 << 20),
        'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        ferry: PathBuf::from("target/release/ferry"),
        dir: PathBuf::from("target/bench/medium"),
        size: 1 << 30,
        runs: 3,
        pairs: Vec::new(),
        json_out: None,
    };
    let mut pairs = DEFAULT_PAIRS.to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--ferry" => o.ferry = val()?.into(),
            "--dir" => o.dir = val()?.into(),
            "--size" => {
                let v = val()?;
                o.size = parse_size(&v)
                    .filter(|s| *s >= MIB && s % MIB == 0)
                    .ok_or(format!("--size {v}: give a multiple of 1M"))?;
            }
            "--runs" => {
                o.runs = val()?
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or("--runs needs a positive number")?
            }
            "--pairs" => pairs = val()?,
            "--json-out" => o.json_out = Some(val()?.into()),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    for p in pairs.split(',') {
        let (s, d) = p
            .split_once(':')
            .ok_or(format!("'{p}' is not a SRC:DST pair"))?;
        for f in [s, d] {
            if qemu_fmt(f).is_none() {
                return Err(format!("unknown format '{f}'"));
            }
        }
        o.pairs.push((s.to_string(), d.to_string()));
    }
    Ok(o)
}

fn qemu_fmt(f: &str) -> Option<&'static str> {
    Some(match f {
        "raw" => "raw",
        "vdi" => "vdi",
        "vmdk" => "vmdk",
        "vhd" => "vpc",
        "parallels" => "parallels",
        _ => return None,
    })
}

/// xorshift: deterministic content.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn make_source_raw(path: &Path, size: u64) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut buf = vec![0u8; MIB as usize];
    for chunk in 0..size / MIB {
        let kind = rng.next() % 100;
        if kind < 35 {
            continue; // hole
        }
        if kind < 50 {
            buf.fill(0); // written zeros
        } else {
            for w in buf.chunks_exact_mut(8) {
                w.copy_from_slice(&rng.next().to_le_bytes());
            }
        }
        f.seek(SeekFrom::Start(chunk * MIB))?;
        f.write_all(&buf)?;
    }
    f.sync_all()
}

fn run(cmd: &mut Command) -> Result<f64, String> {
    let t = Instant::now();
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(secs)
}

fn remove_image(p: &Path) {
    let _ = std::fs::remove_file(p);
    // Split or flat VMDK extents beside it.
    if let (Some(dir), Some(stem)) = (p.parent(), p.file_stem()) {
        let stem = stem.to_string_lossy().into_owned();
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(&format!("{stem}-")) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Row {
    src: String,
    dst: String,
    /// qemu-img convert as it comes (its default cache mode for the target is `unsafe`:
    /// nothing is flushed to the disk).
    qemu: f64,
    /// qemu-img convert -t writeback: flushed at the end, as ferry always does.
    qemu_wb: f64,
    ferry: f64,
    /// ferry medium clone --no-sync: no flush, as qemu-img's default.
    ferry_ns: f64,
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("medium-bench: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match bench(&o) {
        Ok(rows) => {
            report(&o, &rows);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("medium-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench(o: &Opts) -> Result<Vec<Row>, String> {
    std::fs::create_dir_all(&o.dir).map_err(|e| e.to_string())?;
    let raw = o.dir.join("source.raw");
    eprintln!(
        "medium-bench: source disk {} MiB (50% data, 15% written zeros, 35% holes)",
        o.size / MIB
    );
    make_source_raw(&raw, o.size).map_err(|e| e.to_string())?;
    let mut sources: Vec<String> = o.pairs.iter().map(|p| p.0.clone()).collect();
    sources.sort();
    sources.dedup();
    for s in &sources {
        let path = o.dir.join(format!("source.{s}"));
        if s != "raw" {
            remove_image(&path);
            run(Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", qemu_fmt(s).unwrap_or("raw")])
                .arg(&raw)
                .arg(&path))?;
        }
    }
    let mut rows = Vec::new();
    for (s, d) in &o.pairs {
        let src = o.dir.join(format!("source.{s}"));
        let (qs, qd) = (qemu_fmt(s).unwrap_or("raw"), qemu_fmt(d).unwrap_or("raw"));
        // Warm the page cache with the source, for both tools alike.
        let _ = std::fs::read(&src);
        let mut q = Vec::new();
        let mut qw = Vec::new();
        let mut f = Vec::new();
        let mut fns = Vec::new();
        let qdst = o.dir.join(format!("qemu-out.{d}"));
        let fdst = o.dir.join(format!("ferry-out.{d}"));
        for r in 0..o.runs {
            let order = if r % 2 == 0 {
                [0, 1, 2, 3]
            } else {
                [3, 2, 1, 0]
            };
            for tool in order {
                // Untimed: the previous output is removed and the previous run's dirty pages
                // (a no-flush run leaves hundreds of MiB) written back before the clock starts.
                // Removing after the sync would bill the next tool's first flush for freeing
                // the old file's blocks (and, with `-o discard`, for discarding them).
                remove_image(if tool < 2 { &qdst } else { &fdst });
                let _ = Command::new("sync").status();
                if tool < 2 {
                    let cache = if tool == 0 { "unsafe" } else { "writeback" };
                    let t = run(Command::new("qemu-img")
                        .args(["convert", "-t", cache, "-f", qs, "-O", qd])
                        .arg(&src)
                        .arg(&qdst))?;
                    if tool == 0 {
                        q.push(t)
                    } else {
                        qw.push(t)
                    }
                } else {
                    let mut cmd = Command::new(&o.ferry);
                    cmd.args(["medium", "clone"])
                        .arg(&src)
                        .arg(&fdst)
                        .args(["--format", d])
                        .env("FERRY_LOG", "error");
                    if tool == 3 {
                        cmd.arg("--no-sync");
                    }
                    let t = run(&mut cmd)?;
                    if tool == 2 {
                        f.push(t)
                    } else {
                        fns.push(t)
                    }
                }
            }
        }
        for (out, who) in [(&qdst, "qemu-img"), (&fdst, "ferry")] {
            run(Command::new("qemu-img")
                .args(["compare", "-q", "-f", qd, "-F", "raw"])
                .arg(out)
                .arg(&raw))
            .map_err(|e| format!("{s}->{d}: {who} wrote different data: {e}"))?;
        }
        let row = Row {
            src: s.clone(),
            dst: d.clone(),
            qemu: median(&mut q),
            qemu_wb: median(&mut qw),
            ferry: median(&mut f),
            ferry_ns: median(&mut fns),
        };
        eprintln!(
            "medium-bench: {s} -> {d}: qemu-img {:.3}s, ferry --no-sync {:.3}s; qemu-img -t writeback {:.3}s, ferry {:.3}s",
            row.qemu, row.ferry_ns, row.qemu_wb, row.ferry
        );
        rows.push(row);
        remove_image(&qdst);
        remove_image(&fdst);
    }
    Ok(rows)
}

fn report(o: &Opts, rows: &[Row]) {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\nferry medium clone vs qemu-img convert ({} MiB source, median of {} runs, seconds)",
        o.size / MIB,
        o.runs
    );
    let _ = writeln!(
        t,
        "  no flush:      qemu-img convert (default: -t unsafe)  vs  ferry medium clone --no-sync"
    );
    let _ = writeln!(
        t,
        "  flushed:       qemu-img convert -t writeback          vs  ferry medium clone (default)"
    );
    let _ = writeln!(
        t,
        "{:<22} {:>9} {:>9} {:>7}   {:>9} {:>9} {:>7}   goal: both ratios >= 1.5",
        "pair", "qemu-img", "ferry-ns", "ratio", "qemu -t wb", "ferry", "ratio"
    );
    let mut json = String::from("{\"size\":");
    let _ = write!(json, "{},\"runs\":{},\"pairs\":[", o.size, o.runs);
    for (i, r) in rows.iter().enumerate() {
        let ratio_ns = r.qemu / r.ferry_ns.max(1e-9);
        let ratio = r.qemu_wb / r.ferry.max(1e-9);
        let _ = writeln!(
            t,
            "{:<22} {:>9.3} {:>9.3} {:>6.2}x   {:>9.3} {:>9.3} {:>6.2}x   {}",
            format!("{} -> {}", r.src, r.dst),
            r.qemu,
            r.ferry_ns,
            ratio_ns,
            r.qemu_wb,
            r.ferry,
            ratio,
            if ratio_ns >= 1.5 && ratio >= 1.5 {
                "met"
            } else {
                "MISSED"
            }
        );
        let _ = write!(
            json,
            "{}{{\"src\":\"{}\",\"dst\":\"{}\",\"qemu_s\":{:.4},\"ferry_no_sync_s\":{:.4},\"ratio_no_sync\":{:.3},\"qemu_writeback_s\":{:.4},\"ferry_s\":{:.4},\"ratio_flushed\":{:.3}}}",
            if i > 0 { "," } else { "" },
            r.src,
            r.dst,
            r.qemu,
            r.ferry_ns,
            ratio_ns,
            r.qemu_wb,
            r.ferry,
            ratio
        );
    }
    json.push_str("]}\n");
    print!("{t}");
    if let Some(p) = &o.json_out {
        let _ = std::fs::write(p, json);
    }
}
