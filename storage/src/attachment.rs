//! Medium types: the rules by which a VM opens an attached image (VirtualBox's vocabulary),
//! and the set of one VM's attachments, which refuses two images with one identity.
//!
//! | type         | writes go to                         | locks                              |
//! |--------------|--------------------------------------|------------------------------------|
//! | normal       | the image                            | top exclusive, parents shared      |
//! | writethrough | the image (left out of snapshots)    | as normal                          |
//! | immutable    | a child in the VM folder, discarded  | child exclusive, image shared      |
//! |              | at each power-on unless autoreset=off|                                    |
//! | multiattach  | a child in the VM folder, kept       | child exclusive, image shared      |
//! | shareable    | the image, by several VMs at once    | shared-write (fixed images only)   |
//! | readonly     | nowhere (writes fail)                | shared                             |

use std::path::{Path, PathBuf};
use std::str::FromStr;

use uuid::Uuid;

use crate::disk::Disk;
use crate::error::{Result, StorageError};
use crate::layer::{CreateOptions, CreateParent, FormatKind, Layer, Variant};
use crate::lock::{ImageLock, LockMode};
use crate::probe::{create_image, open_image};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MediumType {
    Normal,
    Immutable,
    Writethrough,
    Shareable,
    Multiattach,
    Readonly,
}

impl MediumType {
    pub const ALL: [MediumType; 6] = [
        Self::Normal,
        Self::Immutable,
        Self::Writethrough,
        Self::Shareable,
        Self::Multiattach,
        Self::Readonly,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Immutable => "immutable",
            Self::Writethrough => "writethrough",
            Self::Shareable => "shareable",
            Self::Multiattach => "multiattach",
            Self::Readonly => "readonly",
        }
    }

    /// Whether the VM writes into the image itself (not into a child of it).
    fn writes_image(self) -> bool {
        matches!(self, Self::Normal | Self::Writethrough | Self::Shareable)
    }

    /// Whether writes go to a differencing child in the VM's folder.
    fn uses_child(self) -> bool {
        matches!(self, Self::Immutable | Self::Multiattach)
    }
}

impl std::fmt::Display for MediumType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MediumType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|t| t.name()).collect();
                format!(
                    "'{s}' is not a medium type; use one of {}",
                    names.join(", ")
                )
            })
    }
}

/// Where a VM keeps what it makes for its media.
#[derive(Debug, Clone)]
pub struct Placement {
    /// The VM's folder (its VM.toml's folder): children go to `Snapshots/` in it.
    pub vm_dir: PathBuf,
    /// Extra places to look for parents by UUID.
    pub search: Vec<PathBuf>,
    /// Immutable media: start from a fresh child at each power-on (VirtualBox's default).
    pub autoreset: bool,
}

impl Placement {
    pub fn new(vm_dir: &Path, search: &[PathBuf]) -> Self {
        Self {
            vm_dir: vm_dir.to_path_buf(),
            search: search.to_vec(),
            autoreset: true,
        }
    }

    pub fn snapshots(&self) -> PathBuf {
        self.vm_dir.join("Snapshots")
    }
}

/// An attached medium, open by a VM's rules; its locks last as long as it does.
pub struct Attachment {
    pub disk: Disk,
    pub mtype: MediumType,
    /// The image the user attached.
    pub path: PathBuf,
    /// The differencing child this VM writes into (immutable and multiattach media).
    pub child: Option<PathBuf>,
    locks: Vec<ImageLock>,
}

impl Attachment {
    pub fn locks(&self) -> &[ImageLock] {
        &self.locks
    }

    /// The disk for a device to own, and the locks that must live as long as the VM runs.
    pub fn split(self) -> (Disk, Vec<ImageLock>) {
        (self.disk, self.locks)
    }

    /// Whether this medium's data belongs in a snapshot of the VM (writethrough's does not).
    pub fn in_snapshots(&self) -> bool {
        !matches!(self.mtype, MediumType::Writethrough | MediumType::Shareable)
    }
}

/// Opens `path` as a medium of type `mtype` for a VM whose folder is `vm_dir`, with
/// autoreset on.
pub fn open_attachment(
    path: &Path,
    mtype: MediumType,
    vm_dir: &Path,
    search: &[PathBuf],
) -> Result<Attachment> {
    open_attachment_with(path, mtype, &Placement::new(vm_dir, search))
}

/// Opens `path` as a medium of type `mtype`, placing children as `place` says.
pub fn open_attachment_with(
    path: &Path,
    mtype: MediumType,
    place: &Placement,
) -> Result<Attachment> {
    // The chain is read first without writing anything, to know which files to lock before
    // any of them is opened for writing.
    let chain = Disk::open(path, false, &place.search)?;
    let mut locks = Vec::new();
    match mtype {
        MediumType::Normal | MediumType::Writethrough => {
            for (i, layer) in chain.layers().iter().enumerate() {
                let mode = if i == 0 {
                    LockMode::Exclusive
                } else {
                    LockMode::Shared
                };
                lock_layer(layer.as_ref(), mode, &mut locks)?;
            }
            drop(chain);
            let disk = Disk::open(path, true, &place.search)?;
            Ok(Attachment {
                disk,
                mtype,
                path: path.to_path_buf(),
                child: None,
                locks,
            })
        }
        MediumType::Shareable => {
            check_shareable(&chain)?;
            lock_layer(
                chain.layers()[0].as_ref(),
                LockMode::SharedWrite,
                &mut locks,
            )?;
            drop(chain);
            let disk = Disk::open(path, true, &place.search)?;
            Ok(Attachment {
                disk,
                mtype,
                path: path.to_path_buf(),
                child: None,
                locks,
            })
        }
        MediumType::Readonly => {
            for layer in chain.layers() {
                lock_layer(layer.as_ref(), LockMode::Shared, &mut locks)?;
            }
            Ok(Attachment {
                disk: chain,
                mtype,
                path: path.to_path_buf(),
                child: None,
                locks,
            })
        }
        MediumType::Immutable | MediumType::Multiattach => {
            for layer in chain.layers() {
                lock_layer(layer.as_ref(), LockMode::Shared, &mut locks)?;
            }
            // Multiattach children are the VM's own disk: never reset.
            let reset = mtype == MediumType::Immutable && place.autoreset;
            let (child_layer, child_path, child_lock) = child_for(&chain, path, place, reset)?;
            locks.push(child_lock);
            let mut layers = vec![child_layer];
            layers.extend(chain.into_layers());
            Ok(Attachment {
                disk: Disk::from_layers(layers)?,
                mtype,
                path: path.to_path_buf(),
                child: Some(child_path),
                locks,
            })
        }
    }
}

/// Locks every regular file of a layer (a bundle's folder itself is not lockable).
fn lock_layer(layer: &dyn Layer, mode: LockMode, locks: &mut Vec<ImageLock>) -> Result<()> {
    let mut files = layer.files();
    if files.is_empty() {
        files.push(layer.path().to_path_buf());
    }
    for f in files.iter().filter(|f| f.is_file()) {
        locks.push(ImageLock::acquire(f, mode)?);
    }
    Ok(())
}

/// Several VMs writing one image at once is safe only where no metadata moves: fixed images.
fn check_shareable(chain: &Disk) -> Result<()> {
    let top = &chain.layers()[0];
    let fixed = top.format() == FormatKind::Raw
        || matches!(top.variant(), Variant::Fixed | Variant::Split2GFlat);
    let why = if chain.layers().len() > 1 {
        Some("it is a differencing image")
    } else if !fixed {
        Some("it is dynamically allocated")
    } else {
        None
    };
    match why {
        Some(why) => Err(StorageError::Unsupported {
            path: top.path().to_path_buf(),
            detail: format!(
                "only a fixed-size image without parents can be shareable, and {why}; make a fixed copy with `ferry medium clone --variant fixed`"
            ),
        }),
        None => Ok(()),
    }
}

/// The differencing child of an immutable or multiattach medium, in the VM's `Snapshots/`
/// folder as `{base UUID}.vdi`: made fresh when `reset` (or missing), reused otherwise.
fn child_for(
    base: &Disk,
    base_path: &Path,
    place: &Placement,
    reset: bool,
) -> Result<(Box<dyn Layer>, PathBuf, ImageLock)> {
    let top = &base.layers()[0];
    let uuid = top.uuid().filter(|u| !u.is_nil()).ok_or_else(|| {
        StorageError::Unsupported {
            path: base_path.to_path_buf(),
            detail: format!(
                "a {} image has no UUID for a differencing child to name; convert it (e.g. to VDI with `ferry medium clone`) to use it as immutable or multiattach",
                top.format().name()
            ),
        }
    })?;
    let dir = place.snapshots();
    std::fs::create_dir_all(&dir).map_err(|e| StorageError::io(&dir, e))?;
    let child = dir.join(format!("{{{uuid}}}.vdi"));
    if child.exists() {
        // Locked before it is deleted or reused: another run of this VM may be using it.
        let lock = ImageLock::acquire(&child, LockMode::Exclusive)?;
        if !reset {
            let layer = open_image(&child, true)?;
            match layer.parent().and_then(|p| p.uuid) {
                Some(p) if p == uuid => {
                    tracing::info!("{}: writes continue in {}", base_path.display(), child.display());
                    return Ok((layer, child, lock));
                }
                other => {
                    return Err(StorageError::corrupt(
                        &child,
                        format!(
                            "this differencing image belongs to {}, not to {} ({uuid}); move it away to start afresh",
                            other.map_or("no parent".to_string(), |u| u.to_string()),
                            base_path.display()
                        ),
                    ))
                }
            }
        }
        std::fs::remove_file(&child).map_err(|e| StorageError::io(&child, e))?;
        drop(lock);
        tracing::info!("{}: reset to its base image", child.display());
    }
    let opts = CreateOptions {
        size: base.size(),
        variant: Variant::Dynamic,
        parent: Some(CreateParent {
            path: top.path().to_path_buf(),
            uuid: Some(uuid),
            modification_uuid: top.modification_uuid(),
            format: top.format(),
        }),
    };
    let layer = create_image(&child, FormatKind::Vdi, &opts)?;
    let lock = match ImageLock::acquire(&child, LockMode::Exclusive) {
        Ok(l) => l,
        Err(e) => {
            drop(layer);
            let _ = std::fs::remove_file(&child);
            return Err(e);
        }
    };
    Ok((layer, child, lock))
}

/// One VM's attachments: refuses two different files with one UUID (a `cp` of an image; the
/// parent search by UUID could pick either, and guests tell disks apart by their identity),
/// and one image attached twice where both would write it.
#[derive(Default)]
pub struct AttachmentSet {
    /// (UUID, canonical path) of every layer attached so far.
    uuids: Vec<(Uuid, PathBuf)>,
    /// (canonical path, medium type) of every attached image.
    media: Vec<(PathBuf, MediumType)>,
    attached: Vec<Attachment>,
}

impl AttachmentSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks `path` against what is attached, then opens it.
    pub fn attach(
        &mut self,
        path: &Path,
        mtype: MediumType,
        place: &Placement,
    ) -> Result<&Attachment> {
        let me = canonical(path);
        for (other, other_type) in &self.media {
            if *other == me && !(may_repeat(mtype) && may_repeat(*other_type)) {
                return Err(StorageError::Invalid(format!(
                    "{} is attached twice; an image can be attached to one place at a time unless every attachment of it is readonly or shareable",
                    path.display()
                )));
            }
        }
        let chain = Disk::open(path, false, &place.search)?;
        let mut new_uuids = Vec::new();
        for layer in chain.layers() {
            let Some(uuid) = layer.uuid().filter(|u| !u.is_nil()) else {
                continue;
            };
            let here = canonical(layer.path());
            for (u, there) in self.uuids.iter().chain(new_uuids.iter()) {
                if *u == uuid && *there != here {
                    return Err(StorageError::DuplicateUuid {
                        first: there.clone(),
                        second: here,
                        uuid,
                    });
                }
            }
            new_uuids.push((uuid, here));
        }
        drop(chain);
        let att = open_attachment_with(path, mtype, place)?;
        self.uuids.extend(new_uuids);
        self.media.push((me, mtype));
        self.attached.push(att);
        Ok(self.attached.last().expect("just pushed"))
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.attached
    }

    pub fn into_attachments(self) -> Vec<Attachment> {
        self.attached
    }
}

fn may_repeat(t: MediumType) -> bool {
    // Shareable media are meant to be written from several places.
    !t.writes_image() && !t.uses_child() || t == MediumType::Shareable
}

fn canonical(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}
