//! Recognizing a format from a file's content, never from its name.

use std::io::Read;
use std::path::Path;

use crate::error::{Result, StorageError};
use crate::iso::IsoFormat;
use crate::layer::{CreateOptions, FormatKind, ImageFormat, Layer};
use crate::parallels::ParallelsFormat;
use crate::raw::{foreign_format, RawFormat};
use crate::vdi::VdiFormat;
use crate::vhd::VhdFormat;
use crate::vmdk::VmdkFormat;

/// Every format ferry reads, most specific first; raw comes last and takes what is left.
pub static FORMATS: &[&dyn ImageFormat] = &[
    &VdiFormat,
    &VmdkFormat,
    &ParallelsFormat,
    // A fixed VHD is recognizable only by its last 512 bytes: after the formats with a magic
    // at offset 0.
    &VhdFormat,
    &IsoFormat,
    &RawFormat,
];

/// The first bytes of a file (empty for a folder, such as a Parallels bundle).
fn head(path: &Path) -> Result<Vec<u8>> {
    if path.is_dir() {
        return Ok(Vec::new());
    }
    let mut f = std::fs::File::open(path).map_err(|e| StorageError::io(path, e))?;
    let mut buf = Vec::with_capacity(64 * 1024);
    f.by_ref()
        .take(64 * 1024)
        .read_to_end(&mut buf)
        .map_err(|e| StorageError::io(path, e))?;
    Ok(buf)
}

/// Which format `path` is.
pub fn probe(path: &Path) -> Result<&'static dyn ImageFormat> {
    let head = head(path)?;
    if let Some(fmt) = FORMATS.iter().find(|f| f.probe(path, &head)) {
        return Ok(*fmt);
    }
    let tried: Vec<&str> = FORMATS.iter().map(|f| f.kind().name()).collect();
    let tried = match foreign_format(&head) {
        Some(other) => format!(
            "{}; it looks like {other}, which ferry does not read",
            tried.join(", ")
        ),
        None => tried.join(", "),
    };
    Err(StorageError::UnknownFormat {
        path: path.into(),
        tried,
    })
}

/// Opens one layer, probing its format.
pub fn open_image(path: &Path, writable: bool) -> Result<Box<dyn Layer>> {
    if !path.exists() {
        return Err(StorageError::io(
            path,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    probe(path)?.open(path, writable)
}

/// Creates an image of `format`.
pub fn create_image(
    path: &Path,
    format: FormatKind,
    opts: &CreateOptions,
) -> Result<Box<dyn Layer>> {
    let fmt = FORMATS.iter().find(|f| f.kind() == format).ok_or_else(|| {
        StorageError::Invalid(format!("ferry cannot create {} images yet", format.name()))
    })?;
    fmt.create(path, opts)
}
