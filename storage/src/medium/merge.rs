//! `merge`: folds a differencing child into its parent, as deleting a snapshot does, then
//! removes the child. The parent is written in place; until the child is removed, the chain
//! through the child still reads the child's data over whatever the parent holds, so an
//! interrupted merge leaves the child's disk readable and the merge can be run again.

use std::path::{Path, PathBuf};

use crate::disk::Disk;
use crate::error::{Result, StorageError};
use crate::layer::LowerLayers;
use crate::medium::copy::{self, layer_ranges, CopyStats, Progress, Source};
use crate::probe::open_image;

/// What a merge did.
#[derive(Debug, Clone)]
pub struct MergeReport {
    /// The parent that now holds the data.
    pub into: PathBuf,
    /// The child's files, removed.
    pub removed: Vec<PathBuf>,
    pub stats: CopyStats,
}

pub fn merge(
    child: &Path,
    threads: usize,
    search: &[PathBuf],
    progress: &dyn Progress,
) -> Result<MergeReport> {
    super::must_exist(child)?;
    let mut disk = Disk::open(child, false, search)?;
    if disk.layers().len() < 2 {
        return Err(StorageError::Invalid(format!(
            "{} has no parent to merge into",
            child.display()
        )));
    }
    let parent_path = disk.layers()[1].path().to_path_buf();
    if disk.layers()[1].virtual_size() < disk.size() {
        // The child was grown: the parent grows first (rebuilt beside itself, so this step
        // alone leaves a consistent chain too).
        super::rebuild::resize(&parent_path, disk.size(), false, threads, search, progress)?;
        disk = Disk::open(child, false, search)?;
    }
    let (stats, removed) = {
        let parent = open_image(&parent_path, true)?;
        let top = &*disk.layers()[0];
        let read = |buf: &mut [u8], off: u64| top.read_at(buf, off);
        // Zero runs in the child matter only where the parent's chain is not zero.
        let before = disk.lower(1);
        let source = Source {
            read: &read,
            ranges: layer_ranges(top, parent.virtual_size())?,
            below: Some(&before as &(dyn LowerLayers + Sync)),
            mapped: None,
        };
        let grand = disk.lower(2);
        let stats = copy::copy(&source, &*parent, &grand, threads, progress)?;
        parent.flush()?;
        (stats, top.files())
    };
    drop(disk);
    for f in &removed {
        std::fs::remove_file(f).map_err(|e| StorageError::io(f, e))?;
    }
    Ok(MergeReport {
        into: parent_path,
        removed,
        stats,
    })
}
