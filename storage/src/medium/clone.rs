//! `clone`: a disk (its whole chain, flattened) copied into a new image of any format, with a
//! new UUID. Holes and all-zero grains are not written; the target appears under its name only
//! when complete.

use std::path::{Path, PathBuf};

use crate::disk::Disk;
use crate::error::{Result, StorageError};
use crate::layer::{CreateOptions, FormatKind, NoLowerLayers, Variant};
use crate::medium::copy::{self, CopyStats, Progress, Source};
use crate::medium::mapped::MappedFile;
use crate::medium::staging::Staged;
use crate::probe::{create_image, open_image};

#[derive(Debug, Clone)]
pub struct CloneOptions {
    pub format: FormatKind,
    pub variant: Variant,
    /// Replace an existing target.
    pub overwrite: bool,
    /// Reader threads (see [`copy::default_threads`]).
    pub threads: usize,
    /// Where to look for parents (beside the image and the folder above are always searched).
    pub search: Vec<PathBuf>,
}

/// What a clone made.
#[derive(Debug, Clone)]
pub struct CloneReport {
    pub files: Vec<PathBuf>,
    pub size: u64,
    pub stats: CopyStats,
}

pub fn clone(
    src: &Path,
    dst: &Path,
    opts: &CloneOptions,
    progress: &dyn Progress,
) -> Result<CloneReport> {
    super::must_exist(src)?;
    if same_file(src, dst) {
        return Err(StorageError::Invalid(format!(
            "{} is the source itself; clone into a new file",
            dst.display()
        )));
    }
    if dst.exists() && !opts.overwrite {
        return Err(StorageError::Invalid(format!(
            "{} already exists; pass --overwrite to replace it",
            dst.display()
        )));
    }
    if dst.is_dir() {
        return Err(StorageError::Invalid(format!(
            "{} is a folder; ferry replaces only image files",
            dst.display()
        )));
    }
    let disk = Disk::open(src, false, &opts.search)?;
    let size = disk.size();
    // Files of the image being replaced (extents included), removed once the new one is in.
    let old_files = if dst.exists() {
        open_image(dst, false)
            .map(|l| l.files())
            .unwrap_or_else(|_| vec![dst.to_path_buf()])
    } else {
        Vec::new()
    };
    let mut staged = Staged::new(dst)?;
    let layer = create_image(
        staged.path(),
        opts.format,
        &CreateOptions {
            size,
            variant: opts.variant,
            parent: None,
        },
    )?;
    staged.set_files(layer.files());
    tracing::info!(
        "cloning {} ({} layers, {size} bytes) into {} {:?}",
        src.display(),
        disk.layers().len(),
        opts.format.name(),
        opts.variant
    );
    let read = |buf: &mut [u8], off: u64| disk.read_at(buf, off);
    // A disk of one layer whose format stores blocks as they are is read in place, through
    // a mapping of its file, where it can be.
    let top = &disk.layers()[0];
    let file = top.mapped_file().filter(|_| disk.layers().len() == 1);
    let mapped = file.and_then(|f| match MappedFile::open(&f) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::debug!("{}: read without a mapping: {e}", f.display());
            None
        }
    });
    let map = mapped.as_ref().map(MappedFile::bytes);
    let in_place = |off: u64, len: usize| -> Option<&[u8]> {
        let (host, run) = top.host_run(off, len as u64).ok()??;
        let start = usize::try_from(host).ok()?;
        match run == len as u64 {
            true => map?.get(start..start.checked_add(len)?),
            false => None,
        }
    };
    let source = Source {
        read: &read,
        ranges: disk.data_ranges()?,
        below: None,
        mapped: map.is_some().then_some(&in_place as _),
    };
    let stats = copy::copy(&source, &*layer, &NoLowerLayers, opts.threads, progress)?;
    layer.flush()?;
    drop(layer);
    let files = staged.commit()?;
    for f in old_files {
        if !files.contains(&f) {
            let _ = std::fs::remove_file(&f);
        }
    }
    Ok(CloneReport { files, size, stats })
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
