//! Shared by the image fuzz targets: write the input to a scratch file, open it with one
//! format (or by probing), map it and read part of it. Never panic, hang or allocate without
//! bound.

use std::path::{Path, PathBuf};

use ferry_storage::{Disk, Layer, Result};

/// Stop reading after this much data per input, so one input cannot take minutes.
const READ_BUDGET: u64 = 4 << 20;

pub fn with_scratch_file(data: &[u8], tag: &str, f: impl FnOnce(&Path)) {
    let path = PathBuf::from(format!("/dev/shm/ferry-fuzz-{tag}-{}", std::process::id()));
    if std::fs::write(&path, data).is_ok() {
        f(&path);
    }
    let _ = std::fs::remove_file(&path);
}

pub fn exercise(layer: Result<Box<dyn Layer>>) {
    let Ok(layer) = layer else { return };
    let Ok(disk) = Disk::from_layers(vec![layer]) else { return };
    let Ok(ranges) = disk.allocated_ranges() else { return };
    let mut budget = READ_BUDGET;
    let mut buf = vec![0u8; 64 * 1024];
    for (off, len) in ranges {
        let n = len.min(buf.len() as u64).min(budget);
        if n == 0 {
            break;
        }
        let _ = disk.read_at(&mut buf[..n as usize], off);
        budget -= n;
    }
}
