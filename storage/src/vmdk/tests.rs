//! Unit tests: malformed input, one per class, each refused with an error naming the file.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::*;

const MIB: u64 = 1 << 20;

fn dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/tmp/vmdk-unit")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A small monolithicSparse image with data in grains 0 and 2.
fn sample(name: &str, variant: Variant) -> PathBuf {
    let p = dir(name).join("d.vmdk");
    let l = VmdkLayer::create(
        &p,
        &CreateOptions {
            size: 4 * MIB,
            variant,
            parent: None,
        },
    )
    .unwrap();
    l.write_at(&[0xabu8; 4096], 0, &NoLowerLayers).unwrap();
    l.write_at(&[0xcdu8; 4096], 128 * 1024, &NoLowerLayers)
        .unwrap();
    l.flush().unwrap();
    p
}

fn patch(p: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn le64_at(p: &Path, off: u64) -> u64 {
    let f = std::fs::File::open(p).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).unwrap();
    u64::from_le_bytes(b)
}

fn open(p: &Path) -> Result<VmdkLayer> {
    VmdkLayer::open_file(Arc::new(LocalFile::open(p, false).unwrap()), false)
}

/// Opens and reads the whole disk; returns the first error.
fn open_and_read(p: &Path) -> Result<()> {
    let l = open(p)?;
    let mut buf = vec![0u8; l.virtual_size().min(64 * MIB) as usize];
    l.read_at(&mut buf, 0)
}

fn corrupt(r: Result<()>, p: &Path, what: &str) {
    match r {
        Err(e @ StorageError::Corrupt { .. }) => {
            assert!(e.to_string().contains(&*p.to_string_lossy()), "{what}: {e}");
            assert!(e.to_string().contains(what), "wanted {what:?} in: {e}");
        }
        other => panic!("{what}: expected Corrupt, got {:?}", other.err()),
    }
}

fn gd_entry0(p: &Path) -> u64 {
    let gd = le64_at(p, 56);
    le64_at(p, gd * 512) & 0xffff_ffff
}

#[test]
fn sample_reads_back() {
    let p = sample("ok", Variant::Dynamic);
    let l = open(&p).unwrap();
    let mut b = vec![0u8; 8192];
    l.read_at(&mut b, 124 * 1024).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 0) && b[4096..].iter().all(|&x| x == 0xcd));
    assert_eq!(
        l.block_status(0, 4 * MIB).unwrap(),
        (Allocation::Data, 64 * 1024)
    );
    assert_eq!(
        l.block_status(64 * 1024, 4 * MIB - 64 * 1024).unwrap(),
        (Allocation::Unallocated, 64 * 1024)
    );
    assert!(VmdkFormat.probe(&p, &std::fs::read(&p).unwrap()[..4096]));
}

#[test]
fn bad_magic_is_refused() {
    let p = sample("magic", Variant::Dynamic);
    patch(&p, 0, b"KDMX");
    assert!(!VmdkFormat.probe(&p, &std::fs::read(&p).unwrap()[..4096]));
    // Not a sparse header, and the rest is binary: no descriptor either.
    corrupt(open_and_read(&p), &p, "descriptor");
}

#[test]
fn bad_version_is_refused() {
    let p = sample("version", Variant::Dynamic);
    patch(&p, 4, &7u32.to_le_bytes());
    corrupt(open_and_read(&p), &p, "version 7");
}

#[test]
fn damaged_newline_check_bytes_are_refused() {
    let p = sample("nl", Variant::Dynamic);
    patch(&p, 73, b"\n \n\n");
    corrupt(open_and_read(&p), &p, "text mode");
}

#[test]
fn truncated_file_is_refused() {
    let p = sample("trunc", Variant::Dynamic);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(300)
        .unwrap();
    corrupt(open_and_read(&p), &p, "truncated");
    let p = sample("trunc2", Variant::Dynamic);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(20 * 1024)
        .unwrap();
    assert!(matches!(
        open_and_read(&p),
        Err(StorageError::Corrupt { .. })
    ));
}

#[test]
fn absurd_capacity_is_refused_without_allocating() {
    let p = sample("cap", Variant::Dynamic);
    patch(&p, 12, &(1u64 << 40).to_le_bytes());
    corrupt(open_and_read(&p), &p, "capacity");
    // A capacity whose grain directory cannot fit the file (afl9.vmdk's class).
    let p = sample("cap2", Variant::Dynamic);
    patch(&p, 12, &(1u64 << 32).to_le_bytes());
    patch(&p, 44, &1u32.to_le_bytes());
    patch(&p, 20, &1u64.to_le_bytes());
    corrupt(open_and_read(&p), &p, "grain directory");
}

#[test]
fn bad_grain_size_is_refused() {
    for (i, g) in [0u64, 3, 1 << 30].into_iter().enumerate() {
        let p = sample(&format!("grain{i}"), Variant::Dynamic);
        patch(&p, 20, &g.to_le_bytes());
        corrupt(open_and_read(&p), &p, "grain size");
    }
}

#[test]
fn grain_directory_past_eof_is_refused() {
    let p = sample("gdeof", Variant::Dynamic);
    patch(&p, 56, &(1u64 << 30).to_le_bytes());
    corrupt(open_and_read(&p), &p, "outside the file");
    let p = sample("gteof", Variant::Dynamic);
    let gd = le64_at(&p, 56);
    patch(&p, gd * 512, &0x00ff_ffffu32.to_le_bytes());
    corrupt(open_and_read(&p), &p, "past the end");
}

#[test]
fn grain_entry_past_eof_is_refused() {
    let p = sample("geof", Variant::Dynamic);
    let gt = gd_entry0(&p);
    patch(&p, gt * 512 + 4 * 2, &0x0fff_ffffu32.to_le_bytes());
    corrupt(open_and_read(&p), &p, "past the end of the file");
}

#[test]
fn grain_entry_into_metadata_is_refused() {
    let p = sample("gmeta", Variant::Dynamic);
    let gt = gd_entry0(&p);
    patch(&p, gt * 512, &2u32.to_le_bytes());
    corrupt(open_and_read(&p), &p, "inside the header");
}

#[test]
fn descriptor_garbage_is_refused() {
    let p = sample("descgarbage", Variant::Dynamic);
    patch(&p, 512 + 30, &[1, 2, 3, 0xff, 4]);
    corrupt(open_and_read(&p), &p, "garbage");
    let p = sample("descextent", Variant::Fixed);
    std::fs::write(
        &p,
        "# Disk DescriptorFile\nversion=1\nCID=1\nRW many FLAT \"d-flat.vmdk\" 0\n",
    )
    .unwrap();
    corrupt(open_and_read(&p), &p, "bad extent line");
    let p = dir("big").join("big.vmdk");
    std::fs::write(&p, vec![b'x'; 2 << 20]).unwrap();
    corrupt(open_and_read(&p), &p, "too large");
}

#[test]
fn missing_extent_file_is_named() {
    let p = sample("missing", Variant::Split2GSparse);
    let ext = p.with_file_name("d-s001.vmdk");
    std::fs::remove_file(&ext).unwrap();
    match open_and_read(&p) {
        Err(e @ StorageError::Io { .. }) => {
            assert!(e.to_string().contains("d-s001.vmdk"), "{e}");
            assert!(e.to_string().contains("d.vmdk"), "{e}");
        }
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn unfinished_stream_is_refused() {
    let p = sample("stream", Variant::Stream);
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len - 512)
        .unwrap();
    corrupt(open_and_read(&p), &p, "footer");
}

#[test]
fn broken_compressed_grain_is_refused() {
    let p = sample("deflate", Variant::Stream);
    // The first grain follows the 64 KiB of header and descriptor: damage its deflate data.
    patch(&p, 64 * 1024 + 12, &[0xff; 16]);
    corrupt(open_and_read(&p), &p, "inflate");
    let p = sample("deflate2", Variant::Stream);
    patch(&p, 64 * 1024, &999u64.to_le_bytes());
    corrupt(open_and_read(&p), &p, "says it holds sector");
}

#[test]
fn out_of_range_and_read_only_are_errors() {
    let p = sample("range", Variant::Dynamic);
    let l = open(&p).unwrap();
    let mut b = [0u8; 512];
    assert!(matches!(
        l.read_at(&mut b, 4 * MIB - 511),
        Err(StorageError::OutOfRange { .. })
    ));
    assert!(matches!(
        l.read_at(&mut b, u64::MAX),
        Err(StorageError::OutOfRange { .. })
    ));
    assert!(matches!(
        l.write_at(&b, 0, &NoLowerLayers),
        Err(StorageError::ReadOnly { .. })
    ));
    assert!(matches!(
        l.block_status(u64::MAX - 1, 2),
        Err(StorageError::OutOfRange { .. })
    ));
}

#[test]
fn cowd_of_unknown_version_is_recognized_and_refused() {
    let p = dir("cowd").join("old.vmdk");
    let mut b = b"COWD".to_vec();
    b.resize(2048, 0);
    std::fs::write(&p, &b).unwrap();
    assert!(VmdkFormat.probe(&p, &b));
    assert!(matches!(
        open_and_read(&p),
        Err(StorageError::Unsupported { .. })
    ));
}

#[test]
fn new_grain_table_is_published_after_its_data() {
    let p = sample("newgt", Variant::Dynamic);
    // Forget grain table 0 in both directories (a file from a tool that allocates lazily).
    let (rgd, gd) = (le64_at(&p, 48), le64_at(&p, 56));
    patch(&p, rgd * 512, &[0; 4]);
    patch(&p, gd * 512, &[0; 4]);
    let l = VmdkLayer::open_file(Arc::new(LocalFile::open(&p, true).unwrap()), true).unwrap();
    assert_eq!(l.block_status(0, 4096).unwrap().0, Allocation::Unallocated);
    l.write_at(&[0x11u8; 1000], 70_000, &NoLowerLayers).unwrap();
    l.flush().unwrap();
    drop(l);
    assert_ne!(gd_entry0(&p), 0);
    let l = open(&p).unwrap();
    let mut b = vec![0u8; 2000];
    l.read_at(&mut b, 69_500).unwrap();
    assert!(b[..500].iter().all(|&x| x == 0) && b[500..1500].iter().all(|&x| x == 0x11));
    assert!(b[1500..].iter().all(|&x| x == 0));
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "vmdk"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn zeroed_grain_entries_read_as_zero_and_hide_the_parent() {
    let p = sample("zeroed", Variant::Dynamic);
    let gt = gd_entry0(&p);
    patch(&p, gt * 512, &1u32.to_le_bytes());
    let l = open(&p).unwrap();
    assert_eq!(l.block_status(0, 65536).unwrap(), (Allocation::Zero, 65536));
    let mut b = vec![1u8; 4096];
    l.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

#[test]
fn esx_vmfs_descriptor_reads_and_keeps_unknown_lines_on_rewrite() {
    let p = sample("vmfs", Variant::Fixed);
    let desc = "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID = fffffffe\nparentCID=ffffffff\n\
        isNativeSnapshot=\"no\"\ncreateType=\"vmfs\"\n\n# Extent description\nRW 8192 VMFS \"d-flat.vmdk\"\n\n\
        # The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\nddb.thinProvisioned = \"1\"\n\
        ddb.uuid = \"60 00 C2 9b 12 34\"\n";
    std::fs::write(&p, desc).unwrap();
    let l = VmdkLayer::open_file(Arc::new(LocalFile::open(&p, true).unwrap()), true).unwrap();
    assert_eq!(l.variant(), Variant::Fixed);
    assert_eq!(l.virtual_size(), 4 * MIB);
    assert_eq!(l.cid(), 0xfffffffe);
    assert!(l.parent().is_none());
    let mut b = vec![0u8; 8192];
    l.read_at(&mut b, 0).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 0xab) && b[4096..].iter().all(|&x| x == 0));
    l.write_at(&[0x5a; 512], 4096, &NoLowerLayers).unwrap();
    l.flush().unwrap();
    let cid = l.cid();
    drop(l);
    let text = std::fs::read_to_string(&p).unwrap();
    let want = desc.replace("CID = fffffffe", &format!("CID={cid:08x}"));
    assert_eq!(text, want);
}

#[test]
fn sparse_extent_smaller_than_its_descriptor_line_is_refused() {
    let p = sample("short", Variant::Split2GSparse);
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("RW 8192 SPARSE", "RW 9000 SPARSE");
    std::fs::write(&p, text).unwrap();
    let ext = p.with_file_name("d-s001.vmdk");
    corrupt(open_and_read(&p), &ext, "gives it 9000");
}

#[test]
fn windows_parent_hints_also_try_the_file_name() {
    assert_eq!(hint_paths("base.vmdk"), vec![PathBuf::from("base.vmdk")]);
    assert_eq!(
        hint_paths("C:\\VMs\\base.vmdk"),
        vec![
            PathBuf::from("C:\\VMs\\base.vmdk"),
            PathBuf::from("base.vmdk")
        ]
    );
    assert_eq!(
        hint_paths("..\\b\\base.vmdk"),
        vec![
            PathBuf::from("..\\b\\base.vmdk"),
            PathBuf::from("../b/base.vmdk"),
            PathBuf::from("base.vmdk")
        ]
    );
}

#[test]
fn create_on_a_failing_file_fails_cleanly() {
    let d = dir("createfail");
    for k in 0..4 {
        let p = d.join(format!("c{k}.vmdk"));
        let inner: Arc<dyn HostFile> = Arc::new(LocalFile::create(&p).unwrap());
        let f: Arc<dyn HostFile> = Arc::new(crate::host_file::FailingFile::new(inner, k));
        let opts = CreateOptions {
            size: 8 * MIB,
            variant: Variant::Dynamic,
            parent: None,
        };
        match VmdkLayer::create_on(f, &opts) {
            Ok(l) => {
                assert!(k >= 3, "k={k}");
                assert_eq!(l.virtual_size(), 8 * MIB);
            }
            Err(e) => assert!(matches!(e, StorageError::Io { .. }), "k={k}: {e}"),
        }
    }
}

#[test]
fn stream_small_writes_append_each_grain_once() {
    let d = dir("streamsmall");
    let p = d.join("s.vmdk");
    let l = VmdkLayer::create(
        &p,
        &CreateOptions {
            size: 4 * MIB,
            variant: Variant::Stream,
            parent: None,
        },
    )
    .unwrap();
    let mut raw = vec![0u8; 4 * MIB as usize];
    for i in 0..64u64 {
        // 4 KiB pieces over 256 KiB (4 grains), then one read-back in the middle.
        let b: Vec<u8> = (0..4096).map(|j| (i as u8) ^ (j as u8) | 1).collect();
        l.write_at(&b, i * 4096, &NoLowerLayers).unwrap();
        raw[(i * 4096) as usize..((i + 1) * 4096) as usize].copy_from_slice(&b);
    }
    let mut back = vec![0u8; 300_000];
    l.read_at(&mut back, 0).unwrap();
    assert!(back == raw[..300_000]);
    assert_eq!(
        l.block_status(0, 4 * MIB).unwrap(),
        (Allocation::Data, 256 * 1024)
    );
    l.flush().unwrap();
    drop(l);
    // Four compressed grains of data that compresses well: far below 4 x 64 KiB.
    assert!(std::fs::metadata(&p).unwrap().len() < 100 * 1024);
    let r = d.join("s.raw");
    std::fs::write(&r, &raw).unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "vmdk", "-F", "raw"])
        .args([&p, &r])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn truncated_flat_extent_is_refused() {
    let p = sample("flattrunc", Variant::Fixed);
    let ext = p.with_file_name("d-flat.vmdk");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&ext)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    corrupt(open_and_read(&p), &ext, "truncated");
}

#[test]
fn empty_embedded_descriptor_is_no_descriptor() {
    let p = sample("nodesc", Variant::Dynamic);
    patch(&p, 512, &[0u8; 10240]);
    let l = open(&p).unwrap();
    assert_eq!(l.virtual_size(), 4 * MIB);
    assert!(l.parent().is_none());
}

#[test]
fn child_records_parent_uuid_cid_and_relative_hint() {
    let base = sample("uuidchain", Variant::Dynamic);
    let b = open(&base).unwrap();
    let sub = base.parent().unwrap().join("snap");
    std::fs::create_dir_all(&sub).unwrap();
    let child = sub.join("c.vmdk");
    let opts = CreateOptions {
        size: 4 * MIB,
        variant: Variant::Dynamic,
        parent: Some(CreateParent {
            path: base.clone(),
            uuid: None,
            modification_uuid: None,
            format: FormatKind::Vmdk,
        }),
    };
    let c = VmdkLayer::create(&child, &opts).unwrap();
    let pr = c.parent().unwrap();
    assert_eq!(pr.uuid, b.uuid());
    assert!(pr.uuid.is_some());
    assert_eq!(pr.path_hints[0], PathBuf::from("../d.vmdk"));
    assert_eq!(c.parent_cid(), b.cid());
    // A flat child, or a parent of another format, is refused.
    let mut o2 = opts.clone();
    o2.variant = Variant::Fixed;
    assert!(matches!(
        VmdkLayer::create(&sub.join("f.vmdk"), &o2),
        Err(StorageError::Unsupported { .. })
    ));
    let mut o3 = opts.clone();
    o3.parent.as_mut().unwrap().format = FormatKind::Vdi;
    assert!(matches!(
        VmdkLayer::create(&sub.join("g.vmdk"), &o3),
        Err(StorageError::Unsupported { .. })
    ));
}

/// Random damage to the metadata of each variant never panics: every open, status query and
/// read either works or returns an error.
#[test]
fn random_metadata_damage_never_panics() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for (vi, variant) in [Variant::Dynamic, Variant::Stream].into_iter().enumerate() {
        let p = sample(&format!("fuzz{vi}"), variant);
        let pristine = std::fs::read(&p).unwrap();
        let meta = if variant == Variant::Stream {
            pristine.len()
        } else {
            64 * 1024
        };
        for _ in 0..150 {
            let mut b = pristine.clone();
            for _ in 0..(1 + rnd() % 8) {
                let at = (rnd() as usize) % meta.min(b.len());
                b[at] = rnd() as u8;
            }
            std::fs::write(&p, &b).unwrap();
            if let Ok(l) = open(&p) {
                let size = l.virtual_size();
                let _ = l.block_status(0, size.min(64 * MIB));
                let mut buf = vec![0u8; size.min(4 * MIB) as usize];
                let _ = l.read_at(&mut buf, 0);
            }
            let f = Arc::new(LocalFile::open(&p, true).unwrap());
            if let Ok(l) = VmdkLayer::open_file(f, true) {
                let size = l.virtual_size();
                for off in [0, size / 2, size.saturating_sub(700)] {
                    let n = 600.min(size - off) as usize;
                    let _ = l.write_at(&vec![0x42; n], off, &NoLowerLayers);
                }
                let _ = l.flush();
            }
        }
    }
}
