//! Copying a disk into a new image of another format, for `ferry import --convert`.
//!
//! A plain copy of what the source chain holds; `ferry medium clone` (being built beside
//! this) will take its place, so this stays one function.

use std::path::Path;

use ferry_storage::{create_image, CreateOptions, Disk, FormatKind, Result, Variant};

const CHUNK: u64 = 1 << 20;

/// Copies the disk at `src` (its whole chain) into a new dynamic image `dst` of `format`.
/// A partly written `dst` is removed on failure.
pub fn convert_disk(
    src: &Path,
    dst: &Path,
    format: FormatKind,
    search: &[std::path::PathBuf],
) -> Result<()> {
    let from = Disk::open(src, false, search)?;
    let layer = create_image(
        dst,
        format,
        &CreateOptions {
            size: from.size(),
            variant: Variant::Dynamic,
            parent: None,
        },
    )?;
    let to = Disk::from_layers(vec![layer])?;
    let copied = copy(&from, &to);
    drop(to);
    if copied.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    copied
}

fn copy(from: &Disk, to: &Disk) -> Result<()> {
    let mut buf = vec![0u8; CHUNK as usize];
    for (start, len) in from.allocated_ranges()? {
        let mut off = start;
        while off < start + len {
            let n = CHUNK.min(start + len - off) as usize;
            let b = &mut buf[..n];
            from.read_at(b, off)?;
            // Zeros stay holes in the new image.
            if b.iter().any(|&x| x != 0) {
                to.write_at(b, off)?;
            }
            off += n as u64;
        }
    }
    to.flush()
}
