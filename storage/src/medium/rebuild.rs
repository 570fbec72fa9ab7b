//! `compact` and `resize`: the image is rebuilt beside itself (same format, variant, parent and
//! UUID; only this layer's own blocks copied, all-zero ones dropped) and renamed over the
//! original, so an interruption leaves the original as it was. Raw files are resized in place.
//! `set-uuid` writes the new UUID into the format's header.

use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::disk::Disk;
use crate::error::{Result, StorageError};
use crate::layer::{Allocation, CreateOptions, CreateParent, FormatKind, Layer, LowerLayers};
use crate::medium::copy::{self, layer_ranges, CopyStats, Progress, Source};
use crate::medium::staging::Staged;
use crate::probe::{create_image, open_image};

/// What a rebuild did.
#[derive(Debug, Clone)]
pub struct RebuildReport {
    pub files: Vec<PathBuf>,
    /// Host bytes before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub stats: CopyStats,
}

/// Drops all-zero blocks (where the parents read zeros too) and unused space.
pub fn compact(
    path: &Path,
    threads: usize,
    search: &[PathBuf],
    progress: &dyn Progress,
) -> Result<RebuildReport> {
    super::must_exist(path)?;
    let disk = Disk::open(path, false, search)?;
    let size = disk.size();
    rebuild(&disk, size, threads, progress)
}

/// Grows the image to `size`, or shrinks it where nothing is allocated past `size`.
pub fn resize(
    path: &Path,
    size: u64,
    allow_shrink: bool,
    threads: usize,
    search: &[PathBuf],
    progress: &dyn Progress,
) -> Result<RebuildReport> {
    super::must_exist(path)?;
    if size == 0 {
        return Err(StorageError::Invalid("a disk needs a size above 0".into()));
    }
    let disk = Disk::open(path, false, search)?;
    let top = &*disk.layers()[0];
    let old = top.virtual_size();
    if size < old {
        if !allow_shrink {
            return Err(StorageError::Invalid(format!(
                "{}: {size} bytes is smaller than the disk ({old} bytes); pass --allow-shrink to cut off its unallocated tail",
                path.display()
            )));
        }
        if let Some(at) = first_data(top, size, old)? {
            return Err(StorageError::Invalid(format!(
                "{}: the disk holds data at byte {at}, past the new size {size}; shrinking would lose it",
                path.display()
            )));
        }
    }
    if top.format() == FormatKind::Raw {
        return resize_raw(top, size, &disk);
    }
    rebuild(&disk, size, threads, progress)
}

/// Where in `[from, to)` the layer holds non-zero data, if anywhere.
fn first_data(layer: &dyn Layer, from: u64, to: u64) -> Result<Option<u64>> {
    let mut off = from;
    let mut buf = vec![0u8; 1 << 20];
    while off < to {
        let (state, run) = layer.block_status(off, to - off)?;
        let run = run.clamp(1, to - off);
        if state == Allocation::Data {
            // Raw reports everything as data: what counts is whether it is zero.
            let mut at = off;
            while at < off + run {
                let n = (off + run - at).min(buf.len() as u64) as usize;
                layer.read_at(&mut buf[..n], at)?;
                if !copy::is_zero(&buf[..n]) {
                    return Ok(Some(at));
                }
                at += n as u64;
            }
        }
        off += run;
    }
    Ok(None)
}

fn resize_raw(top: &dyn Layer, size: u64, disk: &Disk) -> Result<RebuildReport> {
    let path = top.path().to_path_buf();
    let before = super::host_bytes(&top.files());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| StorageError::io(&path, e))?;
    f.set_len(size).map_err(|e| StorageError::io(&path, e))?;
    f.sync_all().map_err(|e| StorageError::io(&path, e))?;
    let files = disk.layers()[0].files();
    Ok(RebuildReport {
        bytes_before: before,
        bytes_after: super::host_bytes(&files),
        files,
        stats: CopyStats::default(),
    })
}

/// The parent a rebuilt child names: the same one, with the identity the child recorded.
fn parent_of(disk: &Disk) -> Option<CreateParent> {
    let parent = disk.layers().get(1)?;
    let recorded = disk.layers()[0].parent().unwrap_or_default();
    Some(CreateParent {
        path: parent.path().to_path_buf(),
        uuid: recorded.uuid.or(parent.uuid()),
        modification_uuid: recorded.modification_uuid.or(parent.modification_uuid()),
        format: parent.format(),
    })
}

fn rebuild(
    disk: &Disk,
    size: u64,
    threads: usize,
    progress: &dyn Progress,
) -> Result<RebuildReport> {
    let top = &*disk.layers()[0];
    let path = top.path().to_path_buf();
    if path.is_dir() {
        return Err(StorageError::Unsupported {
            path,
            detail:
                "ferry cannot rebuild a Parallels bundle yet; clone it into a new image instead"
                    .into(),
        });
    }
    let before = super::host_bytes(&top.files());
    let mut staged = Staged::new(&path)?;
    let new = create_image(
        staged.path(),
        top.format(),
        &CreateOptions {
            size,
            variant: top.variant(),
            parent: parent_of(disk),
        },
    )?;
    staged.set_files(new.files());
    let lower = disk.lower(1);
    let below: Option<&(dyn LowerLayers + Sync)> = if disk.layers().len() > 1 {
        Some(&lower)
    } else {
        None
    };
    let read = |buf: &mut [u8], off: u64| top.read_at(buf, off);
    let source = Source {
        read: &read,
        ranges: layer_ranges(top, size)?,
        below,
        mapped: None,
    };
    let stats = copy::copy(&source, &*new, &lower, threads, progress)?;
    new.flush()?;
    if let Some(uuid) = top.uuid() {
        new.set_uuid(uuid, top.modification_uuid())?;
    }
    drop(new);
    let files = staged.commit()?;
    Ok(RebuildReport {
        bytes_before: before,
        bytes_after: super::host_bytes(&files),
        files,
        stats,
    })
}

/// Writes a new UUID (random when `uuid` is None) into the image's header; returns it.
pub fn set_uuid(path: &Path, uuid: Option<Uuid>) -> Result<Uuid> {
    super::must_exist(path)?;
    let uuid = uuid.unwrap_or_else(Uuid::new_v4);
    // Opened read-only first: a file that does not open cleanly is never written to.
    let layer = open_image(path, false)?;
    match layer.format() {
        FormatKind::Vdi | FormatKind::Vhd | FormatKind::Vmdk => {}
        FormatKind::Parallels if path.is_dir() => {
            return Err(StorageError::Unsupported {
                path: path.into(),
                detail: "a Parallels bundle keeps its UUIDs in DiskDescriptor.xml, which ferry does not rewrite yet".into(),
            })
        }
        other => {
            return Err(StorageError::Unsupported {
                path: path.into(),
                detail: format!("a {} image records no UUID to set", other.name()),
            })
        }
    }
    drop(layer);
    let layer = open_image(path, true)?;
    layer.set_uuid(uuid, None)?;
    Ok(uuid)
}
