//! A Parallels disk bundle: a folder `Name.hdd/` with `DiskDescriptor.xml` and one `.hds`
//! file per (storage range, snapshot). The bundle is presented as ONE layer: its snapshot
//! chain lives inside the folder (the descriptor's `Snapshots`), so reads walk the chain here
//! and `parent()` is `None`; writes go to the top snapshot's files. A padded disk
//! (`Padding` N in the descriptor) stores the guest's sector 0 at sector N of its storages.
//! [`Bundle::create_snapshot`] adds a snapshot (`ferry medium create B.hdd --parent B.hdd`).

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use super::image::{self, ParallelsImage};
use crate::error::{Result, StorageError};
use crate::host_file::{HostFile, LocalFile};
use crate::layer::*;
use crate::lock::{ImageLock, LockMode};
use crate::medium::staging::Staged;
use crate::raw::RawLayer;

pub const DESCRIPTOR: &str = "DiskDescriptor.xml";
/// The GUID Parallels gives the current (top) state of a disk.
pub const TOP_GUID: Uuid = Uuid::from_u128(0x5fbaabe3_6958_40ff_92a7_860e329aab41);
const SECTOR: u64 = 512;
/// A descriptor is a few KiB; refuse anything absurd before reading it.
const MAX_DESCRIPTOR: u64 = 16 << 20;

/// Reads a descriptor file, refusing absurd sizes before reading.
fn read_descriptor(dpath: &Path) -> Result<String> {
    let meta = std::fs::metadata(dpath).map_err(|e| StorageError::io(dpath, e))?;
    if meta.len() > MAX_DESCRIPTOR {
        return Err(StorageError::corrupt(
            dpath,
            format!("{} bytes is too large for a descriptor", meta.len()),
        ));
    }
    let bytes = std::fs::read(dpath).map_err(|e| StorageError::io(dpath, e))?;
    String::from_utf8(bytes)
        .map_err(|_| StorageError::corrupt(dpath, "descriptor is not UTF-8 text"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageType {
    /// An expandable Parallels image file (header + BAT).
    Compressed,
    /// Headerless raw data.
    Plain,
}

#[derive(Debug, Clone)]
pub struct StorageImage {
    pub guid: Uuid,
    pub kind: ImageType,
    pub file: String,
}

#[derive(Debug, Clone)]
pub struct Storage {
    /// Range of the padded disk (see [`Descriptor::padding`]), in sectors.
    pub start: u64,
    pub end: u64,
    /// `<Blocksize>`: the cluster size of its Compressed images, in sectors.
    pub blocksize: Option<u64>,
    pub images: Vec<StorageImage>,
}

#[derive(Debug, Clone)]
pub struct Descriptor {
    /// What the guest sees, in sectors.
    pub disk_size: u64,
    /// Sectors that the stored disk holds before the guest's sector 0: guest sector `s` is
    /// sector `s + padding` of the storages and their images. Parallels pads disks it makes
    /// for Windows XP/2000/2003 so that their partitions, which start at sector 63 (the
    /// second track of the 63-sector CHS geometry), fall on 4 KiB boundaries in the image.
    pub padding: u64,
    pub uid: Option<Uuid>,
    pub storages: Vec<Storage>,
    /// (GUID, parent GUID); the root's parent is the nil UUID.
    pub shots: Vec<(Uuid, Uuid)>,
    /// `<Snapshots><TopGUID>` when present: the current state.
    pub top: Option<Uuid>,
}

fn parse_guid(s: &str) -> Option<Uuid> {
    Uuid::parse_str(s.trim().trim_start_matches('{').trim_end_matches('}')).ok()
}

fn child<'a>(n: roxmltree::Node<'a, 'a>, name: &str) -> Option<roxmltree::Node<'a, 'a>> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

fn text<'a>(n: roxmltree::Node<'a, 'a>, name: &str) -> Option<&'a str> {
    child(n, name).map(|c| c.text().unwrap_or("").trim())
}

impl Descriptor {
    /// Parses descriptor text; errors name `path`.
    pub fn parse(xml: &str, path: &Path) -> Result<Self> {
        let bad = |d: String| StorageError::corrupt(path, d);
        let doc = roxmltree::Document::parse(xml).map_err(|e| bad(format!("bad XML: {e}")))?;
        let root = doc.root_element();
        if root.tag_name().name() != "Parallels_disk_image" {
            return Err(bad(format!(
                "root element is <{}>, expected <Parallels_disk_image>",
                root.tag_name().name()
            )));
        }
        let num = |n: roxmltree::Node, name: &str, what: &str| -> Result<u64> {
            let t = text(n, name).ok_or_else(|| bad(format!("{what} has no <{name}>")))?;
            t.parse::<u64>()
                .map_err(|_| bad(format!("<{name}> of {what} is not a number: {t:?}")))
        };
        let params =
            child(root, "Disk_Parameters").ok_or_else(|| bad("no <Disk_Parameters>".into()))?;
        let disk_size = num(params, "Disk_size", "Disk_Parameters")?;
        let padding = match text(params, "Padding") {
            None | Some("") => 0,
            Some(_) => num(params, "Padding", "Disk_Parameters")?,
        };
        if disk_size
            .checked_add(padding)
            .and_then(|s| s.checked_mul(SECTOR))
            .is_none()
        {
            return Err(bad(format!(
                "Disk_size of {disk_size} sectors (with Padding {padding}) is absurd"
            )));
        }
        let uid = text(params, "UID").and_then(parse_guid);
        let sd = child(root, "StorageData").ok_or_else(|| bad("no <StorageData>".into()))?;
        let mut storages = Vec::new();
        for s in sd
            .children()
            .filter(|c| c.is_element() && c.tag_name().name() == "Storage")
        {
            let start = num(s, "Start", "a <Storage>")?;
            let end = num(s, "End", "a <Storage>")?;
            let blocksize = match text(s, "Blocksize") {
                None | Some("") => None,
                Some(_) => Some(num(s, "Blocksize", "a <Storage>")?),
            };
            let mut images = Vec::new();
            for im in s
                .children()
                .filter(|c| c.is_element() && c.tag_name().name() == "Image")
            {
                let g = text(im, "GUID").unwrap_or("");
                let guid = parse_guid(g).ok_or_else(|| bad(format!("bad image GUID {g:?}")))?;
                let kind = match text(im, "Type") {
                    Some("Compressed") => ImageType::Compressed,
                    Some("Plain") => ImageType::Plain,
                    other => {
                        return Err(bad(format!("image {guid} has unknown Type {other:?}")));
                    }
                };
                let file = text(im, "File")
                    .filter(|f| !f.is_empty())
                    .ok_or_else(|| bad(format!("image {guid} has no <File>")))?
                    .to_string();
                images.push(StorageImage { guid, kind, file });
            }
            storages.push(Storage {
                start,
                end,
                blocksize,
                images,
            });
        }
        let mut shots = Vec::new();
        let mut top = None;
        if let Some(sn) = child(root, "Snapshots") {
            if let Some(t) = text(sn, "TopGUID").filter(|t| !t.is_empty()) {
                top = Some(parse_guid(t).ok_or_else(|| bad(format!("bad TopGUID {t:?}")))?);
            }
            for s in sn
                .children()
                .filter(|c| c.is_element() && c.tag_name().name() == "Shot")
            {
                let g = text(s, "GUID").unwrap_or("");
                let guid = parse_guid(g).ok_or_else(|| bad(format!("bad snapshot GUID {g:?}")))?;
                let p = text(s, "ParentGUID").unwrap_or("");
                let parent = parse_guid(p)
                    .ok_or_else(|| bad(format!("snapshot {guid} has a bad ParentGUID {p:?}")))?;
                shots.push((guid, parent));
            }
        }
        Ok(Self {
            disk_size,
            padding,
            uid,
            storages,
            shots,
            top,
        })
    }

    /// The snapshot chain, top first.
    pub fn chain(&self, path: &Path) -> Result<Vec<Uuid>> {
        let bad = |d: String| StorageError::corrupt(path, d);
        if self.shots.is_empty() {
            // No <Snapshots>: one image per storage is the whole disk.
            let guids: HashSet<Uuid> = self
                .storages
                .iter()
                .flat_map(|s| s.images.iter().map(|i| i.guid))
                .collect();
            return match guids.len() {
                1 => Ok(guids.into_iter().collect()),
                _ => Err(bad(
                    "no <Snapshots> and several image GUIDs: the top is unknown".into(),
                )),
            };
        }
        let mut parent_of = HashMap::new();
        for &(g, p) in &self.shots {
            if parent_of.insert(g, p).is_some() {
                return Err(bad(format!("snapshot {g} is listed twice")));
            }
        }
        let named: HashSet<Uuid> = self.shots.iter().map(|s| s.1).collect();
        let leaves: Vec<Uuid> = self
            .shots
            .iter()
            .map(|s| s.0)
            .filter(|g| !named.contains(g))
            .collect();
        let top = match leaves.as_slice() {
            _ if self.top.is_some() => {
                let t = self.top.unwrap_or_default();
                if !parent_of.contains_key(&t) {
                    return Err(bad(format!("TopGUID {t} is not a listed snapshot")));
                }
                t
            }
            [one] => *one,
            many if many.contains(&TOP_GUID) => TOP_GUID,
            [] => {
                return Err(bad(
                    "the snapshots form a loop (every snapshot is some snapshot's parent)".into(),
                ))
            }
            _ => {
                return Err(bad(format!(
                    "{} snapshots could be the top one and none is {{{TOP_GUID}}}",
                    leaves.len()
                )))
            }
        };
        let mut chain = vec![top];
        let mut seen: HashSet<Uuid> = chain.iter().copied().collect();
        let mut cur = top;
        loop {
            let p = parent_of[&cur];
            if p.is_nil() {
                return Ok(chain);
            }
            if !parent_of.contains_key(&p) {
                return Err(bad(format!(
                    "snapshot {cur} names parent {p}, which is not listed"
                )));
            }
            if !seen.insert(p) {
                return Err(bad(format!("the snapshot chain loops back to {p}")));
            }
            chain.push(p);
            cur = p;
        }
    }
}

struct Extent {
    start: u64,
    len: u64,
    /// Top snapshot first.
    levels: Vec<Box<dyn Layer>>,
}

/// What lies below level `from` of an extent (for copy-on-write of the top level).
struct ExtentBelow<'a> {
    ext: &'a Extent,
    from: usize,
}

impl LowerLayers for ExtentBelow<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_levels(&self.ext.levels[self.from..], buf, offset)
    }
}

fn read_levels(levels: &[Box<dyn Layer>], buf: &mut [u8], offset: u64) -> Result<()> {
    let Some(layer) = levels.first() else {
        buf.fill(0);
        return Ok(());
    };
    let mut done = 0usize;
    while done < buf.len() {
        let off = offset + done as u64;
        let want = (buf.len() - done) as u64;
        let (state, run) = layer.block_status(off, want)?;
        let run = run.clamp(1, want) as usize;
        let part = &mut buf[done..done + run];
        match state {
            Allocation::Data => layer.read_at(part, off)?,
            Allocation::Zero => part.fill(0),
            Allocation::Unallocated => read_levels(&levels[1..], part, off)?,
        }
        done += run;
    }
    Ok(())
}

pub struct Bundle {
    path: PathBuf,
    writable: bool,
    /// Guest size in bytes.
    size: u64,
    /// Bytes of padding before the guest's first sector (guest offset + pad = stored offset).
    pad: u64,
    uid: Option<Uuid>,
    extents: Vec<Extent>,
    files: Vec<PathBuf>,
}

/// How a bundle's files are opened (tests substitute failing files).
pub type Opener<'a> = dyn Fn(&Path, bool) -> std::io::Result<Arc<dyn HostFile>> + 'a;

impl Bundle {
    /// The image when the bundle stores its disk in one file with no snapshot on top (guest
    /// offset + pad is then the image's offset).
    fn single_image(&self) -> Option<&dyn Layer> {
        match self.extents.as_slice() {
            [e] if e.start == 0 => match e.levels.as_slice() {
                [image] => Some(&**image),
                _ => None,
            },
            _ => None,
        }
    }

    pub fn open(dir: &Path, writable: bool) -> Result<Self> {
        Self::open_with(dir, writable, &|p, w| {
            LocalFile::open(p, w).map(|f| Arc::new(f) as Arc<dyn HostFile>)
        })
    }

    pub fn open_with(dir: &Path, writable: bool, opener: &Opener) -> Result<Self> {
        let dpath = dir.join(DESCRIPTOR);
        let xml = read_descriptor(&dpath)?;
        let d = Descriptor::parse(&xml, &dpath)?;
        let bad = |m: String| StorageError::corrupt(&dpath, m);
        let chain = d.chain(&dpath)?;
        if d.storages.is_empty() {
            return Err(bad("no <Storage> in <StorageData>".into()));
        }
        let mut storages = d.storages.clone();
        storages.sort_by_key(|s| s.start);
        let mut expect = 0u64;
        for s in &storages {
            if s.start != expect {
                return Err(bad(format!(
                    "storage ranges leave a gap or overlap at sector {expect} (next starts at {})",
                    s.start
                )));
            }
            if s.end <= s.start {
                return Err(bad(format!(
                    "storage range {}..{} is empty or reversed",
                    s.start, s.end
                )));
            }
            expect = s.end;
        }
        // The storages hold the padded disk: `padding` sectors, then the guest's.
        let total = d.disk_size + d.padding;
        if expect < d.disk_size {
            return Err(bad(format!(
                "storage ranges end at sector {expect}, short of Disk_size {}",
                d.disk_size
            )));
        }
        if expect < total {
            // A padded descriptor may give End as Disk_size; the last storage then runs on
            // to the padded end, as far as its images hold (checked below).
            if let Some(last) = storages.last_mut() {
                last.end = total;
            }
        }
        let size = d.disk_size * SECTOR;
        let mut extents = Vec::new();
        let mut files = vec![dpath.clone()];
        for s in &storages {
            if s.start >= total {
                break;
            }
            let len = (s.end.min(total) - s.start) * SECTOR;
            let mut levels: Vec<Box<dyn Layer>> = Vec::new();
            for (lvl, guid) in chain.iter().enumerate() {
                let im = s.images.iter().find(|i| i.guid == *guid).ok_or_else(|| {
                    bad(format!(
                        "storage {}..{} has no image for snapshot {guid}",
                        s.start, s.end
                    ))
                })?;
                let rel = Path::new(&im.file);
                if rel.is_absolute() || rel.components().any(|c| matches!(c, Component::ParentDir))
                {
                    return Err(bad(format!(
                        "image file {:?} is outside the bundle",
                        im.file
                    )));
                }
                let fpath = dir.join(rel);
                let w = writable && lvl == 0;
                let f = opener(&fpath, w).map_err(|e| StorageError::io(&fpath, e))?;
                let layer: Box<dyn Layer> = match im.kind {
                    ImageType::Compressed => Box::new(ParallelsImage::open(f, w)?),
                    ImageType::Plain => Box::new(RawLayer::new(f, w)?),
                };
                if layer.virtual_size() < len {
                    return Err(StorageError::corrupt(
                        &fpath,
                        format!(
                            "holds {} bytes, but the descriptor gives its range {} bytes",
                            layer.virtual_size(),
                            len
                        ),
                    ));
                }
                files.push(fpath);
                levels.push(layer);
            }
            extents.push(Extent {
                start: s.start * SECTOR,
                len,
                levels,
            });
        }
        if d.padding != 0 {
            tracing::debug!(
                "{}: padded disk: guest sector 0 is stored at sector {}",
                dir.display(),
                d.padding
            );
        }
        Ok(Self {
            path: dir.to_path_buf(),
            writable,
            size,
            pad: d.padding * SECTOR,
            uid: d.uid,
            extents,
            files,
        })
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        crate::error::check_range(&self.path, offset, len, self.size)
    }

    /// The extent holding stored (padded) `offset` and how many bytes of it remain from there.
    fn extent(&self, offset: u64) -> (&Extent, u64) {
        let i = self.extents.partition_point(|e| e.start + e.len <= offset);
        let e = &self.extents[i.min(self.extents.len() - 1)];
        (e, e.start + e.len - offset)
    }

    /// The guest range `offset..offset + len` (checked by the caller) cut where storages end:
    /// each piece's extent, where the piece starts in it (padding included), where in the
    /// range, and its length.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (&Extent, u64, usize, usize)> {
        let mut done = 0u64;
        std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let off = offset + done + self.pad;
            let (e, left) = self.extent(off);
            // 0 only past the last storage, which a checked range never reaches.
            let n = left.min(len - done);
            (n > 0).then(|| {
                let piece = (e, off - e.start, done as usize, n as usize);
                done += n;
                piece
            })
        })
    }

    /// Takes a snapshot of the bundle in `dir`: the current state is frozen and a new, empty
    /// Compressed image per storage becomes the top, written to from now on. The descriptor
    /// gains the new `<Image>`s, a `<Shot>` whose parent is the old top, and a `<TopGUID>`
    /// naming it (the prl-xml way of naming the top; the predefined top GUID, if the old top
    /// had it, then stays with the frozen state). Existing files are never renamed or
    /// rewritten, except the old top's `in_use` mark: the new files are made first and the
    /// descriptor is replaced by rename, so a crash leaves either the old bundle (with at most
    /// unused new files) or the new one.
    pub fn create_snapshot(dir: &Path) -> Result<Self> {
        let dpath = dir.join(DESCRIPTOR);
        // Opening checks the whole chain; the top files are the ones that freeze.
        let tops: Vec<(u64, u64, PathBuf)> = {
            let b = Self::open(dir, false)?;
            b.extents
                .iter()
                .map(|e| {
                    let f = e.levels[0].files().pop().unwrap_or_default();
                    (e.start, e.levels[0].virtual_size(), f)
                })
                .collect()
        };
        // Nobody (a VM in ferry or QEMU) may be writing the state that freezes.
        let _locks = tops
            .iter()
            .map(|t| ImageLock::acquire(&t.2, LockMode::Exclusive))
            .collect::<Result<Vec<_>>>()?;
        // A writable open repairs a top left in use by a crash; closing marks it clean.
        Self::open(dir, true)?.flush()?;

        let xml = read_descriptor(&dpath)?;
        let d = Descriptor::parse(&xml, &dpath)?;
        let parent = *d
            .chain(&dpath)?
            .first()
            .ok_or_else(|| StorageError::corrupt(&dpath, "no snapshot is on top"))?;
        let new = Uuid::new_v4();
        let stem = std::fs::canonicalize(dir)
            .ok()
            .and_then(|c| c.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "disk.hdd".into());
        let mut staged = Staged::new(&dpath)?;
        let mut made = Vec::new();
        let mut names = Vec::new();
        for (i, st) in d.storages.iter().enumerate() {
            let name = format!("{stem}.{i}.{{{new}}}.hds");
            let path = dir.join(&name);
            // Same size as the image it sits on.
            let Some(&(_, size, _)) = tops
                .iter()
                .find(|t| Some(t.0) == st.start.checked_mul(SECTOR))
            else {
                return Err(StorageError::Unsupported {
                    path: dpath.clone(),
                    detail: format!(
                        "storage {}..{} lies past the end of the disk; ferry does not add snapshots to such a bundle",
                        st.start, st.end
                    ),
                });
            };
            let cluster = st
                .blocksize
                .filter(|&b| b > 0 && b <= MAX_SNAPSHOT_CLUSTER / SECTOR)
                .map_or(image::DEFAULT_CLUSTER, |b| b * SECTOR);
            let file = LocalFile::create(&path).map_err(|e| StorageError::io(&path, e))?;
            made.push(path);
            staged.set_files(made.clone());
            ParallelsImage::create_with_cluster(Arc::new(file), size, Variant::Dynamic, cluster)?
                .flush()?;
            names.push(name);
        }
        let text = with_snapshot(&xml, &dpath, new, parent, d.shots.is_empty(), &names)?;
        // What ferry wrote must read back with the new image on top.
        let check = Descriptor::parse(&text, &dpath)?;
        if check.chain(&dpath)?.first() != Some(&new) {
            return Err(StorageError::corrupt(
                &dpath,
                "the rewritten descriptor does not put the new snapshot on top; nothing changed",
            ));
        }
        if crate::host_file::durable() {
            // The new files' names must be on disk before the descriptor that names them.
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| StorageError::io(dir, e))?;
        }
        let tmp = staged.path().to_path_buf();
        std::fs::write(&tmp, &text).map_err(|e| StorageError::io(&tmp, e))?;
        staged.commit()?;
        // Parallels keeps a copy it falls back to; a stale one would lose the new snapshot.
        let backup = dir.join(format!("{DESCRIPTOR}.Backup"));
        if backup.is_file() {
            let r = Staged::new(&backup).and_then(|b| {
                std::fs::write(b.path(), &text).map_err(|e| StorageError::io(b.path(), e))?;
                b.commit()
            });
            if let Err(e) = r {
                tracing::warn!("{}: not updated: {e}", backup.display());
            }
        }
        tracing::info!(
            "{}: snapshot {parent} frozen; writes go to {new}",
            dir.display()
        );
        Self::open(dir, true)
    }

    /// Snapshot levels (top first) per extent: for tests and tools.
    pub fn depth(&self) -> usize {
        self.extents.first().map_or(0, |e| e.levels.len())
    }
}

impl Layer for Bundle {
    fn format(&self) -> FormatKind {
        FormatKind::Parallels
    }
    fn variant(&self) -> Variant {
        let all = self
            .extents
            .iter()
            .all(|e| e.levels[0].variant() == Variant::Fixed);
        match (self.extents.len() > 1, all) {
            (true, true) => Variant::Split2GFlat,
            (true, false) => Variant::Split2GSparse,
            (false, true) => Variant::Fixed,
            (false, false) => Variant::Dynamic,
        }
    }
    fn path(&self) -> &Path {
        &self.path
    }
    fn files(&self) -> Vec<PathBuf> {
        self.files.clone()
    }
    fn host_files(&self) -> Vec<Arc<dyn HostFile>> {
        self.extents
            .iter()
            .flat_map(|e| e.levels.iter().flat_map(|l| l.host_files()))
            .collect()
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn uuid(&self) -> Option<Uuid> {
        self.uid
    }
    fn parent(&self) -> Option<ParentRef> {
        None
    }
    fn writable(&self) -> bool {
        self.writable
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<(Allocation, u64)> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok((Allocation::Unallocated, 0));
        }
        let (e, left) = self.extent(offset + self.pad);
        let rel = offset + self.pad - e.start;
        let mut want = len.min(left);
        // The first level that holds the start decides; the run ends where any level changes.
        for l in &e.levels {
            let (st, run) = l.block_status(rel, want)?;
            let run = run.clamp(1, want);
            match st {
                Allocation::Data | Allocation::Zero => return Ok((Allocation::Data, run)),
                Allocation::Unallocated => want = run,
            }
        }
        Ok((Allocation::Unallocated, want))
    }
    fn host_run(&self, offset: u64, len: u64) -> Result<Option<(u64, u64)>> {
        self.check(offset, len)?;
        // Only a bundle of one image file without snapshots has a single file to read.
        match self.single_image() {
            Some(image) => image.host_run(offset + self.pad, len),
            None => Ok(None),
        }
    }
    fn mapped_file(&self) -> Option<PathBuf> {
        self.single_image()?.mapped_file()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        for (e, at, done, n) in self.pieces(offset, buf.len() as u64) {
            read_levels(&e.levels, &mut buf[done..done + n], at)?;
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
        for (e, at, done, n) in self.pieces(offset, buf.len() as u64) {
            let part = &buf[done..done + n];
            if e.levels.len() > 1 {
                e.levels[0].write_at(part, at, &ExtentBelow { ext: e, from: 1 })?;
            } else {
                // The bundle's own bottom: below it is whatever is below the bundle.
                let shifted = Shifted {
                    inner: lower,
                    start: e.start,
                    pad: self.pad,
                };
                e.levels[0].write_at(part, at, &shifted)?;
            }
        }
        Ok(())
    }
    fn reserve(&self, offset: u64, len: u64) {
        if self.check(offset, len).is_ok() {
            for (e, at, _, n) in self.pieces(offset, len) {
                e.levels[0].reserve(at, n as u64);
            }
        }
    }
    fn flush(&self) -> Result<()> {
        for e in &self.extents {
            e.levels[0].flush()?;
        }
        Ok(())
    }
}

/// Clusters a new snapshot image may have (a `Blocksize` above this falls back to 1 MiB).
const MAX_SNAPSHOT_CLUSTER: u64 = 64 << 20;

/// The whitespace before `n` when it is the only thing between `n` and its previous sibling:
/// new elements copy the indentation of the ones they follow.
fn indent_before(n: roxmltree::Node) -> String {
    n.prev_sibling()
        .filter(|p| p.is_text())
        .and_then(|p| p.text())
        .filter(|t| t.trim().is_empty())
        .map_or_else(|| "\n".to_string(), |t| t.to_string())
}

fn last_child<'a>(n: roxmltree::Node<'a, 'a>, name: &str) -> Option<roxmltree::Node<'a, 'a>> {
    n.children()
        .rfind(|c| c.is_element() && c.tag_name().name() == name)
}

/// Descriptor text with snapshot `new` (child of `parent`) added: one `<Image>` per storage
/// (files in `files`, storage order), its `<Shot>` (and the parent's, when the descriptor had
/// no snapshots), and `<TopGUID>`. Everything else is kept byte for byte: Parallels' own
/// elements that ferry does not know must survive.
pub fn with_snapshot(
    xml: &str,
    path: &Path,
    new: Uuid,
    parent: Uuid,
    list_parent: bool,
    files: &[String],
) -> Result<String> {
    let bad = |d: &str| StorageError::corrupt(path, d.to_string());
    // Entities could make elements whose text is not where their ranges say.
    if xml.contains("<!DOCTYPE") {
        return Err(StorageError::Unsupported {
            path: path.into(),
            detail: "the descriptor has a DOCTYPE, which Parallels never writes; ferry does not rewrite it".into(),
        });
    }
    let doc = roxmltree::Document::parse(xml).map_err(|e| bad(&format!("bad XML: {e}")))?;
    let root = doc.root_element();
    // (start, end, replacement), non-overlapping.
    let mut edits: Vec<(usize, usize, String)> = Vec::new();
    let sd = child(root, "StorageData").ok_or_else(|| bad("no <StorageData>"))?;
    let storages = sd
        .children()
        .filter(|c| c.is_element() && c.tag_name().name() == "Storage");
    let mut n = 0;
    for (st, file) in storages.zip(files) {
        let last = last_child(st, "Image").ok_or_else(|| bad("a <Storage> has no <Image>"))?;
        let ind = indent_before(last);
        let inner = format!("{ind}    ");
        let at = last.range().end;
        edits.push((
            at,
            at,
            format!(
                "{ind}<Image>{inner}<GUID>{{{new}}}</GUID>{inner}<Type>Compressed</Type>{inner}<File>{file}</File>{ind}</Image>"
            ),
        ));
        n += 1;
    }
    if n != files.len() {
        return Err(bad("the storages changed while the snapshot was made"));
    }
    let shot = |g: Uuid, p: Uuid, ind: &str| {
        let inner = format!("{ind}    ");
        format!("{ind}<Shot>{inner}<GUID>{{{g}}}</GUID>{inner}<ParentGUID>{{{p}}}</ParentGUID>{ind}</Shot>")
    };
    let shots = |ind: &str| {
        let mut s = String::new();
        if list_parent {
            s += &shot(parent, Uuid::nil(), ind);
        }
        s + &shot(new, parent, ind)
    };
    match child(root, "Snapshots") {
        Some(sn) if sn.children().any(|c| c.is_element()) => {
            let first = sn.children().find(|c| c.is_element()).unwrap_or(sn);
            let ind = indent_before(first);
            match child(sn, "TopGUID") {
                Some(t) => edits.push((
                    t.range().start,
                    t.range().end,
                    format!("<TopGUID>{{{new}}}</TopGUID>"),
                )),
                None => edits.push((
                    first.range().start,
                    first.range().start,
                    format!("<TopGUID>{{{new}}}</TopGUID>{ind}"),
                )),
            }
            let last = sn.children().rfind(|c| c.is_element()).unwrap_or(first);
            let at = last.range().end;
            edits.push((at, at, shots(&ind)));
        }
        other => {
            // No snapshots listed (or an empty element): write the whole element.
            let last = root.children().rfind(|c| c.is_element());
            let ind = last.map_or_else(|| "\n".to_string(), indent_before);
            let inner = format!("{ind}    ");
            let el = format!(
                "<Snapshots>{inner}<TopGUID>{{{new}}}</TopGUID>{}{ind}</Snapshots>",
                shots(&inner)
            );
            match (other, last) {
                (Some(sn), _) => edits.push((sn.range().start, sn.range().end, el)),
                (None, Some(l)) => edits.push((l.range().end, l.range().end, format!("{ind}{el}"))),
                (None, None) => return Err(bad("the descriptor has no elements")),
            }
        }
    }
    edits.sort_by_key(|e| std::cmp::Reverse(e.0));
    let mut out = xml.to_string();
    let mut limit = xml.len();
    for (a, b, t) in edits {
        // Never splice across another edit or inside a character.
        if a > b || b > limit || !xml.is_char_boundary(a) || !xml.is_char_boundary(b) {
            return Err(bad("the descriptor's layout is too unusual to rewrite"));
        }
        out.replace_range(a..b, &t);
        limit = a;
    }
    Ok(out)
}

/// `lower` (guest offsets) seen from inside an extent that starts at stored offset `start`.
struct Shifted<'a> {
    inner: &'a dyn LowerLayers,
    start: u64,
    pad: u64,
}

impl LowerLayers for Shifted<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let stored = offset + self.start;
        // The padding lies before the guest's disk: nothing below holds it.
        let head = (self.pad.saturating_sub(stored) as usize).min(buf.len());
        buf[..head].fill(0);
        if head < buf.len() {
            let guest = (stored + head as u64) - self.pad;
            self.inner.read_at(&mut buf[head..], guest)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(shots: &[(&str, &str)], top: Option<&str>) -> Descriptor {
        let g = |s: &str| parse_guid(s).unwrap();
        Descriptor {
            disk_size: 8,
            padding: 0,
            uid: None,
            storages: vec![],
            shots: shots.iter().map(|(a, b)| (g(a), g(b))).collect(),
            top: top.map(g),
        }
    }

    const A: &str = "{aaaaaaaa-0000-0000-0000-000000000001}";
    const B: &str = "{bbbbbbbb-0000-0000-0000-000000000002}";
    const C: &str = "{cccccccc-0000-0000-0000-000000000003}";
    const T: &str = "{5fbaabe3-6958-40ff-92a7-860e329aab41}";
    const NIL: &str = "{00000000-0000-0000-0000-000000000000}";

    #[test]
    fn chain_order_and_choice_of_top() {
        let p = Path::new("d.xml");
        let g = |s: &str| parse_guid(s).unwrap();
        // Listed in any order: top first.
        let d = desc(&[(A, NIL), (T, B), (B, A)], None);
        assert_eq!(d.chain(p).unwrap(), vec![g(T), g(B), g(A)]);
        // Branches (a reverted snapshot): the predefined current GUID wins.
        let d = desc(&[(A, NIL), (C, A), (T, A)], None);
        assert_eq!(d.chain(p).unwrap(), vec![g(T), g(A)]);
        // Without it, the choice is ambiguous.
        let d = desc(&[(A, NIL), (C, A), (B, A)], None);
        assert!(d.chain(p).is_err());
        // An explicit TopGUID decides.
        let d = desc(&[(A, NIL), (C, A), (B, A)], Some(C));
        assert_eq!(d.chain(p).unwrap(), vec![g(C), g(A)]);
        // Loops and self-parents are errors, never endless walks.
        assert!(desc(&[(A, A)], None).chain(p).is_err());
        assert!(desc(&[(A, B), (B, A)], Some(A)).chain(p).is_err());
        assert!(desc(&[(A, B), (B, C), (C, B)], None).chain(p).is_err());
        assert!(desc(&[(A, NIL), (A, NIL)], None).chain(p).is_err());
    }

    #[test]
    fn with_snapshot_covers_empty_absent_and_existing_snapshot_lists() {
        let p = Path::new("d.xml");
        let g = |s: &str| parse_guid(s).unwrap();
        let (n, a) = (g(C), g(A));
        let storage = format!(
            "<StorageData><Storage><Start>0</Start><End>8</End><Image><GUID>{A}</GUID>\
             <Type>Plain</Type><File>a</File></Image></Storage></StorageData>"
        );
        let head = "<Parallels_disk_image><Disk_Parameters><Disk_size>8</Disk_size><X a='>'/>\
                    </Disk_Parameters>";
        for tail in [
            "<Snapshots/>".to_string(),
            String::new(),
            format!("<Snapshots><Shot><GUID>{A}</GUID><ParentGUID>{NIL}</ParentGUID></Shot></Snapshots>"),
            format!("<Snapshots><TopGUID>{A}</TopGUID><Shot><GUID>{A}</GUID><ParentGUID>{NIL}</ParentGUID></Shot></Snapshots>"),
        ] {
            let x = format!("{head}{storage}{tail}</Parallels_disk_image>");
            let d = Descriptor::parse(&x, p).unwrap();
            let out = with_snapshot(&x, p, n, a, d.shots.is_empty(), &["n.hds".into()]).unwrap();
            assert!(out.starts_with(&x[..x.find("</Image>").unwrap()]), "{out}");
            let d = Descriptor::parse(&out, p).unwrap();
            assert_eq!(d.chain(p).unwrap(), vec![n, a], "{out}");
            assert_eq!(d.top, Some(n));
            assert_eq!(out.matches("<TopGUID>").count(), 1);
            let im = &d.storages[0].images[1];
            assert_eq!((im.guid, im.kind, im.file.as_str()), (n, ImageType::Compressed, "n.hds"));
        }
        let x = format!("<!DOCTYPE d>{head}{storage}</Parallels_disk_image>");
        assert!(with_snapshot(&x, p, n, a, true, &["n.hds".into()]).is_err());
    }

    #[test]
    fn parse_rejects_bad_numbers_and_guids() {
        let p = Path::new("d.xml");
        let x = |size: &str, guid: &str| {
            format!(
                "<Parallels_disk_image><Disk_Parameters><Disk_size>{size}</Disk_size></Disk_Parameters>\
                 <StorageData><Storage><Start>0</Start><End>8</End><Image><GUID>{guid}</GUID>\
                 <Type>Plain</Type><File>a.hds</File></Image></Storage></StorageData></Parallels_disk_image>"
            )
        };
        assert!(Descriptor::parse(&x("8", A), p).is_ok());
        assert!(Descriptor::parse(&x("-1", A), p).is_err());
        assert!(Descriptor::parse(&x("eight", A), p).is_err());
        assert!(Descriptor::parse(&x("8", "{nope}"), p).is_err());
        assert!(Descriptor::parse("", p).is_err());
        assert!(Descriptor::parse("<Parallels_disk_image/>", p).is_err());
    }
}
