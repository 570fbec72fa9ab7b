//! Parallels: the public samples and the generated corpus read to their manifests, and what
//! ferry writes passes `qemu-img check`/`compare`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use ferry_storage::host_file::{HostFile, LocalFile};
use ferry_storage::layer::{Allocation, CreateOptions, ImageFormat, Layer, NoLowerLayers, Variant};
use ferry_storage::parallels::{Bundle, ParallelsFormat, ParallelsImage};
use serde_json::Value;
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn samples() -> PathBuf {
    common::conformance_dir().join("samples")
}

fn scratch(name: &str) -> PathBuf {
    let d = root().join("target/parallels-tests").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn sha(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

fn manifest() -> Value {
    serde_json::from_str(&std::fs::read_to_string(samples().join("samples.json")).unwrap()).unwrap()
}

fn sample(m: &Value, file: &str) -> Value {
    m["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["file"] == file)
        .unwrap_or_else(|| panic!("{file} not in samples.json"))
        .clone()
}

/// Hashes of every non-zero 1 MiB chunk of `layer`, reading only allocated ranges; `base`
/// shifts chunk numbers (split extents).
fn chunk_hashes(layer: &dyn Layer, base: u64) -> Vec<(u64, String)> {
    let size = layer.virtual_size();
    let mut out = Vec::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut c = 0u64;
    while c * MIB < size {
        let off = c * MIB;
        let len = MIB.min(size - off);
        let (st, run) = layer.block_status(off, len).unwrap();
        if st == Allocation::Unallocated && run == len {
            // Skip the whole unallocated run, chunk by chunk.
            let mut skip = 0u64;
            let mut o = off;
            while o < size {
                let l = (size - o).min(1 << 40);
                let (st, run) = layer.block_status(o, l).unwrap();
                if st != Allocation::Unallocated {
                    break;
                }
                o += run;
                skip = o - off;
            }
            c += (skip / MIB).max(1);
            continue;
        }
        let b = &mut buf[..len as usize];
        layer.read_at(b, off).unwrap();
        if b.iter().any(|&x| x != 0) {
            out.push((base + c, sha(b)));
        }
        c += 1;
    }
    out
}

fn assert_chunks(layer: &dyn Layer, expect: &Value, base: u64, what: &str) {
    let got = chunk_hashes(layer, 0);
    let map = expect.as_object().unwrap();
    for (i, h) in &got {
        assert_eq!(
            map.get(&i.to_string()).and_then(|v| v.as_str()),
            Some(h.as_str()),
            "{what}: chunk {} differs",
            i + base
        );
    }
    assert_eq!(
        got.len(),
        map.len(),
        "{what}: manifest has chunks ferry reads as zero"
    );
}

fn decompress(src: &Path, dst: &Path) {
    let tool = if src.extension().unwrap() == "gz" {
        "gzip"
    } else {
        "bzip2"
    };
    let out = Command::new(tool).arg("-dc").arg(src).output().unwrap();
    assert!(out.status.success(), "{tool} {}", src.display());
    std::fs::write(dst, out.stdout).unwrap();
}

/// Copies a sample bundle, decompressing `.gz` members, keeping the layout.
fn copy_bundle(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if let Some(stem) = name.strip_suffix(".gz") {
            decompress(&p, &dst.join(stem));
        } else {
            std::fs::copy(&p, dst.join(&name)).unwrap();
        }
    }
}

fn open_file(p: &Path, writable: bool) -> ParallelsImage {
    ParallelsImage::open(Arc::new(LocalFile::open(p, writable).unwrap()), writable).unwrap()
}

#[test]
fn probe_recognises_files_and_bundles() {
    let f = ParallelsFormat;
    for s in [
        "parallels-v1",
        "parallels-v2",
        "fake.parallels",
        "parallels-with-bitmap",
    ] {
        let p = samples().join("qemu-iotests").join(s);
        let head = std::fs::read(&p).unwrap();
        assert!(f.probe(&p, &head[..4096.min(head.len())]), "{s}");
    }
    let raw = samples().join("qemu-iotests/grub_mbr.raw");
    assert!(!f.probe(&raw, &std::fs::read(&raw).unwrap()));
    assert!(f.probe(&samples().join("dissect.hypervisor/split.hdd"), &[]));
    assert!(!f.probe(&samples().join("dissect.hypervisor"), &[]));
    // The descriptor file itself also stands for its bundle.
    let desc = samples().join("dissect.hypervisor/split.hdd/DiskDescriptor.xml");
    assert!(f.probe(&desc, &std::fs::read(&desc).unwrap()));
    let b = f.open(&desc, false).unwrap();
    assert_eq!(b.virtual_size(), 10 << 30);
    assert_eq!(b.files().len(), 7);
}

#[test]
fn qemu_samples_read_to_manifest() {
    let m = manifest();
    for s in [
        "parallels-v1",
        "parallels-v2",
        "fake.parallels",
        "parallels-with-bitmap",
    ] {
        let file = format!("qemu-iotests/{s}");
        let e = sample(&m, &file);
        let img = open_file(&samples().join(&file), false);
        assert_eq!(
            img.virtual_size(),
            e["virtual_size"].as_u64().unwrap(),
            "{s}"
        );
        assert_chunks(&img, &e["chunk_sha256"], 0, s);
    }
    // A writable open of the bitmap sample works too (its extension is optional) and leaves
    // the extension's clusters alone.
    let d = scratch("bitmap-rw");
    let p = d.join("bitmap.hds");
    std::fs::copy(samples().join("qemu-iotests/parallels-with-bitmap"), &p).unwrap();
    let before = std::fs::read(&p).unwrap();
    {
        let img = open_file(&p, true);
        img.write_at(&[7u8; 4096], 5 * MIB, &NoLowerLayers).unwrap();
        img.flush().unwrap();
    }
    let after = std::fs::read(&p).unwrap();
    assert_eq!(
        &after[64 + 4 * 64 * 1024..before.len()],
        &before[64 + 4 * 64 * 1024..]
    );
    let img = open_file(&p, false);
    let mut b = vec![0u8; 4096];
    img.read_at(&mut b, 5 * MIB).unwrap();
    assert_eq!(b, vec![7u8; 4096]);
}

#[test]
fn dissect_bundles_read_to_manifest() {
    let m = manifest();
    let d = scratch("dissect");
    for name in ["expanding", "plain"] {
        let src = samples().join(format!("dissect.hypervisor/{name}.hdd"));
        let dst = d.join(format!("{name}.hdd"));
        copy_bundle(&src, &dst);
        let e = sample(
            &m,
            &format!(
                "dissect.hypervisor/{name}.hdd/{name}.hdd.0.{{5fbaabe3-6958-40ff-92a7-860e329aab41}}.hds.gz"
            ),
        );
        let layer = ParallelsFormat.open(&dst, false).unwrap();
        assert_eq!(layer.virtual_size(), e["virtual_size"].as_u64().unwrap());
        assert_chunks(&*layer, &e["chunk_sha256"], 0, name);
        if name == "expanding" {
            // The .hds alone is an ordinary image file too.
            let hds = dst.join("expanding.hdd.0.{5fbaabe3-6958-40ff-92a7-860e329aab41}.hds");
            assert_chunks(
                &open_file(&hds, false),
                &e["chunk_sha256"],
                0,
                "expanding.hds",
            );
        }
    }
    // Split: six extents; each extent's manifest chunks appear at its place in the disk.
    let split = samples().join("dissect.hypervisor/split.hdd");
    let bundle = Bundle::open(&split, false).unwrap();
    assert_eq!(bundle.virtual_size(), 10 << 30);
    let got = chunk_hashes(&bundle, 0);
    let mut want = Vec::new();
    for i in 0..6u64 {
        let e = sample(
            &m,
            &format!(
                "dissect.hypervisor/split.hdd/split.hdd.{i}.{{5fbaabe3-6958-40ff-92a7-860e329aab41}}.hds"
            ),
        );
        let file = split.join(format!(
            "split.hdd.{i}.{{5fbaabe3-6958-40ff-92a7-860e329aab41}}.hds"
        ));
        let ext = open_file(&file, false);
        assert_eq!(ext.virtual_size(), e["virtual_size"].as_u64().unwrap());
        assert_chunks(&ext, &e["chunk_sha256"], 0, &format!("split extent {i}"));
        for (k, v) in e["chunk_sha256"].as_object().unwrap() {
            want.push((
                i * 1948 + k.parse::<u64>().unwrap(),
                v.as_str().unwrap().to_string(),
            ));
        }
    }
    want.sort();
    assert_eq!(got, want);
    // A read across the boundary between extents 0 and 1.
    let mut b = vec![0u8; 2 * MIB as usize];
    bundle.read_at(&mut b, 1948 * MIB - MIB).unwrap();
    let e0 = open_file(
        &split.join("split.hdd.0.{5fbaabe3-6958-40ff-92a7-860e329aab41}.hds"),
        false,
    );
    let e1 = open_file(
        &split.join("split.hdd.1.{5fbaabe3-6958-40ff-92a7-860e329aab41}.hds"),
        false,
    );
    let mut a = vec![0u8; MIB as usize];
    e0.read_at(&mut a, 1947 * MIB).unwrap();
    assert_eq!(&b[..MIB as usize], &a[..]);
    e1.read_at(&mut a, 0).unwrap();
    assert_eq!(&b[MIB as usize..], &a[..]);
}

fn corpus() -> PathBuf {
    let out = root().join("target/conformance-corpus");
    if !out.join("manifest.json").exists() {
        let st = Command::new("bash")
            .arg(common::conformance_dir().join("make-corpus.sh"))
            .arg(&out)
            .status()
            .unwrap();
        assert!(st.success(), "make-corpus.sh failed");
    }
    out
}

#[test]
fn corpus_reads_to_expected_raw() {
    let dir = corpus();
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let mut n = 0;
    for e in m["images"].as_array().unwrap() {
        if e["format"] != "parallels" {
            continue;
        }
        n += 1;
        let name = e["name"].as_str().unwrap();
        let img = open_file(&dir.join(e["file"].as_str().unwrap()), false);
        assert_eq!(
            img.virtual_size(),
            e["virtual_size"].as_u64().unwrap(),
            "{name}"
        );
        assert_chunks(&img, &e["chunk_sha256"], 0, name);
        // Odd offsets and lengths across cluster boundaries against the expected raw file.
        let raw = std::fs::File::open(dir.join(e["expected_raw"].as_str().unwrap())).unwrap();
        let size = img.virtual_size();
        for (off, len) in [
            (0u64, 513u64),
            (2 * MIB - 700, 5000),
            (3 * MIB + 17 * 512 - 3, 3 * MIB),
            (size - 1000, 1000),
        ] {
            let len = len.min(size - off);
            let mut a = vec![0u8; len as usize];
            let mut b = vec![0u8; len as usize];
            img.read_at(&mut a, off).unwrap();
            std::os::unix::fs::FileExt::read_exact_at(&raw, &mut b, off).unwrap();
            assert!(a == b, "{name}: bytes at {off}+{len} differ");
        }
    }
    assert_eq!(n, 4);
}

/// Deterministic bytes for a write.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn qemu(args: &[&str]) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The write list: first sector, a run across a cluster boundary, a multi-cluster run, an
/// overwrite of allocated data, the last sector.
fn workload(size: u64) -> Vec<(u64, Vec<u8>)> {
    vec![
        (0, pattern(1, 512)),
        (2 * MIB - 3000, pattern(2, 6000)),
        (3 * MIB + 17 * 512, pattern(3, (2 * MIB + MIB / 2) as usize)),
        (100, pattern(4, 300)),
        (8 * MIB, vec![0u8; 65536]),
        (size - 512, pattern(5, 512)),
    ]
}

#[test]
fn create_write_check_compare() {
    let d = scratch("create");
    let size = 20 * MIB + 3 * 512;
    for variant in [Variant::Dynamic, Variant::Fixed] {
        let p = d.join(format!("{variant:?}.hds"));
        let mut model = vec![0u8; size as usize];
        {
            let opts = CreateOptions {
                size,
                variant,
                parent: None,
            };
            let img = ParallelsFormat.create(&p, &opts).unwrap();
            assert_eq!(img.variant(), variant);
            for (off, data) in workload(size) {
                img.write_at(&data, off, &NoLowerLayers).unwrap();
                model[off as usize..off as usize + data.len()].copy_from_slice(&data);
            }
            img.flush().unwrap();
        }
        let raw = d.join(format!("{variant:?}.raw"));
        common::write_sparse(&raw, &model);
        let ps = p.to_str().unwrap();
        let (rc, out) = qemu(&["check", "-f", "parallels", ps]);
        assert_eq!(rc, 0, "{variant:?}: {out}");
        let (rc, out) = qemu(&[
            "compare",
            "-f",
            "parallels",
            "-F",
            "raw",
            ps,
            raw.to_str().unwrap(),
        ]);
        assert_eq!(rc, 0, "{variant:?}: {out}");
        let (rc, out) = qemu(&["info", ps]);
        assert!(rc == 0 && out.contains("file format: parallels"), "{out}");
        // ferry reads its own image back.
        let img = open_file(&p, false);
        let mut back = vec![0u8; size as usize];
        img.read_at(&mut back, 0).unwrap();
        assert!(back == model);
        // And the checker script agrees.
        let script = common::conformance_dir().join("check-writer.sh");
        let st = Command::new("bash")
            .arg(script)
            .args(["-f", "parallels", ps, raw.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stdout)
        );
    }
    // A child image cannot be expressed in one Parallels file.
    let opts = CreateOptions {
        size,
        variant: Variant::Dynamic,
        parent: Some(ferry_storage::CreateParent {
            path: d.join("Dynamic.hds"),
            uuid: None,
            modification_uuid: None,
            format: ferry_storage::FormatKind::Parallels,
        }),
    };
    let e = ParallelsFormat
        .create(&d.join("child.hds"), &opts)
        .err()
        .unwrap();
    assert!(
        matches!(e, ferry_storage::StorageError::Unsupported { .. }),
        "{e}"
    );
    assert!(!d.join("child.hds").exists());
}

/// A lower layer of a fixed byte value, to see copy-on-write fill partial clusters.
struct Fill(u8);
impl ferry_storage::LowerLayers for Fill {
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> ferry_storage::Result<()> {
        buf.fill(self.0);
        Ok(())
    }
}

#[test]
fn partial_write_takes_rest_from_lower() {
    let d = scratch("cow");
    let p = d.join("a.hds");
    let opts = CreateOptions {
        size: 4 * MIB,
        variant: Variant::Dynamic,
        parent: None,
    };
    let img = ParallelsFormat.create(&p, &opts).unwrap();
    img.write_at(&[1u8; 10], MIB + 5, &Fill(9)).unwrap();
    let mut b = vec![0u8; MIB as usize];
    img.read_at(&mut b, MIB).unwrap();
    assert!(b[..5].iter().all(|&x| x == 9));
    assert!(b[5..15].iter().all(|&x| x == 1));
    assert!(b[15..].iter().all(|&x| x == 9));
    assert_eq!(
        img.block_status(0, 4 * MIB).unwrap(),
        (Allocation::Unallocated, MIB)
    );
    assert_eq!(
        img.block_status(MIB, 3 * MIB).unwrap(),
        (Allocation::Data, MIB)
    );
}

#[test]
fn crash_at_every_write_leaves_a_consistent_image() {
    let d = scratch("crash");
    let size = 12 * MIB;
    let base = d.join("base.hds");
    let mut old = vec![0u8; size as usize];
    {
        let opts = CreateOptions {
            size,
            variant: Variant::Dynamic,
            parent: None,
        };
        let img = ParallelsFormat.create(&base, &opts).unwrap();
        let data = pattern(10, 3 * MIB as usize);
        img.write_at(&data, 0, &NoLowerLayers).unwrap();
        old[..data.len()].copy_from_slice(&data);
    }
    // Each cluster is touched by at most one write, so after a crash each reads old or new.
    let writes: Vec<(u64, Vec<u8>)> = vec![
        (MIB + 100, pattern(11, 1000)),             // overwrite in place
        (4 * MIB + 4096, pattern(12, 8192)),        // new cluster, partial
        (6 * MIB - 512, pattern(13, MIB as usize)), // two new clusters
        (10 * MIB, pattern(14, MIB as usize)),      // a whole new cluster
        (2 * MIB + 7, pattern(15, 77)),             // overwrite again
    ];
    let mut new = old.clone();
    for (o, w) in &writes {
        new[*o as usize..*o as usize + w.len()].copy_from_slice(w);
    }
    let mut k = 0;
    let mut unclean = 0;
    loop {
        let p = d.join(format!("k{k}.hds"));
        std::fs::copy(&base, &p).unwrap();
        let inner: Arc<dyn HostFile> = Arc::new(LocalFile::open(&p, true).unwrap());
        let failing = Arc::new(ferry_storage::host_file::FailingFile::new(inner, k));
        let mut completed = true;
        match ParallelsImage::open(failing, true) {
            Ok(img) => {
                for (o, w) in &writes {
                    if img.write_at(w, *o, &NoLowerLayers).is_err() {
                        completed = false;
                        break;
                    }
                }
                if img.flush().is_err() {
                    completed = false;
                }
            }
            Err(_) => completed = false,
        }
        let ps = p.to_str().unwrap();
        // Before ferry repairs it: at worst "not closed correctly" and leaks, never a bad BAT.
        let (rc, out) = qemu(&["check", "-f", "parallels", ps]);
        assert!(rc == 0 || rc == 2 || rc == 3, "k={k}: {out}");
        assert!(!out.contains("outside"), "k={k}: {out}");
        if rc == 2 {
            assert!(out.contains("not closed correctly"), "k={k}: {out}");
            unclean += 1;
        }
        // ferry reopens it writable (repairing the mark and leaks), then it is clean.
        drop(open_file(&p, true));
        let (rc, out) = qemu(&["check", "-f", "parallels", ps]);
        assert_eq!(rc, 0, "k={k}: {out}");
        let img = open_file(&p, false);
        let mut got = vec![0u8; size as usize];
        img.read_at(&mut got, 0).unwrap();
        for c in 0..(size / MIB) as usize {
            let r = c * MIB as usize..(c + 1) * MIB as usize;
            assert!(
                got[r.clone()] == old[r.clone()] || got[r.clone()] == new[r],
                "k={k}: cluster {c} is neither old nor new"
            );
        }
        if completed {
            assert!(got == new);
            break;
        }
        k += 1;
        assert!(k < 100);
    }
    assert!(k >= 8, "only {k} writes: the workload did not allocate");
    // Most crash points leave the in-use mark set; the repair path above handled them.
    assert!(
        unclean >= k - 1,
        "{unclean} of {k} crashes left the image marked in use"
    );
}

/// Host bytes the file occupies (holes excluded).
fn host_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn partial_writes_allocate_sparse_clusters_and_bat_waits_for_flush() {
    let d = scratch("sparse");
    let p = d.join("a.hds");
    let size = 32 * MIB;
    let opts = CreateOptions {
        size,
        variant: Variant::Dynamic,
        parent: None,
    };
    let img = ParallelsImage::create(
        Arc::new(LocalFile::create(&p).unwrap()),
        opts.size,
        opts.variant,
    )
    .unwrap();
    let mut model = vec![0u8; size as usize];
    for c in 0..16u64 {
        let o = c * 2 * MIB + 8192 + c * 512;
        let w = pattern(100 + c, 4096);
        img.write_at(&w, o, &NoLowerLayers).unwrap();
        model[o as usize..o as usize + w.len()].copy_from_slice(&w);
    }
    // Reads see the new clusters before the flush...
    let mut got = vec![0u8; size as usize];
    img.read_at(&mut got, 0).unwrap();
    assert!(got == model);
    // ...but the BAT on disk does not point at them yet.
    let on_disk = |p: &Path| {
        let raw = std::fs::read(p).unwrap();
        raw[64..64 + 4 * 32]
            .chunks_exact(4)
            .filter(|e| e != &[0u8; 4])
            .count()
    };
    assert_eq!(on_disk(&p), 0, "{:?}", &std::fs::read(&p).unwrap()[..200]);
    img.flush().unwrap();
    assert_eq!(on_disk(&p), 16);
    // Only the guest's bytes take space, not 16 zero-filled clusters.
    assert!(host_bytes(&p) < 4 * MIB, "{} bytes", host_bytes(&p));
    drop(img);
    let (rc, out) = qemu(&["check", "-f", "parallels", p.to_str().unwrap()]);
    assert_eq!(rc, 0, "{out}");
    let img = open_file(&p, false);
    img.read_at(&mut got, 0).unwrap();
    assert!(got == model);
    // Copy-on-write from a non-zero lower still fills the rest of a fresh cluster.
    let img = open_file(&p, true);
    img.write_at(&[1u8; 10], MIB + 5, &Fill(9)).unwrap();
    let mut b = vec![0u8; MIB as usize];
    img.read_at(&mut b, MIB).unwrap();
    assert!(b[..5].iter().all(|&x| x == 9) && b[5..15].iter().all(|&x| x == 1));
    assert!(b[15..].iter().all(|&x| x == 9));
}
