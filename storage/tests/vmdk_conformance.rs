//! VMDK against the conformance kit: the samples, the generated corpus (chains included),
//! ferry's own writer judged by qemu-img, and crash safety of sparse writes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use ferry_storage::host_file::FailingFile;
use ferry_storage::layer::NoLowerLayers;
use ferry_storage::vmdk::{VmdkFormat, VmdkLayer};
use ferry_storage::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn kit() -> PathBuf {
    common::conformance_dir()
}

fn scratch(name: &str) -> PathBuf {
    let d = root()
        .join("target/tmp/vmdk-tests")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The generated corpus, made once (another test binary may be making it at the same time).
fn corpus() -> PathBuf {
    let dir = root().join("target/conformance-corpus");
    let lock = root().join("target/conformance-corpus.vmdk-lock");
    for _ in 0..600 {
        if dir.join("manifest.json").exists() {
            return dir;
        }
        if std::fs::create_dir(&lock).is_ok() {
            if !dir.join("manifest.json").exists() {
                let tmp = root().join(format!(
                    "target/conformance-corpus.vmdk.{}",
                    std::process::id()
                ));
                let st = Command::new("bash")
                    .arg(kit().join("make-corpus.sh"))
                    .arg(&tmp)
                    .status()
                    .unwrap();
                assert!(st.success(), "make-corpus.sh failed");
                if !dir.join("manifest.json").exists() {
                    let _ = std::fs::rename(&tmp, &dir);
                }
            }
            let _ = std::fs::remove_dir(&lock);
            continue;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    assert!(dir.join("manifest.json").exists(), "no corpus");
    dir
}

fn manifest(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

fn open(path: &Path, writable: bool) -> Box<dyn Layer> {
    VmdkFormat
        .open(path, writable)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn open_chain(dir: &Path, chain: &[Value]) -> Disk {
    let layers: Vec<Box<dyn Layer>> = chain
        .iter()
        .map(|n| open(&dir.join(n.as_str().unwrap()), false))
        .collect();
    Disk::from_layers(layers).unwrap()
}

fn read_file_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = f.read_at(&mut b[done..], off + done as u64).unwrap();
        if n == 0 {
            break;
        }
        done += n;
    }
    b
}

/// Compares the disk with the expected raw file: every chunk a layer holds byte for byte,
/// every other chunk must be a zero chunk in the manifest; plus reads at odd offsets.
fn compare_disk(disk: &Disk, expected: &Path, chunks: &Value, what: &str) {
    let size = disk.size();
    assert_eq!(
        size,
        std::fs::metadata(expected).unwrap().len(),
        "{what}: size"
    );
    let ranges = disk.allocated_ranges().unwrap();
    let mut held = std::collections::BTreeSet::new();
    for (s, l) in &ranges {
        for c in s / MIB..(s + l).div_ceil(MIB) {
            held.insert(c);
        }
    }
    for c in 0..size.div_ceil(MIB) {
        if !held.contains(&c) {
            assert!(
                chunks.get(c.to_string()).is_none(),
                "{what}: chunk {c} has data but no layer holds it"
            );
        }
    }
    for &c in &held {
        let off = c * MIB;
        let n = (size - off).min(MIB) as usize;
        let mut buf = vec![0u8; n];
        disk.read_at(&mut buf, off).unwrap();
        assert!(
            buf == read_file_at(expected, off, n),
            "{what}: chunk {c} differs"
        );
    }
    let odd = [
        (0u64, 1usize),
        (2 * MIB - 1000, 3000),
        (3 * MIB + 8700, 70_000),
        (65_535, 2),
        (size - 513, 513),
    ];
    let big = [(2 * 1024 * MIB - 700, 5000)];
    for &(off, len) in odd.iter().chain(big.iter()) {
        if off + len as u64 > size {
            continue;
        }
        let mut buf = vec![0u8; len];
        disk.read_at(&mut buf, off).unwrap();
        assert!(
            buf == read_file_at(expected, off, len),
            "{what}: read at {off}+{len} differs"
        );
    }
}

#[test]
fn vmdk_samples_read_to_manifest_hashes() {
    let dir = kit().join("samples");
    let m: Value =
        serde_json::from_slice(&std::fs::read(dir.join("samples.json")).unwrap()).unwrap();
    let mut seen = 0;
    for s in m["samples"].as_array().unwrap() {
        let file = s["file"].as_str().unwrap();
        if s["qemu_format"].as_str() != Some("vmdk") {
            continue;
        }
        let path = dir.join(file);
        let head = read_file_at(&path, 0, 4096);
        assert!(VmdkFormat.probe(&path, &head), "{file}: probe");
        if s["qemu_opens"].as_bool() != Some(true) {
            let err = VmdkFormat
                .open(&path, false)
                .err()
                .unwrap_or_else(|| panic!("{file} opened"));
            assert!(matches!(err, StorageError::Corrupt { .. }), "{file}: {err}");
            assert!(err.to_string().contains("afl9.vmdk"), "{err}");
            seen += 1;
            continue;
        }
        let layer = open(&path, false);
        let size = s["virtual_size"].as_u64().unwrap();
        assert_eq!(layer.virtual_size(), size, "{file}");
        let disk = Disk::from_layers(vec![layer]).unwrap();
        let chunks = &s["chunk_sha256"];
        let mut held = std::collections::BTreeSet::new();
        for (st, l) in disk.allocated_ranges().unwrap() {
            for c in st / MIB..(st + l).div_ceil(MIB) {
                held.insert(c);
            }
        }
        for (k, _) in chunks.as_object().unwrap() {
            assert!(
                held.contains(&k.parse::<u64>().unwrap()),
                "{file}: chunk {k} not allocated"
            );
        }
        for c in held {
            let off = c * MIB;
            let mut buf = vec![0u8; (size - off).min(MIB) as usize];
            disk.read_at(&mut buf, off).unwrap();
            let h = format!("{:x}", Sha256::digest(&buf));
            match chunks.get(c.to_string()) {
                Some(want) => assert_eq!(want.as_str().unwrap(), h, "{file}: chunk {c}"),
                None => assert!(
                    buf.iter().all(|&b| b == 0),
                    "{file}: chunk {c} should be zeros"
                ),
            }
        }
        seen += 1;
    }
    assert_eq!(seen, 4);
}

#[test]
fn vmdk_corpus_reads_every_image_and_chain() {
    let dir = corpus();
    let m = manifest(&dir);
    let mut n = 0;
    for img in m["images"].as_array().unwrap() {
        if img["format"].as_str() != Some("vmdk") {
            continue;
        }
        let name = img["name"].as_str().unwrap();
        let chain = img["chain"].as_array().unwrap();
        let top = dir.join(img["file"].as_str().unwrap());
        assert!(
            VmdkFormat.probe(&top, &read_file_at(&top, 0, 4096)),
            "{name}: probe"
        );
        let disk = open_chain(&dir, chain);
        assert_eq!(disk.size(), img["virtual_size"].as_u64().unwrap(), "{name}");
        // The chain links: parentFileNameHint names the next layer, parentCID its CID.
        for w in chain.windows(2) {
            let child = VmdkLayer::open_file(
                Arc::new(LocalFile::open(&dir.join(w[0].as_str().unwrap()), false).unwrap()),
                false,
            )
            .unwrap();
            let parent = VmdkLayer::open_file(
                Arc::new(LocalFile::open(&dir.join(w[1].as_str().unwrap()), false).unwrap()),
                false,
            )
            .unwrap();
            assert_eq!(child.parent_cid(), parent.cid(), "{name}: parentCID");
            let hints = child.parent().unwrap().path_hints;
            assert_eq!(hints, vec![PathBuf::from(w[1].as_str().unwrap())]);
        }
        if chain.len() == 1 {
            assert!(disk.layers()[0].parent().is_none(), "{name}");
        }
        // Every range qemu maps as data in the top file is data in ferry's top layer.
        for e in img["qemu_img_map"].as_array().unwrap() {
            let e = e.as_array().unwrap();
            if e[2].as_str() == Some("data") && e[3].as_u64() == Some(0) {
                let (start, len) = (e[0].as_u64().unwrap(), e[1].as_u64().unwrap());
                let mut off = start;
                while off < start + len {
                    let (a, run) = disk.layers()[0]
                        .block_status(off, start + len - off)
                        .unwrap();
                    assert_eq!(a, Allocation::Data, "{name}: map at {off}");
                    off += run;
                }
            }
        }
        compare_disk(
            &disk,
            &dir.join(img["expected_raw"].as_str().unwrap()),
            &img["chunk_sha256"],
            name,
        );
        n += 1;
    }
    assert_eq!(n, 17);
}

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn check_writer(args: &[&str]) {
    let out = Command::new("bash")
        .arg(kit().join("check-writer.sh"))
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "check-writer {args:?}:\n{text}");
}

/// Applies the manifest's writes of `layer_name` with the bytes of `expected` (the final
/// content: later writes overlap earlier ones only with their own final bytes).
fn apply_writes(disk: &Disk, img: &Value, layer_name: &str, expected: &Path) {
    for w in img["writes"].as_array().unwrap() {
        if w["layer"].as_str() != Some(layer_name) {
            continue;
        }
        let (off, len) = (
            w["offset"].as_u64().unwrap(),
            w["length"].as_u64().unwrap() as usize,
        );
        disk.write_at(&read_file_at(expected, off, len), off)
            .unwrap();
    }
}

fn image<'a>(m: &'a Value, name: &str) -> &'a Value {
    m["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .unwrap()
}

#[test]
fn vmdk_writer_variants_pass_qemu_img() {
    let dir = corpus();
    let m = manifest(&dir);
    let out = scratch("writer");
    for (variant, src, ty) in [
        (Variant::Dynamic, "vmdk-sparse", "monolithicSparse"),
        (Variant::Fixed, "vmdk-flat", "monolithicFlat"),
        (
            Variant::Split2GSparse,
            "vmdk-2gb-sparse",
            "twoGbMaxExtentSparse",
        ),
        (Variant::Split2GFlat, "vmdk-2gb-flat", "twoGbMaxExtentFlat"),
        (Variant::Stream, "vmdk-stream", "streamOptimized"),
    ] {
        let img = image(&m, src);
        let expected = dir.join(img["expected_raw"].as_str().unwrap());
        let path = out.join(format!("{src}.vmdk"));
        let size = img["virtual_size"].as_u64().unwrap();
        let layer = VmdkFormat
            .create(
                &path,
                &CreateOptions {
                    size,
                    variant,
                    parent: None,
                },
            )
            .unwrap();
        assert_eq!(layer.variant(), variant);
        let disk = Disk::from_layers(vec![layer]).unwrap();
        apply_writes(&disk, img, src, &expected);
        disk.flush().unwrap();
        drop(disk);
        let disk = Disk::from_layers(vec![open(&path, false)]).unwrap();
        compare_disk(&disk, &expected, &img["chunk_sha256"], src);
        drop(disk);
        check_writer(&[
            "-f",
            "vmdk",
            "-t",
            ty,
            path.to_str().unwrap(),
            expected.to_str().unwrap(),
        ]);
        // Reopened for writing, a second round of writes (stream: rewritten tail).
        let disk = Disk::from_layers(vec![open(&path, true)]).unwrap();
        apply_writes(&disk, img, src, &expected);
        disk.flush().unwrap();
        drop(disk);
        check_writer(&[
            "-f",
            "vmdk",
            "-t",
            ty,
            path.to_str().unwrap(),
            expected.to_str().unwrap(),
        ]);
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn vmdk_writer_children_over_qemu_chains() {
    let dir = corpus();
    let m = manifest(&dir);
    let out = scratch("children");
    // Copies of the qemu-made bases beside ferry's children.
    for (base_name, child_name, grand_name, child_variant) in [
        (
            "chain-sparse-base",
            "chain-sparse-child",
            Some("chain-sparse-grandchild"),
            Variant::Dynamic,
        ),
        (
            "chain-mixed-base",
            "chain-mixed-child",
            Some("chain-mixed-grandchild"),
            Variant::Stream,
        ),
        (
            "chain-2gb-base",
            "chain-2gb-child",
            None,
            Variant::Split2GSparse,
        ),
    ] {
        let base = image(&m, base_name);
        for f in base["files"].as_array().unwrap() {
            let f = f.as_str().unwrap();
            std::fs::copy(dir.join(f), out.join(f)).unwrap();
        }
        let mut levels = vec![(base_name, out.join(base["file"].as_str().unwrap()))];
        for (name, variant) in [
            (child_name, child_variant),
            (grand_name.unwrap_or(""), Variant::Dynamic),
        ] {
            if name.is_empty() {
                continue;
            }
            let img = image(&m, name);
            let (parent_name, parent_path) = levels.last().unwrap().clone();
            let path = out.join(format!("{name}.vmdk"));
            let size = img["virtual_size"].as_u64().unwrap();
            let child = VmdkFormat
                .create(
                    &path,
                    &CreateOptions {
                        size,
                        variant,
                        parent: Some(CreateParent {
                            path: parent_path.clone(),
                            uuid: None,
                            modification_uuid: None,
                            format: FormatKind::Vmdk,
                        }),
                    },
                )
                .unwrap();
            let hint = child.parent().unwrap().path_hints[0].clone();
            assert_eq!(hint, PathBuf::from(parent_path.file_name().unwrap()));
            let mut layers: Vec<Box<dyn Layer>> = vec![child];
            for (_, p) in levels.iter().rev() {
                layers.push(open(p, false));
            }
            let disk = Disk::from_layers(layers).unwrap();
            let expected = dir.join(img["expected_raw"].as_str().unwrap());
            apply_writes(&disk, img, name, &expected);
            disk.flush().unwrap();
            compare_disk(&disk, &expected, &img["chunk_sha256"], name);
            drop(disk);
            let _ = parent_name;
            check_writer(&[
                "-f",
                "vmdk",
                "-b",
                hint.to_str().unwrap(),
                path.to_str().unwrap(),
                expected.to_str().unwrap(),
            ]);
            levels.push((name, path));
        }
    }
}

/// Grain-sized content of a whole small image.
fn snapshot(path: &Path) -> Vec<u8> {
    let l = open(path, false);
    let mut b = vec![0u8; l.virtual_size() as usize];
    l.read_at(&mut b, 0).unwrap();
    b
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// Clears grain directory entry `idx` in both directories, so a write there must make a new
/// grain table (and update the directory last).
fn drop_gt(path: &Path, idx: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut h = [0u8; 512];
    f.read_exact_at(&mut h, 0).unwrap();
    let rgd = u64::from_le_bytes(h[48..56].try_into().unwrap());
    let gd = u64::from_le_bytes(h[56..64].try_into().unwrap());
    for d in [rgd, gd] {
        f.write_all_at(&[0u8; 4], d * 512 + idx * 4).unwrap();
    }
}

#[test]
fn vmdk_sparse_crash_safety() {
    let out = scratch("crash");
    let size = 64 * MIB;
    let grain = 65536usize;
    let pristine = out.join("pristine.vmdk");
    let l = VmdkFormat
        .create(
            &pristine,
            &CreateOptions {
                size,
                variant: Variant::Dynamic,
                parent: None,
            },
        )
        .unwrap();
    l.write_at(&pattern(1, 3 * grain), 0, &NoLowerLayers)
        .unwrap();
    l.write_at(&pattern(2, grain), 40 * MIB, &NoLowerLayers)
        .unwrap();
    l.flush().unwrap();
    drop(l);
    // Grain table 1 (32..64 MiB) is gone: the workload's write there needs a new table.
    drop_gt(&pristine, 1);
    let _ = std::fs::remove_file(out.join("x"));
    let old = snapshot(&pristine);
    assert!(old[40 * MIB as usize..].iter().all(|&b| b == 0));
    // The workload: overwrite an allocated grain, a partial write into a new grain, a write
    // spanning two new grains, a write needing a new grain table, then flush.
    let workload: Vec<(u64, Vec<u8>)> = vec![
        (1000, pattern(3, 5000)),
        (5 * grain as u64 + 100, pattern(4, 700)),
        (9 * grain as u64 - 512, pattern(5, 4096)),
        (33 * MIB + 4096, pattern(6, 8192)),
    ];
    let mut new = old.clone();
    for (off, b) in &workload {
        new[*off as usize..*off as usize + b.len()].copy_from_slice(b);
    }
    let work = out.join("work.vmdk");
    let mut k = 0;
    loop {
        std::fs::copy(&pristine, &work).unwrap();
        let inner: Arc<dyn HostFile> = Arc::new(LocalFile::open(&work, true).unwrap());
        let failing: Arc<dyn HostFile> = Arc::new(FailingFile::new(inner, k));
        let layer = VmdkLayer::open_file(failing, true).unwrap();
        let mut ok = true;
        for (off, b) in &workload {
            if layer.write_at(b, *off, &NoLowerLayers).is_err() {
                ok = false;
                break;
            }
        }
        if ok && layer.flush().is_err() {
            ok = false;
        }
        drop(layer);
        let got = snapshot(&work);
        for (i, (g, (o, n))) in got
            .chunks(grain)
            .zip(old.chunks(grain).zip(new.chunks(grain)))
            .enumerate()
        {
            assert!(g == o || g == n, "k={k}: grain {i} is neither old nor new");
        }
        let (good, text) = qemu_img(&["check", "-f", "vmdk", work.to_str().unwrap()]);
        assert!(good, "k={k}: qemu-img check:\n{text}");
        if ok {
            assert!(got == new, "k={k}: completed workload reads back wrong");
            assert!(k > 5, "the workload made only {k} writes");
            eprintln!("crash test: {k} failure points checked");
            break;
        }
        k += 1;
        assert!(k < 100);
    }
    let (same, text) = qemu_img(&[
        "compare",
        "-f",
        "vmdk",
        "-F",
        "vmdk",
        work.to_str().unwrap(),
        work.to_str().unwrap(),
    ]);
    assert!(same, "{text}");
}

#[test]
fn vmdk_cid_changes_on_first_write_and_is_written_on_flush() {
    let out = scratch("cid");
    let p = out.join("d.vmdk");
    let l = VmdkLayer::create(
        &p,
        &CreateOptions {
            size: 4 * MIB,
            variant: Variant::Dynamic,
            parent: None,
        },
    )
    .unwrap();
    let c0 = l.cid();
    l.write_at(&[7u8; 512], 0, &NoLowerLayers).unwrap();
    let c1 = l.cid();
    assert_ne!(c0, c1);
    l.write_at(&[8u8; 512], 512, &NoLowerLayers).unwrap();
    assert_eq!(l.cid(), c1);
    l.flush().unwrap();
    drop(l);
    let l = VmdkLayer::open_file(Arc::new(LocalFile::open(&p, false).unwrap()), false).unwrap();
    assert_eq!(l.cid(), c1);
    assert!(l.uuid().is_some());
    let (ok, text) = qemu_img(&["info", "--output=json", p.to_str().unwrap()]);
    assert!(ok && text.contains(&format!("\"cid\": {c1}")), "{text}");
}

#[test]
fn vmdk_new_grains_are_holes_and_runs_span_tables() {
    use std::os::unix::fs::MetadataExt;
    const MIB: u64 = 1 << 20;
    let dir = scratch("holes");
    let path = dir.join("d.vmdk");
    let layer = VmdkFormat
        .create(
            &path,
            &CreateOptions {
                size: 128 * MIB,
                variant: Variant::Dynamic,
                parent: None,
            },
        )
        .unwrap();
    let disk = Disk::from_layers(vec![layer]).unwrap();
    disk.flush().unwrap();
    let blocks = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
    let before = blocks(&path);
    let mut expected = vec![0u8; 128 * MIB as usize];
    // A 4 KiB write inside a 64 KiB grain: the grain is a hole around it.
    let at = 3 * MIB + 20 * 1024;
    disk.write_at(&[0x5a; 4096], at).unwrap();
    expected[at as usize..at as usize + 4096].fill(0x5a);
    disk.flush().unwrap();
    let grew = blocks(&path) - before;
    assert!(grew <= 32 * 1024, "the file grew by {grew} bytes");
    // Unaligned runs of new grains across a grain table boundary (32 MiB), next to
    // allocated ones, and over a table not yet made.
    for (off, len, seed) in [
        (32 * MIB - 100_000, 300_000usize, 1u8),
        (3 * MIB - 70_000, 200_000, 2),
        (96 * MIB + 512, 3 * MIB as usize, 3),
        (127 * MIB, MIB as usize, 4),
    ] {
        let data = pattern(seed, len);
        disk.write_at(&data, off).unwrap();
        expected[off as usize..off as usize + len].copy_from_slice(&data);
    }
    disk.flush().unwrap();
    drop(disk);
    let disk = Disk::from_layers(vec![open(&path, false)]).unwrap();
    let mut back = vec![0u8; expected.len()];
    disk.read_at(&mut back, 0).unwrap();
    assert!(back == expected, "read-back differs");
    let (ok, out) = qemu_img(&["check", path.to_str().unwrap()]);
    assert!(ok, "{out}");
    let raw = dir.join("d.raw");
    common::write_sparse(&raw, &expected);
    let (ok, out) = qemu_img(&[
        "compare",
        "-f",
        "vmdk",
        "-F",
        "raw",
        path.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
}
