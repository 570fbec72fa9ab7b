//! The virtual disk a device sees: a chain of layers, top first. Reads fall through to the
//! first layer that holds a range; writes go to the top layer.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::error::{Result, StorageError};
use crate::layer::{Allocation, Layer, LowerLayers};
use crate::probe::open_image;

pub struct Disk {
    /// Top (written) layer first, base last.
    layers: Vec<Box<dyn Layer>>,
}

/// The layers below index `from`, as the top layer's copy-on-write source.
struct Below<'a> {
    disk: &'a Disk,
    from: usize,
}

impl LowerLayers for Below<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.disk.read_from(self.from, buf, offset)
    }
}

impl Disk {
    /// Opens `path` and every parent it names. Parents are found by their recorded path, then
    /// by UUID beside the child, in the folder above it, and in `search`.
    pub fn open(path: &Path, writable: bool, search: &[PathBuf]) -> Result<Self> {
        let mut layers = vec![open_image(path, writable)?];
        let mut seen = HashSet::new();
        seen.insert(canonical(path));
        while let Some(parent) = layers.last().and_then(|l| l.parent()) {
            let child = layers
                .last()
                .map(|l| l.path().to_path_buf())
                .unwrap_or_default();
            let next = resolve_parent(&child, &parent, search)?;
            if !seen.insert(canonical(next.path())) {
                return Err(StorageError::ParentLoop {
                    path: child,
                    again: next.path().to_path_buf(),
                });
            }
            // VDI children record the parent's modification UUID: a parent written since the
            // child was made may no longer match what the child's blocks were copied against.
            if let (Some(want), Some(now)) = (parent.modification_uuid, next.modification_uuid()) {
                if want != now {
                    tracing::warn!(
                        "{}: its parent {} was modified after this child was made (modification UUID {now}, the child expects {want}); data read through the child may be inconsistent",
                        child.display(),
                        next.path().display()
                    );
                }
            }
            if next.virtual_size() < layers[0].virtual_size() {
                tracing::debug!(
                    "{}: parent is smaller than the child; the rest reads as zeros",
                    child.display()
                );
            }
            layers.push(next);
        }
        Ok(Self { layers })
    }

    /// A disk made of the given layers, top first.
    pub fn from_layers(layers: Vec<Box<dyn Layer>>) -> Result<Self> {
        if layers.is_empty() {
            return Err(StorageError::Invalid(
                "a disk needs at least one layer".into(),
            ));
        }
        Ok(Self { layers })
    }

    pub fn layers(&self) -> &[Box<dyn Layer>] {
        &self.layers
    }

    /// The layers, top first, to stack under a new top.
    pub fn into_layers(self) -> Vec<Box<dyn Layer>> {
        self.layers
    }

    pub fn size(&self) -> u64 {
        self.layers[0].virtual_size()
    }

    /// What the layers from index `from` down read (zeros below the base): the reference a
    /// copy into a differencing layer compares against.
    pub fn lower(&self, from: usize) -> impl LowerLayers + Sync + '_ {
        Below { disk: self, from }
    }

    fn check(&self, offset: u64, len: usize) -> Result<()> {
        crate::error::check_range(self.layers[0].path(), offset, len as u64, self.size())
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len())?;
        self.read_from(0, buf, offset)
    }

    fn read_from(&self, level: usize, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(layer) = self.layers.get(level) else {
            buf.fill(0);
            return Ok(());
        };
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            // Beyond a (smaller) parent's end the disk reads zeros.
            let avail = layer.virtual_size().saturating_sub(off);
            let want = (buf.len() - done) as u64;
            if avail == 0 {
                buf[done..].fill(0);
                break;
            }
            let (state, run) = layer.block_status(off, want.min(avail))?;
            let run = run.clamp(1, want.min(avail)) as usize;
            let part = &mut buf[done..done + run];
            match state {
                Allocation::Data => layer.read_at(part, off)?,
                Allocation::Zero => part.fill(0),
                Allocation::Unallocated => self.read_from(level + 1, part, off)?,
            }
            done += run;
        }
        Ok(())
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len())?;
        self.layers[0].write_at(
            buf,
            offset,
            &Below {
                disk: self,
                from: 1,
            },
        )
    }

    pub fn flush(&self) -> Result<()> {
        self.layers[0].flush()
    }

    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len as usize)?;
        self.layers[0].discard(offset, len)
    }

    /// Ranges any layer holds (data or explicit zeros), merged, in order: what a copy must
    /// read; everything else reads as zeros.
    pub fn allocated_ranges(&self) -> Result<Vec<(u64, u64)>> {
        let size = self.size();
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut off = 0u64;
        while off < size {
            let (held, run) = self.status_from(0, off, size - off)?;
            if held {
                match out.last_mut() {
                    Some((s, l)) if *s + *l == off => *l += run,
                    _ => out.push((off, run)),
                }
            }
            off += run;
        }
        Ok(out)
    }

    /// Ranges whose topmost holding layer has data (explicit zeros and holes left out), merged,
    /// in order: what a flattening copy must read; everything else reads as zeros.
    pub fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        let size = self.size();
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut off = 0u64;
        while off < size {
            let (state, run) = self.state_from(0, off, size - off)?;
            if state == Allocation::Data {
                match out.last_mut() {
                    Some((s, l)) if *s + *l == off => *l += run,
                    _ => out.push((off, run)),
                }
            }
            off += run;
        }
        Ok(out)
    }

    /// What the topmost layer at or below `level` that holds the run at `offset` says of it.
    fn state_from(&self, level: usize, offset: u64, len: u64) -> Result<(Allocation, u64)> {
        let Some(layer) = self.layers.get(level) else {
            return Ok((Allocation::Zero, len));
        };
        let avail = layer.virtual_size().saturating_sub(offset);
        if avail == 0 {
            return Ok((Allocation::Zero, len));
        }
        let (state, run) = layer.block_status(offset, len.min(avail))?;
        let run = run.clamp(1, len.min(avail));
        match state {
            Allocation::Unallocated => self.state_from(level + 1, offset, run),
            held => Ok((held, run)),
        }
    }

    /// Whether some layer at or below `level` holds the run at `offset`, and its length.
    fn status_from(&self, level: usize, offset: u64, len: u64) -> Result<(bool, u64)> {
        let Some(layer) = self.layers.get(level) else {
            return Ok((false, len));
        };
        let avail = layer.virtual_size().saturating_sub(offset);
        if avail == 0 {
            return Ok((false, len));
        }
        let (state, run) = layer.block_status(offset, len.min(avail))?;
        let run = run.clamp(1, len.min(avail));
        match state {
            Allocation::Data | Allocation::Zero => Ok((true, run)),
            Allocation::Unallocated => self.status_from(level + 1, offset, run),
        }
    }
}

fn canonical(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

/// Finds the layer a child names as its parent.
fn resolve_parent(
    child: &Path,
    parent: &crate::layer::ParentRef,
    search: &[PathBuf],
) -> Result<Box<dyn Layer>> {
    let dir = child.parent().unwrap_or(Path::new("."));
    // Recorded paths first, relative to the child's folder.
    for hint in &parent.path_hints {
        let p = if hint.is_absolute() {
            hint.clone()
        } else {
            dir.join(hint)
        };
        if p.exists() {
            let layer = open_image(&p, false)?;
            if let (Some(want), Some(found)) = (parent.uuid, layer.uuid()) {
                if want != found {
                    return Err(StorageError::ParentMismatch {
                        path: child.into(),
                        parent: p,
                        expected: want,
                        found,
                    });
                }
            }
            return Ok(layer);
        }
    }
    let Some(uuid) = parent.uuid else {
        let hint = parent
            .path_hints
            .first()
            .map(|h| h.display().to_string())
            .unwrap_or_default();
        return Err(StorageError::corrupt(
            child,
            format!("its parent {hint} does not exist"),
        ));
    };
    find_by_uuid(child, uuid, search)
}

/// Looks for an image with `uuid` beside the child, in the folder above (a VM's Snapshots/
/// layout) and in the user's search paths.
fn find_by_uuid(child: &Path, uuid: Uuid, search: &[PathBuf]) -> Result<Box<dyn Layer>> {
    let dir = child.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut places = vec![dir.clone()];
    if let Some(up) = dir.parent() {
        places.push(up.to_path_buf());
    }
    places.extend(search.iter().cloned());
    let me = canonical(child);
    for place in places {
        let candidates: Vec<PathBuf> = if place.is_dir() {
            match std::fs::read_dir(&place) {
                Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
                Err(_) => continue,
            }
        } else {
            vec![place]
        };
        for c in candidates {
            if canonical(&c) == me {
                continue;
            }
            // Anything that is not an image with this UUID is skipped quietly.
            if let Ok(layer) = open_image(&c, false) {
                if layer.uuid() == Some(uuid) {
                    return Ok(layer);
                }
            }
        }
    }
    Err(StorageError::ParentNotFound {
        path: child.into(),
        uuid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{FormatKind, ParentRef, Variant};
    use std::sync::Mutex;

    /// An in-memory layer with 4 KiB blocks, for chain logic.
    struct MemLayer {
        size: u64,
        blocks: Mutex<std::collections::BTreeMap<u64, Vec<u8>>>,
        path: PathBuf,
    }

    impl MemLayer {
        fn new(size: u64, name: &str) -> Self {
            Self {
                size,
                blocks: Mutex::new(Default::default()),
                path: PathBuf::from(name),
            }
        }
    }

    const B: u64 = 4096;

    impl Layer for MemLayer {
        fn format(&self) -> FormatKind {
            FormatKind::Raw
        }
        fn variant(&self) -> Variant {
            Variant::Dynamic
        }
        fn path(&self) -> &Path {
            &self.path
        }
        fn files(&self) -> Vec<PathBuf> {
            vec![]
        }
        fn host_files(&self) -> Vec<std::sync::Arc<dyn crate::HostFile>> {
            vec![]
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
            true
        }
        fn block_status(&self, offset: u64, len: u64) -> Result<(Allocation, u64)> {
            let blocks = self.blocks.lock().unwrap();
            let first = offset / B;
            let state = blocks.contains_key(&first);
            let mut end = (first + 1) * B;
            while end < offset + len && blocks.contains_key(&(end / B)) == state {
                end += B;
            }
            let st = if state {
                Allocation::Data
            } else {
                Allocation::Unallocated
            };
            Ok((st, (end - offset).min(len)))
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            let blocks = self.blocks.lock().unwrap();
            for (i, b) in buf.iter_mut().enumerate() {
                let o = offset + i as u64;
                *b = blocks.get(&(o / B)).map_or(0, |blk| blk[(o % B) as usize]);
            }
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64, lower: &dyn LowerLayers) -> Result<()> {
            let mut blocks = self.blocks.lock().unwrap();
            for (i, &v) in buf.iter().enumerate() {
                let o = offset + i as u64;
                let blk = match blocks.entry(o / B) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(e) => {
                        let mut fill = vec![0u8; B as usize];
                        lower.read_at(&mut fill, (o / B) * B)?;
                        e.insert(fill)
                    }
                };
                blk[(o % B) as usize] = v;
            }
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn reads_fall_through_and_writes_copy_on_write() {
        let base = MemLayer::new(64 * B, "base");
        base.write_at(&[1u8; 8192], 0, &crate::layer::NoLowerLayers)
            .unwrap();
        let top = MemLayer::new(64 * B, "top");
        let disk = Disk::from_layers(vec![Box::new(top), Box::new(base)]).unwrap();
        // A partial write into the child keeps the parent's bytes around it.
        disk.write_at(&[2u8; 10], 100).unwrap();
        let mut buf = vec![0u8; 3 * B as usize];
        disk.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..100], &[1u8; 100][..]);
        assert_eq!(&buf[100..110], &[2u8; 10][..]);
        assert_eq!(&buf[110..8192], &vec![1u8; 8082][..]);
        assert!(buf[8192..].iter().all(|&b| b == 0));
        assert_eq!(disk.allocated_ranges().unwrap(), vec![(0, 8192)]);
        // Out-of-range access is an error, not a panic.
        assert!(disk.read_at(&mut buf, 63 * B).is_err());
        assert!(disk.write_at(&[0], u64::MAX).is_err());
    }
}
