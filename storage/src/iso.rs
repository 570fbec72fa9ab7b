//! ISO 9660 images: read-only CD/DVD media, recognized by the volume descriptor at 32 KiB.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Result, StorageError};
use crate::host_file::LocalFile;
use crate::layer::*;
use crate::raw::RawLayer;

/// The first volume descriptor sits in sector 16 (2048-byte sectors): type, then "CD001".
const VD_OFFSET: usize = 16 * 2048;
const STANDARD_ID: &[u8] = b"CD001";

pub struct IsoFormat;

impl ImageFormat for IsoFormat {
    fn kind(&self) -> FormatKind {
        FormatKind::Iso
    }

    fn probe(&self, _path: &Path, head: &[u8]) -> bool {
        head.get(VD_OFFSET + 1..VD_OFFSET + 6) == Some(STANDARD_ID)
    }

    fn open(&self, path: &Path, writable: bool) -> Result<Box<dyn Layer>> {
        if writable {
            return Err(StorageError::ReadOnly { path: path.into() });
        }
        let file = LocalFile::open(path, false).map_err(|e| StorageError::io(path, e))?;
        Ok(Box::new(RawLayer::with_kind(
            FormatKind::Iso,
            Arc::new(file),
            false,
        )?))
    }

    fn create(&self, path: &Path, _opts: &CreateOptions) -> Result<Box<dyn Layer>> {
        Err(StorageError::Unsupported {
            path: path.into(),
            detail: "ferry reads ISO images but does not make them; use genisoimage or xorriso"
                .into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_the_volume_descriptor() {
        let mut head = vec![0u8; VD_OFFSET + 2048];
        assert!(!IsoFormat.probe(Path::new("x.iso"), &head));
        head[VD_OFFSET] = 1;
        head[VD_OFFSET + 1..VD_OFFSET + 6].copy_from_slice(STANDARD_ID);
        assert!(IsoFormat.probe(Path::new("renamed.img"), &head));
        // A short file is not an ISO, and never panics the probe.
        assert!(!IsoFormat.probe(Path::new("x"), &head[..100]));
    }
}
