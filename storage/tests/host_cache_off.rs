//! hostiocache=off through the I/O engine, for every format and for a differencing chain:
//! each layer's file really has O_DIRECT (the kernel's own record in /proc/self/fdinfo),
//! aligned and unaligned guest requests read back what was written, and after closing,
//! ferry and qemu-img read the same bytes and qemu-img finds nothing wrong with the image.
//!
//! The files live under the build's tmp folder (on the disk that holds the target folder),
//! never in /tmp, which may be a tmpfs.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_storage::io::{EngineOptions, IoEngine, Request};
use ferry_storage::layer::CreateParent;
use ferry_storage::{create_image, open_image, CreateOptions, Disk, FormatKind, Variant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
/// O_DIRECT in /proc/<pid>/fdinfo's octal `flags` (x86 and arm64 value).
const O_DIRECT_FLAG: u32 = 0o40000;

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("odirect-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Whether the scratch folder's file system takes O_DIRECT at all (if not, the engine falls
/// back to the page cache and the flag checks below do not apply).
fn takes_odirect(dir: &Path) -> bool {
    let p = dir.join("probe");
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .is_ok();
    let _ = std::fs::remove_file(&p);
    ok
}

/// The `flags` of every descriptor this process has open on `path`.
fn fd_flags(path: &Path) -> Vec<u32> {
    let want = path.canonicalize().unwrap();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if std::fs::read_link(e.path()).ok().as_deref() != Some(want.as_path()) {
            continue;
        }
        let info = std::fs::read_to_string(Path::new("/proc/self/fdinfo").join(e.file_name()))
            .unwrap_or_default();
        if let Some(f) = info.lines().find_map(|l| l.strip_prefix("flags:")) {
            out.push(u32::from_str_radix(f.trim(), 8).unwrap());
        }
    }
    out
}

fn qemu_name(f: FormatKind) -> &'static str {
    match f {
        FormatKind::Vhd => "vpc",
        other => other.name(),
    }
}

fn qemu(args: &[&str], paths: &[&Path]) {
    let out = Command::new("qemu-img")
        .args(args)
        .args(paths)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img {args:?} {paths:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8) | 1
        })
        .collect()
}

fn new_image(path: &Path, format: FormatKind, parent: Option<CreateParent>) {
    let opts = CreateOptions {
        size: SIZE,
        variant: Variant::Dynamic,
        parent,
    };
    if format == FormatKind::Raw {
        std::fs::File::create(path).unwrap().set_len(SIZE).unwrap();
    } else {
        create_image(path, format, &opts).unwrap().flush().unwrap();
    }
}

/// One request through the engine, waited for.
fn run(e: &mut IoEngine, r: Request) {
    let tag = r.user_data;
    e.submit(r).unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < until, "request {tag} never completed");
        e.wait(Duration::from_millis(100));
        if let Some(c) = e.completions().next() {
            assert_eq!(c.user_data, tag);
            assert!(c.result.is_ok(), "request {tag}: {:?}", c.result);
            return;
        }
    }
}

/// Writes, through the engine with the host cache off, ranges that are whole 4 KiB blocks
/// from aligned guest memory, odd sectors from odd guest addresses, and ranges that cross
/// the formats' block boundaries; reads each back the same ways. `shadow` is what the disk
/// must hold.
fn exercise(top: &Path, shadow: &mut [u8], direct: bool) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let disk = Arc::new(Disk::open(top, true, &[]).unwrap());
    let files: Vec<PathBuf> = disk
        .layers()
        .iter()
        .flat_map(|l| l.host_files())
        .map(|f| f.path().to_path_buf())
        .collect();
    let opts = EngineOptions {
        host_cache: false,
        threads: 4,
        ..Default::default()
    };
    let mut e = IoEngine::new(disk.clone(), mem.clone(), opts).unwrap();
    let raw = disk.layers().len() == 1 && disk.layers()[0].format() == FormatKind::Raw;
    let paths = if raw { vec![top.to_path_buf()] } else { files };
    for p in &paths {
        // Octal, as fdinfo shows them.
        let flags: Vec<String> = fd_flags(p).iter().map(|f| format!("{f:o}")).collect();
        assert!(!flags.is_empty(), "{}: no descriptor open", p.display());
        let with: Vec<bool> = fd_flags(p).iter().map(|f| f & O_DIRECT_FLAG != 0).collect();
        if !direct {
            assert!(with.iter().all(|d| !d), "{}: {flags:?}", p.display());
        } else if raw {
            // The raw fast path keeps a buffered descriptor beside the O_DIRECT one for
            // offsets O_DIRECT cannot take.
            assert!(with.contains(&true), "{}: flags {flags:?}", p.display());
        } else {
            assert!(with.iter().all(|&d| d), "{}: flags {flags:?}", p.display());
        }
    }
    // (disk offset, length, guest address)
    let writes: [(u64, usize, u64); 6] = [
        (MIB, 64 << 10, 0x10_0000),
        (3 * 512, 5 * 512, 0x20_1001),
        (2 * MIB - 1536, 8192, 0x30_0200),
        (5 * MIB + 512, 3 * MIB as usize, 0x40_0003),
        (SIZE - 4096, 4096, 0x80_0000),
        (MIB + 4096 + 512, 512, 0x90_0001),
    ];
    for (i, &(off, len, addr)) in writes.iter().enumerate() {
        let data = pattern(off ^ 0x5a, len);
        mem.write_slice(&data, GuestAddress(addr)).unwrap();
        run(
            &mut e,
            Request::write(off, vec![(GuestAddress(addr), len)], i as u64),
        );
        shadow[off as usize..][..len].copy_from_slice(&data);
    }
    run(&mut e, Request::flush(100));
    for (i, &(off, len, _)) in writes.iter().enumerate() {
        // Read a little around each write, into aligned and unaligned guest memory.
        let off = off.saturating_sub(1024);
        let len = (len + 2048).min((SIZE - off) as usize);
        for addr in [0xa0_0000u64, 0xa0_0e07] {
            run(
                &mut e,
                Request::read(off, vec![(GuestAddress(addr), len)], 200 + i as u64),
            );
            let mut back = vec![0u8; len];
            mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
            assert!(
                back == shadow[off as usize..][..len],
                "{}: read at {off:#x}+{len:#x} into {addr:#x} differs",
                top.display()
            );
        }
    }
    drop(e);
    drop(disk);
    // Closed: ferry reads the same through the page cache.
    let disk = Disk::open(top, false, &[]).unwrap();
    let mut all = vec![0u8; SIZE as usize];
    disk.read_at(&mut all, 0).unwrap();
    assert!(
        all == shadow,
        "{}: content after reopening differs",
        top.display()
    );
}

fn one_format(format: FormatKind, ext: &str) {
    let dir = scratch(format.name());
    let direct = takes_odirect(&dir);
    let top = dir.join(format!("disk.{ext}"));
    new_image(&top, format, None);
    let mut shadow = vec![0u8; SIZE as usize];
    exercise(&top, &mut shadow, direct);
    let raw = dir.join("expect.raw");
    std::fs::write(&raw, &shadow).unwrap();
    if format != FormatKind::Raw {
        qemu(
            &["compare", "-f", qemu_name(format), "-F", "raw"],
            &[&top, &raw],
        );
    }
    if matches!(
        format,
        FormatKind::Vdi | FormatKind::Vmdk | FormatKind::Parallels
    ) {
        qemu(&["check", "-f", qemu_name(format)], &[&top]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn raw_with_host_cache_off() {
    one_format(FormatKind::Raw, "raw");
}

#[test]
fn vdi_with_host_cache_off() {
    one_format(FormatKind::Vdi, "vdi");
}

#[test]
fn vmdk_monolithic_sparse_with_host_cache_off() {
    one_format(FormatKind::Vmdk, "vmdk");
}

#[test]
fn vhd_dynamic_with_host_cache_off() {
    one_format(FormatKind::Vhd, "vhd");
}

#[test]
fn parallels_with_host_cache_off() {
    one_format(FormatKind::Parallels, "hds");
}

/// A differencing child over a base of `base_fmt`: both files O_DIRECT, reads fall
/// through to the base, partial writes copy the base's bytes around them.
fn chain(base_fmt: FormatKind, child_fmt: FormatKind) {
    let dir = scratch(&format!("chain-{}-{}", child_fmt.name(), base_fmt.name()));
    let direct = takes_odirect(&dir);
    let base = dir.join(format!("base.{}", base_fmt.name()));
    new_image(&base, base_fmt, None);
    let mut shadow = vec![0u8; SIZE as usize];
    {
        let disk = Disk::open(&base, true, &[]).unwrap();
        for (off, len) in [(0u64, 3 * MIB as usize), (6 * MIB, MIB as usize)] {
            let data = pattern(off + 7, len);
            disk.write_at(&data, off).unwrap();
            shadow[off as usize..][..len].copy_from_slice(&data);
        }
        disk.flush().unwrap();
    }
    let b = open_image(&base, false).unwrap();
    let parent = CreateParent {
        path: base.clone(),
        uuid: b.uuid(),
        modification_uuid: b.modification_uuid(),
        format: b.format(),
    };
    drop(b);
    let top = dir.join(format!("child.{}", child_fmt.name()));
    new_image(&top, child_fmt, Some(parent));
    exercise(&top, &mut shadow, direct);
    // qemu follows a VMDK child's parent (as a VMDK); it reads a differencing VHD alone.
    if child_fmt == FormatKind::Vmdk && base_fmt == FormatKind::Vmdk {
        let raw = dir.join("expect.raw");
        std::fs::write(&raw, &shadow).unwrap();
        qemu(&["compare", "-f", "vmdk", "-F", "raw"], &[&top, &raw]);
        qemu(&["check", "-f", "vmdk"], &[&top]);
    }
    qemu(&["check", "-f", qemu_name(base_fmt)], &[&base]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vmdk_chain_with_host_cache_off() {
    chain(FormatKind::Vmdk, FormatKind::Vmdk);
}

/// VHD blocks start 512 bytes off a 4 KiB boundary (their bitmap sector first).
#[test]
fn vhd_over_vdi_chain_with_host_cache_off() {
    chain(FormatKind::Vdi, FormatKind::Vhd);
}

/// Many requests in flight at once on a VDI (reads share its map lock, writes into
/// allocated blocks too): every write lands, every read sees it.
#[test]
fn vdi_many_requests_in_flight_with_host_cache_off() {
    let dir = scratch("vdi-in-flight");
    let top = dir.join("disk.vdi");
    new_image(&top, FormatKind::Vdi, None);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let disk = Arc::new(Disk::open(&top, true, &[]).unwrap());
    let opts = EngineOptions {
        host_cache: false,
        threads: 8,
        ..Default::default()
    };
    let mut e = IoEngine::new(disk, mem.clone(), opts).unwrap();
    let mut shadow = vec![0u8; SIZE as usize];
    // Two rounds: the first allocates blocks, the second writes into them (the shared path).
    for round in 0..2u64 {
        let mut tags = Vec::new();
        for i in 0..96u64 {
            // 8 KiB slots spread over the disk (37 is prime to their 2048), one per write.
            let off = (i * 37 % 2048) * 8192 + round * 4096;
            let len = 4096usize;
            let addr = 0x10_0000 + i * 0x2000 + 1;
            let data = pattern(off ^ round << 40, len);
            mem.write_slice(&data, GuestAddress(addr)).unwrap();
            e.submit(Request::write(off, vec![(GuestAddress(addr), len)], i))
                .unwrap();
            shadow[off as usize..][..len].copy_from_slice(&data);
            tags.push(i);
        }
        let mut left = tags.len();
        let until = Instant::now() + Duration::from_secs(30);
        while left > 0 {
            assert!(Instant::now() < until, "writes never completed");
            e.wait(Duration::from_millis(100));
            for c in e.completions() {
                assert!(c.result.is_ok(), "{:?}", c.result);
                left -= 1;
            }
        }
    }
    run(&mut e, Request::flush(1000));
    // Read the whole disk back, 64 KiB requests all in flight.
    let chunk = 64usize << 10;
    let n = SIZE as usize / chunk;
    for i in 0..n {
        let sg = vec![(GuestAddress((i * chunk) as u64), chunk)];
        e.submit(Request::read((i * chunk) as u64, sg, i as u64))
            .unwrap();
    }
    let mut left = n;
    while left > 0 {
        e.wait(Duration::from_millis(100));
        for c in e.completions() {
            assert!(c.result.is_ok(), "{:?}", c.result);
            left -= 1;
        }
    }
    let mut back = vec![0u8; SIZE as usize];
    mem.read_slice(&mut back, GuestAddress(0)).unwrap();
    assert!(back == shadow, "content read in flight differs");
    drop(e);
    qemu(&["check", "-f", "vdi"], &[&top]);
    let _ = std::fs::remove_dir_all(&dir);
}
