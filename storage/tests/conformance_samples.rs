//! Images made by other tools (../shared/conformance/samples) read exactly as qemu-img reads
//! them: the virtual size and the SHA-256 of every non-zero 1 MiB chunk from its manifest.
//! Images qemu-img refuses (AFL-fuzzed headers) must be refused by ferry too, cleanly.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_storage::{open_image, Disk, StorageError};
use sha2::{Digest, Sha256};

const CHUNK: u64 = 1 << 20;

fn samples_dir() -> PathBuf {
    common::conformance_dir().join("samples")
}

/// The sample as a plain file (or bundle folder) under the test's scratch folder.
fn materialize(rel: &str) -> PathBuf {
    let src = samples_dir().join(rel);
    let dst_root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("conformance-samples");
    // Bundles: copy the whole .hdd folder, decompressing its members.
    let (src_dir, dst_dir) = match rel.find(".hdd/") {
        Some(i) => (
            samples_dir().join(&rel[..i + 4]),
            dst_root.join(&rel[..i + 4]),
        ),
        None => (
            src.parent().unwrap().to_path_buf(),
            dst_root.join(Path::new(rel).parent().unwrap()),
        ),
    };
    std::fs::create_dir_all(&dst_dir).unwrap();
    let entries: Vec<PathBuf> = if rel.contains(".hdd/") {
        std::fs::read_dir(&src_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    } else {
        vec![src.clone()]
    };
    for e in entries {
        let name = e.file_name().unwrap().to_string_lossy().to_string();
        let (out_name, tool) = if let Some(n) = name.strip_suffix(".gz") {
            (n.to_string(), Some("gzip"))
        } else if let Some(n) = name.strip_suffix(".bz2") {
            (n.to_string(), Some("bzip2"))
        } else {
            (name.clone(), None)
        };
        let out = dst_dir.join(&out_name);
        if out.exists() {
            continue;
        }
        match tool {
            Some(t) => {
                let f = std::fs::File::create(&out).unwrap();
                let st = Command::new(t)
                    .arg("-dc")
                    .arg(&e)
                    .stdout(f)
                    .status()
                    .unwrap();
                assert!(st.success(), "{t} -dc {}", e.display());
            }
            None => {
                std::fs::copy(&e, &out).unwrap();
            }
        }
    }
    let rel_out = rel.trim_end_matches(".gz").trim_end_matches(".bz2");
    dst_root.join(rel_out)
}

fn check_sample(entry: &serde_json::Value, zero_hash: &str) -> Result<(), String> {
    let rel = entry["file"].as_str().unwrap();
    let path = materialize(rel);
    let opens = entry["qemu_opens"].as_bool().unwrap_or(false);
    let fmt = entry["qemu_format"].as_str().unwrap_or("");
    // A bundle folder qemu cannot open as one disk: ferry opens it; its extents are checked
    // one by one against their own entries.
    let composite = rel.ends_with('/');
    if (!opens && !composite) || fmt == "vhdx" {
        return match open_image(&path, false) {
            Ok(_) => Err(format!(
                "{rel}: ferry opened an image qemu-img refuses ({fmt})"
            )),
            Err(e) => {
                eprintln!("refused as expected: {rel}: {e}");
                Ok(())
            }
        };
    }
    let disk = match Disk::open(&path, false, &[]) {
        Ok(d) => d,
        // qemu ignores a differencing VHD's missing parent; ferry must name it, and the child
        // layer alone must still read as qemu read it.
        Err(e @ StorageError::ParentNotFound { .. }) => {
            eprintln!("missing parent reported as expected: {e}");
            let layer = open_image(&path, false).map_err(|e| format!("{rel}: {e}"))?;
            Disk::from_layers(vec![layer]).map_err(|e| format!("{rel}: {e}"))?
        }
        Err(e) => return Err(format!("{rel}: {e}")),
    };
    let size = entry["virtual_size"].as_u64().unwrap();
    if disk.size() != size {
        return Err(format!(
            "{rel}: virtual size {} but qemu-img says {size}",
            disk.size()
        ));
    }
    if entry["chunk_sha256"].is_null() {
        return if composite {
            Ok(())
        } else {
            Err(format!("{rel}: the manifest has no chunk hashes"))
        };
    }
    let want: HashMap<u64, String> = entry["chunk_sha256"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.parse().unwrap(), v.as_str().unwrap().to_string()))
                .collect()
        })
        .unwrap_or_default();
    // Chunks ferry says nobody holds must be zero chunks in the manifest too.
    let ranges = disk.allocated_ranges().map_err(|e| format!("{rel}: {e}"))?;
    let mut held = std::collections::BTreeSet::new();
    for (off, len) in ranges {
        for c in off / CHUNK..(off + len).div_ceil(CHUNK) {
            held.insert(c);
        }
    }
    for c in want.keys() {
        if !held.contains(c) {
            return Err(format!(
                "{rel}: chunk {c} has data per qemu-img but ferry reports it unallocated"
            ));
        }
    }
    let mut buf = vec![0u8; CHUNK as usize];
    for c in held {
        let off = c * CHUNK;
        let n = (size - off).min(CHUNK) as usize;
        disk.read_at(&mut buf[..n], off)
            .map_err(|e| format!("{rel}: chunk {c}: {e}"))?;
        let got = if buf[..n].iter().all(|&b| b == 0) {
            None
        } else {
            Some(format!("{:x}", Sha256::digest(&buf[..n])))
        };
        let expect = want.get(&c).cloned();
        if got != expect {
            return Err(format!(
                "{rel}: chunk {c} differs from qemu-img's reading (got {}, want {})",
                got.as_deref().unwrap_or(zero_hash),
                expect.as_deref().unwrap_or(zero_hash)
            ));
        }
    }
    Ok(())
}

#[test]
fn samples_read_like_qemu_img() {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(samples_dir().join("samples.json")).unwrap())
            .unwrap();
    let zero = manifest["zero_chunk_sha256"].as_str().unwrap();
    let mut failures = Vec::new();
    let mut checked = 0;
    for entry in manifest["samples"].as_array().unwrap() {
        checked += 1;
        if let Err(e) = check_sample(entry, zero) {
            failures.push(e);
        }
    }
    assert!(checked >= 30, "the manifest lists {checked} samples");
    assert!(
        failures.is_empty(),
        "{} of {checked} samples failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
