//! Raw images: the disk's bytes as they are, sparse where the host file has holes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use crate::error::{Result, StorageError};
use crate::host_file::{HostFile, LocalFile};
use crate::layer::*;

pub struct RawFormat;

/// Signatures of image formats ferry does not read: such a file is never taken for raw.
const FOREIGN: &[(&[u8], usize, &str)] = &[
    (b"QFI\xfb", 0, "qcow2"),
    (b"vhdxfile", 0, "vhdx"),
    (b"QED\0", 0, "qed"),
];

/// The format a file is, if it is one ferry knows of but cannot read.
pub fn foreign_format(head: &[u8]) -> Option<&'static str> {
    FOREIGN
        .iter()
        .find(|(magic, at, _)| head.get(*at..*at + magic.len()) == Some(*magic))
        .map(|(_, _, name)| *name)
}

impl ImageFormat for RawFormat {
    fn kind(&self) -> FormatKind {
        FormatKind::Raw
    }

    fn probe(&self, path: &Path, head: &[u8]) -> bool {
        path.is_file() && foreign_format(head).is_none()
    }

    fn open(&self, path: &Path, writable: bool) -> Result<Box<dyn Layer>> {
        let file = LocalFile::open(path, writable).map_err(|e| StorageError::io(path, e))?;
        Ok(Box::new(RawLayer::new(Arc::new(file), writable)?))
    }

    fn create(&self, path: &Path, opts: &CreateOptions) -> Result<Box<dyn Layer>> {
        if opts.parent.is_some() {
            return Err(StorageError::Unsupported {
                path: path.into(),
                detail: "a raw image cannot have a parent; choose vdi, vmdk, vhd or parallels"
                    .into(),
            });
        }
        let file = LocalFile::create(path).map_err(|e| StorageError::io(path, e))?;
        file.set_len(opts.size)
            .map_err(|e| StorageError::io(path, e))?;
        if opts.variant == Variant::Fixed {
            // Fixed raw: allocate every byte now (fallback: the sparse file still reads right).
            let zeros = vec![0u8; 1 << 20];
            let mut off = 0;
            while off < opts.size {
                let n = (opts.size - off).min(zeros.len() as u64) as usize;
                file.write_at(&zeros[..n], off)
                    .map_err(|e| StorageError::io(path, e))?;
                off += n as u64;
            }
        }
        Ok(Box::new(RawLayer::new(Arc::new(file), true)?))
    }
}

pub struct RawLayer {
    kind: FormatKind,
    file: Arc<dyn HostFile>,
    size: u64,
    writable: bool,
    path: PathBuf,
    /// A handle for asking the host where the file's holes are (None: treat all as data).
    holes: Option<std::fs::File>,
}

impl RawLayer {
    pub fn new(file: Arc<dyn HostFile>, writable: bool) -> Result<Self> {
        Self::with_kind(FormatKind::Raw, file, writable)
    }

    /// A layer that is the file's bytes as they are, reported as `kind` (raw, or ISO media).
    pub fn with_kind(kind: FormatKind, file: Arc<dyn HostFile>, writable: bool) -> Result<Self> {
        let size = file.len().map_err(|e| StorageError::io(file.path(), e))?;
        Ok(Self {
            kind,
            path: file.path().to_path_buf(),
            holes: std::fs::File::open(file.path()).ok(),
            file,
            size,
            writable,
        })
    }

    /// The run at `offset` (at most `len`): data, or a host hole (known zeros), per
    /// SEEK_DATA/SEEK_HOLE; all data where the host cannot say.
    fn host_extent(&self, offset: u64, len: u64) -> (Allocation, u64) {
        use rustix::fs::{seek, SeekFrom};
        let Some(f) = &self.holes else {
            return (Allocation::Data, len);
        };
        let end = offset + len;
        match seek(f, SeekFrom::Data(offset)) {
            Ok(data) if data > offset => (Allocation::Zero, data.min(end) - offset),
            Ok(_) => match seek(f, SeekFrom::Hole(offset)) {
                Ok(hole) if hole > offset => (Allocation::Data, hole.min(end) - offset),
                _ => (Allocation::Data, len),
            },
            // ENXIO: no data at or after `offset` (a hole to the end of the file).
            Err(rustix::io::Errno::NXIO) => (Allocation::Zero, len),
            Err(_) => (Allocation::Data, len),
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        crate::error::check_range(&self.path, offset, len, self.size)
    }
}

impl Layer for RawLayer {
    fn format(&self) -> FormatKind {
        self.kind
    }
    fn variant(&self) -> Variant {
        Variant::Dynamic
    }
    fn path(&self) -> &Path {
        &self.path
    }
    fn files(&self) -> Vec<PathBuf> {
        vec![self.path.clone()]
    }
    fn host_files(&self) -> Vec<Arc<dyn HostFile>> {
        vec![self.file.clone()]
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn uuid(&self) -> Option<Uuid> {
        None
    }
    fn parent(&self) -> Option<ParentRef> {
        None
    }
    fn writable(&self) -> bool {
        self.writable
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<(Allocation, u64)> {
        self.check(offset, len)?;
        if len == 0 || self.kind != FormatKind::Raw {
            return Ok((Allocation::Data, len));
        }
        Ok(self.host_extent(offset, len))
    }
    fn host_run(&self, offset: u64, len: u64) -> Result<Option<(u64, u64)>> {
        self.check(offset, len)?;
        Ok(Some((offset, len)))
    }
    fn mapped_file(&self) -> Option<PathBuf> {
        Some(self.path.clone())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.file
            .read_at(buf, offset)
            .map_err(|e| StorageError::io(&self.path, e))
    }
    fn write_at(&self, buf: &[u8], offset: u64, _lower: &dyn LowerLayers) -> Result<()> {
        if !self.writable {
            return Err(StorageError::ReadOnly {
                path: self.path.clone(),
            });
        }
        self.check(offset, buf.len() as u64)?;
        self.file
            .write_at(buf, offset)
            .map_err(|e| StorageError::io(&self.path, e))
    }
    fn reserve(&self, offset: u64, len: u64) {
        if self.writable && self.check(offset, len).is_ok() {
            self.file.reserve(offset, len);
        }
    }
    fn flush(&self) -> Result<()> {
        self.file
            .sync()
            .map_err(|e| StorageError::io(&self.path, e))
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        self.file
            .punch_hole(offset, len)
            .map_err(|e| StorageError::io(&self.path, e))
    }
}
