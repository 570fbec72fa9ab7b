//! VirtualBox VDI images: dynamic (normal), fixed and differencing.
//!
//! Layout (little-endian; `VDICore.h` of VirtualBox): a 64-byte text, the signature
//! `0xBEDA107F` at 0x40, the version at 0x44, then the version-1 header (`VDIHEADER1PLUS`,
//! 0x190 bytes as VirtualBox writes it): image type, offsets of the block map and of the data
//! area, disk size, block size, extra bytes before each block, block counts and four UUIDs
//! (create, modify, linkage = parent, parent's modify), stored in GUID (little-endian) layout.
//! The block map holds one u32 per block: the block's index in the data area, `0xFFFFFFFF`
//! (not allocated: the parent's data, or zeros) or `0xFFFFFFFE` (zeros, hiding the parent).
//!
//! Writes allocate a block at the end of the data area: the data first, then the map entry,
//! then the header's allocated-block count, so a crash loses at most unflushed writes. A crash
//! between the map entry and the header leaves the count one short; opening the image
//! writable recounts and rewrites it (VirtualBox appends new blocks at index `count`, so the
//! count must match the map before anything is written).
//!
//! Discard (dynamic, non-differencing images only, whole blocks only): the last block of the
//! data area is returned to "not allocated" and the file shrinks; any other block keeps its
//! place in the map (VirtualBox and qemu need the data area dense) and its host range is
//! punched out, so it reads as zeros and takes no host space.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use uuid::Uuid;

use crate::error::{Result, StorageError};
use crate::host_file::{HostFile, LocalFile};
use crate::layer::*;

/// Signature at offset 0x40.
pub const SIGNATURE: u32 = 0xBEDA_107F;
/// The text VirtualBox (4.x to 7.0) writes in front of the signature.
pub const HEADER_TEXT: &[u8] = b"<<< Oracle VM VirtualBox Disk Image >>>\n";
/// Map entry: not allocated (the parent's data, or zeros at the bottom of a chain).
pub const BLOCK_FREE: u32 = 0xFFFF_FFFF;
/// Map entry: reads as zeros and hides the parent.
pub const BLOCK_ZERO: u32 = 0xFFFF_FFFE;

const VERSION_1_1: u32 = 0x0001_0001;
const TYPE_NORMAL: u32 = 1;
const TYPE_FIXED: u32 = 2;
const TYPE_UNDO: u32 = 3;
const TYPE_DIFF: u32 = 4;

// Offsets of the version-1 header fields in the file.
const O_SIGNATURE: usize = 0x40;
const O_VERSION: usize = 0x44;
const O_CB_HEADER: usize = 0x48;
const O_TYPE: usize = 0x4C;
const O_OFF_BLOCKS: usize = 0x154;
const O_OFF_DATA: usize = 0x158;
const O_LEGACY_GEOMETRY: usize = 0x15C;
const O_CB_DISK: usize = 0x170;
const O_CB_BLOCK: usize = 0x178;
const O_CB_BLOCK_EXTRA: usize = 0x17C;
const O_C_BLOCKS: usize = 0x180;
const O_C_ALLOCATED: usize = 0x184;
const O_UUID_CREATE: usize = 0x188;
const O_UUID_MODIFY: usize = 0x198;
const O_UUID_LINKAGE: usize = 0x1A8;
const O_UUID_PARENT_MODIFY: usize = 0x1B8;
const O_LCHS_GEOMETRY: usize = 0x1C8;
/// End of `VDIHEADER1PLUS` (0x48 + 0x190).
const HEADER1PLUS_END: usize = 0x1D8;
/// sizeof(VDIHEADER1): the smallest version-1 header (qemu writes this size).
const HEADER1_SIZE: u32 = 0x180;
const HEADER1PLUS_SIZE: u32 = 0x190;

// Version-0 header (VirtualBox before 1.4), read only.
const V0_TYPE: usize = 0x48;
const V0_CB_DISK: usize = 0x160;
const V0_CB_BLOCK: usize = 0x168;
const V0_C_BLOCKS: usize = 0x16C;
const V0_C_ALLOCATED: usize = 0x170;
const V0_UUID_CREATE: usize = 0x174;
const V0_UUID_MODIFY: usize = 0x184;
const V0_UUID_LINKAGE: usize = 0x194;
const V0_END: usize = 0x1A4;

/// Alignment VirtualBox uses for the block map and the data area.
const DATA_ALIGN: u64 = 1 << 20;
const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;
/// Largest block size ferry reads (VirtualBox creates 512 KiB to 8 MiB).
const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Largest disk ferry creates: qemu's limit (0x1fffff80 blocks of 1 MiB).
const MAX_DISK_SIZE: u64 = 0x1fff_ff80 * (1 << 20);
const SECTOR: u64 = 512;

pub struct VdiFormat;

impl ImageFormat for VdiFormat {
    fn kind(&self) -> FormatKind {
        FormatKind::Vdi
    }

    fn probe(&self, _path: &Path, head: &[u8]) -> bool {
        head.get(O_SIGNATURE..O_SIGNATURE + 4)
            .is_some_and(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == SIGNATURE)
    }

    fn open(&self, path: &Path, writable: bool) -> Result<Box<dyn Layer>> {
        let file = LocalFile::open(path, writable).map_err(|e| StorageError::io(path, e))?;
        Ok(Box::new(VdiLayer::new(Arc::new(file), writable)?))
    }

    fn create(&self, path: &Path, opts: &CreateOptions) -> Result<Box<dyn Layer>> {
        let image = plan_create(path, opts)?;
        let file = LocalFile::create(path).map_err(|e| StorageError::io(path, e))?;
        let file: Arc<dyn HostFile> = Arc::new(file);
        if let Err(e) = write_new_image(&*file, &image) {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(Box::new(VdiLayer::new(file, true)?))
    }
}

impl VdiFormat {
    /// Creates an image in `file` (which must be empty), for tests that inject failures.
    pub fn create_on(file: Arc<dyn HostFile>, opts: &CreateOptions) -> Result<VdiLayer> {
        let image = plan_create(file.path(), opts)?;
        write_new_image(&*file, &image)?;
        VdiLayer::new(file, true)
    }
}

/// What `create` writes.
struct NewImage {
    header: Vec<u8>,
    map: Vec<u32>,
    off_blocks: u64,
    off_data: u64,
    block_size: u64,
    fixed: bool,
}

fn plan_create(path: &Path, opts: &CreateOptions) -> Result<NewImage> {
    let unsupported = |detail: String| StorageError::Unsupported {
        path: path.into(),
        detail,
    };
    if opts.size == 0 {
        return Err(StorageError::Invalid(format!(
            "{}: a VDI image needs a size above 0",
            path.display()
        )));
    }
    // Sizes are whole sectors (qemu rounds odd sizes up when it reads them, so do it here).
    let size = opts
        .size
        .checked_next_multiple_of(SECTOR)
        .filter(|&s| s <= MAX_DISK_SIZE)
        .ok_or_else(|| {
            unsupported(format!(
                "{} bytes is over the largest VDI size ({MAX_DISK_SIZE} bytes)",
                opts.size
            ))
        })?;
    let fixed = match opts.variant {
        Variant::Fixed => true,
        Variant::Dynamic => false,
        other => {
            return Err(unsupported(format!(
                "VDI has no {other:?} variant (fixed or dynamic only)"
            )))
        }
    };
    let (image_type, link, parent_modify) = match &opts.parent {
        None => (
            if fixed { TYPE_FIXED } else { TYPE_NORMAL },
            Uuid::nil(),
            Uuid::nil(),
        ),
        Some(_) if fixed => {
            return Err(unsupported(
                "a differencing VDI image is always dynamic".into(),
            ));
        }
        Some(p) => {
            let uuid = p.uuid.filter(|u| !u.is_nil()).ok_or_else(|| {
                unsupported(format!(
                    "the parent {} has no UUID for a VDI child to name",
                    p.path.display()
                ))
            })?;
            (TYPE_DIFF, uuid, p.modification_uuid.unwrap_or_default())
        }
    };
    let block_size = u64::from(DEFAULT_BLOCK_SIZE);
    let blocks = size.div_ceil(block_size);
    let blocks32 = u32::try_from(blocks).map_err(|_| unsupported("too many blocks".into()))?;
    let off_blocks = (HEADER1PLUS_END as u64).next_multiple_of(DATA_ALIGN);
    let off_data = (off_blocks + blocks * 4).next_multiple_of(DATA_ALIGN);
    let off_data32 =
        u32::try_from(off_data).map_err(|_| unsupported("block map too large".into()))?;

    let mut h = vec![0u8; HEADER1PLUS_END];
    h[..HEADER_TEXT.len()].copy_from_slice(HEADER_TEXT);
    put32(&mut h, O_SIGNATURE, SIGNATURE);
    put32(&mut h, O_VERSION, VERSION_1_1);
    put32(&mut h, O_CB_HEADER, HEADER1PLUS_SIZE);
    put32(&mut h, O_TYPE, image_type);
    // Flags 0, comment empty.
    put32(&mut h, O_OFF_BLOCKS, off_blocks as u32);
    put32(&mut h, O_OFF_DATA, off_data32);
    // Geometry "not calculated" (0/0/0, 512-byte sectors), as VirtualBox writes it when the
    // caller lets it auto-detect; the legacy field's sector size must be 512 for qemu.
    put32(&mut h, O_LEGACY_GEOMETRY + 12, SECTOR as u32);
    h[O_CB_DISK..O_CB_DISK + 8].copy_from_slice(&size.to_le_bytes());
    put32(&mut h, O_CB_BLOCK, DEFAULT_BLOCK_SIZE);
    put32(&mut h, O_CB_BLOCK_EXTRA, 0);
    put32(&mut h, O_C_BLOCKS, blocks32);
    put32(&mut h, O_C_ALLOCATED, if fixed { blocks32 } else { 0 });
    put_uuid(&mut h, O_UUID_CREATE, Uuid::new_v4());
    put_uuid(&mut h, O_UUID_MODIFY, Uuid::new_v4());
    put_uuid(&mut h, O_UUID_LINKAGE, link);
    put_uuid(&mut h, O_UUID_PARENT_MODIFY, parent_modify);
    put32(&mut h, O_LCHS_GEOMETRY + 12, SECTOR as u32);

    let map = if fixed {
        (0..blocks32).collect()
    } else {
        vec![BLOCK_FREE; blocks as usize]
    };
    Ok(NewImage {
        header: h,
        map,
        off_blocks,
        off_data,
        block_size,
        fixed,
    })
}

/// Writes a new image: the file's size and data area, the map, and the header last, so a
/// crash during creation leaves no file that passes for a VDI.
fn write_new_image(file: &dyn HostFile, img: &NewImage) -> Result<()> {
    let path = file.path().to_path_buf();
    let io = |e| StorageError::io(&path, e);
    let end = if img.fixed {
        img.off_data + img.map.len() as u64 * img.block_size
    } else {
        img.off_data
    };
    file.set_len(end).map_err(io)?;
    if img.fixed {
        // Preallocate: write every block's zeros.
        let zeros = vec![0u8; img.block_size as usize];
        for i in 0..img.map.len() as u64 {
            file.write_at(&zeros, img.off_data + i * img.block_size)
                .map_err(io)?;
        }
    }
    let map: Vec<u8> = img.map.iter().flat_map(|e| e.to_le_bytes()).collect();
    file.write_at(&map, img.off_blocks).map_err(io)?;
    file.sync().map_err(io)?;
    file.write_at(&img.header, 0).map_err(io)?;
    file.sync().map_err(io)?;
    Ok(())
}

fn put32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn get32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

fn get64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

fn get_uuid(buf: &[u8], at: usize) -> Uuid {
    let mut b = [0u8; 16];
    b.copy_from_slice(&buf[at..at + 16]);
    Uuid::from_bytes_le(b)
}

fn put_uuid(buf: &mut [u8], at: usize, u: Uuid) {
    buf[at..at + 16].copy_from_slice(&u.to_bytes_le());
}

fn is_allocated(entry: u32) -> bool {
    entry < BLOCK_ZERO
}

/// The header fields ferry uses, validated.
#[derive(Debug, Clone)]
struct Header {
    /// Version 1.1: the one ferry writes.
    writable_version: bool,
    image_type: u32,
    off_blocks: u64,
    off_data: u64,
    disk_size: u64,
    block_size: u64,
    block_extra: u64,
    blocks: u32,
    allocated: u32,
    uuid_create: Uuid,
    uuid_modify: Uuid,
    uuid_linkage: Uuid,
    uuid_parent_modify: Uuid,
}

fn parse_header(path: &Path, h: &[u8], file_len: u64) -> Result<Header> {
    let corrupt = |d: String| StorageError::corrupt(path, format!("VDI header: {d}"));
    if file_len < V0_END as u64 {
        return Err(corrupt(format!("the file is truncated ({file_len} bytes)")));
    }
    let sig = get32(h, O_SIGNATURE);
    if sig != SIGNATURE {
        return Err(corrupt(format!(
            "bad signature {sig:#010x} (expected {SIGNATURE:#010x})"
        )));
    }
    let version = get32(h, O_VERSION);
    let major = version >> 16;
    let hd = match major {
        1 => {
            if file_len < HEADER1PLUS_END as u64 {
                return Err(corrupt(format!("the file is truncated ({file_len} bytes)")));
            }
            let cb_header = get32(h, O_CB_HEADER);
            if cb_header < HEADER1_SIZE {
                return Err(corrupt(format!(
                    "header size {cb_header} is below the minimum {HEADER1_SIZE}"
                )));
            }
            Header {
                writable_version: version == VERSION_1_1,
                image_type: get32(h, O_TYPE),
                off_blocks: u64::from(get32(h, O_OFF_BLOCKS)),
                off_data: u64::from(get32(h, O_OFF_DATA)),
                disk_size: get64(h, O_CB_DISK),
                block_size: u64::from(get32(h, O_CB_BLOCK)),
                block_extra: u64::from(get32(h, O_CB_BLOCK_EXTRA)),
                blocks: get32(h, O_C_BLOCKS),
                allocated: get32(h, O_C_ALLOCATED),
                uuid_create: get_uuid(h, O_UUID_CREATE),
                uuid_modify: get_uuid(h, O_UUID_MODIFY),
                uuid_linkage: get_uuid(h, O_UUID_LINKAGE),
                uuid_parent_modify: get_uuid(h, O_UUID_PARENT_MODIFY),
            }
        }
        0 => {
            let blocks = get32(h, V0_C_BLOCKS);
            Header {
                writable_version: false,
                image_type: get32(h, V0_TYPE),
                off_blocks: V0_END as u64,
                off_data: V0_END as u64 + u64::from(blocks) * 4,
                disk_size: get64(h, V0_CB_DISK),
                block_size: u64::from(get32(h, V0_CB_BLOCK)),
                block_extra: 0,
                blocks,
                allocated: get32(h, V0_C_ALLOCATED),
                uuid_create: get_uuid(h, V0_UUID_CREATE),
                uuid_modify: get_uuid(h, V0_UUID_MODIFY),
                uuid_linkage: get_uuid(h, V0_UUID_LINKAGE),
                uuid_parent_modify: Uuid::nil(),
            }
        }
        _ => {
            return Err(StorageError::Unsupported {
                path: path.into(),
                detail: format!(
                    "VDI version {}.{} is not supported (ferry reads 0.x and 1.x)",
                    major,
                    version & 0xffff
                ),
            })
        }
    };
    match hd.image_type {
        TYPE_NORMAL | TYPE_FIXED | TYPE_DIFF => {}
        TYPE_UNDO => {
            return Err(StorageError::Unsupported {
                path: path.into(),
                detail: "VDI undo images (type 3) are not supported".into(),
            })
        }
        t => return Err(corrupt(format!("unknown image type {t}"))),
    }
    // Any power of two from a sector up: VirtualBox takes it from the header (its
    // `AllocationBlockSize` at creation), so nothing below assumes 1 MiB.
    if !hd.block_size.is_power_of_two() || hd.block_size < SECTOR {
        return Err(corrupt(format!(
            "block size {} is not a power of two of at least 512 bytes",
            hd.block_size
        )));
    }
    if hd.block_size > u64::from(MAX_BLOCK_SIZE) {
        return Err(corrupt(format!(
            "block size {} is over the largest ferry reads ({MAX_BLOCK_SIZE} bytes)",
            hd.block_size
        )));
    }
    // Bytes VirtualBox reserves in front of each block's data (VDICore.h: 0 or a power of two).
    if hd.block_extra != 0
        && (!hd.block_extra.is_power_of_two() || hd.block_extra > u64::from(MAX_BLOCK_SIZE))
    {
        return Err(corrupt(format!(
            "{} extra bytes per block is neither 0 nor a power of two up to {MAX_BLOCK_SIZE}",
            hd.block_extra
        )));
    }
    if hd.disk_size == 0 || hd.blocks == 0 {
        return Err(corrupt(format!(
            "empty disk (size {}, {} blocks)",
            hd.disk_size, hd.blocks
        )));
    }
    // u64 cannot overflow: u32 blocks times a block of at most 2^28 bytes.
    let capacity = u64::from(hd.blocks) * hd.block_size;
    if capacity < hd.disk_size {
        return Err(corrupt(format!(
            "disk size {} is more than its {} blocks of {} bytes hold",
            hd.disk_size, hd.blocks, hd.block_size
        )));
    }
    if u64::from(hd.blocks) > hd.disk_size.div_ceil(hd.block_size) {
        tracing::debug!(
            "{}: {} blocks for a disk of {} bytes (more than needed)",
            path.display(),
            hd.blocks,
            hd.disk_size
        );
    }
    if hd.allocated > hd.blocks {
        return Err(corrupt(format!(
            "{} blocks allocated of only {}",
            hd.allocated, hd.blocks
        )));
    }
    let header_end = if major == 1 {
        O_CB_HEADER as u64 + u64::from(get32(h, O_CB_HEADER))
    } else {
        V0_END as u64
    };
    if hd.off_blocks < header_end {
        return Err(corrupt(format!(
            "block map offset {:#x} overlaps the header (which ends at {header_end:#x})",
            hd.off_blocks
        )));
    }
    let map_end = hd.off_blocks + u64::from(hd.blocks) * 4;
    if map_end > file_len {
        return Err(corrupt(format!(
            "the block map ({} entries at {:#x}) runs past the end of the file ({file_len} bytes)",
            hd.blocks, hd.off_blocks
        )));
    }
    if hd.off_data < map_end {
        return Err(corrupt(format!(
            "data offset {:#x} overlaps the header or block map (which ends at {map_end:#x})",
            hd.off_data
        )));
    }
    if hd.image_type == TYPE_DIFF && hd.uuid_linkage.is_nil() {
        return Err(corrupt("a differencing image with no parent UUID".into()));
    }
    Ok(hd)
}

struct State {
    map: Vec<u32>,
    /// Allocated map entries (what the header's count must say).
    allocated: u32,
    /// Next slot at the end of the data area.
    next_slot: u32,
    /// Unreferenced slots below `next_slot` (only in images another tool left sparse).
    gaps: Vec<u32>,
    modify_uuid: Uuid,
    /// Whether this session changed the image (and so its modification UUID).
    modified: bool,
    /// The header on disk is behind (count or modification UUID).
    header_dirty: bool,
}

pub struct VdiLayer {
    file: Arc<dyn HostFile>,
    path: PathBuf,
    writable: bool,
    hd: Header,
    /// Reads share it (with the host cache off each read waits for the disk: they must
    /// overlap); writes and metadata changes hold it alone.
    state: RwLock<State>,
}

impl VdiLayer {
    /// Opens the VDI image in `file`.
    pub fn new(file: Arc<dyn HostFile>, writable: bool) -> Result<Self> {
        let path = file.path().to_path_buf();
        let io = |e| StorageError::io(&path, e);
        let file_len = file.len().map_err(io)?;
        let mut head = vec![0u8; HEADER1PLUS_END];
        file.read_at(&mut head, 0).map_err(io)?;
        let hd = parse_header(&path, &head, file_len)?;
        if writable && !hd.writable_version {
            return Err(StorageError::Unsupported {
                path,
                detail: format!(
                    "VDI version {}.{} is read-only in ferry (it writes 1.1)",
                    get32(&head, O_VERSION) >> 16,
                    get32(&head, O_VERSION) & 0xffff
                ),
            });
        }
        // The map's size is bounded by the file's (checked in parse_header).
        let mut raw = vec![0u8; hd.blocks as usize * 4];
        file.read_at(&mut raw, hd.off_blocks).map_err(io)?;
        let map: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        drop(raw);
        let total = hd.block_extra + hd.block_size;
        let mut used = vec![false; hd.blocks as usize];
        let mut allocated = 0u32;
        let mut next_slot = 0u32;
        for (i, &e) in map.iter().enumerate() {
            if !is_allocated(e) {
                continue;
            }
            let corrupt =
                |d: String| StorageError::corrupt(&path, format!("VDI block map entry {i}: {d}"));
            if e >= hd.blocks {
                return Err(corrupt(format!(
                    "data block {e} is past the data area ({} blocks)",
                    hd.blocks
                )));
            }
            let end = hd.off_data + (u64::from(e) + 1) * total;
            if end > file_len {
                return Err(corrupt(format!(
                    "data block {e} (ends at {end:#x}) is past the end of the file ({file_len} bytes)"
                )));
            }
            if std::mem::replace(&mut used[e as usize], true) {
                let other = map.iter().position(|&x| x == e).unwrap_or(i);
                return Err(corrupt(format!(
                    "data block {e} is also used by entry {other}"
                )));
            }
            allocated += 1;
            next_slot = next_slot.max(e + 1);
        }
        let gaps: Vec<u32> = (0..next_slot)
            .rev()
            .filter(|&s| !used[s as usize])
            .collect();
        drop(used);
        let layer = Self {
            file,
            writable,
            state: RwLock::new(State {
                map,
                allocated,
                next_slot,
                gaps,
                modify_uuid: hd.uuid_modify,
                modified: false,
                header_dirty: false,
            }),
            hd,
            path,
        };
        if layer.hd.allocated != allocated {
            // A crash between a map entry and the header (or another tool's bug).
            tracing::warn!(
                "{}: header says {} blocks allocated, the map holds {}{}",
                layer.path.display(),
                layer.hd.allocated,
                allocated,
                if writable { "; fixing the header" } else { "" }
            );
            if writable {
                let mut st = layer.lock();
                layer.write_header(&mut st)?;
                layer
                    .file
                    .sync()
                    .map_err(|e| StorageError::io(&layer.path, e))?;
            }
        }
        Ok(layer)
    }

    fn lock(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read_lock(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn io(&self, e: std::io::Error) -> StorageError {
        StorageError::io(&self.path, e)
    }

    fn is_diff(&self) -> bool {
        self.hd.image_type == TYPE_DIFF
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        crate::error::check_range(&self.path, offset, len, self.hd.disk_size)
    }

    /// Host offset of the data of slot `slot`.
    fn slot_offset(&self, slot: u32) -> u64 {
        self.hd.off_data
            + u64::from(slot) * (self.hd.block_extra + self.hd.block_size)
            + self.hd.block_extra
    }

    /// Writes the header's allocated count and modification UUID (one write: 0x184..0x1A8).
    fn write_header(&self, st: &mut State) -> Result<()> {
        let mut b = [0u8; O_UUID_LINKAGE - O_C_ALLOCATED];
        b[..4].copy_from_slice(&st.allocated.to_le_bytes());
        b[4..20].copy_from_slice(&self.hd.uuid_create.to_bytes_le());
        b[20..36].copy_from_slice(&st.modify_uuid.to_bytes_le());
        self.file
            .write_at(&b, O_C_ALLOCATED as u64)
            .map_err(|e| self.io(e))?;
        st.header_dirty = false;
        Ok(())
    }

    fn write_entry(&self, index: u64, entry: u32) -> Result<()> {
        self.file
            .write_at(&entry.to_le_bytes(), self.hd.off_blocks + index * 4)
            .map_err(|e| self.io(e))
    }

    /// The first write after open gives the image a new modification UUID (as VirtualBox
    /// does); it reaches the header with the next header write, flush or close.
    fn mark_modified(&self, st: &mut State) {
        if !st.modified {
            st.modified = true;
            st.modify_uuid = Uuid::new_v4();
            st.header_dirty = true;
        }
    }

    fn need_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(StorageError::ReadOnly {
                path: self.path.clone(),
            })
        }
    }

    /// Bytes of block `index` inside the disk (the last block may be cut short).
    fn block_len(&self, index: u64) -> u64 {
        (self.hd.disk_size - index * self.hd.block_size).min(self.hd.block_size)
    }

    fn state_of(&self, entry: u32) -> Allocation {
        if is_allocated(entry) {
            Allocation::Data
        } else if entry == BLOCK_ZERO {
            Allocation::Zero
        } else {
            Allocation::Unallocated
        }
    }

    /// Writes `part` at `within` of block `index`, whose entry is not allocated.
    fn write_new_block(
        &self,
        st: &mut State,
        index: u64,
        within: u64,
        part: &[u8],
        lower: &dyn LowerLayers,
    ) -> Result<()> {
        let entry = st.map[index as usize];
        let zeros = part.iter().all(|&b| b == 0);
        let whole = within == 0 && part.len() as u64 == self.block_len(index);
        if zeros && (entry == BLOCK_ZERO || (entry == BLOCK_FREE && !self.is_diff())) {
            // Already reads as zeros.
            return Ok(());
        }
        if zeros && whole {
            // Differencing: a zero block hides the parent without taking space.
            self.write_entry(index, BLOCK_ZERO)?;
            st.map[index as usize] = BLOCK_ZERO;
            return Ok(());
        }
        let bs = self.hd.block_size as usize;
        let len = self.block_len(index) as usize;
        let start = within as usize;
        let end = start + part.len();
        let slot = match st.gaps.last() {
            Some(&s) => s,
            None => st.next_slot,
        };
        if slot >= self.hd.blocks {
            return Err(StorageError::corrupt(
                &self.path,
                format!("VDI data area is full ({} blocks)", self.hd.blocks),
            ));
        }
        let at = self.slot_offset(slot);
        let extra_at = at - self.hd.block_extra;
        // A new slot past the end of the file: a hole that reads as zeros.
        let fresh = st.gaps.is_empty() && self.file.len().map_err(|e| self.io(e))? <= extra_at;
        if fresh {
            // Extend the file over the block and write only what is not zero.
            if start > 0 || end < bs {
                self.file.set_len(at + bs as u64).map_err(|e| self.io(e))?;
            }
            if entry == BLOCK_FREE {
                let base = index * self.hd.block_size;
                let r = |a: usize, b: usize| a as u64..b as u64;
                let (f, p) = (&*self.file, &*self.path);
                copy_nonzero_lower(f, p, at, base, r(0, start), lower)?;
                copy_nonzero_lower(f, p, at, base, r(end.min(len), len), lower)?;
            }
            self.file
                .write_at(part, at + within)
                .map_err(|e| self.io(e))?;
        } else {
            let mut block = vec![0u8; bs];
            if entry == BLOCK_FREE {
                let base = index * self.hd.block_size;
                if start > 0 {
                    lower.read_at(&mut block[..start], base)?;
                }
                if end < len {
                    lower.read_at(&mut block[end..len], base + end as u64)?;
                }
            }
            block[start..end].copy_from_slice(part);
            if self.hd.block_extra > 0 {
                let extra = vec![0u8; self.hd.block_extra as usize];
                self.file
                    .write_at(&extra, extra_at)
                    .map_err(|e| self.io(e))?;
            }
            self.file.write_at(&block, at).map_err(|e| self.io(e))?;
        }
        // Data, then the map entry, then the header.
        self.write_entry(index, slot)?;
        if st.gaps.last() == Some(&slot) {
            st.gaps.pop();
        } else {
            st.next_slot += 1;
        }
        st.map[index as usize] = slot;
        st.allocated += 1;
        st.header_dirty = true;
        self.write_header(st)
    }

    /// Frees whole block `index` of a dynamic base image.
    fn discard_block(&self, st: &mut State, index: u64) -> Result<()> {
        let entry = st.map[index as usize];
        if !is_allocated(entry) {
            return Ok(());
        }
        if entry + 1 == st.next_slot {
            // The last slot: unmap it (durably, before the file shrinks), then shrink.
            self.write_entry(index, BLOCK_FREE)?;
            st.map[index as usize] = BLOCK_FREE;
            st.allocated -= 1;
            st.next_slot -= 1;
            while st.next_slot > 0 && st.gaps.first() == Some(&(st.next_slot - 1)) {
                st.gaps.remove(0);
                st.next_slot -= 1;
            }
            self.file.sync().map_err(|e| self.io(e))?;
            self.write_header(st)?;
            let total = self.hd.block_extra + self.hd.block_size;
            self.file
                .set_len(self.hd.off_data + u64::from(st.next_slot) * total)
                .map_err(|e| self.io(e))?;
        } else {
            let at = self.slot_offset(entry);
            if self.file.punch_hole(at, self.hd.block_size).is_err() {
                let zeros = vec![0u8; self.hd.block_size as usize];
                self.file.write_at(&zeros, at).map_err(|e| self.io(e))?;
            }
        }
        Ok(())
    }

    /// The image's block map (for tests and tools).
    pub fn block_map(&self) -> Vec<u32> {
        self.lock().map.clone()
    }

    pub fn block_size(&self) -> u64 {
        self.hd.block_size
    }
}

impl Drop for VdiLayer {
    fn drop(&mut self) {
        if !self.writable {
            return;
        }
        let mut st = self.lock();
        if st.header_dirty {
            let _ = self.file.sync();
            if self.write_header(&mut st).is_ok() {
                let _ = self.file.sync();
            }
        }
    }
}

impl Layer for VdiLayer {
    fn format(&self) -> FormatKind {
        FormatKind::Vdi
    }

    fn variant(&self) -> Variant {
        if self.hd.image_type == TYPE_FIXED {
            Variant::Fixed
        } else {
            Variant::Dynamic
        }
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
        self.hd.disk_size
    }

    fn uuid(&self) -> Option<Uuid> {
        Some(self.hd.uuid_create).filter(|u| !u.is_nil())
    }

    fn modification_uuid(&self) -> Option<Uuid> {
        Some(self.lock().modify_uuid).filter(|u| !u.is_nil())
    }

    fn parent(&self) -> Option<ParentRef> {
        if !self.is_diff() {
            return None;
        }
        Some(ParentRef {
            uuid: Some(self.hd.uuid_linkage),
            modification_uuid: Some(self.hd.uuid_parent_modify).filter(|u| !u.is_nil()),
            path_hints: Vec::new(),
        })
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<(Allocation, u64)> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok((Allocation::Unallocated, 0));
        }
        let st = self.read_lock();
        let bs = self.hd.block_size;
        let first = offset / bs;
        let state = self.state_of(st.map[first as usize]);
        let end = offset + len;
        let mut next = first + 1;
        while next * bs < end && self.state_of(st.map[next as usize]) == state {
            next += 1;
        }
        Ok((state, (next * bs).min(end) - offset))
    }

    fn mapped_file(&self) -> Option<PathBuf> {
        Some(self.path.clone())
    }

    fn host_run(&self, offset: u64, len: u64) -> Result<Option<(u64, u64)>> {
        self.check(offset, len)?;
        let st = self.read_lock();
        Ok(crate::layer::block_host_run(
            offset,
            len,
            self.hd.block_size,
            |index| {
                let entry = *st.map.get(usize::try_from(index).ok()?)?;
                is_allocated(entry).then(|| self.slot_offset(entry))
            },
        ))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        let st = self.read_lock();
        let bs = self.hd.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let index = off / bs;
            let within = off % bs;
            let n = ((bs - within) as usize).min(buf.len() - done);
            let part = &mut buf[done..done + n];
            let entry = st.map[index as usize];
            if is_allocated(entry) {
                self.file
                    .read_at(part, self.slot_offset(entry) + within)
                    .map_err(|e| self.io(e))?;
            } else {
                part.fill(0);
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, lower: &dyn LowerLayers) -> Result<()> {
        self.need_writable()?;
        self.check(offset, buf.len() as u64)?;
        let bs = self.hd.block_size;
        {
            // Into blocks that are all allocated, of an image already marked modified: no
            // map or header change, so writes share the lock and overlap on the disk.
            let st = self.read_lock();
            let (first, last) = (
                offset / bs,
                (offset + buf.len() as u64).saturating_sub(1) / bs,
            );
            if st.modified
                && !buf.is_empty()
                && (first..=last).all(|i| is_allocated(st.map[i as usize]))
            {
                let mut done = 0usize;
                while done < buf.len() {
                    let off = offset + done as u64;
                    let within = off % bs;
                    let n = ((bs - within) as usize).min(buf.len() - done);
                    let entry = st.map[(off / bs) as usize];
                    self.file
                        .write_at(&buf[done..done + n], self.slot_offset(entry) + within)
                        .map_err(|e| self.io(e))?;
                    done += n;
                }
                return Ok(());
            }
        }
        let mut st = self.lock();
        if !buf.is_empty() {
            self.mark_modified(&mut st);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let index = off / bs;
            let within = off % bs;
            let n = ((bs - within) as usize).min(buf.len() - done);
            let part = &buf[done..done + n];
            let entry = st.map[index as usize];
            if is_allocated(entry) {
                self.file
                    .write_at(part, self.slot_offset(entry) + within)
                    .map_err(|e| self.io(e))?;
            } else {
                self.write_new_block(&mut st, index, within, part, lower)?;
            }
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut st = self.lock();
        self.file.sync().map_err(|e| self.io(e))?;
        if st.header_dirty {
            self.write_header(&mut st)?;
            self.file.sync().map_err(|e| self.io(e))?;
        }
        Ok(())
    }

    fn set_uuid(&self, uuid: Uuid, modification: Option<Uuid>) -> Result<()> {
        self.need_writable()?;
        // Pending header fields go first: the header write below must be the last one.
        self.flush()?;
        let mut st = self.lock();
        let mut b = [0u8; 32];
        b[..16].copy_from_slice(&uuid.to_bytes_le());
        if let Some(m) = modification {
            st.modify_uuid = m;
        }
        b[16..].copy_from_slice(&st.modify_uuid.to_bytes_le());
        self.file
            .write_at(&b, O_UUID_CREATE as u64)
            .map_err(|e| self.io(e))?;
        self.file.sync().map_err(|e| self.io(e))
    }

    fn block_table(&self) -> Result<Option<crate::layer::BlockTable>> {
        let st = self.lock();
        let blocks = st
            .map
            .iter()
            .enumerate()
            .filter(|(_, &e)| is_allocated(e))
            .map(|(i, &e)| (i as u64, self.slot_offset(e) - self.hd.block_extra))
            .collect();
        Ok(Some(crate::layer::BlockTable {
            file: self.path.clone(),
            blocks,
            block_bytes: self.hd.block_extra + self.hd.block_size,
            data_start: self.hd.off_data,
            data_end: self.file.len().map_err(|e| self.io(e))?,
            slack: 0,
        }))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.need_writable()?;
        self.check(offset, len)?;
        if self.hd.image_type != TYPE_NORMAL || len == 0 {
            return Ok(());
        }
        let bs = self.hd.block_size;
        let end = offset + len;
        let first = offset.div_ceil(bs);
        let mut st = self.lock();
        let mut index = first;
        while index * bs < end {
            let block_end = index * bs + self.block_len(index);
            if block_end > end {
                break;
            }
            if is_allocated(st.map[index as usize]) {
                self.mark_modified(&mut st);
                self.discard_block(&mut st, index)?;
            }
            index += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A fresh 4 MiB dynamic image with blocks 0 and 2 allocated (slots 0 and 1).
    fn image(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-vdi-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.vdi"));
        let _ = std::fs::remove_file(&path);
        let opts = CreateOptions {
            size: 4 * MIB,
            variant: Variant::Dynamic,
            parent: None,
        };
        let layer = VdiFormat.create(&path, &opts).unwrap();
        layer.write_at(&[1u8; 100], 0, &NoLowerLayers).unwrap();
        layer
            .write_at(&[2u8; 100], 2 * MIB, &NoLowerLayers)
            .unwrap();
        layer.flush().unwrap();
        path
    }

    fn patch(path: &Path, at: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(bytes, at).unwrap();
    }

    fn open_err(path: &Path) -> StorageError {
        match VdiFormat.open(path, false) {
            Ok(_) => panic!("{} opened", path.display()),
            Err(e) => e,
        }
    }

    fn assert_corrupt(path: &Path, words: &str) {
        match open_err(path) {
            StorageError::Corrupt { path: p, detail } => {
                assert_eq!(p, path);
                assert!(detail.contains(words), "{detail:?} should say {words:?}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn good_image_opens() {
        let p = image("good");
        let l = VdiFormat.open(&p, false).unwrap();
        assert_eq!(l.virtual_size(), 4 * MIB);
        let mut b = [0u8; 4];
        l.read_at(&mut b, 2 * MIB).unwrap();
        assert_eq!(b, [2; 4]);
        let head = std::fs::read(&p).unwrap();
        assert!(VdiFormat.probe(&p, &head[..4096]));
        // Probing is by signature, not name.
        assert!(!VdiFormat.probe(&p, &[0u8; 4096]));
        assert!(!VdiFormat.probe(&p, &head[..0x43]));
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn bad_magic() {
        let p = image("magic");
        patch(&p, 0x40, &0x1234_5678u32.to_le_bytes());
        assert_corrupt(&p, "signature");
    }

    #[test]
    fn truncated_header() {
        let p = image("trunc");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(300)
            .unwrap();
        assert_corrupt(&p, "truncated");
    }

    #[test]
    fn truncated_map() {
        let p = image("trunc-map");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(MIB + 8)
            .unwrap();
        assert_corrupt(&p, "past the end of the file");
    }

    #[test]
    fn absurd_disk_size() {
        let p = image("size");
        patch(&p, O_CB_DISK as u64, &u64::MAX.to_le_bytes());
        assert_corrupt(&p, "more than its");
        let p = image("size0");
        patch(&p, O_CB_DISK as u64, &0u64.to_le_bytes());
        assert_corrupt(&p, "empty disk");
    }

    #[test]
    fn absurd_block_count() {
        // A map of 4 GiB would be needed: refused before allocating it.
        let p = image("blocks");
        patch(&p, O_C_BLOCKS as u64, &0xFFFF_FFF0u32.to_le_bytes());
        assert_corrupt(&p, "past the end of the file");
    }

    #[test]
    fn block_size_not_power_of_two_or_too_big() {
        let p = image("bs");
        patch(&p, O_CB_BLOCK as u64, &0x0010_0001u32.to_le_bytes());
        assert_corrupt(&p, "power of two");
        let p = image("bs0");
        patch(&p, O_CB_BLOCK as u64, &0u32.to_le_bytes());
        assert_corrupt(&p, "power of two");
        let p = image("bsbig");
        patch(&p, O_CB_BLOCK as u64, &(1u32 << 31).to_le_bytes());
        assert_corrupt(&p, "largest");
        let p = image("bs256");
        patch(&p, O_CB_BLOCK as u64, &256u32.to_le_bytes());
        assert_corrupt(&p, "at least 512");
        let p = image("extra3");
        patch(&p, O_CB_BLOCK_EXTRA as u64, &3u32.to_le_bytes());
        assert_corrupt(&p, "extra bytes per block");
        let p = image("extrabig");
        patch(&p, O_CB_BLOCK_EXTRA as u64, &(1u32 << 31).to_le_bytes());
        assert_corrupt(&p, "extra bytes per block");
    }

    #[test]
    fn block_count_against_block_size() {
        // 4 MiB disk: 64 blocks of 64 KiB would need a map the file holds, but 4 blocks of
        // 64 KiB hold only 256 KiB of the disk.
        let p = image("few");
        patch(&p, O_CB_BLOCK as u64, &(64u32 << 10).to_le_bytes());
        assert_corrupt(&p, "more than its 4 blocks of 65536 bytes hold");
        // Blocks whose product with the block size overflows 32 bits: 2^31 blocks of 256 MiB
        // (no overflow in u64), whose map alone is 8 GiB: refused before reading it.
        let p = image("overflow");
        patch(&p, O_CB_BLOCK as u64, &MAX_BLOCK_SIZE.to_le_bytes());
        patch(&p, O_C_BLOCKS as u64, &(1u32 << 31).to_le_bytes());
        patch(&p, O_CB_DISK as u64, &(1u64 << 58).to_le_bytes());
        assert_corrupt(&p, "past the end of the file");
        // A smaller block over the same map is fine: 4 MiB disk in 64 blocks of 64 KiB (the
        // map's first 4 entries are the image's; the rest of its sector is zeros, i.e. slot 0
        // again: a duplicate).
        let p = image("small");
        patch(&p, O_CB_BLOCK as u64, &(64u32 << 10).to_le_bytes());
        patch(&p, O_C_BLOCKS as u64, &64u32.to_le_bytes());
        assert_corrupt(&p, "also used by entry 0");
    }

    #[test]
    fn map_entry_past_eof() {
        let p = image("entry-eof");
        // Block 1 -> slot 3: inside the data area's count, past the file's end.
        patch(&p, MIB + 4, &3u32.to_le_bytes());
        assert_corrupt(&p, "past the end of the file");
        let p = image("entry-huge");
        patch(&p, MIB + 4, &0x7FFF_FFFFu32.to_le_bytes());
        assert_corrupt(&p, "past the data area");
    }

    #[test]
    fn map_or_data_into_header() {
        let p = image("map-hdr");
        patch(&p, O_OFF_BLOCKS as u64, &0x100u32.to_le_bytes());
        assert_corrupt(&p, "overlaps the header");
        let p = image("data-hdr");
        // Data area starting inside the map: block 0's data would overwrite header/map.
        patch(&p, O_OFF_DATA as u64, &0u32.to_le_bytes());
        assert_corrupt(&p, "overlaps the header or block map");
    }

    #[test]
    fn duplicate_entries() {
        let p = image("dup");
        // Block 3 -> slot 0, which block 0 uses.
        patch(&p, MIB + 12, &0u32.to_le_bytes());
        assert_corrupt(&p, "also used by entry 0");
    }

    #[test]
    fn too_many_allocated() {
        let p = image("alloc");
        patch(&p, O_C_ALLOCATED as u64, &9u32.to_le_bytes());
        assert_corrupt(&p, "allocated of only");
    }

    #[test]
    fn unsupported_version_and_type() {
        let p = image("ver");
        patch(&p, O_VERSION as u64, &0x0002_0000u32.to_le_bytes());
        assert!(matches!(open_err(&p), StorageError::Unsupported { .. }));
        let p = image("undo");
        patch(&p, O_TYPE as u64, &TYPE_UNDO.to_le_bytes());
        assert!(matches!(open_err(&p), StorageError::Unsupported { .. }));
        let p = image("type9");
        patch(&p, O_TYPE as u64, &9u32.to_le_bytes());
        assert_corrupt(&p, "image type");
        // 1.0 reads, but only read-only.
        let p = image("v10");
        patch(&p, O_VERSION as u64, &0x0001_0000u32.to_le_bytes());
        assert!(VdiFormat.open(&p, false).is_ok());
        assert!(matches!(
            VdiFormat.open(&p, true),
            Err(StorageError::Unsupported { .. })
        ));
    }

    #[test]
    fn header_count_behind_map_is_repaired_on_writable_open() {
        let p = image("count");
        patch(&p, O_C_ALLOCATED as u64, &1u32.to_le_bytes());
        drop(VdiFormat.open(&p, false).unwrap());
        let head = std::fs::read(&p).unwrap();
        assert_eq!(
            get32(&head, O_C_ALLOCATED),
            1,
            "read-only open leaves the file alone"
        );
        let l = VdiFormat.open(&p, true).unwrap();
        let head = std::fs::read(&p).unwrap();
        assert_eq!(get32(&head, O_C_ALLOCATED), 2);
        // The next block goes after both existing slots.
        l.write_at(&[3u8; 10], MIB, &NoLowerLayers).unwrap();
        let mut b = [0u8; 10];
        l.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [1; 10]);
        drop(l);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn version_0_reads() {
        // A 0.x header built by hand: 2 blocks of 1 MiB, block 1 at slot 0.
        let dir = std::env::temp_dir().join(format!("ferry-vdi-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("v0.vdi");
        let mut h = vec![0u8; V0_END + 8];
        put32(&mut h, O_SIGNATURE, SIGNATURE);
        put32(&mut h, O_VERSION, 0x0000_0002);
        put32(&mut h, V0_TYPE, TYPE_NORMAL);
        h[V0_CB_DISK..V0_CB_DISK + 8].copy_from_slice(&(2 * MIB).to_le_bytes());
        put32(&mut h, V0_CB_BLOCK, MIB as u32);
        put32(&mut h, V0_C_BLOCKS, 2);
        put32(&mut h, V0_C_ALLOCATED, 1);
        put_uuid(&mut h, V0_UUID_CREATE, Uuid::new_v4());
        put_uuid(&mut h, V0_UUID_MODIFY, Uuid::new_v4());
        put32(&mut h, V0_END, BLOCK_FREE);
        put32(&mut h, V0_END + 4, 0);
        h.extend(std::iter::repeat_n(5u8, MIB as usize));
        std::fs::write(&p, &h).unwrap();
        let l = VdiFormat.open(&p, false).unwrap();
        let mut b = [9u8; 4];
        l.read_at(&mut b, MIB - 2).unwrap();
        assert_eq!(b, [0, 0, 5, 5]);
        assert!(VdiFormat.open(&p, true).is_err());
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn create_refuses_bad_options() {
        let dir = std::env::temp_dir().join(format!("ferry-vdi-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bad-create.vdi");
        let mk = |size, variant, parent| CreateOptions {
            size,
            variant,
            parent,
        };
        assert!(VdiFormat
            .create(&p, &mk(0, Variant::Dynamic, None))
            .is_err());
        assert!(VdiFormat
            .create(&p, &mk(u64::MAX, Variant::Dynamic, None))
            .is_err());
        assert!(VdiFormat
            .create(&p, &mk(MIB, Variant::Stream, None))
            .is_err());
        let parent = CreateParent {
            path: "base.vdi".into(),
            uuid: None,
            modification_uuid: None,
            format: FormatKind::Vdi,
        };
        assert!(VdiFormat
            .create(&p, &mk(MIB, Variant::Dynamic, Some(parent.clone())))
            .is_err());
        let parent = CreateParent {
            uuid: Some(Uuid::new_v4()),
            ..parent
        };
        assert!(VdiFormat
            .create(&p, &mk(MIB, Variant::Fixed, Some(parent)))
            .is_err());
        assert!(!p.exists());
        // Odd sizes round up to whole sectors.
        let l = VdiFormat
            .create(&p, &mk(1025, Variant::Dynamic, None))
            .unwrap();
        assert_eq!(l.virtual_size(), 1536);
        drop(l);
        std::fs::remove_file(&p).unwrap();
    }
}
