//! VHD: samples made by other tools and qemu-img's corpus read to their manifests; images
//! ferry creates pass qemu-img; differencing chains; crash safety of block allocation.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use ferry_storage::host_file::FailingFile;
use ferry_storage::vhd::{chs_geometry, VhdFormat, VhdLayer, VhdOpenOptions};
use ferry_storage::{
    Allocation, CreateOptions, CreateParent, Disk, FormatKind, HostFile, ImageFormat, Layer,
    LocalFile, StorageError, Variant,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

const CHUNK: u64 = 1 << 20;
const MIB: u64 = 1 << 20;

fn shared() -> PathBuf {
    common::conformance_dir()
}

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("vhd")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The sample, decompressed when needed, as a file under `dir`.
fn sample(rel: &str, dir: &Path) -> PathBuf {
    let src = shared().join("samples").join(rel);
    let name = Path::new(rel)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    let (out, tool) = if let Some(n) = name.strip_suffix(".gz") {
        (dir.join(n), Some("gzip"))
    } else if let Some(n) = name.strip_suffix(".bz2") {
        (dir.join(n), Some("bzip2"))
    } else {
        (dir.join(&name), None)
    };
    match tool {
        Some(t) => {
            let f = std::fs::File::create(&out).unwrap();
            assert!(Command::new(t)
                .arg("-dc")
                .arg(&src)
                .stdout(f)
                .status()
                .unwrap()
                .success());
        }
        None => {
            std::fs::copy(&src, &out).unwrap();
        }
    }
    out
}

fn open(path: &Path, writable: bool) -> VhdLayer {
    let f = LocalFile::open(path, writable).unwrap();
    VhdLayer::open(Arc::new(f), writable).unwrap_or_else(|e| panic!("{e}"))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// SHA-256 of every non-zero 1 MiB chunk, found through block_status (holes are skipped).
fn chunk_hashes(disk: &Disk) -> BTreeMap<String, String> {
    let size = disk.size();
    let mut chunks = std::collections::BTreeSet::new();
    for (start, len) in disk.allocated_ranges().unwrap() {
        for c in start / CHUNK..(start + len).div_ceil(CHUNK) {
            chunks.insert(c);
        }
    }
    let mut out = BTreeMap::new();
    for c in chunks {
        let n = CHUNK.min(size - c * CHUNK) as usize;
        let mut buf = vec![0u8; n];
        disk.read_at(&mut buf, c * CHUNK).unwrap();
        if buf.iter().any(|&b| b != 0) {
            out.insert(c.to_string(), hex(&Sha256::digest(&buf)));
        }
    }
    out
}

fn samples_manifest() -> Vec<Value> {
    let text = std::fs::read_to_string(shared().join("samples/samples.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["samples"].as_array().unwrap().clone()
}

fn is_vhd_sample(s: &Value) -> bool {
    s["qemu_format"] == "vpc"
}

#[test]
fn vhd_samples_read_to_manifest_hashes() {
    let dir = scratch("samples");
    let mut checked = 0;
    for s in samples_manifest()
        .iter()
        .filter(|s| is_vhd_sample(s) && s["qemu_opens"] == true)
    {
        let rel = s["file"].as_str().unwrap();
        let path = sample(rel, &dir);
        assert!(
            VhdFormat.probe(&path, &std::fs::read(&path).unwrap()[..512]),
            "{rel}: probe"
        );
        let layer = open(&path, false);
        assert_eq!(
            layer.virtual_size(),
            s["virtual_size"].as_u64().unwrap(),
            "{rel}: size"
        );
        // qemu reads a differencing VHD alone (no parent): so does a one-layer disk.
        let disk = Disk::from_layers(vec![Box::new(layer)]).unwrap();
        let want: BTreeMap<String, String> = s["chunk_sha256"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        assert_eq!(chunk_hashes(&disk), want, "{rel}: chunk hashes");
        if disk.size() <= 64 * MIB {
            let mut all = vec![0u8; disk.size() as usize];
            disk.read_at(&mut all, 0).unwrap();
            assert_eq!(
                hex(&Sha256::digest(&all)),
                s["raw_sha256"].as_str().unwrap(),
                "{rel}: raw hash"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 7, "every readable VHD sample");
}

#[test]
fn vhd_sample_sizes_follow_the_creator_rule() {
    let dir = scratch("sizes");
    // Same footer current_size family, different creators: CHS for "vpc ", current_size for "win ".
    let vpc = open(&sample("qemu-iotests/virtualpc-dynamic.vhd", &dir), false);
    let hv = open(
        &sample("qemu-iotests/hyperv2012r2-dynamic.vhd", &dir),
        false,
    );
    assert_eq!(&vpc.creator(), b"vpc ");
    assert_eq!(vpc.virtual_size(), 136_363_130_880);
    assert_eq!(&hv.creator(), b"win ");
    assert_eq!(hv.virtual_size(), 136_365_211_648);
    // An empty 127 GiB disk: one status call covers it.
    assert_eq!(
        hv.block_status(0, hv.virtual_size()).unwrap(),
        (Allocation::Unallocated, hv.virtual_size())
    );
}

#[test]
fn vhd_afl5_is_refused_clearly() {
    let dir = scratch("afl5");
    let path = sample("qemu-iotests/afl5.img", &dir);
    let f = LocalFile::open(&path, false).unwrap();
    match VhdLayer::open(Arc::new(f), false) {
        Err(StorageError::Corrupt { path: p, detail }) => {
            assert_eq!(p, path);
            assert!(detail.contains("Max Table Entries too large"), "{detail}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("afl5 opened"),
    }
}

#[test]
fn vhd_dfvfs_differential_pair_reads_through_its_parent() {
    let dir = scratch("dfvfs-pair");
    let parent = sample("dfvfs/image.vhd", &dir);
    let child = sample("dfvfs/image-differential.vhd", &dir);
    // Strict (default): the wrong checksums are named.
    for p in [&parent, &child] {
        let f = LocalFile::open(p, false).unwrap();
        let err = VhdLayer::open(Arc::new(f), false).err().expect("refused");
        assert!(err.to_string().contains("checksum is wrong"), "{err}");
        assert!(err.to_string().contains(&*p.to_string_lossy()), "{err}");
    }
    // Lenient, read-only: libvhdi's behaviour.
    let lenient = |p: &Path| {
        let f = LocalFile::open(p, false).unwrap();
        VhdLayer::open_with(
            Arc::new(f),
            false,
            VhdOpenOptions {
                accept_bad_checksums: true,
            },
        )
        .unwrap()
    };
    let base = lenient(&parent);
    let top = lenient(&child);
    let pref = top.parent().expect("a differencing disk names its parent");
    assert_eq!(pref.uuid, base.uuid());
    assert!(
        pref.path_hints.contains(&PathBuf::from("image.vhd")),
        "{:?}",
        pref.path_hints
    );
    assert_eq!(top.virtual_size(), 104_448);
    // Writable + bad checksum stays refused even when lenient.
    let f = LocalFile::open(&child, true).unwrap();
    assert!(VhdLayer::open_with(
        Arc::new(f),
        true,
        VhdOpenOptions {
            accept_bad_checksums: true
        }
    )
    .is_err());

    let mut alone = vec![0u8; base.virtual_size() as usize];
    base.read_at(&mut alone, 0).unwrap();
    let disk = Disk::from_layers(vec![Box::new(top), Box::new(base)]).unwrap();
    let mut buf = vec![0u8; disk.size() as usize];
    disk.read_at(&mut buf, 0).unwrap();
    // An ext2 file system: the superblock magic at 1024 + 56.
    assert_eq!(&buf[1080..1082], &[0x53, 0xef]);
    // Sectors the child holds come from the child; the rest from the parent.
    let top = &disk.layers()[0];
    let mut off = 0;
    let mut child_sectors = 0;
    while off < disk.size() {
        let (st, run) = top.block_status(off, disk.size() - off).unwrap();
        if st == Allocation::Unallocated {
            assert_eq!(
                buf[off as usize..(off + run) as usize],
                alone[off as usize..(off + run) as usize]
            );
        } else {
            child_sectors += run / 512;
        }
        off += run;
    }
    // This child holds every sector (its bitmap is all ones, its data the parent's).
    assert!(child_sectors > 0, "{child_sectors}");
    assert!(buf == alone);
}

#[test]
fn vhd_fat_differential_names_its_missing_parent() {
    let dir = scratch("fat-diff");
    let path = sample("dfvfs/fat-differential.vhd", &dir);
    let layer = open(&path, false);
    let p = layer.parent().unwrap();
    assert_eq!(
        p.uuid.unwrap().to_string(),
        "5fa21a55-f394-aa4d-9958-1951a67d5540"
    );
    assert_eq!(p.path_hints[0], PathBuf::from("./fat-parent.vhd"));
    assert_eq!(
        p.path_hints[1],
        PathBuf::from("C:/Projects/dfvfs/test_data/fat-parent.vhd")
    );
    assert!(p.path_hints.contains(&PathBuf::from("fat-parent.vhd")));
    // Per-sector runs from the bitmap: the first block is partly this layer's.
    let (st, run) = layer.block_status(0, layer.virtual_size()).unwrap();
    assert!(run < 2 * MIB, "{st:?} {run}");
}

fn corpus() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/conformance-corpus");
    if !dir.join("manifest.json").exists() {
        let st = Command::new("bash")
            .arg(shared().join("make-corpus.sh"))
            .arg(&dir)
            .status()
            .unwrap();
        assert!(st.success(), "make-corpus.sh");
    }
    dir
}

fn assert_same(disk: &Disk, expected: &[u8], what: &str) {
    let mut buf = vec![0u8; 4 * MIB as usize];
    let mut off = 0u64;
    while off < disk.size() {
        let n = (buf.len() as u64).min(disk.size() - off) as usize;
        disk.read_at(&mut buf[..n], off).unwrap();
        assert!(
            buf[..n] == expected[off as usize..off as usize + n],
            "{what}: differs in {off:#x}+{n:#x}"
        );
        off += n as u64;
    }
}

#[test]
fn vhd_corpus_reads_expected_raw() {
    let dir = corpus();
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let mut n = 0;
    for img in manifest["images"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["format"] == "vpc")
    {
        let name = img["name"].as_str().unwrap();
        let path = dir.join(img["file"].as_str().unwrap());
        let head = std::fs::read(&path).unwrap();
        assert!(VhdFormat.probe(&path, &head[..512]), "{name}: probe");
        let layer = open(&path, false);
        assert_eq!(
            layer.virtual_size(),
            img["virtual_size"].as_u64().unwrap(),
            "{name}"
        );
        let want_variant = if img["variant"] == "fixed" {
            Variant::Fixed
        } else {
            Variant::Dynamic
        };
        assert_eq!(layer.variant(), want_variant, "{name}");
        let expected = std::fs::read(dir.join(img["expected_raw"].as_str().unwrap())).unwrap();
        let disk = Disk::from_layers(vec![Box::new(layer)]).unwrap();
        assert_same(&disk, &expected, name);
        // Odd offsets and lengths across the 2 MiB block boundary and sector edges.
        for (off, len) in [
            (2 * MIB - 700, 1500),
            (3 * MIB + 17 * 512 - 3, 2 * MIB + 11),
            (1, 511),
        ] {
            if off + len <= disk.size() {
                let mut b = vec![0u8; len as usize];
                disk.read_at(&mut b, off).unwrap();
                assert!(
                    b == expected[off as usize..(off + len) as usize],
                    "{name} at {off}"
                );
            }
        }
        // Every data extent qemu maps at depth 0 is data for ferry too.
        for m in img["qemu_img_map"].as_array().unwrap() {
            if m[2] == "data" && m[3] == 0 {
                let (s, l) = (m[0].as_u64().unwrap(), m[1].as_u64().unwrap());
                let mut off = s;
                while off < s + l {
                    let (st, run) = disk.layers()[0].block_status(off, s + l - off).unwrap();
                    assert_eq!(st, Allocation::Data, "{name}: qemu maps data at {off:#x}");
                    off += run;
                }
            }
        }
        n += 1;
    }
    assert_eq!(n, 6);
}

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn qemu_size(path: &Path) -> u64 {
    let (ok, text) = qemu_img(&["info", "-f", "vpc", "--output=json", path.to_str().unwrap()]);
    assert!(ok, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// A deterministic pattern for write `i`.
fn pattern(i: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| ((j * 31 + i * 7 + j / 509) % 251) as u8 + 1)
        .collect()
}

/// Writes that cross blocks, sectors, and hit the last sector.
fn workload(size: u64) -> Vec<(u64, Vec<u8>)> {
    vec![
        (0, pattern(0, 512)),
        (2 * MIB - 1000, pattern(1, 3000)),
        (3 * MIB + 17 * 512 + 5, pattern(2, MIB as usize + 100)),
        (8 * MIB, vec![0u8; 65536]),
        (6 * MIB - 512, pattern(3, 512)),
        (size - 512, pattern(4, 512)),
        (2 * MIB + 100, pattern(5, 50)),
    ]
}

fn apply(expected: &mut [u8], w: &[(u64, Vec<u8>)]) {
    for (off, data) in w {
        expected[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
}

#[test]
fn vhd_create_write_read_back_and_qemu_agrees() {
    let dir = scratch("create");
    // Sizes: a CHS-exact one, and one that is not (qemu 10 must still show it exactly).
    for (variant, size) in [
        (Variant::Dynamic, 20 * MIB + 3 * 512),
        (Variant::Fixed, 20 * MIB + 3 * 512),
        (Variant::Dynamic, 33 * MIB),
        (Variant::Dynamic, 4 * 1024 * MIB),
    ] {
        let path = dir.join(format!("{variant:?}-{size}.vhd"));
        let layer = VhdFormat
            .create(
                &path,
                &CreateOptions {
                    size,
                    variant,
                    parent: None,
                },
            )
            .unwrap();
        assert_eq!(layer.virtual_size(), size);
        let disk = Disk::from_layers(vec![layer]).unwrap();
        let mut expected = vec![0u8; size as usize];
        let w = workload(size);
        for (off, data) in &w {
            disk.write_at(data, *off).unwrap();
        }
        apply(&mut expected, &w);
        disk.flush().unwrap();
        assert_same(&disk, &expected, "written");
        drop(disk);
        // Reopened: same content, probed as VHD.
        let head = std::fs::read(&path).unwrap();
        assert!(VhdFormat.probe(&path, &head[..512]));
        let disk = Disk::from_layers(vec![Box::new(open(&path, false))]).unwrap();
        assert_same(&disk, &expected, "reopened");
        // qemu-img: the exact size, the same content.
        assert_eq!(qemu_size(&path), size, "qemu-img info virtual-size");
        let raw = dir.join("expected.raw");
        common::write_sparse(&raw, &expected);
        let (ok, text) = qemu_img(&[
            "compare",
            "-f",
            "vpc",
            "-F",
            "raw",
            path.to_str().unwrap(),
            raw.to_str().unwrap(),
        ]);
        assert!(ok, "{variant:?} {size}: {text}");
        let (_, text) = qemu_img(&["check", "-f", "vpc", path.to_str().unwrap()]);
        assert!(
            text.contains("does not support checks") || text.contains("No errors"),
            "{text}"
        );
        if size <= 64 * MIB {
            let mut args = vec!["-f", "vpc", "-s"];
            let s = size.to_string();
            args.push(&s);
            args.extend([
                "-t",
                if variant == Variant::Fixed {
                    "fixed"
                } else {
                    "dynamic"
                },
            ]);
            let st = Command::new("bash")
                .arg(shared().join("check-writer.sh"))
                .args(&args)
                .arg(&path)
                .arg(&raw)
                .output()
                .unwrap();
            assert!(
                st.status.success(),
                "check-writer: {}",
                String::from_utf8_lossy(&st.stdout)
            );
        }
    }
}

#[test]
fn vhd_created_geometry_is_the_specs() {
    let dir = scratch("geometry");
    let size = 20 * MIB + 3 * 512;
    let path = dir.join("g.vhd");
    VhdFormat
        .create(
            &path,
            &CreateOptions {
                size,
                variant: Variant::Dynamic,
                parent: None,
            },
        )
        .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let footer = &bytes[bytes.len() - 512..];
    assert_eq!(&footer[..512], &bytes[..512], "footer copy at 0");
    let (c, h, s) = chs_geometry(size / 512);
    assert_eq!(u16::from_be_bytes([footer[56], footer[57]]), c);
    assert_eq!((footer[58], footer[59]), (h, s));
    assert_eq!(&footer[28..32], b"fery");
    // qemu-img create rounds a size up to a geometry; for that size ours is the same.
    for sectors in [40960u64, 204, 8228, 1_000_000, 4_000_000, 70_000_000] {
        let q = dir.join(format!("q{sectors}.vhd"));
        let (ok, text) = qemu_img(&[
            "create",
            "-q",
            "-f",
            "vpc",
            q.to_str().unwrap(),
            &(sectors * 512).to_string(),
        ]);
        assert!(ok, "{text}");
        let mut qf = vec![0u8; 512];
        let f = LocalFile::open(&q, false).unwrap();
        f.read_at(&mut qf, 0).unwrap();
        let cur = u64::from_be_bytes(qf[48..56].try_into().unwrap()) / 512;
        let geo = (u16::from_be_bytes([qf[56], qf[57]]), qf[58], qf[59]);
        assert_eq!(chs_geometry(cur), geo, "{sectors} sectors");
        assert_eq!(open(&q, false).virtual_size(), qemu_size(&q));
    }
}

#[test]
fn vhd_differencing_child_over_a_base() {
    let dir = scratch("diff");
    let size = 12 * MIB;
    let base_path = dir.join("base.vhd");
    let base = VhdFormat
        .create(
            &base_path,
            &CreateOptions {
                size,
                variant: Variant::Dynamic,
                parent: None,
            },
        )
        .unwrap();
    let mut expected = vec![0u8; size as usize];
    let base_writes = vec![
        (0u64, pattern(10, 3 * MIB as usize)),
        (6 * MIB, pattern(11, 1024)),
    ];
    for (off, d) in &base_writes {
        base.write_at(d, *off, &ferry_storage::NoLowerLayers)
            .unwrap();
    }
    apply(&mut expected, &base_writes);
    base.flush().unwrap();
    let base_uuid = base.uuid();
    drop(base);

    let child_path = dir.join("sub").join("child.vhd");
    std::fs::create_dir_all(child_path.parent().unwrap()).unwrap();
    let opts = CreateOptions {
        size,
        variant: Variant::Dynamic,
        parent: Some(CreateParent {
            path: base_path.clone(),
            uuid: base_uuid,
            modification_uuid: None,
            format: FormatKind::Vhd,
        }),
    };
    let child = VhdFormat.create(&child_path, &opts).unwrap();
    let p = child.parent().unwrap();
    assert_eq!(p.uuid, base_uuid);
    assert_eq!(p.path_hints[0], PathBuf::from("../base.vhd"));
    assert_eq!(p.path_hints[1], std::path::absolute(&base_path).unwrap());
    let disk = Disk::from_layers(vec![child, Box::new(open(&base_path, false))]).unwrap();
    assert_same(&disk, &expected, "fresh child");
    // Partial sectors over parent data, zeros over parent data, a write onto a hole.
    let child_writes = vec![
        (100u64, pattern(20, 10)),
        (MIB + 3, vec![0u8; 2000]),
        (2 * MIB - 5, pattern(21, 10)),
        (9 * MIB, pattern(22, 4096)),
        (size - 1, vec![7u8]),
    ];
    for (off, d) in &child_writes {
        disk.write_at(d, *off).unwrap();
    }
    apply(&mut expected, &child_writes);
    assert_same(&disk, &expected, "written child");
    // Per-sector runs: sector 0 is the child's, sector 1 the parent's.
    let top = &disk.layers()[0];
    assert_eq!(top.block_status(0, MIB).unwrap(), (Allocation::Data, 512));
    assert_eq!(
        top.block_status(512, MIB).unwrap().0,
        Allocation::Unallocated
    );
    disk.flush().unwrap();
    drop(disk);
    // Reopened from disk.
    let child = open(&child_path, false);
    assert_eq!(child.parent().unwrap().uuid, base_uuid);
    let disk = Disk::from_layers(vec![Box::new(child), Box::new(open(&base_path, false))]).unwrap();
    assert_same(&disk, &expected, "reopened child");
    // qemu reads the child alone (it ignores VHD parents): it must still open it and see
    // the child's own sectors.
    assert_eq!(qemu_size(&child_path), size);
}

/// The disk reads as the state after some prefix of the writes, with the next write
/// possibly half done (each sector old or new): never torn sectors or garbage.
fn prefix_state(disk: &Disk, states: &[Vec<u8>]) {
    let mut buf = vec![0u8; disk.size() as usize];
    disk.read_at(&mut buf, 0).unwrap();
    let ok = (0..states.len()).any(|i| {
        let next = states.get(i + 1).unwrap_or(&states[i]);
        (0..buf.len() / 512).all(|s| {
            let r = s * 512..(s + 1) * 512;
            buf[r.clone()] == states[i][r.clone()] || buf[r.clone()] == next[r]
        })
    });
    assert!(ok, "content is no prefix of the workload");
}

fn crash_run(diff: bool) {
    let dir = scratch(if diff { "crash-diff" } else { "crash" });
    let size = 12 * MIB;
    let base_path = dir.join("base.vhd");
    let base = VhdFormat
        .create(
            &base_path,
            &CreateOptions {
                size,
                variant: Variant::Dynamic,
                parent: None,
            },
        )
        .unwrap();
    base.write_at(
        &pattern(9, 5 * MIB as usize),
        0,
        &ferry_storage::NoLowerLayers,
    )
    .unwrap();
    let mut old = vec![0u8; size as usize];
    old[..5 * MIB as usize].copy_from_slice(&pattern(9, 5 * MIB as usize));
    let base_uuid = base.uuid();
    drop(base);
    let pristine = dir.join("pristine.vhd");
    if diff {
        let opts = CreateOptions {
            size,
            variant: Variant::Dynamic,
            parent: Some(CreateParent {
                path: base_path.clone(),
                uuid: base_uuid,
                modification_uuid: None,
                format: FormatKind::Vhd,
            }),
        };
        VhdFormat.create(&pristine, &opts).unwrap();
    } else {
        std::fs::copy(&base_path, &pristine).unwrap();
    }
    let w = workload(size);
    let mut states = vec![old.clone()];
    for one in &w {
        let mut next = states.last().unwrap().clone();
        apply(&mut next, std::slice::from_ref(one));
        states.push(next);
    }
    let new = states.last().unwrap().clone();
    let mut k = 0;
    loop {
        let img = dir.join(format!("k{k}.vhd"));
        std::fs::copy(&pristine, &img).unwrap();
        let inner: Arc<dyn HostFile> = Arc::new(LocalFile::open(&img, true).unwrap());
        let failing = Arc::new(FailingFile::new(inner, k));
        let layer = VhdLayer::open(failing, true).unwrap();
        let mut layers: Vec<Box<dyn Layer>> = vec![Box::new(layer)];
        if diff {
            layers.push(Box::new(open(&base_path, false)));
        }
        let disk = Disk::from_layers(layers).unwrap();
        let completed = w.iter().all(|(off, d)| disk.write_at(d, *off).is_ok());
        drop(disk);
        // Reopen cleanly, read old-or-new everywhere, and qemu agrees on the layer.
        let again = open(&img, false);
        let mut layers: Vec<Box<dyn Layer>> = vec![Box::new(again)];
        if diff {
            layers.push(Box::new(open(&base_path, false)));
        }
        let disk = Disk::from_layers(layers).unwrap();
        prefix_state(&disk, &states);
        assert_eq!(qemu_size(&img), size, "k={k}");
        if !diff {
            let raw = dir.join("now.raw");
            let mut buf = vec![0u8; size as usize];
            disk.read_at(&mut buf, 0).unwrap();
            common::write_sparse(&raw, &buf);
            let (ok, text) = qemu_img(&[
                "compare",
                "-f",
                "vpc",
                "-F",
                "raw",
                img.to_str().unwrap(),
                raw.to_str().unwrap(),
            ]);
            assert!(ok, "k={k}: {text}");
        }
        std::fs::remove_file(&img).unwrap();
        if completed {
            assert_same(&disk, &new, "all writes done");
            break;
        }
        k += 1;
        assert!(k < 200);
    }
    assert!(k > 10, "the workload makes several writes ({k})");
}

#[test]
fn vhd_crash_at_every_write_leaves_a_valid_image() {
    crash_run(false);
}

#[test]
fn vhd_crash_at_every_write_of_a_differencing_child() {
    crash_run(true);
}

#[test]
fn vhd_discard_returns_whole_blocks() {
    let dir = scratch("discard");
    let size = 8 * MIB;
    for variant in [Variant::Dynamic, Variant::Fixed] {
        let path = dir.join(format!("{variant:?}.vhd"));
        let layer = VhdFormat
            .create(
                &path,
                &CreateOptions {
                    size,
                    variant,
                    parent: None,
                },
            )
            .unwrap();
        let disk = Disk::from_layers(vec![layer]).unwrap();
        let data = pattern(30, size as usize);
        disk.write_at(&data, 0).unwrap();
        let mut expected = data.clone();
        // Block 1 whole, and a partial range in block 2 (kept in a dynamic disk).
        disk.discard(2 * MIB, 2 * MIB + 4096).unwrap();
        expected[2 * MIB as usize..4 * MIB as usize].fill(0);
        if variant == Variant::Fixed {
            expected[4 * MIB as usize..4 * MIB as usize + 4096].fill(0);
        } else {
            assert_eq!(
                disk.layers()[0].block_status(2 * MIB, MIB).unwrap(),
                (Allocation::Unallocated, MIB)
            );
        }
        assert_same(&disk, &expected, "discarded");
        drop(disk);
        let raw = dir.join("expected.raw");
        common::write_sparse(&raw, &expected);
        let (ok, text) = qemu_img(&[
            "compare",
            "-f",
            "vpc",
            "-F",
            "raw",
            path.to_str().unwrap(),
            raw.to_str().unwrap(),
        ]);
        assert!(ok, "{variant:?}: {text}");
        // Written again after the discard: a fresh block.
        let layer = open(&path, true);
        layer
            .write_at(&[9u8; 512], 2 * MIB, &ferry_storage::NoLowerLayers)
            .unwrap();
        let mut b = [0u8; 513];
        layer.read_at(&mut b, 2 * MIB).unwrap();
        assert_eq!(&b[..512], &[9u8; 512][..]);
        assert_eq!(b[512], 0);
    }
}

#[test]
fn vhd_writes_into_qemu_made_images() {
    let src = corpus();
    let dir = scratch("qemu-made");
    for name in ["vpc-dynamic", "vpc-fixed", "vpc-dynamic-force-size"] {
        let path = dir.join(format!("{name}.vhd"));
        std::fs::copy(src.join(format!("{name}.vhd")), &path).unwrap();
        let mut expected = std::fs::read(src.join(format!("expected/{name}.raw"))).unwrap();
        let layer = open(&path, true);
        let size = layer.virtual_size();
        let disk = Disk::from_layers(vec![Box::new(layer)]).unwrap();
        let w = workload(size);
        for (off, d) in &w {
            disk.write_at(d, *off).unwrap();
        }
        apply(&mut expected, &w);
        disk.flush().unwrap();
        drop(disk);
        let disk = Disk::from_layers(vec![Box::new(open(&path, false))]).unwrap();
        assert_same(&disk, &expected, name);
        let raw = dir.join("expected.raw");
        common::write_sparse(&raw, &expected);
        let (ok, text) = qemu_img(&[
            "compare",
            "-f",
            "vpc",
            "-F",
            "raw",
            path.to_str().unwrap(),
            raw.to_str().unwrap(),
        ]);
        assert!(ok, "{name}: {text}");
    }
}

/// Host bytes the file occupies (st_blocks).
fn host_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn vhd_partial_allocating_write_leaves_the_rest_of_the_block_a_hole() {
    let dir = scratch("holes");
    let path = dir.join("d.vhd");
    let layer = VhdFormat
        .create(
            &path,
            &CreateOptions {
                size: 64 * MIB,
                variant: Variant::Dynamic,
                parent: None,
            },
        )
        .unwrap();
    let disk = Disk::from_layers(vec![layer]).unwrap();
    disk.flush().unwrap();
    let before = host_bytes(&path);
    let at = 5 * MIB + 12 * 1024;
    disk.write_at(&[0x5a; 4096], at).unwrap();
    disk.flush().unwrap();
    // A 2 MiB block: its data (4 KiB), bitmap, footer and BAT page, not the whole block.
    let grew = host_bytes(&path) - before;
    assert!(grew <= 64 * 1024, "the file grew by {grew} bytes");
    drop(disk);
    let disk = Disk::from_layers(vec![Box::new(open(&path, false))]).unwrap();
    let mut back = vec![1u8; 2 * MIB as usize];
    disk.read_at(&mut back, 4 * MIB).unwrap();
    let rel = (at - 4 * MIB) as usize;
    assert!(back[..rel].iter().all(|&b| b == 0));
    assert!(back[rel..rel + 4096].iter().all(|&b| b == 0x5a));
    assert!(back[rel + 4096..].iter().all(|&b| b == 0));
    // qemu reads the same disk (it cannot check VHDs).
    let mut expected = vec![0u8; 64 * MIB as usize];
    expected[at as usize..at as usize + 4096].fill(0x5a);
    let raw = dir.join("d.raw");
    common::write_sparse(&raw, &expected);
    let (ok, out) = qemu_img(&[
        "compare",
        "-f",
        "vpc",
        "-F",
        "raw",
        path.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
}
