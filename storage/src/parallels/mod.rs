//! Parallels disks: single image files ("WithoutFreeSpace" and "WithouFreSpacExt" headers)
//! and `.hdd` bundles (a folder with `DiskDescriptor.xml`, split storages, Plain/Compressed
//! extents and an internal snapshot chain).

pub mod bundle;
pub mod image;
pub mod pvm;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use bundle::{Bundle, Descriptor};
pub use image::ParallelsImage;

use crate::error::{Result, StorageError};
use crate::host_file::{HostFile, LocalFile};
use crate::layer::*;

pub struct ParallelsFormat;

/// The bundle folder `path` names (the folder, or its descriptor), canonical; `None` for
/// anything else.
pub fn bundle_dir(path: &Path) -> Option<PathBuf> {
    let dir = if path.file_name() == Some(bundle::DESCRIPTOR.as_ref()) {
        path.parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    } else {
        path
    };
    let dir = std::fs::canonicalize(dir).ok()?;
    dir.join(bundle::DESCRIPTOR).is_file().then_some(dir)
}

/// A child of a Parallels parent: only a bundle has room for one, as a snapshot inside it.
fn create_snapshot(path: &Path, parent: &Path, opts: &CreateOptions) -> Result<Box<dyn Layer>> {
    let unsupported = |detail: &str| StorageError::Unsupported {
        path: path.into(),
        detail: detail.into(),
    };
    let Some(dir) = bundle_dir(parent) else {
        return Err(unsupported(
            "a Parallels image file has no field for a parent; only a .hdd bundle holds snapshots (give the bundle as both the new image and --parent)",
        ));
    };
    if bundle_dir(path).as_ref() != Some(&dir) {
        return Err(unsupported(
            "a Parallels bundle keeps its snapshots inside itself: give the bundle as both the new image and --parent",
        ));
    }
    if opts.variant != Variant::Dynamic {
        return Err(unsupported("snapshots in a Parallels bundle are dynamic"));
    }
    let size = Bundle::open(&dir, false)?.virtual_size();
    if opts.size != size {
        return Err(StorageError::Invalid(format!(
            "a snapshot has its bundle's size ({size} bytes), not {}",
            opts.size
        )));
    }
    Ok(Box::new(Bundle::create_snapshot(&dir)?))
}

/// A bundle's `DiskDescriptor.xml` given instead of its folder.
fn is_descriptor(path: &Path, head: &[u8]) -> bool {
    path.file_name() == Some(bundle::DESCRIPTOR.as_ref())
        && head.windows(21).any(|w| w == b"<Parallels_disk_image")
}

impl ImageFormat for ParallelsFormat {
    fn kind(&self) -> FormatKind {
        FormatKind::Parallels
    }

    fn probe(&self, path: &Path, head: &[u8]) -> bool {
        if path.is_dir() {
            return path.join(bundle::DESCRIPTOR).is_file();
        }
        image::is_parallels_header(head) || is_descriptor(path, head)
    }

    fn open(&self, path: &Path, writable: bool) -> Result<Box<dyn Layer>> {
        if path.is_dir() {
            return Ok(Box::new(Bundle::open(path, writable)?));
        }
        if path.file_name() == Some(bundle::DESCRIPTOR.as_ref()) {
            // The descriptor itself names its bundle.
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            return Ok(Box::new(Bundle::open(
                dir.unwrap_or(Path::new(".")),
                writable,
            )?));
        }
        let file = LocalFile::open(path, writable).map_err(|e| StorageError::io(path, e))?;
        Ok(Box::new(ParallelsImage::open(Arc::new(file), writable)?))
    }

    fn create(&self, path: &Path, opts: &CreateOptions) -> Result<Box<dyn Layer>> {
        if let Some(parent) = &opts.parent {
            return create_snapshot(path, &parent.path, opts);
        }
        let file = LocalFile::create(path).map_err(|e| StorageError::io(path, e))?;
        let file: Arc<dyn HostFile> = Arc::new(file);
        match ParallelsImage::create(file, opts.size, opts.variant) {
            Ok(img) => Ok(Box::new(img)),
            Err(e) => {
                let _ = std::fs::remove_file(path);
                Err(e)
            }
        }
    }
}
