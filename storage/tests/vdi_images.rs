//! VDI: reading qemu-made images and samples, writing images qemu-img accepts, differencing
//! chains, and crash safety.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use ferry_storage::host_file::FailingFile;
use ferry_storage::vdi::{VdiFormat, VdiLayer, BLOCK_FREE, BLOCK_ZERO};
use ferry_storage::*;
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn conformance() -> PathBuf {
    common::conformance_dir()
}

/// A fresh scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("vdi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn have_qemu_img() -> bool {
    Command::new("qemu-img").arg("--version").output().is_ok()
}

/// The generated corpus (make-corpus.sh), made once and reused.
fn corpus() -> Option<&'static Path> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = repo().join("target/conformance-corpus");
        if dir.join("manifest.json").exists() {
            return Some(dir);
        }
        if !have_qemu_img() {
            eprintln!("qemu-img missing: skipping the corpus");
            return None;
        }
        let tmp = repo().join(format!(
            "target/conformance-corpus.tmp.{}",
            std::process::id()
        ));
        let ok = Command::new("bash")
            .arg(conformance().join("make-corpus.sh"))
            .arg(&tmp)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "make-corpus.sh failed");
        if !dir.join("manifest.json").exists() {
            let _ = std::fs::rename(&tmp, &dir);
        }
        Some(dir)
    })
    .as_deref()
}

fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn read_all(layer: &dyn Layer) -> Vec<u8> {
    let mut buf = vec![0u8; layer.virtual_size() as usize];
    layer.read_at(&mut buf, 0).unwrap();
    buf
}

/// Compares every 1 MiB chunk with the manifest's hashes (missing index = zeros).
fn check_chunks(name: &str, data: &[u8], chunks: &serde_json::Value) {
    for (i, chunk) in data.chunks(MIB as usize).enumerate() {
        let want = chunks.get(i.to_string()).and_then(|v| v.as_str());
        match want {
            Some(h) => assert_eq!(sha256(chunk), h, "{name}: chunk {i}"),
            None => assert!(
                chunk.iter().all(|&b| b == 0),
                "{name}: chunk {i} should be zeros"
            ),
        }
    }
}

/// Simple deterministic generator for workloads.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}

#[test]
fn vdi_reads_generated_corpus() {
    let Some(dir) = corpus() else { return };
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let mut seen = 0;
    for img in manifest["images"].as_array().unwrap() {
        if img["format"] != "vdi" {
            continue;
        }
        seen += 1;
        let name = img["name"].as_str().unwrap();
        let path = dir.join(img["file"].as_str().unwrap());
        let head = std::fs::read(&path).unwrap();
        assert!(
            VdiFormat.probe(&path, &head[..4096.min(head.len())]),
            "{name}: probe"
        );
        let layer = VdiFormat.open(&path, false).unwrap();
        assert_eq!(
            layer.virtual_size(),
            img["virtual_size"].as_u64().unwrap(),
            "{name}"
        );
        assert!(layer.uuid().is_some() && layer.parent().is_none(), "{name}");
        // Chunk by chunk (the 1 GiB empty image stays out of memory).
        let raw = std::fs::File::open(dir.join(img["expected_raw"].as_str().unwrap())).unwrap();
        let size = layer.virtual_size();
        let mut whole = Sha256::new();
        let mut chunk = vec![0u8; MIB as usize];
        let mut want = vec![0u8; MIB as usize];
        let mut off = 0u64;
        while off < size {
            let n = MIB.min(size - off) as usize;
            layer.read_at(&mut chunk[..n], off).unwrap();
            raw.read_exact_at(&mut want[..n], off).unwrap();
            assert!(
                chunk[..n] == want[..n],
                "{name}: chunk at {off} differs from the expected raw"
            );
            let i = (off / MIB).to_string();
            match img["chunk_sha256"].get(&i).and_then(|v| v.as_str()) {
                Some(h) => assert_eq!(sha256(&chunk[..n]), h, "{name}: chunk {i}"),
                None => assert!(
                    chunk[..n].iter().all(|&b| b == 0),
                    "{name}: chunk {i} should be zeros"
                ),
            }
            if size <= 64 * MIB {
                whole.update(&chunk[..n]);
            }
            off += n as u64;
        }
        if size <= 64 * MIB {
            let h: String = whole
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(h, img["raw_sha256"].as_str().unwrap(), "{name}: whole disk");
        }
        // Odd offsets and lengths across block boundaries against the expected raw.
        let mut rng = Rng(0x5eed ^ seen);
        for _ in 0..50 {
            let off = rng.below(size);
            let len = 1 + rng.below((3 * MIB).min(size - off));
            let mut buf = vec![0u8; len as usize];
            let mut exp = vec![0u8; len as usize];
            layer.read_at(&mut buf, off).unwrap();
            raw.read_exact_at(&mut exp, off).unwrap();
            assert!(buf == exp, "{name} at {off}+{len}");
        }
        // Data qemu maps at depth 0 is reported as Data here.
        for e in img["qemu_img_map"].as_array().unwrap() {
            let (start, len) = (e[0].as_u64().unwrap(), e[1].as_u64().unwrap());
            if e[2] != "data" || e[3] != 0 {
                continue;
            }
            let mut off = start;
            while off < start + len {
                let (state, run) = layer.block_status(off, start + len - off).unwrap();
                assert_eq!(state, Allocation::Data, "{name}: map says data at {off}");
                off += run;
            }
        }
        // Runs are merged: the status walk takes few steps.
        let mut off = 0;
        let mut runs = 0;
        while off < layer.virtual_size() {
            let (_, run) = layer.block_status(off, layer.virtual_size() - off).unwrap();
            assert!(run > 0);
            off += run;
            runs += 1;
        }
        assert!(runs <= layer.virtual_size().div_ceil(MIB), "{name}");
        if name == "vdi-static" {
            assert_eq!(layer.variant(), Variant::Fixed);
        }
        if name == "vdi-empty-1g" {
            assert_eq!(
                layer.block_status(0, 1 << 30).unwrap(),
                (Allocation::Unallocated, 1 << 30)
            );
        }
    }
    assert_eq!(seen, 4, "the corpus has four VDI images");
}

#[test]
fn vdi_reads_dissect_sample() {
    let samples: serde_json::Value =
        serde_json::from_slice(&std::fs::read(conformance().join("samples/samples.json")).unwrap())
            .unwrap();
    let dir = scratch("sample");
    let mut seen = 0;
    for s in samples["samples"].as_array().unwrap() {
        if s["qemu_format"] != "vdi" {
            continue;
        }
        seen += 1;
        let file = s["file"].as_str().unwrap();
        let src = conformance().join("samples").join(file);
        let path = dir.join(Path::new(file.trim_end_matches(".gz")).file_name().unwrap());
        if file.ends_with(".gz") {
            let out = Command::new("gzip").arg("-dc").arg(&src).output().unwrap();
            assert!(out.status.success());
            std::fs::write(&path, out.stdout).unwrap();
        } else {
            std::fs::copy(&src, &path).unwrap();
        }
        let layer = VdiFormat.open(&path, false).unwrap();
        assert_eq!(layer.virtual_size(), s["virtual_size"].as_u64().unwrap());
        let data = read_all(&*layer);
        assert_eq!(sha256(&data), s["raw_sha256"].as_str().unwrap(), "{file}");
        check_chunks(file, &data, &s["chunk_sha256"]);
        // dissect's own check: the first MiB is a hole.
        assert_eq!(
            layer.block_status(0, MIB).unwrap(),
            (Allocation::Unallocated, MIB)
        );
        assert_eq!(
            layer.block_status(MIB, 9 * MIB).unwrap(),
            (Allocation::Data, 9 * MIB)
        );
    }
    assert!(seen >= 1);
}

/// Runs `qemu-img check` + `compare` through the conformance kit.
fn check_writer(image: &Path, raw: &Path) {
    if !have_qemu_img() {
        eprintln!(
            "qemu-img missing: skipping check-writer for {}",
            image.display()
        );
        return;
    }
    let out = Command::new("bash")
        .arg(conformance().join("check-writer.sh"))
        .args(["-f", "vdi"])
        .arg(image)
        .arg(raw)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "check-writer failed for {}:\n{text}",
        image.display()
    );
}

fn qemu_check_passes(image: &Path) -> bool {
    Command::new("qemu-img")
        .args(["check", "-f", "vdi"])
        .arg(image)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn qemu_check(image: &Path) {
    if !have_qemu_img() {
        return;
    }
    let out = Command::new("qemu-img")
        .args(["check", "-f", "vdi"])
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

/// Random writes (partial blocks, across blocks, zeros, the last sector) into `layer` and
/// `model`.
fn workload(layer: &dyn Layer, model: &mut [u8], seed: u64, count: usize) {
    let mut rng = Rng(seed);
    let size = model.len() as u64;
    for i in 0..count {
        let (off, len) = match i % 5 {
            0 => (size - 512, 512),
            1 => {
                // Across a block boundary.
                let b = 1 + rng.below(size / MIB - 1);
                (b * MIB - 1 - rng.below(4000), 1 + rng.below(8000))
            }
            2 => (rng.below(size / MIB) * MIB, MIB), // a whole block
            _ => {
                let off = rng.below(size);
                (off, 1 + rng.below(300_000))
            }
        };
        let len = len.min(size - off);
        let mut buf = vec![0u8; len as usize];
        if i % 7 != 3 {
            rng.fill(&mut buf);
        }
        layer.write_at(&buf, off, &NoLowerLayers).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&buf);
    }
}

#[test]
fn vdi_create_write_and_qemu_accepts() {
    let dir = scratch("create");
    for (variant, size) in [
        (Variant::Dynamic, 20 * MIB + 3 * 512),
        (Variant::Fixed, 9 * MIB),
        (Variant::Dynamic, 64 * MIB),
    ] {
        let path = dir.join(format!("{variant:?}-{size}.vdi"));
        let opts = CreateOptions {
            size,
            variant,
            parent: None,
        };
        let layer = VdiFormat.create(&path, &opts).unwrap();
        assert_eq!(layer.variant(), variant);
        assert_eq!(layer.virtual_size(), size);
        let created_mod = layer.modification_uuid();
        // A new image reads as zeros: fixed is all data, dynamic all unallocated.
        let want = if variant == Variant::Fixed {
            Allocation::Data
        } else {
            Allocation::Unallocated
        };
        assert_eq!(layer.block_status(0, size).unwrap(), (want, size));
        // An empty image already passes.
        let raw_path = dir.join(format!("{variant:?}-{size}.raw"));
        common::write_sparse(&raw_path, &vec![0u8; size as usize]);
        layer.flush().unwrap();
        check_writer(&path, &raw_path);

        let mut model = vec![0u8; size as usize];
        workload(&*layer, &mut model, size ^ 0x1234, 60);
        assert_eq!(read_all(&*layer), model);
        assert_ne!(
            layer.modification_uuid(),
            created_mod,
            "first write changes the modification UUID"
        );
        let new_mod = layer.modification_uuid();
        layer.flush().unwrap();
        drop(layer);
        common::write_sparse(&raw_path, &model);
        check_writer(&path, &raw_path);
        let again = VdiFormat.open(&path, false).unwrap();
        assert_eq!(
            again.modification_uuid(),
            new_mod,
            "the new modification UUID was saved"
        );
        assert_eq!(read_all(&*again), model);
    }
}

#[test]
fn vdi_zero_write_and_discard() {
    let dir = scratch("discard");
    let path = dir.join("d.vdi");
    let size = 8 * MIB;
    let layer = VdiFormat
        .create(
            &path,
            &CreateOptions {
                size,
                variant: Variant::Dynamic,
                parent: None,
            },
        )
        .unwrap();
    // All-zero writes onto nothing allocate nothing.
    layer
        .write_at(&vec![0u8; 3 * MIB as usize], 100, &NoLowerLayers)
        .unwrap();
    assert_eq!(
        layer.block_status(0, size).unwrap(),
        (Allocation::Unallocated, size)
    );
    // A 512-byte write into an empty block: the rest of the block reads as zeros.
    layer
        .write_at(&[7u8; 512], MIB + 512, &NoLowerLayers)
        .unwrap();
    layer
        .write_at(&[8u8; 512], 3 * MIB, &NoLowerLayers)
        .unwrap();
    let mut buf = vec![1u8; 2 * MIB as usize];
    layer.read_at(&mut buf, MIB).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 0));
    assert!(buf[512..1024].iter().all(|&b| b == 7));
    assert!(buf[1024..].iter().all(|&b| b == 0));
    assert_eq!(
        layer.block_status(0, size).unwrap(),
        (Allocation::Unallocated, MIB)
    );
    assert_eq!(
        layer.block_status(MIB, size - MIB).unwrap(),
        (Allocation::Data, MIB)
    );
    let vdi = path.clone();
    let len_before = std::fs::metadata(&vdi).unwrap().len();
    // Discarding the first-allocated block (not the last slot): stays mapped, reads zeros.
    layer.discard(MIB, MIB).unwrap();
    layer.read_at(&mut buf[..MIB as usize], MIB).unwrap();
    assert!(buf[..MIB as usize].iter().all(|&b| b == 0));
    // Discarding the last slot unmaps it and shrinks the file; partial ranges do nothing.
    layer.discard(3 * MIB + 512, MIB).unwrap();
    assert_eq!(
        layer.block_status(3 * MIB, MIB).unwrap().0,
        Allocation::Data
    );
    layer.discard(3 * MIB, MIB).unwrap();
    assert_eq!(
        layer.block_status(3 * MIB, 5 * MIB).unwrap(),
        (Allocation::Unallocated, 5 * MIB)
    );
    assert_eq!(std::fs::metadata(&vdi).unwrap().len(), len_before - MIB);
    // Reuse after discard.
    layer.write_at(&[9u8; 10], 6 * MIB, &NoLowerLayers).unwrap();
    layer.flush().unwrap();
    drop(layer);
    let mut model = vec![0u8; size as usize];
    model[6 * MIB as usize..6 * MIB as usize + 10].fill(9);
    let raw = dir.join("d.raw");
    common::write_sparse(&raw, &model);
    check_writer(&vdi, &raw);
    // Read-only layers refuse writes and discards.
    let ro = VdiFormat.open(&vdi, false).unwrap();
    assert!(matches!(
        ro.write_at(&[1], 0, &NoLowerLayers),
        Err(StorageError::ReadOnly { .. })
    ));
    assert!(ro.discard(0, MIB).is_err());
    assert!(
        ro.read_at(&mut [0u8; 2], size - 1).is_err(),
        "read past the end"
    );
}

#[test]
fn vdi_differencing_chain() {
    let dir = scratch("diff");
    let size = 8 * MIB + 4096;
    let base_path = dir.join("base.vdi");
    let child_path = dir.join("child.vdi");
    let mut model = vec![0u8; size as usize];
    {
        let base = VdiFormat
            .create(
                &base_path,
                &CreateOptions {
                    size,
                    variant: Variant::Dynamic,
                    parent: None,
                },
            )
            .unwrap();
        let mut rng = Rng(99);
        // Base data in blocks 0..=4.
        let mut buf = vec![0u8; 5 * MIB as usize];
        rng.fill(&mut buf);
        base.write_at(&buf, 0, &NoLowerLayers).unwrap();
        model[..buf.len()].copy_from_slice(&buf);
        base.flush().unwrap();
    }
    // qemu-img judges the base (it cannot open differencing VDIs).
    let base_raw = dir.join("base.raw");
    common::write_sparse(&base_raw, &model);
    check_writer(&base_path, &base_raw);
    let base = VdiFormat.open(&base_path, false).unwrap();
    let base_uuid = base.uuid().unwrap();
    let base_mod = base.modification_uuid().unwrap();
    let child = VdiFormat
        .create(
            &child_path,
            &CreateOptions {
                size,
                variant: Variant::Dynamic,
                parent: Some(CreateParent {
                    path: base_path.clone(),
                    uuid: Some(base_uuid),
                    modification_uuid: Some(base_mod),
                    format: FormatKind::Vdi,
                }),
            },
        )
        .unwrap();
    let pref = child.parent().unwrap();
    assert_eq!(pref.uuid, Some(base_uuid));
    assert_eq!(pref.modification_uuid, Some(base_mod));
    assert_ne!(child.uuid(), Some(base_uuid));
    let disk = Disk::from_layers(vec![child, base]).unwrap();
    let mut all = vec![0u8; size as usize];
    disk.read_at(&mut all, 0).unwrap();
    assert_eq!(all, model, "an empty child reads its parent");

    let mut rng = Rng(7);
    let write = |disk: &Disk, model: &mut Vec<u8>, off: u64, data: Vec<u8>| {
        disk.write_at(&data, off).unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    };
    // Partial write over parent data: the rest of the block comes from the parent.
    let mut b = vec![0u8; 1000];
    rng.fill(&mut b);
    write(&disk, &mut model, MIB + 5000, b);
    // Zeros over a whole parent block: a zero block, no data.
    write(&disk, &mut model, 2 * MIB, vec![0u8; MIB as usize]);
    // Partial zeros over parent data.
    write(&disk, &mut model, 3 * MIB + 100, vec![0u8; 300]);
    // Where the parent has a hole, across a block boundary, and the last sector.
    let mut b = vec![0u8; 20000];
    rng.fill(&mut b);
    write(&disk, &mut model, 6 * MIB - 10000, b);
    let mut b = vec![0u8; 512];
    rng.fill(&mut b);
    write(&disk, &mut model, size - 512, b);
    disk.read_at(&mut all, 0).unwrap();
    assert_eq!(all, model);
    let top = &disk.layers()[0];
    assert_eq!(
        top.block_status(2 * MIB, MIB).unwrap(),
        (Allocation::Zero, MIB)
    );
    assert_eq!(
        top.block_status(0, MIB).unwrap(),
        (Allocation::Unallocated, MIB)
    );
    assert_eq!(top.block_status(MIB, MIB).unwrap(), (Allocation::Data, MIB));
    let child_mod = top.modification_uuid();
    disk.flush().unwrap();
    drop(disk);

    // Reopened from the files: same content, the parent link kept, the base untouched.
    let child = VdiFormat.open(&child_path, false).unwrap();
    assert_eq!(child.parent().unwrap().uuid, Some(base_uuid));
    assert_eq!(child.modification_uuid(), child_mod);
    let base = VdiFormat.open(&base_path, false).unwrap();
    assert_eq!(base.modification_uuid(), Some(base_mod));
    let raw = std::fs::read(dir.join("child.vdi")).unwrap();
    assert_eq!(
        u32::from_le_bytes(raw[0x4c..0x50].try_into().unwrap()),
        4,
        "type diff"
    );
    let disk = Disk::from_layers(vec![child, base]).unwrap();
    disk.read_at(&mut all, 0).unwrap();
    assert_eq!(all, model);
    assert!(disk
        .allocated_ranges()
        .unwrap()
        .iter()
        .any(|&(s, _)| s == 0));
}

/// For every k, the k-th host write fails; the image must still open, pass qemu-img check
/// after a writable open, and every block must read as before or after the workload.
#[test]
fn vdi_crash_safety() {
    let dir = scratch("crash");
    let size = 6 * MIB;
    let pristine = dir.join("pristine.vdi");
    let mut old = vec![0u8; size as usize];
    {
        let l = VdiFormat
            .create(
                &pristine,
                &CreateOptions {
                    size,
                    variant: Variant::Dynamic,
                    parent: None,
                },
            )
            .unwrap();
        let mut b = vec![0u8; 3 * MIB as usize];
        Rng(3).fill(&mut b);
        l.write_at(&b, MIB, &NoLowerLayers).unwrap();
        old[MIB as usize..4 * MIB as usize].copy_from_slice(&b);
        l.flush().unwrap();
    }
    // Each write touches its own blocks, so a block holds its old or its new content.
    let ops: Vec<(u64, Vec<u8>)> = {
        let mut rng = Rng(11);
        let mut mk = |off: u64, len: usize| {
            let mut b = vec![0u8; len];
            rng.fill(&mut b);
            (off, b)
        };
        vec![
            mk(4096, 512),             // new block 0, partial
            mk(MIB + 777, 4000),       // allocated block 1
            mk(3 * MIB - 100, 200),    // across allocated blocks 2 and 3
            mk(4 * MIB + 10, 3 * 512), // new block 4
            mk(6 * MIB - 512, 512),    // new block 5, the last sector
        ]
    };
    let mut new = old.clone();
    for (off, b) in &ops {
        new[*off as usize..*off as usize + b.len()].copy_from_slice(b);
    }
    let mut completed = false;
    let mut repaired = 0;
    for k in 0..200 {
        let path = dir.join(format!("k{k}.vdi"));
        std::fs::copy(&pristine, &path).unwrap();
        let file: Arc<dyn HostFile> = Arc::new(LocalFile::open(&path, true).unwrap());
        let failing: Arc<dyn HostFile> = Arc::new(FailingFile::new(file, k));
        let mut failed = false;
        match VdiLayer::new(failing, true) {
            Err(_) => failed = true,
            Ok(layer) => {
                for (off, b) in &ops {
                    if layer.write_at(b, *off, &NoLowerLayers).is_err() {
                        failed = true;
                        break;
                    }
                }
                if !failed && layer.flush().is_err() {
                    failed = true;
                }
            }
        }
        // Opens read-only as it was left.
        let ro = VdiFormat
            .open(&path, false)
            .unwrap_or_else(|e| panic!("k={k}: {e}"));
        let got = read_all(&*ro);
        drop(ro);
        for blk in 0..(size / MIB) as usize {
            let r = blk * MIB as usize..(blk + 1) * MIB as usize;
            assert!(
                got[r.clone()] == old[r.clone()] || got[r.clone()] == new[r.clone()],
                "k={k}: block {blk} is neither old nor new"
            );
        }
        // A crash between a map entry and the header leaves the count one short, which
        // qemu-img check calls corruption; a writable open repairs it, then qemu-img agrees.
        if have_qemu_img() && !qemu_check_passes(&path) {
            repaired += 1;
        }
        drop(
            VdiFormat
                .open(&path, true)
                .unwrap_or_else(|e| panic!("k={k}: {e}")),
        );
        qemu_check(&path);
        let _ = std::fs::remove_file(&path);
        if !failed {
            assert_eq!(got, new, "k={k}: the whole workload ran");
            // 3 new blocks x (data, map, header) + 3 writes into allocated blocks.
            assert!(k >= 12, "k={k}: fewer host writes than expected");
            completed = true;
            break;
        }
    }
    assert!(completed, "the workload never completed");
    if have_qemu_img() {
        assert!(
            repaired > 0,
            "no crash point left the header behind the map"
        );
    }
}

#[test]
fn vdi_block_map_entries_as_written() {
    let dir = scratch("map");
    let path = dir.join("m.vdi");
    let layer = VdiLayer::new(
        Arc::new(
            LocalFile::open(
                &{
                    drop(
                        VdiFormat
                            .create(
                                &path,
                                &CreateOptions {
                                    size: 4 * MIB,
                                    variant: Variant::Dynamic,
                                    parent: None,
                                },
                            )
                            .unwrap(),
                    );
                    path.clone()
                },
                true,
            )
            .unwrap(),
        ),
        true,
    )
    .unwrap();
    layer.write_at(&[1], 3 * MIB, &NoLowerLayers).unwrap();
    layer.write_at(&[1], 0, &NoLowerLayers).unwrap();
    // Blocks are appended in the order they are first written.
    assert_eq!(layer.block_map(), vec![1, BLOCK_FREE, BLOCK_FREE, 0]);
    assert_ne!(BLOCK_ZERO, BLOCK_FREE);
    drop(layer);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..40], b"<<< Oracle VM VirtualBox Disk Image >>>\n");
    assert_eq!(
        u32::from_le_bytes(bytes[0x184..0x188].try_into().unwrap()),
        2,
        "allocated count"
    );
    assert_eq!(
        u32::from_le_bytes(bytes[0x154..0x158].try_into().unwrap()),
        MIB as u32,
        "map offset"
    );
    assert_eq!(
        u32::from_le_bytes(bytes[0x158..0x15c].try_into().unwrap()),
        2 * MIB as u32,
        "data offset"
    );
    assert_eq!(
        bytes.len() as u64,
        4 * MIB,
        "two data blocks after 2 MiB of header and map"
    );
    // UUIDs are stored in GUID (little-endian) layout.
    let l = VdiFormat.open(&path, false).unwrap();
    let mut u = [0u8; 16];
    u.copy_from_slice(&bytes[0x188..0x198]);
    assert_eq!(l.uuid(), Some(Uuid::from_bytes_le(u)));
}

/// Crash points while discarding the last block, and while writing a differencing child
/// through a `Disk` (qemu-img cannot open differencing VDIs, so ferry judges those).
#[test]
fn vdi_crash_safety_discard_and_child() {
    let dir = scratch("crash2");
    let size = 4 * MIB;
    // Discard of the last slot: map entry, sync, header, shrink.
    let pristine = dir.join("pristine.vdi");
    let mut old = vec![0u8; size as usize];
    {
        let l = VdiFormat
            .create(
                &pristine,
                &CreateOptions {
                    size,
                    variant: Variant::Dynamic,
                    parent: None,
                },
            )
            .unwrap();
        let mut b = vec![0u8; 2 * MIB as usize];
        Rng(5).fill(&mut b);
        l.write_at(&b, MIB, &NoLowerLayers).unwrap();
        old[MIB as usize..3 * MIB as usize].copy_from_slice(&b);
        l.flush().unwrap();
    }
    let mut new = old.clone();
    new[2 * MIB as usize..3 * MIB as usize].fill(0);
    let mut done = false;
    for k in 0..20 {
        let path = dir.join(format!("d{k}.vdi"));
        std::fs::copy(&pristine, &path).unwrap();
        let file: Arc<dyn HostFile> = Arc::new(LocalFile::open(&path, true).unwrap());
        let layer = VdiLayer::new(Arc::new(FailingFile::new(file, k)), true).unwrap();
        let ok = layer.discard(2 * MIB, MIB).is_ok() && layer.flush().is_ok();
        drop(layer);
        let got = read_all(&*VdiFormat.open(&path, false).unwrap());
        for blk in 0..4usize {
            let r = blk * MIB as usize..(blk + 1) * MIB as usize;
            assert!(
                got[r.clone()] == old[r.clone()] || got[r.clone()] == new[r.clone()],
                "k={k} block {blk}"
            );
        }
        drop(VdiFormat.open(&path, true).unwrap());
        qemu_check(&path);
        if ok {
            assert_eq!(got, new);
            assert_eq!(
                std::fs::metadata(&path).unwrap().len(),
                3 * MIB,
                "k={k}: shrunk by a block"
            );
            done = true;
            break;
        }
    }
    assert!(done);

    // A differencing child over `pristine`.
    let base_path = pristine;
    let base_uuid = VdiFormat.open(&base_path, false).unwrap().uuid();
    let child_pristine = dir.join("child.vdi");
    drop(
        VdiFormat
            .create(
                &child_pristine,
                &CreateOptions {
                    size,
                    variant: Variant::Dynamic,
                    parent: Some(CreateParent {
                        path: base_path.clone(),
                        uuid: base_uuid,
                        modification_uuid: None,
                        format: FormatKind::Vdi,
                    }),
                },
            )
            .unwrap(),
    );
    let ops: Vec<(u64, Vec<u8>)> = vec![
        (MIB + 300, vec![0xAB; 700]),       // partial over parent data
        (2 * MIB, vec![0u8; MIB as usize]), // whole zero block over parent data
        (10, vec![0xCD; 20]),               // where the parent has a hole
        (size - 512, vec![0xEF; 512]),      // the last sector
    ];
    let mut new = old.clone();
    for (off, b) in &ops {
        new[*off as usize..*off as usize + b.len()].copy_from_slice(b);
    }
    let mut done = false;
    for k in 0..40 {
        let path = dir.join(format!("c{k}.vdi"));
        std::fs::copy(&child_pristine, &path).unwrap();
        let file: Arc<dyn HostFile> = Arc::new(LocalFile::open(&path, true).unwrap());
        let child = VdiLayer::new(Arc::new(FailingFile::new(file, k)), true).unwrap();
        let base = VdiFormat.open(&base_path, false).unwrap();
        let disk = Disk::from_layers(vec![Box::new(child), base]).unwrap();
        let mut ok = true;
        for (off, b) in &ops {
            if disk.write_at(b, *off).is_err() {
                ok = false;
                break;
            }
        }
        ok = ok && disk.flush().is_ok();
        drop(disk);
        let child = VdiFormat
            .open(&path, true)
            .unwrap_or_else(|e| panic!("k={k}: {e}"));
        assert_eq!(child.parent().unwrap().uuid, base_uuid);
        let disk =
            Disk::from_layers(vec![child, VdiFormat.open(&base_path, false).unwrap()]).unwrap();
        let mut got = vec![0u8; size as usize];
        disk.read_at(&mut got, 0).unwrap();
        for blk in 0..4usize {
            let r = blk * MIB as usize..(blk + 1) * MIB as usize;
            assert!(
                got[r.clone()] == old[r.clone()] || got[r.clone()] == new[r.clone()],
                "k={k} block {blk}"
            );
        }
        if ok {
            assert_eq!(got, new);
            done = true;
            break;
        }
    }
    assert!(done);
}

#[test]
fn vdi_modification_uuid_changes_once_per_open() {
    let dir = scratch("moduuid");
    let path = dir.join("m.vdi");
    drop(
        VdiFormat
            .create(
                &path,
                &CreateOptions {
                    size: 2 * MIB,
                    variant: Variant::Dynamic,
                    parent: None,
                },
            )
            .unwrap(),
    );
    let l = VdiFormat.open(&path, true).unwrap();
    let at_open = l.modification_uuid();
    let mut b = [0u8; 4];
    l.read_at(&mut b, 0).unwrap();
    assert_eq!(l.modification_uuid(), at_open, "reads change nothing");
    l.write_at(&[1, 2, 3], 0, &NoLowerLayers).unwrap();
    let first = l.modification_uuid();
    assert_ne!(first, at_open);
    l.write_at(&[4], 5, &NoLowerLayers).unwrap(); // into the allocated block: no header write
    assert_eq!(l.modification_uuid(), first, "once per open");
    drop(l); // close writes the header
    assert_eq!(
        VdiFormat.open(&path, false).unwrap().modification_uuid(),
        first
    );
    // An open without writes leaves it alone.
    drop(VdiFormat.open(&path, true).unwrap());
    assert_eq!(
        VdiFormat.open(&path, false).unwrap().modification_uuid(),
        first
    );
    // A write into an allocated block changes it in memory; close writes it to the header.
    let l = VdiFormat.open(&path, true).unwrap();
    l.write_at(&[9], 100, &NoLowerLayers).unwrap();
    let second = l.modification_uuid();
    assert_ne!(second, first);
    let on_disk = VdiFormat.open(&path, false).unwrap().modification_uuid();
    assert_eq!(on_disk, first, "not yet written");
    drop(l);
    assert_eq!(
        VdiFormat.open(&path, false).unwrap().modification_uuid(),
        second
    );
}

/// A lower layer of one byte value, to see copy-on-write fill the rest of a new block.
struct Fill(u8);
impl LowerLayers for Fill {
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> Result<()> {
        buf.fill(self.0);
        Ok(())
    }
}

#[test]
fn vdi_partial_writes_allocate_sparse_blocks() {
    use std::os::unix::fs::MetadataExt;
    let dir = scratch("sparse");
    let path = dir.join("a.vdi");
    let size = 32 * MIB;
    let opts = CreateOptions {
        size,
        variant: Variant::Dynamic,
        parent: None,
    };
    let layer = VdiFormat.create(&path, &opts).unwrap();
    let mut model = vec![0u8; size as usize];
    for b in 0..16u64 {
        let o = b * 2 * MIB + 4096 * (b + 1);
        let w: Vec<u8> = (0..4096u64).map(|i| (i * 7 + b) as u8 | 1).collect();
        layer.write_at(&w, o, &NoLowerLayers).unwrap();
        model[o as usize..o as usize + w.len()].copy_from_slice(&w);
    }
    assert_eq!(read_all(&*layer), model);
    layer.flush().unwrap();
    drop(layer);
    // Only the guest's bytes take space, not 16 zero-filled blocks.
    let used = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(used < 4 * MIB, "{used} bytes");
    assert!(std::fs::metadata(&path).unwrap().len() >= 16 * MIB);
    qemu_check(&path);
    let raw_path = dir.join("a.raw");
    common::write_sparse(&raw_path, &model);
    check_writer(&path, &raw_path);
    // Copy-on-write from a non-zero lower still fills the rest of a fresh block.
    let layer = VdiFormat.open(&path, true).unwrap();
    layer.write_at(&[1u8; 10], MIB + 5, &Fill(9)).unwrap();
    let mut b = vec![0u8; MIB as usize];
    layer.read_at(&mut b, MIB).unwrap();
    assert!(b[..5].iter().all(|&x| x == 9) && b[5..15].iter().all(|&x| x == 1));
    assert!(b[15..].iter().all(|&x| x == 9));
}

// Block sizes other than 1 MiB, and extra bytes before each block. VirtualBox takes the block
// size from the header (`AllocationBlockSize` at creation); qemu opens only 1 MiB blocks, so
// for the others an independent decoder below is the referee.

/// Writes an empty dynamic (or, with `diff_of`, differencing) VDI by hand: `block` bytes per
/// block with `extra` bytes in front of each, the map at 0x200 and the data area right after
/// it on a sector boundary (as VirtualBox before 4.x laid images out).
fn hand_vdi(path: &Path, size: u64, block: u32, extra: u32, diff_of: Option<Uuid>) {
    let blocks = size.div_ceil(u64::from(block)) as u32;
    let off_blocks = 0x200u32;
    let off_data = (off_blocks + blocks * 4).next_multiple_of(512);
    let mut h = vec![0u8; off_data as usize];
    let put = |h: &mut Vec<u8>, at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_le_bytes());
    h[..40].copy_from_slice(b"<<< Oracle VM VirtualBox Disk Image >>>\n");
    put(&mut h, 0x40, 0xBEDA_107F);
    put(&mut h, 0x44, 0x0001_0001);
    put(&mut h, 0x48, 0x190);
    put(&mut h, 0x4C, if diff_of.is_some() { 4 } else { 1 });
    put(&mut h, 0x154, off_blocks);
    put(&mut h, 0x158, off_data);
    put(&mut h, 0x15C + 12, 512);
    h[0x170..0x178].copy_from_slice(&size.to_le_bytes());
    put(&mut h, 0x178, block);
    put(&mut h, 0x17C, extra);
    put(&mut h, 0x180, blocks);
    put(&mut h, 0x184, 0);
    h[0x188..0x198].copy_from_slice(&Uuid::new_v4().to_bytes_le());
    h[0x198..0x1A8].copy_from_slice(&Uuid::new_v4().to_bytes_le());
    if let Some(p) = diff_of {
        h[0x1A8..0x1B8].copy_from_slice(&p.to_bytes_le());
    }
    put(&mut h, 0x1C8 + 12, 512);
    for i in 0..blocks as usize {
        put(&mut h, off_blocks as usize + i * 4, BLOCK_FREE);
    }
    std::fs::write(path, &h).unwrap();
}

/// Reads a VDI without ferry, from the layout VirtualBox documents in VDICore.h: block `i`'s
/// data lies at offData + map[i] * (cbBlockExtra + cbBlock) + cbBlockExtra. Returns the disk's
/// bytes and the map.
fn decode_vdi(bytes: &[u8]) -> (Vec<u8>, Vec<u32>) {
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    let size = u64::from_le_bytes(bytes[0x170..0x178].try_into().unwrap()) as usize;
    let (off_blocks, off_data) = (u32_at(0x154) as usize, u32_at(0x158) as usize);
    let (block, extra, blocks) = (
        u32_at(0x178) as usize,
        u32_at(0x17C) as usize,
        u32_at(0x180) as usize,
    );
    let map: Vec<u32> = (0..blocks).map(|i| u32_at(off_blocks + i * 4)).collect();
    let allocated = map.iter().filter(|&&e| e < BLOCK_ZERO).count() as u32;
    assert_eq!(u32_at(0x184), allocated, "header's allocated count");
    let mut out = vec![0u8; size];
    for (i, &e) in map.iter().enumerate() {
        if e >= BLOCK_ZERO {
            continue;
        }
        let at = off_data + e as usize * (extra + block) + extra;
        let n = block.min(size - i * block);
        // A block the file does not reach yet (a hole at its end) reads as zeros.
        let have = bytes.len().saturating_sub(at).min(n);
        out[i * block..i * block + have].copy_from_slice(&bytes[at..at + have]);
    }
    (out, map)
}

/// Random writes sized to the block: inside a block, across block boundaries, whole blocks,
/// zeros, and the last sector.
fn block_workload(layer: &dyn Layer, model: &mut [u8], bs: u64, seed: u64, count: usize) {
    let mut rng = Rng(seed);
    let size = model.len() as u64;
    let blocks = size.div_ceil(bs);
    for i in 0..count {
        let (off, len) = match i % 6 {
            0 => (size - 512, 512),
            1 if blocks > 1 => {
                let b = 1 + rng.below(blocks - 1);
                (b * bs - 1 - rng.below(bs.min(4000)), 1 + rng.below(2 * bs))
            }
            2 => (rng.below(blocks) * bs, bs),
            3 => (rng.below(size), 1 + rng.below(3 * bs)),
            _ => (rng.below(size), 1 + rng.below(bs.min(20_000))),
        };
        let len = len.min(size - off);
        let mut buf = vec![0u8; len as usize];
        if i % 7 != 4 {
            rng.fill(&mut buf);
        }
        layer.write_at(&buf, off, &NoLowerLayers).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&buf);
    }
}

/// Ranges of the map's allocated blocks, merged (what `allocated_ranges` must say).
fn map_ranges(map: &[u32], bs: u64, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, &e) in map.iter().enumerate() {
        if e >= BLOCK_ZERO {
            continue;
        }
        let (s, n) = (i as u64 * bs, bs.min(size - i as u64 * bs));
        match out.last_mut() {
            Some((ls, ll)) if *ls + *ll == s => *ll += n,
            _ => out.push((s, n)),
        }
    }
    out
}

#[test]
fn vdi_block_sizes_from_the_header() {
    let dir = scratch("blocksize");
    // (block, extra): 512 bytes (the smallest), 64 KiB, 1 MiB (qemu-img referees), 4 MiB
    // (the disk's size not a multiple of it), and extra bytes before each block.
    for (block, extra) in [
        (512u32, 0u32),
        (64 << 10, 0),
        (1 << 20, 0),
        (4 << 20, 0),
        (64 << 10, 4096),
        (4 << 20, 512),
    ] {
        let bs = u64::from(block);
        let size = 13 * MIB + 3 * 512;
        let name = format!("b{block}-x{extra}");
        let path = dir.join(format!("{name}.vdi"));
        hand_vdi(&path, size, block, extra, None);
        let layer = VdiFormat.open(&path, true).unwrap();
        assert_eq!(layer.virtual_size(), size, "{name}");
        let mut model = vec![0u8; size as usize];
        block_workload(&*layer, &mut model, bs, u64::from(block) ^ 77, 80);
        assert_eq!(read_all(&*layer), model, "{name}: read back");
        // The allocated-ranges query follows the map, block by block.
        layer.flush().unwrap();
        let (on_disk, map) = decode_vdi(&std::fs::read(&path).unwrap());
        assert_eq!(on_disk, model, "{name}: decoded without ferry");
        let disk = Disk::from_layers(vec![layer]).unwrap();
        let want = map_ranges(&map, bs, size);
        assert!(!want.is_empty());
        assert_eq!(disk.allocated_ranges().unwrap(), want, "{name}: ranges");
        let layer = disk.into_layers().remove(0);
        for (i, &e) in map.iter().enumerate() {
            let off = i as u64 * bs;
            let (state, n) = layer.block_status(off, bs.min(size - off)).unwrap();
            let expect = if e < BLOCK_ZERO {
                Allocation::Data
            } else {
                Allocation::Unallocated
            };
            assert_eq!(
                (state, n),
                (expect, bs.min(size - off)),
                "{name}: block {i}"
            );
        }
        // Slots are dense: the file ends right after the last block.
        let slots = map.iter().filter(|&&e| e < BLOCK_ZERO).count() as u64;
        let off_data = (0x200 + map.len() as u64 * 4).next_multiple_of(512);
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(len, off_data + slots * (bs + u64::from(extra)), "{name}");

        // Discard: a whole block that is not the last slot reads as zeros and keeps its slot;
        // the last slot is unmapped and the file shrinks by one block and its extra bytes; a
        // range covering no whole block changes nothing.
        let last_slot = slots as u32 - 1;
        let last = map.iter().position(|&e| e == last_slot).unwrap() as u64;
        let other = map
            .iter()
            .position(|&e| e < last_slot)
            .map(|i| i as u64)
            .unwrap();
        let block_len = |i: u64| bs.min(size - i * bs);
        layer.discard(other * bs + 1, block_len(other)).unwrap();
        let mut b = vec![0u8; block_len(other) as usize];
        layer.read_at(&mut b, other * bs).unwrap();
        assert_eq!(
            b,
            model[(other * bs) as usize..(other * bs + block_len(other)) as usize],
            "{name}: a partial discard keeps the data"
        );
        layer.discard(other * bs, block_len(other)).unwrap();
        model[(other * bs) as usize..(other * bs + block_len(other)) as usize].fill(0);
        layer.discard(last * bs, block_len(last)).unwrap();
        model[(last * bs) as usize..(last * bs + block_len(last)) as usize].fill(0);
        assert_eq!(
            layer.block_status(last * bs, block_len(last)).unwrap(),
            (Allocation::Unallocated, block_len(last)),
            "{name}"
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            len - bs - u64::from(extra),
            "{name}: discarding the last slot shrinks the file"
        );
        assert_eq!(read_all(&*layer), model, "{name}: after discard");
        // The freed slot is taken again by the next new block.
        let at = last * bs + block_len(last) - 300;
        layer.write_at(&[0xA5; 300], at, &NoLowerLayers).unwrap();
        model[at as usize..(at + 300) as usize].fill(0xA5);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len, "{name}");
        layer.flush().unwrap();
        drop(layer);

        // Reopened: the same bytes, through ferry and through the independent decoder.
        let again = VdiFormat.open(&path, false).unwrap();
        assert_eq!(read_all(&*again), model, "{name}: reopened");
        let (on_disk, _) = decode_vdi(&std::fs::read(&path).unwrap());
        assert_eq!(on_disk, model, "{name}: decoded after reopen");
        let raw = dir.join(format!("{name}.raw"));
        common::write_sparse(&raw, &model);
        if block == 1 << 20 && extra == 0 {
            check_writer(&path, &raw);
        } else if have_qemu_img() && extra == 0 {
            // qemu's vdi driver opens 1 MiB blocks only (block/vdi.c, whatever the build).
            let out = Command::new("qemu-img")
                .args(["info", "-f", "vdi"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(!out.status.success(), "{name}: qemu-img now opens it");
            let text = String::from_utf8_lossy(&out.stderr);
            assert!(text.contains("block size"), "{name}: {text}");
        }
    }
}

/// Copy-on-write and zero blocks in a differencing image with small and large blocks: a new
/// block takes the rest of its bytes from the parent, exactly one block's worth.
#[test]
fn vdi_differencing_with_other_block_sizes() {
    let dir = scratch("diffblock");
    for block in [64u32 << 10, 4 << 20] {
        let bs = u64::from(block);
        let size = 13 * MIB;
        let path = dir.join(format!("child-{block}.vdi"));
        hand_vdi(&path, size, block, 0, Some(Uuid::new_v4()));
        let layer = VdiFormat.open(&path, true).unwrap();
        assert!(layer.parent().is_some());
        // 10 bytes inside block 1: the rest of block 1 is the parent's (9s), nothing else.
        layer.write_at(&[1u8; 10], bs + 5, &Fill(9)).unwrap();
        let mut b = vec![0u8; 3 * bs as usize];
        layer.read_at(&mut b, 0).unwrap();
        let bsu = bs as usize;
        assert!(b[..bsu].iter().all(|&x| x == 0), "block 0 untouched");
        assert!(b[bsu..bsu + 5].iter().all(|&x| x == 9));
        assert!(b[bsu + 5..bsu + 15].iter().all(|&x| x == 1));
        assert!(b[bsu + 15..2 * bsu].iter().all(|&x| x == 9));
        assert!(b[2 * bsu..].iter().all(|&x| x == 0), "block 2 untouched");
        assert_eq!(
            layer.block_status(0, 3 * bs).unwrap(),
            (Allocation::Unallocated, bs)
        );
        assert_eq!(
            layer.block_status(bs, 2 * bs).unwrap(),
            (Allocation::Data, bs)
        );
        // Zeros over a whole block hide the parent without taking space.
        layer.write_at(&vec![0u8; bsu], 2 * bs, &Fill(9)).unwrap();
        assert_eq!(
            layer.block_status(2 * bs, bs).unwrap(),
            (Allocation::Zero, bs)
        );
        drop(layer);
        let bytes = std::fs::read(&path).unwrap();
        let (_, map) = decode_vdi(&bytes);
        assert_eq!(&map[..3], &[BLOCK_FREE, 0, BLOCK_ZERO]);
        let off_data = (0x200 + map.len() as u64 * 4).next_multiple_of(512);
        assert_eq!(bytes.len() as u64, off_data + bs, "one block allocated");
    }
}
