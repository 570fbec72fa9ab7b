//! One layer of a virtual disk (an image file, or a bundle of them), and the format trait
//! that probes, opens and creates layers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use crate::error::Result;
use crate::host_file::HostFile;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FormatKind {
    Raw,
    Vdi,
    Vmdk,
    Vhd,
    Parallels,
    Iso,
}

impl FormatKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Vdi => "vdi",
            Self::Vmdk => "vmdk",
            Self::Vhd => "vhd",
            Self::Parallels => "parallels",
            Self::Iso => "iso",
        }
    }
}

/// How a layer's blocks are laid out on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Every block allocated up front.
    Fixed,
    /// Blocks allocated on first write.
    Dynamic,
    /// VMDK: split into 2 GiB extents (sparse when combined with dynamic allocation).
    Split2GSparse,
    Split2GFlat,
    /// VMDK streamOptimized: compressed grains, append-only.
    Stream,
}

/// How a layer names its parent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParentRef {
    pub uuid: Option<Uuid>,
    /// VDI: the parent's modification UUID the child was made against.
    pub modification_uuid: Option<Uuid>,
    /// A path the child records (VMDK parentFileNameHint, VHD parent locators).
    pub path_hints: Vec<PathBuf>,
}

/// What a range of a layer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Data stored in this layer.
    Data,
    /// Known zeros in this layer (hides the parent).
    Zero,
    /// Not in this layer: read the parent, or zeros at the bottom of the chain.
    Unallocated,
}

/// Reads from the layers below the one being written (copy-on-write fills partial blocks).
pub trait LowerLayers {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
}

/// Copies `range` (offsets within a block at guest offset `guest`) from `lower` into the
/// block at host offset `host`, skipping all-zero chunks: the block is a fresh hole there.
pub(crate) fn copy_nonzero_lower(
    file: &dyn crate::host_file::HostFile,
    path: &Path,
    host: u64,
    guest: u64,
    range: std::ops::Range<u64>,
    lower: &dyn LowerLayers,
) -> Result<()> {
    const CHUNK: u64 = 64 << 10;
    if range.start >= range.end {
        return Ok(());
    }
    let mut chunk = vec![0u8; CHUNK.min(range.end - range.start) as usize];
    let mut pos = range.start;
    while pos < range.end {
        let n = CHUNK.min(range.end - pos) as usize;
        let c = &mut chunk[..n];
        lower.read_at(c, guest + pos)?;
        if c.iter().fold(0u8, |a, &b| a | b) != 0 {
            file.write_at(c, host + pos)
                .map_err(|e| crate::error::StorageError::io(path, e))?;
        }
        pos += n as u64;
    }
    Ok(())
}

/// Nothing below: zeros.
pub struct NoLowerLayers;

impl LowerLayers for NoLowerLayers {
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> Result<()> {
        buf.fill(0);
        Ok(())
    }
}

pub trait Layer: Send + Sync {
    fn format(&self) -> FormatKind;
    fn variant(&self) -> Variant;
    /// The main file (the descriptor, header file or bundle folder).
    fn path(&self) -> &Path;
    /// Every host file the layer uses.
    fn files(&self) -> Vec<PathBuf>;
    /// The open files it reads and writes through (blocks and metadata alike): the I/O
    /// engine turns their host cache off for `hostiocache=off`.
    fn host_files(&self) -> Vec<Arc<dyn HostFile>>;
    fn virtual_size(&self) -> u64;
    fn uuid(&self) -> Option<Uuid>;
    /// VDI: changes whenever the image is written (children record it).
    fn modification_uuid(&self) -> Option<Uuid> {
        None
    }
    fn parent(&self) -> Option<ParentRef>;
    fn writable(&self) -> bool;
    /// The state of the run starting at `offset` and how long it is (at most `len`, at least
    /// 1 byte when `len > 0`).
    fn block_status(&self, offset: u64, len: u64) -> Result<(Allocation, u64)>;
    /// Reads what this layer holds; unallocated ranges read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes into this layer; a block allocated for a partial write takes the rest of its
    /// content from `lower`.
    fn write_at(&self, buf: &[u8], offset: u64, lower: &dyn LowerLayers) -> Result<()>;
    /// Says that `write_at` will fill the range whole next (a copy's run): a format that
    /// stores it in place allocates its host blocks in one step ([`HostFile::reserve`]).
    fn reserve(&self, _offset: u64, _len: u64) {}
    /// Makes every completed write durable (data, then metadata).
    fn flush(&self) -> Result<()>;
    /// Drops the range's data where the format can (the range then reads as zeros, or as the
    /// parent's data in a differencing layer for ranges returned to unallocated).
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    /// Writes a new identity into the header (and, where the format has one, a new
    /// modification UUID). Call it last: the layer may rewrite its header from memory on a
    /// later write.
    fn set_uuid(&self, _uuid: Uuid, _modification: Option<Uuid>) -> Result<()> {
        Err(crate::error::StorageError::Unsupported {
            path: self.path().to_path_buf(),
            detail: format!("a {} image records no UUID to set", self.format().name()),
        })
    }
    /// Where the run at `offset` is stored as it is (not compressed, not behind a sector
    /// bitmap) in the layer's file [`Layer::mapped_file`]: its offset there, and how many of
    /// the `len` bytes from `offset` on follow contiguously. `None` where this layer does not
    /// hold the run or the format cannot say; a reader then uses `read_at`. (A copy reads
    /// mapped files in place through this.)
    fn host_run(&self, _offset: u64, _len: u64) -> Result<Option<(u64, u64)>> {
        Ok(None)
    }
    /// The one host file that every run [`Layer::host_run`] reports lies in; `None` where the
    /// layer reports none.
    fn mapped_file(&self) -> Option<PathBuf> {
        None
    }
    /// Where the layer's data blocks live in its host file, for consistency checks; `None`
    /// for formats without a block table (raw, fixed, VMDK's grain tables).
    fn block_table(&self) -> Result<Option<BlockTable>> {
        Ok(None)
    }
    /// Damage that opening tolerated (a redundant copy of a header with a bad checksum), for
    /// `check`: one sentence each.
    fn metadata_problems(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
}

/// `Layer::host_run` for formats that store fixed-size blocks whole: `host(index)` is where
/// block `index` starts in the file (None: not allocated here). Blocks stored one after the
/// other (as a sequential writer leaves them) extend the run.
pub(crate) fn block_host_run(
    offset: u64,
    len: u64,
    block: u64,
    host: impl Fn(u64) -> Option<u64>,
) -> Option<(u64, u64)> {
    let index = offset / block;
    let start = host(index)? + offset % block;
    let mut end = (index + 1) * block;
    while end < offset + len && host(end / block) == Some(start + (end - offset)) {
        end += block;
    }
    Some((start, end.min(offset + len) - offset))
}

/// A layer's block table as host offsets, for `check`: every referenced block must lie in
/// the data area, no two may overlap, and data-area space no block uses is leaked.
#[derive(Debug, Clone)]
pub struct BlockTable {
    /// The host file the blocks are in.
    pub file: PathBuf,
    /// (table index, host offset) of every allocated block.
    pub blocks: Vec<(u64, u64)>,
    /// Host bytes one block occupies (with its bitmap or extra bytes).
    pub block_bytes: u64,
    /// The data area: after headers and tables, before any trailer (VHD's footer).
    pub data_start: u64,
    pub data_end: u64,
    /// Bytes between blocks that are alignment padding, not leaks.
    pub slack: u64,
}

/// What `create` makes.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size: u64,
    pub variant: Variant,
    /// The parent layer's identity and path, for a differencing child.
    pub parent: Option<CreateParent>,
}

#[derive(Debug, Clone)]
pub struct CreateParent {
    pub path: PathBuf,
    pub uuid: Option<Uuid>,
    pub modification_uuid: Option<Uuid>,
    pub format: FormatKind,
}

/// One image format: recognizes, opens and creates its files.
pub trait ImageFormat: Sync {
    fn kind(&self) -> FormatKind;
    /// Whether `head` (the file's first bytes, up to 4 KiB; for a folder, empty) is this format.
    fn probe(&self, path: &Path, head: &[u8]) -> bool;
    fn open(&self, path: &Path, writable: bool) -> Result<Box<dyn Layer>>;
    fn create(&self, path: &Path, opts: &CreateOptions) -> Result<Box<dyn Layer>>;
}
