//! The medium operations (clone, resize, compact, merge, check, set-uuid) on every format, with
//! qemu-img as the referee where it reads the result.

use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_storage::medium::{self, CloneOptions, Silent};
use ferry_storage::{
    create_image, open_image, Allocation, CreateOptions, CreateParent, Disk, FormatKind, Variant,
};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-medium-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn ext(f: FormatKind) -> &'static str {
    match f {
        FormatKind::Parallels => "hds",
        other => other.name(),
    }
}

fn qemu_name(f: FormatKind) -> &'static str {
    match f {
        FormatKind::Vhd => "vpc",
        other => other.name(),
    }
}

const FORMATS: [FormatKind; 5] = [
    FormatKind::Raw,
    FormatKind::Vdi,
    FormatKind::Vmdk,
    FormatKind::Vhd,
    FormatKind::Parallels,
];

/// Deterministic non-zero bytes.
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

/// Data at 0..1.5 MiB, zeros written at 4..6 MiB, a small write at 9 MiB + 4 KiB, data at the
/// last 64 KiB; the rest never written.
fn fill(disk: &Disk, seed: u64) {
    let size = disk.size();
    disk.write_at(&pattern(seed, 3 * MIB as usize / 2), 0)
        .unwrap();
    disk.write_at(&vec![0u8; 2 * MIB as usize], 4 * MIB)
        .unwrap();
    disk.write_at(&pattern(seed + 1, 5000), 9 * MIB + 4096)
        .unwrap();
    disk.write_at(&pattern(seed + 2, 65536), size - 65536)
        .unwrap();
    disk.flush().unwrap();
}

fn make(path: &Path, format: FormatKind, variant: Variant, size: u64) -> Disk {
    let layer = create_image(
        path,
        format,
        &CreateOptions {
            size,
            variant,
            parent: None,
        },
    )
    .unwrap();
    Disk::from_layers(vec![layer]).unwrap()
}

fn content(path: &Path) -> Vec<u8> {
    let disk = Disk::open(path, false, &[]).unwrap();
    let mut buf = vec![0u8; disk.size() as usize];
    disk.read_at(&mut buf, 0).unwrap();
    buf
}

fn write_raw(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

fn qemu_compare(image: &Path, format: FormatKind, raw: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", qemu_name(format), "-F", "raw"])
        .arg(image)
        .arg(raw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_check(image: &Path, format: FormatKind) {
    if !matches!(
        format,
        FormatKind::Vdi | FormatKind::Vmdk | FormatKind::Parallels
    ) {
        return;
    }
    let out = Command::new("qemu-img")
        .args(["check", "-f", qemu_name(format)])
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn clone_opts(format: FormatKind, variant: Variant) -> CloneOptions {
    CloneOptions {
        format,
        variant,
        overwrite: false,
        threads: 2,
        search: vec![],
    }
}

fn host_bytes(path: &Path) -> u64 {
    medium::host_bytes(&open_image(path, false).unwrap().files())
}

#[test]
fn clone_every_format_to_every_format() {
    let dir = scratch("clone-all");
    for src_fmt in FORMATS {
        let src = dir.join(format!("src.{}", ext(src_fmt)));
        fill(&make(&src, src_fmt, Variant::Dynamic, SIZE), src_fmt as u64);
        let want = content(&src);
        let raw = dir.join(format!("src-{}.raw", ext(src_fmt)));
        write_raw(&raw, &want);
        let mut targets: Vec<(FormatKind, Variant)> =
            FORMATS.iter().map(|&f| (f, Variant::Dynamic)).collect();
        targets.extend([
            (FormatKind::Vdi, Variant::Fixed),
            (FormatKind::Vhd, Variant::Fixed),
            (FormatKind::Vmdk, Variant::Stream),
            (FormatKind::Vmdk, Variant::Split2GSparse),
            (FormatKind::Vmdk, Variant::Fixed),
        ]);
        for (dst_fmt, variant) in targets {
            let dst = dir.join(format!(
                "{}-to-{:?}.{}",
                ext(src_fmt),
                variant,
                ext(dst_fmt)
            ));
            medium::clone(&src, &dst, &clone_opts(dst_fmt, variant), &Silent).unwrap();
            assert!(content(&dst) == want, "{} differs", dst.display());
            let layer = open_image(&dst, false).unwrap();
            assert_eq!(layer.variant(), variant, "{}", dst.display());
            if dst_fmt != FormatKind::Raw && dst_fmt != FormatKind::Parallels {
                assert_ne!(
                    layer.uuid(),
                    open_image(&src, false).unwrap().uuid(),
                    "a clone gets a new UUID"
                );
            }
            drop(layer);
            qemu_compare(&dst, dst_fmt, &raw);
            qemu_check(&dst, dst_fmt);
            // No temporary files are left behind.
            let leftovers: Vec<_> = std::fs::read_dir(&dir)
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(".ferry-tmp"))
                .collect();
            assert!(leftovers.is_empty(), "{leftovers:?}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A base, and a child that overwrites some of it (with data and with zeros).
fn chain(dir: &Path, format: FormatKind) -> (PathBuf, PathBuf) {
    let base = dir.join(format!("base.{}", ext(format)));
    fill(&make(&base, format, Variant::Dynamic, SIZE), 7);
    let child = dir.join(format!("child.{}", ext(format)));
    let b = open_image(&base, false).unwrap();
    let layer = create_image(
        &child,
        format,
        &CreateOptions {
            size: SIZE,
            variant: Variant::Dynamic,
            parent: Some(CreateParent {
                path: base.clone(),
                uuid: b.uuid(),
                modification_uuid: b.modification_uuid(),
                format,
            }),
        },
    )
    .unwrap();
    drop((b, layer));
    let disk = Disk::open(&child, true, &[]).unwrap();
    disk.write_at(&pattern(99, 100_000), MIB / 2).unwrap();
    // Zeros over the base's data: they must hide it.
    disk.write_at(&vec![0u8; 256 << 10], MIB).unwrap();
    disk.write_at(&pattern(98, 4096), 12 * MIB).unwrap();
    disk.flush().unwrap();
    (base, child)
}

const CHAIN_FORMATS: [FormatKind; 3] = [FormatKind::Vdi, FormatKind::Vmdk, FormatKind::Vhd];

#[test]
fn clone_flattens_a_chain() {
    let dir = scratch("clone-chain");
    for fmt in CHAIN_FORMATS {
        let (_, child) = chain(&dir, fmt);
        let want = content(&child);
        assert!(want[MIB as usize..MIB as usize + 4096]
            .iter()
            .all(|&b| b == 0));
        let raw = dir.join("want.raw");
        write_raw(&raw, &want);
        for dst_fmt in FORMATS {
            let dst = dir.join(format!("flat-{}.{}", ext(fmt), ext(dst_fmt)));
            medium::clone(
                &child,
                &dst,
                &clone_opts(dst_fmt, Variant::Dynamic),
                &Silent,
            )
            .unwrap();
            assert!(content(&dst) == want, "{}", dst.display());
            assert!(open_image(&dst, false).unwrap().parent().is_none());
            qemu_compare(&dst, dst_fmt, &raw);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn clone_is_sparse() {
    let dir = scratch("sparse");
    let src = dir.join("src.raw");
    // 64 MiB raw, fully allocated: 2 MiB of data, the rest written zeros.
    let mut data = vec![0u8; 64 * MIB as usize];
    data[..2 * MIB as usize].copy_from_slice(&pattern(3, 2 * MIB as usize));
    write_raw(&src, &data);
    for fmt in FORMATS {
        let dst = dir.join(format!("dst.{}", ext(fmt)));
        medium::clone(&src, &dst, &clone_opts(fmt, Variant::Dynamic), &Silent).unwrap();
        let bytes = host_bytes(&dst);
        assert!(
            bytes < 4 * MIB,
            "{}: {bytes} bytes on the host for 2 MiB of data",
            dst.display()
        );
        let layer = open_image(&dst, false).unwrap();
        if fmt != FormatKind::Raw {
            let (state, _) = layer.block_status(32 * MIB, MIB).unwrap();
            assert_ne!(
                state,
                Allocation::Data,
                "{}: zeros were allocated",
                fmt.name()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resize_grows_and_shrinks_only_an_empty_tail() {
    let dir = scratch("resize");
    for fmt in FORMATS {
        let path = dir.join(format!("r.{}", ext(fmt)));
        let disk = make(&path, fmt, Variant::Dynamic, SIZE);
        disk.write_at(&pattern(5, 3000), MIB).unwrap();
        disk.flush().unwrap();
        drop(disk);
        let before = content(&path);
        medium::resize(&path, 2 * SIZE, false, 2, &[], &Silent).unwrap();
        let after = content(&path);
        assert_eq!(after.len() as u64, 2 * SIZE, "{}", fmt.name());
        assert!(after[..before.len()] == before[..]);
        assert!(after[before.len()..].iter().all(|&b| b == 0));
        qemu_check(&path, fmt);
        // Shrinking needs --allow-shrink ...
        let e = medium::resize(&path, SIZE, false, 2, &[], &Silent).unwrap_err();
        assert!(e.to_string().contains("--allow-shrink"), "{e}");
        // ... and refuses to cut off data ...
        let e = medium::resize(&path, MIB, true, 2, &[], &Silent).unwrap_err();
        assert!(e.to_string().contains("would lose"), "{e}");
        assert_eq!(content(&path).len() as u64, 2 * SIZE);
        // ... but cuts an empty tail.
        medium::resize(&path, 4 * MIB, true, 2, &[], &Silent).unwrap();
        let small = content(&path);
        assert_eq!(small.len() as u64, 4 * MIB);
        assert!(small[..] == before[..4 * MIB as usize]);
        let raw = dir.join("small.raw");
        write_raw(&raw, &small);
        qemu_compare(&path, fmt, &raw);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn compact_drops_zero_blocks() {
    let dir = scratch("compact");
    for fmt in [
        FormatKind::Vdi,
        FormatKind::Vmdk,
        FormatKind::Vhd,
        FormatKind::Parallels,
    ] {
        let path = dir.join(format!("c.{}", ext(fmt)));
        let disk = make(&path, fmt, Variant::Dynamic, SIZE);
        disk.write_at(&pattern(1, 8 * MIB as usize), 0).unwrap();
        disk.flush().unwrap();
        // The guest zeroes most of it again (without discard): the blocks stay allocated.
        disk.write_at(&vec![0u8; 6 * MIB as usize], 2 * MIB)
            .unwrap();
        disk.flush().unwrap();
        drop(disk);
        let want = content(&path);
        let uuid = open_image(&path, false).unwrap().uuid();
        let before = std::fs::metadata(&path).unwrap().len();
        let r = medium::compact(&path, 2, &[], &Silent).unwrap();
        let after = std::fs::metadata(&path).unwrap().len();
        assert!(
            after + 4 * MIB < before && r.bytes_after < r.bytes_before,
            "{}: {before} -> {after} bytes",
            fmt.name()
        );
        assert!(content(&path) == want);
        assert_eq!(
            open_image(&path, false).unwrap().uuid(),
            uuid,
            "compact keeps the UUID"
        );
        qemu_check(&path, fmt);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn compact_of_a_child_keeps_zeros_that_hide_the_parent() {
    let dir = scratch("compact-child");
    for fmt in CHAIN_FORMATS {
        let (_, child) = chain(&dir, fmt);
        let want = content(&child);
        medium::compact(&child, 2, &[], &Silent).unwrap();
        assert!(content(&child) == want, "{}", fmt.name());
        let disk = Disk::open(&child, false, &[]).unwrap();
        assert_eq!(disk.layers().len(), 2);
        let _ = std::fs::remove_file(&child);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn merge_folds_the_child_into_its_parent() {
    let dir = scratch("merge");
    for fmt in CHAIN_FORMATS {
        let (base, child) = chain(&dir, fmt);
        let want = content(&child);
        let r = medium::merge(&child, 2, &[], &Silent).unwrap();
        assert_eq!(r.into, base);
        assert!(!child.exists(), "the child is removed");
        assert!(content(&base) == want, "{}", fmt.name());
        let raw = dir.join("merged.raw");
        write_raw(&raw, &want);
        qemu_compare(&base, fmt, &raw);
        qemu_check(&base, fmt);
        let _ = std::fs::remove_file(&base);
    }
    let e = medium::merge(&dir.join("merged.raw"), 2, &[], &Silent).unwrap_err();
    assert!(e.to_string().contains("no parent"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn read_u32(path: &Path, at: u64) -> u32 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, at).unwrap();
    u32::from_le_bytes(b)
}

#[test]
fn check_finds_clean_images_clean() {
    let dir = scratch("check-clean");
    for fmt in FORMATS {
        let path = dir.join(format!("k.{}", ext(fmt)));
        fill(&make(&path, fmt, Variant::Dynamic, SIZE), 4);
        let r = medium::check(&path, false, &[]).unwrap();
        assert!(r.clean(), "{}: {:?}", fmt.name(), r.findings);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_finds_leaks_and_repair_reclaims_them() {
    let dir = scratch("check-leak");
    let path = dir.join("leak.vdi");
    fill(&make(&path, FormatKind::Vdi, Variant::Dynamic, SIZE), 4);
    // The block map starts at 0x200 (header offsets field at 0x154); block 0 is allocated.
    let off_blocks = u64::from(read_u32(&path, 0x154));
    assert_ne!(read_u32(&path, off_blocks), u32::MAX);
    // Free block 0's entry: its data stays in the file, referenced by nothing.
    patch(&path, off_blocks, &u32::MAX.to_le_bytes());
    let want = content(&path);
    let r = medium::check(&path, false, &[]).unwrap();
    assert_eq!(r.leaked_blocks, 1, "{:?}", r.findings);
    assert!(!r.corrupt());
    let r = medium::check(&path, true, &[]).unwrap();
    assert!(r.clean(), "{:?}", r.findings);
    assert!(!r.repaired.is_empty());
    assert!(content(&path) == want);
    qemu_check(&path, FormatKind::Vdi);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_finds_injected_corruption() {
    let dir = scratch("check-corrupt");
    // VDI: two map entries pointing at the same block.
    let vdi = dir.join("overlap.vdi");
    fill(&make(&vdi, FormatKind::Vdi, Variant::Dynamic, SIZE), 4);
    let off_blocks = u64::from(read_u32(&vdi, 0x154));
    let first = read_u32(&vdi, off_blocks);
    patch(&vdi, off_blocks + 8 * 4, &first.to_le_bytes());
    // VHD: a footer byte changed without its checksum.
    let vhd = dir.join("sum.vhd");
    fill(&make(&vhd, FormatKind::Vhd, Variant::Dynamic, SIZE), 4);
    patch(&vhd, 0x30, &[0x7f]);
    // Parallels: a BAT entry past the end of the file.
    let hds = dir.join("range.hds");
    fill(
        &make(&hds, FormatKind::Parallels, Variant::Dynamic, SIZE),
        4,
    );
    patch(&hds, 64 + 4 * 3, &0x00ff_ffffu32.to_le_bytes());
    // VMDK: a grain table entry past the end of the file.
    let vmdk = dir.join("grain.vmdk");
    fill(&make(&vmdk, FormatKind::Vmdk, Variant::Dynamic, SIZE), 4);
    let gd = {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&vmdk).unwrap();
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, 56).unwrap();
        u64::from_le_bytes(b) * 512
    };
    let gt = u64::from(read_u32(&vmdk, gd)) * 512;
    patch(&vmdk, gt, &0x0fff_ffffu32.to_le_bytes());
    for path in [&vdi, &vhd, &hds, &vmdk] {
        let hash = std::fs::read(path).unwrap();
        let r = medium::check(path, false, &[]).unwrap();
        assert!(r.corrupt(), "{}: {:?}", path.display(), r.findings);
        let r = medium::check(path, true, &[]).unwrap();
        assert!(r.corrupt());
        assert!(
            std::fs::read(path).unwrap() == hash,
            "check changed {}",
            path.display()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn set_uuid_writes_the_header() {
    let dir = scratch("uuid");
    for fmt in [FormatKind::Vdi, FormatKind::Vmdk, FormatKind::Vhd] {
        let path = dir.join(format!("u.{}", ext(fmt)));
        fill(&make(&path, fmt, Variant::Dynamic, SIZE), 4);
        let want = content(&path);
        let u = ferry_storage::Uuid::new_v4();
        assert_eq!(medium::set_uuid(&path, Some(u)).unwrap(), u);
        assert_eq!(
            open_image(&path, false).unwrap().uuid(),
            Some(u),
            "{}",
            fmt.name()
        );
        assert!(content(&path) == want);
        qemu_check(&path, fmt);
        let random = medium::set_uuid(&path, None).unwrap();
        assert_ne!(random, u);
        assert_eq!(open_image(&path, false).unwrap().uuid(), Some(random));
    }
    // VHD fixed: the footer at the end.
    let fixed = dir.join("f.vhd");
    drop(make(&fixed, FormatKind::Vhd, Variant::Fixed, 4 * MIB));
    let u = ferry_storage::Uuid::new_v4();
    medium::set_uuid(&fixed, Some(u)).unwrap();
    assert_eq!(open_image(&fixed, false).unwrap().uuid(), Some(u));
    // Raw records no UUID.
    let raw = dir.join("r.raw");
    write_raw(&raw, &[0u8; 4096]);
    assert!(medium::set_uuid(&raw, None).is_err());
    assert_eq!(std::fs::read(&raw).unwrap(), vec![0u8; 4096]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn clone_refuses_an_existing_target() {
    let dir = scratch("exists");
    let src = dir.join("s.vdi");
    fill(&make(&src, FormatKind::Vdi, Variant::Dynamic, SIZE), 4);
    let dst = dir.join("d.vmdk");
    write_raw(&dst, b"precious");
    let e = medium::clone(
        &src,
        &dst,
        &clone_opts(FormatKind::Vmdk, Variant::Dynamic),
        &Silent,
    )
    .unwrap_err();
    assert!(e.to_string().contains("--overwrite"), "{e}");
    assert_eq!(std::fs::read(&dst).unwrap(), b"precious");
    let mut o = clone_opts(FormatKind::Vmdk, Variant::Dynamic);
    o.overwrite = true;
    medium::clone(&src, &dst, &o, &Silent).unwrap();
    assert!(content(&dst) == content(&src));
    let e = medium::clone(&src, &src, &o, &Silent).unwrap_err();
    assert!(e.to_string().contains("source itself"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Where a layer says a run is stored in its file (`Layer::host_run`, which a clone reads in
/// place), the file holds exactly what `read_at` returns, also for blocks allocated out of
/// order (a run never spans two blocks that are not next to each other in the file).
#[test]
fn host_runs_hold_what_reads_return() {
    let dir = scratch("host-run");
    for fmt in [
        FormatKind::Raw,
        FormatKind::Vdi,
        FormatKind::Parallels,
        FormatKind::Vhd,
    ] {
        let path = dir.join(format!("img.{}", ext(fmt)));
        let disk = make(&path, fmt, Variant::Dynamic, SIZE);
        // Later blocks first, then earlier ones: the file's order is not the disk's.
        disk.write_at(&pattern(1, 3 * MIB as usize), 8 * MIB)
            .unwrap();
        disk.write_at(&pattern(2, 2 * MIB as usize + 4096), MIB)
            .unwrap();
        disk.write_at(&pattern(3, 4096), 12 * MIB).unwrap();
        disk.flush().unwrap();
        drop(disk);
        let layer = open_image(&path, false).unwrap();
        assert_eq!(layer.mapped_file().as_deref(), Some(&*path), "{fmt:?}");
        let file = std::fs::read(&path).unwrap();
        let mut found = 0;
        for start in (0..SIZE).step_by(MIB as usize / 2) {
            let len = 2 * MIB;
            let Some((host, run)) = layer.host_run(start, len.min(SIZE - start)).unwrap() else {
                continue;
            };
            assert!(run > 0 && run <= len, "{fmt:?} at {start}: run {run}");
            let mut want = vec![0u8; run as usize];
            layer.read_at(&mut want, start).unwrap();
            let have = &file[host as usize..][..run as usize];
            assert!(
                have == want,
                "{fmt:?}: the run at {start} differs in the file"
            );
            found += 1;
        }
        assert!(found > 0, "{fmt:?}: no run found");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
