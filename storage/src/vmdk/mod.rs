//! VMDK images: monolithicSparse, monolithicFlat, twoGbMaxExtentSparse/Flat, streamOptimized
//! and ESX flat (vmfs) descriptors; differencing children by parentCID/parentFileNameHint; ESX
//! snapshot extents (vmfsSparse "COWD", seSparse) read-only, see [`esx`].
//!
//! Layout facts from VMware's Virtual Disk Format 5.0 and QEMU's/VirtualBox's readers. A sparse
//! extent is a header ("KDMV"), an optional embedded descriptor, a grain directory (GD) of
//! grain table (GT) sector numbers, GTs of grain sector numbers (0 = unallocated, 1 = zeroed)
//! and grains. Writes allocate a grain at the end of the file and publish it in this order:
//! grain data, GT entry (both copies), GD entry (only for a new GT), so a crash loses at most
//! the unflushed write and never points a table at unwritten data. The consecutive new grains
//! of one request are placed together and written first, then the entries of each table they
//! touch in one write per copy. In an image without a parent, a new grain is not filled with
//! zeros: the file is extended over it (a hole) and only the guest's bytes are written.

pub mod descriptor;
pub mod esx;
pub mod sparse;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use uuid::Uuid;

use crate::error::{Result, StorageError};
use crate::host_file::{HostFile, LocalFile};
use crate::layer::*;
use descriptor::{Access, Descriptor, ExtentType, MAX_DESCRIPTOR};
use esx::{EsxSparse, COWD_MAGIC, SESPARSE_MAGIC};
use sparse::{Sparse, SECTOR};

pub struct VmdkFormat;

const DESC_MAGIC: &str = "# Disk DescriptorFile";
/// Extents of the twoGbMaxExtent variants are 2 GiB.
const SPLIT_SECTORS: u64 = 4 << 20;

impl ImageFormat for VmdkFormat {
    fn kind(&self) -> FormatKind {
        FormatKind::Vmdk
    }

    fn probe(&self, _path: &Path, head: &[u8]) -> bool {
        if head.starts_with(sparse::MAGIC) || head.starts_with(COWD_MAGIC) {
            return true;
        }
        let text = String::from_utf8_lossy(&head[..head.len().min(1024)]);
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        match lines.next() {
            Some(l) if l.eq_ignore_ascii_case(DESC_MAGIC) => true,
            // QEMU's rule: comment lines, then version=1|2|3.
            _ => {
                text.lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty() && !l.starts_with('#'))
                    .is_some_and(|l| matches!(l, "version=1" | "version=2" | "version=3"))
                    && text.trim_start().starts_with('#')
            }
        }
    }

    fn open(&self, path: &Path, writable: bool) -> Result<Box<dyn Layer>> {
        let file = LocalFile::open(path, writable).map_err(|e| StorageError::io(path, e))?;
        Ok(Box::new(VmdkLayer::open_file(Arc::new(file), writable)?))
    }

    fn create(&self, path: &Path, opts: &CreateOptions) -> Result<Box<dyn Layer>> {
        Ok(Box::new(VmdkLayer::create(path, opts)?))
    }
}

enum Data {
    Flat {
        file: Arc<dyn HostFile>,
        offset: u64,
    },
    Zero,
    /// Index into `Inner::sparse`.
    Sparse(usize),
    /// Index into `Inner::esx` (read-only).
    Esx(usize),
}

struct Extent {
    /// Byte range on the virtual disk.
    start: u64,
    len: u64,
    access: Access,
    data: Data,
    path: PathBuf,
}

enum DescLoc {
    None,
    Embedded { offset: u64, size: u64 },
    File,
}

struct Inner {
    sparse: Vec<Sparse>,
    esx: Vec<EsxSparse>,
    desc: Option<Descriptor>,
    /// A write happened since open: the next flush writes the descriptor with `cid`.
    cid_dirty: bool,
    cid: u32,
}

pub struct VmdkLayer {
    path: PathBuf,
    main: Arc<dyn HostFile>,
    files: Vec<PathBuf>,
    writable: bool,
    variant: Variant,
    create_type: String,
    size: u64,
    extents: Vec<Extent>,
    desc_loc: DescLoc,
    inner: Mutex<Inner>,
    uuid: Option<Uuid>,
    parent: Option<ParentRef>,
    parent_cid: u32,
    wrote: std::sync::atomic::AtomicBool,
}

fn variant_of(create_type: &str) -> Variant {
    match create_type.to_ascii_lowercase().as_str() {
        "monolithicflat"
        | "vmfs"
        | "vmfspreallocated"
        | "vmfseagerzeroedthick"
        | "vmfsthin"
        | "custom" => Variant::Fixed,
        "twogbmaxextentsparse" => Variant::Split2GSparse,
        "twogbmaxextentflat" => Variant::Split2GFlat,
        "streamoptimized" => Variant::Stream,
        _ => Variant::Dynamic,
    }
}

fn random_cid() -> u32 {
    let b = Uuid::new_v4().into_bytes();
    let c = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if c == u32::MAX {
        0xfffffffe
    } else {
        c
    }
}

fn parse_uuid(v: Option<&str>) -> Option<Uuid> {
    v.and_then(|s| Uuid::parse_str(s.trim()).ok())
        .filter(|u| !u.is_nil())
}

/// The paths a parentFileNameHint may mean: as written, and for a Windows path
/// (`C:\\VMs\\base.vmdk`, `..\\base.vmdk`) also with `/` separators and its bare file name.
fn hint_paths(hint: &str) -> Vec<PathBuf> {
    let mut out = vec![PathBuf::from(hint)];
    if hint.contains('\\') {
        let is_drive = hint.as_bytes().get(1) == Some(&b':');
        if !is_drive {
            out.push(PathBuf::from(hint.replace('\\', "/")));
        }
        if let Some(name) = hint.rsplit('\\').next().filter(|n| !n.is_empty()) {
            out.push(PathBuf::from(name));
        }
    }
    out
}

/// `target` relative to the folder `from` when it lies below it, else absolute.
fn relative_to(target: &Path, from: &Path) -> PathBuf {
    let t = target
        .canonicalize()
        .unwrap_or_else(|_| target.to_path_buf());
    let f = from.canonicalize().unwrap_or_else(|_| from.to_path_buf());
    let tc: Vec<_> = t.components().collect();
    let fc: Vec<_> = f.components().collect();
    let common = tc.iter().zip(&fc).take_while(|(a, b)| a == b).count();
    if common == 0 {
        return t;
    }
    let mut out = PathBuf::new();
    for _ in common..fc.len() {
        out.push("..");
    }
    for c in &tc[common..] {
        out.push(c);
    }
    out
}

/// The first four bytes of an extent file (its magic).
fn magic(file: &Arc<dyn HostFile>) -> Result<[u8; 4]> {
    let mut head = [0u8; 4];
    let len = file.len().map_err(|e| StorageError::io(file.path(), e))?;
    if len >= 4 {
        file.read_at(&mut head, 0)
            .map_err(|e| StorageError::io(file.path(), e))?;
    }
    Ok(head)
}

fn read_only_extent(path: &Path, kind: &str) -> StorageError {
    StorageError::Unsupported {
        path: path.into(),
        detail: format!(
            "{kind} extents (ESX snapshots) can only be read; attach the disk read-only (mtype=readonly or immutable)"
        ),
    }
}

/// Checks that an ESX extent holds the sectors its descriptor line gives it.
fn esx_extent(p: &Path, esx: EsxSparse, len: u64, desc: &Path) -> Result<EsxSparse> {
    if esx.capacity_bytes() < len {
        return Err(StorageError::corrupt(
            p,
            format!(
                "the extent holds {} sectors, but the descriptor {} gives it {}",
                esx.capacity_bytes() / SECTOR,
                desc.display(),
                len / SECTOR
            ),
        ));
    }
    Ok(esx)
}

impl VmdkLayer {
    /// Opens the image whose main file (descriptor or monolithic sparse file) is `main`;
    /// extent files named by a descriptor are opened beside it.
    pub fn open_file(main: Arc<dyn HostFile>, writable: bool) -> Result<Self> {
        let path = main.path().to_path_buf();
        let len = main.len().map_err(|e| StorageError::io(&path, e))?;
        if len < 4 {
            return Err(StorageError::corrupt(
                &path,
                format!("truncated: {len} bytes is not a VMDK image"),
            ));
        }
        let mut head = [0u8; 8];
        let n = len.min(8) as usize;
        main.read_at(&mut head[..n], 0)
            .map_err(|e| StorageError::io(&path, e))?;
        if head[..4] == *COWD_MAGIC {
            return Self::open_cowd_main(main, writable);
        }
        if head == SESPARSE_MAGIC {
            // Its size, parent and CID live in the descriptor that names it.
            return Err(StorageError::Unsupported {
                path,
                detail: "this is the data file of an ESXi seSparse snapshot; open the .vmdk descriptor that names it instead".into(),
            });
        }
        if head[..4] == *sparse::MAGIC {
            Self::open_sparse_main(main, writable)
        } else {
            Self::open_descriptor_file(main, writable, len)
        }
    }

    fn open_sparse_main(main: Arc<dyn HostFile>, writable: bool) -> Result<Self> {
        let path = main.path().to_path_buf();
        let mut sp = Sparse::open(main.clone())?;
        let h = sp.first_header;
        let (desc, desc_loc) = if h.desc_offset != 0 && h.desc_size != 0 {
            let mut b = vec![0u8; (h.desc_size * SECTOR) as usize];
            main.read_at(&mut b, h.desc_offset * SECTOR)
                .map_err(|e| StorageError::io(&path, e))?;
            if b.iter().all(|&x| x == 0) {
                // An extent file that reserved room for a descriptor but holds none.
                (None, DescLoc::None)
            } else {
                (
                    Some(Descriptor::parse(&path, &b)?),
                    DescLoc::Embedded {
                        offset: h.desc_offset * SECTOR,
                        size: h.desc_size * SECTOR,
                    },
                )
            }
        } else {
            (None, DescLoc::None)
        };
        let compressed = sp.is_compressed();
        if writable && sp.header.version == 3 && !compressed {
            return Err(StorageError::Unsupported {
                path,
                detail: "VMDK version 3 (ESXi changed-block tracking) images can only be opened read-only".into(),
            });
        }
        if writable && sp.tail_meta() {
            sp.load_all()?;
            let end = sp.grains_end()?;
            sp.set_end(end);
        }
        let default_type = if compressed {
            "streamOptimized"
        } else {
            "monolithicSparse"
        };
        let create_type = desc
            .as_ref()
            .and_then(|d| d.get("createType"))
            .unwrap_or(default_type)
            .to_string();
        let size = sp.capacity_bytes();
        let extents = vec![Extent {
            start: 0,
            len: size,
            access: Access::Rw,
            data: Data::Sparse(0),
            path: path.clone(),
        }];
        Self::finish(
            main,
            writable,
            desc,
            desc_loc,
            create_type,
            extents,
            vec![sp],
            vec![path],
        )
    }

    /// A COWD file on its own: one extent, no descriptor, no parent (a child's unallocated
    /// grains read as zeros, as in QEMU).
    fn open_cowd_main(main: Arc<dyn HostFile>, writable: bool) -> Result<Self> {
        let path = main.path().to_path_buf();
        if writable {
            return Err(read_only_extent(&path, "COWD (vmfsSparse)"));
        }
        let esx = EsxSparse::open_cowd(main.clone())?;
        let extents = vec![Extent {
            start: 0,
            len: esx.capacity_bytes(),
            access: Access::RdOnly,
            data: Data::Esx(0),
            path: path.clone(),
        }];
        let mut layer = Self::finish(
            main,
            false,
            None,
            DescLoc::None,
            "vmfsSparse".into(),
            extents,
            Vec::new(),
            vec![path],
        )?;
        layer.inner.get_mut().unwrap_or_else(|p| p.into_inner()).esx = vec![esx];
        Ok(layer)
    }

    fn open_descriptor_file(main: Arc<dyn HostFile>, writable: bool, len: u64) -> Result<Self> {
        let path = main.path().to_path_buf();
        if len > MAX_DESCRIPTOR as u64 {
            return Err(StorageError::corrupt(
                &path,
                format!(
                    "not a VMDK: no KDMV magic, and at {len} bytes too large to be a descriptor"
                ),
            ));
        }
        let mut b = vec![0u8; len as usize];
        main.read_at(&mut b, 0)
            .map_err(|e| StorageError::io(&path, e))?;
        let desc = Descriptor::parse(&path, &b)?;
        if desc.extents.is_empty() {
            return Err(StorageError::corrupt(
                &path,
                "the VMDK descriptor lists no extents",
            ));
        }
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut extents = Vec::new();
        let mut sparse = Vec::new();
        let mut esx = Vec::new();
        let mut files = vec![path.clone()];
        let mut start = 0u64;
        for e in &desc.extents {
            let len = e
                .sectors
                .checked_mul(SECTOR)
                .filter(|_| e.sectors <= sparse::MAX_EXTENT_SECTORS * 64)
                .ok_or_else(|| {
                    StorageError::corrupt(
                        &path,
                        format!("extent of {} sectors is absurd", e.sectors),
                    )
                })?;
            let epath = e.file.as_ref().map(|f| {
                let p = Path::new(f);
                if p.is_absolute() {
                    p.to_path_buf()
                } else {
                    dir.join(p)
                }
            });
            let rw = writable && e.access == Access::Rw;
            let open = |p: &Path| -> Result<Arc<dyn HostFile>> {
                if p == path {
                    return Err(StorageError::corrupt(
                        &path,
                        "an extent names the descriptor file itself",
                    ));
                }
                let f = LocalFile::open(p, rw).map_err(|err| StorageError::Io {
                    path: p.to_path_buf(),
                    source: std::io::Error::new(
                        err.kind(),
                        format!("extent file of {} cannot be opened: {err}", path.display()),
                    ),
                })?;
                Ok(Arc::new(f))
            };
            let data = match (e.kind, &epath) {
                (ExtentType::Zero, _) => Data::Zero,
                (_, _) if e.access == Access::NoAccess => Data::Zero,
                (ExtentType::Flat | ExtentType::Vmfs, Some(p)) => {
                    let offset = e.offset.checked_mul(SECTOR).ok_or_else(|| {
                        StorageError::corrupt(&path, "flat extent offset overflows")
                    })?;
                    let file = open(p)?;
                    let have = file.len().map_err(|err| StorageError::io(p, err))?;
                    let need = offset.saturating_add(len);
                    if have < need {
                        return Err(StorageError::corrupt(
                            p,
                            format!(
                                "truncated: the flat extent file is {have} bytes, but the descriptor {} needs {need}",
                                path.display()
                            ),
                        ));
                    }
                    Data::Flat { file, offset }
                }
                (ExtentType::SeSparse, Some(p)) => {
                    if rw {
                        return Err(read_only_extent(p, "seSparse"));
                    }
                    esx.push(esx_extent(p, EsxSparse::open_se(open(p)?)?, len, &path)?);
                    Data::Esx(esx.len() - 1)
                }
                // QEMU reads both extent types by the file's magic: KDMV or COWD.
                (ExtentType::Sparse | ExtentType::VmfsSparse, Some(p)) => {
                    let file = open(p)?;
                    if magic(&file)? == *COWD_MAGIC {
                        if rw {
                            return Err(read_only_extent(p, "COWD (vmfsSparse)"));
                        }
                        esx.push(esx_extent(p, EsxSparse::open_cowd(file)?, len, &path)?);
                        Data::Esx(esx.len() - 1)
                    } else {
                        let sp = Sparse::open(file)?;
                        if sp.capacity_bytes() < len {
                            return Err(StorageError::corrupt(
                                p,
                                format!(
                                    "the sparse extent holds {} sectors, but the descriptor {} gives it {}",
                                    sp.header.capacity,
                                    path.display(),
                                    e.sectors
                                ),
                            ));
                        }
                        if sp.is_compressed() && rw {
                            return Err(StorageError::Unsupported {
                                path: p.clone(),
                                detail:
                                    "writing a compressed extent named by a separate descriptor"
                                        .into(),
                            });
                        }
                        sparse.push(sp);
                        Data::Sparse(sparse.len() - 1)
                    }
                }
                (_, None) => {
                    return Err(StorageError::corrupt(
                        &path,
                        "an extent line has no file name",
                    ))
                }
            };
            if let Some(p) = &epath {
                files.push(p.clone());
            }
            extents.push(Extent {
                start,
                len,
                access: e.access,
                data,
                path: epath.unwrap_or_else(|| path.clone()),
            });
            start = start.checked_add(len).ok_or_else(|| {
                StorageError::corrupt(&path, "the extents add up to an absurd size")
            })?;
        }
        let create_type = desc
            .get("createType")
            .unwrap_or("monolithicFlat")
            .to_string();
        let mut layer = Self::finish(
            main,
            writable,
            Some(desc),
            DescLoc::File,
            create_type,
            extents,
            sparse,
            files,
        )?;
        layer.inner.get_mut().unwrap_or_else(|p| p.into_inner()).esx = esx;
        Ok(layer)
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        main: Arc<dyn HostFile>,
        writable: bool,
        desc: Option<Descriptor>,
        desc_loc: DescLoc,
        create_type: String,
        extents: Vec<Extent>,
        mut sparse: Vec<Sparse>,
        files: Vec<PathBuf>,
    ) -> Result<Self> {
        let path = main.path().to_path_buf();
        let size = extents.last().map_or(0, |e| e.start + e.len);
        let cid = desc
            .as_ref()
            .and_then(|d| d.cid("CID"))
            .unwrap_or_else(random_cid);
        let parent_cid = desc
            .as_ref()
            .and_then(|d| d.cid("parentCID"))
            .unwrap_or(u32::MAX);
        let uuid = parse_uuid(desc.as_ref().and_then(|d| d.get("ddb.uuid.image")));
        let parent = desc.as_ref().and_then(|d| {
            let hint = d.get("parentFileNameHint").filter(|h| !h.is_empty());
            let puuid = parse_uuid(d.get("ddb.uuid.parent"));
            if parent_cid == u32::MAX && hint.is_none() && puuid.is_none() {
                return None;
            }
            Some(ParentRef {
                uuid: puuid,
                modification_uuid: parse_uuid(d.get("ddb.uuid.parentmodification")),
                path_hints: hint.map(hint_paths).unwrap_or_default(),
            })
        });
        // Without a parent, `lower` is all zeros: new grains need not have them written.
        for sp in sparse.iter_mut() {
            sp.differencing = parent.is_some();
        }
        Ok(Self {
            variant: variant_of(&create_type),
            create_type,
            path,
            main,
            files,
            writable,
            size,
            extents,
            desc_loc,
            inner: Mutex::new(Inner {
                sparse,
                esx: Vec::new(),
                desc,
                cid_dirty: false,
                cid,
            }),
            uuid,
            parent,
            parent_cid,
            wrote: Default::default(),
        })
    }

    /// The content ID in the descriptor (changes when the image is written).
    pub fn cid(&self) -> u32 {
        self.lock().cid
    }

    /// The parent's CID this child was made against (`0xffffffff` = none).
    pub fn parent_cid(&self) -> u32 {
        self.parent_cid
    }

    pub fn create_type(&self) -> &str {
        &self.create_type
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        crate::error::check_range(&self.path, offset, len, self.size)
    }

    fn extent_at(&self, offset: u64) -> &Extent {
        let i = self.extents.partition_point(|e| e.start + e.len <= offset);
        &self.extents[i.min(self.extents.len() - 1)]
    }

    /// Creates an image at `path`.
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<Self> {
        Self::create_inner(path, opts, None)
    }

    /// Creates a single-file image (monolithicSparse or streamOptimized) in `main`, an empty
    /// file (tests wrap it in a failing file).
    pub fn create_on(main: Arc<dyn HostFile>, opts: &CreateOptions) -> Result<Self> {
        if !matches!(opts.variant, Variant::Dynamic | Variant::Stream) {
            return Err(StorageError::Invalid(
                "only monolithicSparse and streamOptimized VMDKs live in one file".into(),
            ));
        }
        let path = main.path().to_path_buf();
        Self::create_inner(&path, opts, Some(main))
    }

    fn create_inner(
        path: &Path,
        opts: &CreateOptions,
        main: Option<Arc<dyn HostFile>>,
    ) -> Result<Self> {
        let sectors = opts.size.div_ceil(SECTOR);
        if sectors == 0 {
            return Err(StorageError::Invalid(
                "a VMDK image needs a size of at least one sector".into(),
            ));
        }
        if sectors > sparse::MAX_EXTENT_SECTORS * 32 {
            return Err(StorageError::Invalid(format!(
                "{} bytes is too large for a VMDK image",
                opts.size
            )));
        }
        let (create_type, flat, split, stream) = match opts.variant {
            Variant::Dynamic => ("monolithicSparse", false, false, false),
            Variant::Fixed => ("monolithicFlat", true, false, false),
            Variant::Split2GSparse => ("twoGbMaxExtentSparse", false, true, false),
            Variant::Split2GFlat => ("twoGbMaxExtentFlat", true, true, false),
            Variant::Stream => ("streamOptimized", false, false, true),
        };
        if !split && sectors > sparse::MAX_EXTENT_SECTORS {
            return Err(StorageError::Invalid(format!(
                "{} bytes is too large for one VMDK extent (2 TiB); use a twoGbMaxExtent variant",
                opts.size
            )));
        }
        let mut parent_lines = String::new();
        let mut parent_cid = u32::MAX;
        let mut parent_uuid = None;
        if let Some(p) = &opts.parent {
            if flat {
                return Err(StorageError::Unsupported {
                    path: path.into(),
                    detail: "a flat VMDK cannot have a parent; choose a sparse variant".into(),
                });
            }
            if p.format != FormatKind::Vmdk {
                return Err(StorageError::Unsupported {
                    path: path.into(),
                    detail: format!("a VMDK's parent must be a VMDK, not {}", p.format.name()),
                });
            }
            let file = LocalFile::open(&p.path, false).map_err(|e| StorageError::io(&p.path, e))?;
            let parent = VmdkLayer::open_file(Arc::new(file), false)?;
            parent_cid = parent.cid();
            parent_uuid = p.uuid.or(parent.uuid);
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let hint = relative_to(&p.path, dir);
            parent_lines = format!("parentFileNameHint=\"{}\"\n", hint.display());
        }
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "disk".into());
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        // Extent files and their lengths.
        let mut ext: Vec<(String, u64)> = Vec::new();
        if split {
            let mut left = sectors;
            let mut i = 1;
            while left > 0 {
                let n = left.min(SPLIT_SECTORS);
                ext.push((
                    format!("{stem}-{}{i:03}.vmdk", if flat { 'f' } else { 's' }),
                    n,
                ));
                left -= n;
                i += 1;
            }
        } else if flat {
            ext.push((format!("{stem}-flat.vmdk"), sectors));
        } else {
            ext.push((
                path.file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                sectors,
            ));
        }
        let mut lines = String::new();
        for (name, n) in &ext {
            if flat {
                lines += &format!("RW {n} FLAT \"{name}\" 0\n");
            } else {
                lines += &format!("RW {n} SPARSE \"{name}\"\n");
            }
        }
        let heads = 16u64;
        let uuid = Uuid::new_v4();
        let mut ddb = format!(
            "ddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"{}\"\nddb.geometry.heads = \"{heads}\"\n\
             ddb.geometry.sectors = \"63\"\nddb.adapterType = \"ide\"\nddb.uuid.image=\"{uuid}\"\n",
            (sectors / (63 * heads)).min(16383),
        );
        if let Some(pu) = parent_uuid {
            ddb += &format!("ddb.uuid.parent=\"{pu}\"\n");
        }
        let desc = format!(
            "{DESC_MAGIC}\nversion=1\nCID={:08x}\nparentCID={parent_cid:08x}\ncreateType=\"{create_type}\"\n{parent_lines}\n\
             # Extent description\n{lines}\n# The Disk Data Base\n#DDB\n\n{ddb}",
            random_cid()
        );
        if desc.len() > 20 * SECTOR as usize {
            return Err(StorageError::Invalid(
                "the VMDK descriptor would not fit in 10 KiB".into(),
            ));
        }
        let new_file = |p: &Path| -> Result<LocalFile> {
            LocalFile::create(p).map_err(|e| StorageError::io(p, e))
        };
        let write = |f: &LocalFile, buf: &[u8], off: u64| {
            f.write_at(buf, off)
                .map_err(|e| StorageError::io(f.path(), e))
        };
        if !flat && !split {
            let main: Arc<dyn HostFile> = match main {
                Some(m) => m,
                None => Arc::new(new_file(path)?),
            };
            let (writes, len) = sparse::new_sparse(sectors, Some(desc.as_bytes()), stream);
            main.set_len(len).map_err(|e| StorageError::io(path, e))?;
            for (off, b) in writes {
                main.write_at(&b, off)
                    .map_err(|e| StorageError::io(path, e))?;
            }
            main.sync().map_err(|e| StorageError::io(path, e))?;
            return VmdkLayer::open_file(main, true);
        }
        for (name, n) in &ext {
            let p = dir.join(name);
            let f = new_file(&p)?;
            if flat {
                f.set_len(n * SECTOR).map_err(|e| StorageError::io(&p, e))?;
            } else {
                let (writes, len) = sparse::new_sparse(*n, None, false);
                f.set_len(len).map_err(|e| StorageError::io(&p, e))?;
                for (off, b) in writes {
                    write(&f, &b, off)?;
                }
            }
            f.sync().map_err(|e| StorageError::io(&p, e))?;
        }
        let f = new_file(path)?;
        write(&f, desc.as_bytes(), 0)?;
        f.sync().map_err(|e| StorageError::io(path, e))?;
        drop(f);
        let main = LocalFile::open(path, true).map_err(|e| StorageError::io(path, e))?;
        VmdkLayer::open_file(Arc::new(main), true)
    }

    fn write_descriptor(&self, inner: &mut Inner) -> Result<()> {
        let cid = format!("{:08x}", inner.cid);
        let Some(desc) = inner.desc.as_mut() else {
            return Ok(());
        };
        desc.set("CID", &cid, false);
        let text = desc.text();
        let err = |e| StorageError::io(&self.path, e);
        match self.desc_loc {
            DescLoc::None => {}
            DescLoc::Embedded { offset, size } => {
                if text.len() as u64 > size {
                    return Err(StorageError::corrupt(
                        &self.path,
                        "the updated descriptor no longer fits its area",
                    ));
                }
                let mut b = text.into_bytes();
                b.resize(size as usize, 0);
                self.main.write_at(&b, offset).map_err(err)?;
            }
            DescLoc::File => {
                self.main.write_at(text.as_bytes(), 0).map_err(err)?;
                self.main.set_len(text.len() as u64).map_err(err)?;
            }
        }
        Ok(())
    }
}

impl Layer for VmdkLayer {
    fn format(&self) -> FormatKind {
        FormatKind::Vmdk
    }
    fn variant(&self) -> Variant {
        self.variant
    }
    fn path(&self) -> &Path {
        &self.path
    }
    fn files(&self) -> Vec<PathBuf> {
        self.files.clone()
    }
    fn host_files(&self) -> Vec<Arc<dyn HostFile>> {
        let mut out = vec![self.main.clone()];
        for e in &self.extents {
            if let Data::Flat { file, .. } = &e.data {
                out.push(file.clone());
            }
        }
        let inner = self.lock();
        out.extend(inner.sparse.iter().map(|s| s.file.clone()));
        out.extend(inner.esx.iter().map(|s| s.file.clone()));
        drop(inner);
        // A monolithic sparse image's main file is its only extent: list it once.
        let mut seen = Vec::new();
        out.retain(|f| {
            let p = Arc::as_ptr(f).cast::<()>();
            !seen.contains(&p) && {
                seen.push(p);
                true
            }
        });
        out
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn uuid(&self) -> Option<Uuid> {
        self.uuid
    }
    fn parent(&self) -> Option<ParentRef> {
        self.parent.clone()
    }
    fn writable(&self) -> bool {
        self.writable
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<(Allocation, u64)> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok((Allocation::Unallocated, 0));
        }
        let e = self.extent_at(offset);
        let rel = offset - e.start;
        let max = len.min(e.len - rel);
        match &e.data {
            Data::Flat { .. } => Ok((Allocation::Data, max)),
            Data::Zero => Ok((Allocation::Zero, max)),
            Data::Sparse(i) => {
                let (a, n) = self.lock().sparse[*i].status(rel, max)?;
                Ok((a, n.clamp(1, max)))
            }
            Data::Esx(i) => {
                let (a, n) = self.lock().esx[*i].status(rel, max)?;
                Ok((a, n.clamp(1, max)))
            }
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let e = self.extent_at(pos);
            let rel = pos - e.start;
            let n = ((e.len - rel) as usize).min(buf.len() - done);
            let part = &mut buf[done..done + n];
            match &e.data {
                Data::Flat { file, offset } => file
                    .read_at(part, offset + rel)
                    .map_err(|err| StorageError::io(&e.path, err))?,
                Data::Zero => part.fill(0),
                Data::Sparse(i) => self.lock().sparse[*i].read(part, rel)?,
                Data::Esx(i) => self.lock().esx[*i].read(part, rel)?,
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, lower: &dyn LowerLayers) -> Result<()> {
        if !self.writable {
            return Err(StorageError::ReadOnly {
                path: self.path.clone(),
            });
        }
        self.check(offset, buf.len() as u64)?;
        if !self.wrote.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let mut inner = self.lock();
            let mut c = random_cid();
            while c == inner.cid {
                c = random_cid();
            }
            inner.cid = c;
            inner.cid_dirty = true;
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let e = self.extent_at(pos);
            let rel = pos - e.start;
            let n = ((e.len - rel) as usize).min(buf.len() - done);
            let part = &buf[done..done + n];
            if e.access != Access::Rw {
                return Err(StorageError::ReadOnly {
                    path: e.path.clone(),
                });
            }
            match &e.data {
                Data::Flat { file, offset } => file
                    .write_at(part, offset + rel)
                    .map_err(|err| StorageError::io(&e.path, err))?,
                Data::Zero | Data::Esx(_) => {
                    return Err(StorageError::ReadOnly {
                        path: e.path.clone(),
                    })
                }
                Data::Sparse(i) => self.lock().sparse[*i].write(part, rel, e.start, lower)?,
            }
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut inner = self.lock();
        for sp in inner.sparse.iter_mut() {
            sp.commit()?;
            sp.write_tail(false)?;
            sp.sync()?;
        }
        for e in &self.extents {
            if let Data::Flat { file, .. } = &e.data {
                file.sync().map_err(|err| StorageError::io(&e.path, err))?;
            }
        }
        if inner.cid_dirty {
            self.write_descriptor(&mut inner)?;
            self.main
                .sync()
                .map_err(|e| StorageError::io(&self.path, e))?;
            inner.cid_dirty = false;
        }
        Ok(())
    }

    fn set_uuid(&self, uuid: Uuid, _modification: Option<Uuid>) -> Result<()> {
        if !self.writable {
            return Err(StorageError::ReadOnly {
                path: self.path.clone(),
            });
        }
        self.flush()?;
        let mut inner = self.lock();
        let Some(desc) = inner.desc.as_mut() else {
            return Err(StorageError::Unsupported {
                path: self.path.clone(),
                detail: "this VMDK has no descriptor to record a UUID in".into(),
            });
        };
        desc.set("ddb.uuid.image", &uuid.to_string(), true);
        self.write_descriptor(&mut inner)?;
        self.main
            .sync()
            .map_err(|e| StorageError::io(&self.path, e))
    }
}

impl Drop for VmdkLayer {
    /// Like QEMU's close: a layer dropped without a flush still writes what it holds in
    /// memory (a stream's pending grain, tables and footer; the new CID).
    fn drop(&mut self) {
        if self.writable {
            if let Err(e) = self.flush() {
                tracing::warn!("{}: flush on close failed: {e}", self.path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests;
