//! A Parallels `.pvm` bundle to a VM.toml: every check (the XML, each disk's image) runs
//! before anything is written, so bad input leaves nothing behind.

use std::path::{Path, PathBuf};

use ferry_storage::parallels::pvm::{
    self, Backing, BootDevice as PrlBoot, Drive, Firmware as PrlFirmware, Interface, PvmConfig,
    PvmError, ScsiModel,
};
use ferry_storage::{Disk, StorageError};
use serde::Serialize;
use toml::Spanned;

use super::convert::convert_disk;
use super::ImportArgs;
use crate::vmdef::value::{BootDevice, DriveKind, Firmware, OnOff, Size};
use crate::vmdef::{Attach, ControllerType, StorageCtl, VmDef};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{} is not a Parallels VM bundle: {why}", .path.display())]
    NotABundle { path: PathBuf, why: String },
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a Parallels VM configuration: {source}", .path.display())]
    Config { path: PathBuf, source: PvmError },
    #[error("{what}: its image {} is missing{also}", .image.display())]
    MissingDisk {
        what: String,
        image: PathBuf,
        also: String,
    },
    #[error("{what}: {source}")]
    Disk { what: String, source: StorageError },
    #[error("{} already exists; pass --force to replace it, or -o FILE to write elsewhere", .path.display())]
    Exists { path: PathBuf },
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the VM definition made from {} does not read back ({detail}); this is a bug in ferry", .bundle.display())]
    Internal { detail: String, bundle: PathBuf },
}

/// What was mapped, for the user (text) or a script (--json).
#[derive(Debug, Serialize)]
pub struct Report {
    pub source: PathBuf,
    pub definition: PathBuf,
    pub name: Option<String>,
    pub guest: Option<String>,
    pub memory_mib: Option<u64>,
    pub cpus: Option<u32>,
    pub firmware: String,
    pub boot: Vec<String>,
    pub drives: Vec<MappedDrive>,
    pub not_carried: Vec<String>,
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct MappedDrive {
    /// "hard disk 0" / "CD/DVD 0".
    pub drive: String,
    /// Where Parallels had it: "IDE 0:1", "SATA port 2".
    pub parallels: String,
    pub controller: String,
    #[serde(rename = "type")]
    pub controller_type: String,
    pub port: u32,
    pub device: u32,
    pub medium: PathBuf,
    pub format: String,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub converted_from: Option<PathBuf>,
}

impl Report {
    pub fn text(&self) -> String {
        let mut s = format!(
            "Imported {} from {}\ninto {}\n",
            self.name.as_deref().unwrap_or("the VM"),
            self.source.display(),
            self.definition.display()
        );
        let mut facts = Vec::new();
        if let Some(g) = &self.guest {
            facts.push(format!("guest {g}"));
        }
        if let Some(m) = self.memory_mib {
            facts.push(format!("memory {m}M"));
        }
        if let Some(c) = self.cpus {
            facts.push(format!("{c} vCPU{}", if c == 1 { "" } else { "s" }));
        }
        facts.push(format!("firmware {}", self.firmware));
        if !self.boot.is_empty() {
            facts.push(format!("boot {}", self.boot.join(", ")));
        }
        s.push_str(&format!("  {}\n", facts.join(", ")));
        for d in &self.drives {
            s.push_str(&format!(
                "  {} ({}) -> {} {} port {} device {}: {} ({}, {})\n",
                d.drive,
                d.parallels,
                d.controller,
                d.controller_type,
                d.port,
                d.device,
                d.medium.display(),
                d.format,
                Size(d.size),
            ));
            if let Some(from) = &d.converted_from {
                s.push_str(&format!("    copied from {}\n", from.display()));
            }
        }
        if !self.not_carried.is_empty() {
            s.push_str("Not carried over:\n");
            for n in &self.not_carried {
                s.push_str(&format!("  - {n}\n"));
            }
        }
        for n in &self.notes {
            s.push_str(&format!("Note: {n}\n"));
        }
        s
    }
}

/// A drive's planned attachment, checked but not yet written.
struct Planned {
    drive: Drive,
    label: String,
    kind: DriveKind,
    image: PathBuf,
    ctl_name: String,
    ctl_type: ControllerType,
    port: u32,
    device: u32,
    format: String,
    size: u64,
}

pub fn import(args: &ImportArgs) -> Result<Report, ImportError> {
    let bundle = bundle_dir(&args.path)?;
    let config_path = bundle.join("config.pvs");
    let cfg = read_config(&config_path)?;
    let stem = bundle
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "vm".into());
    let out = match &args.output {
        Some(o) => o.clone(),
        None => bundle
            .parent()
            .unwrap_or(Path::new("."))
            .join(format!("{stem}.toml")),
    };
    if out.exists() && !args.force {
        return Err(ImportError::Exists { path: out });
    }
    let out_dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();

    let mut not_carried = cfg.not_carried.clone();
    let mut notes = Vec::new();
    let mut planned = Vec::new();
    for d in &cfg.disks {
        let label = format!("hard disk {}", d.index);
        if let Some(p) = plan_drive(&bundle, d, &label, DriveKind::Hdd, &mut not_carried)? {
            planned.push(p);
        }
    }
    for d in &cfg.cdroms {
        let label = format!("CD/DVD {}", d.index);
        match plan_drive(&bundle, d, &label, DriveKind::Dvd, &mut not_carried) {
            Ok(Some(p)) => planned.push(p),
            Ok(None) => {}
            // An installer ISO left on the old machine is no reason to stop.
            Err(ImportError::MissingDisk { image, .. }) => not_carried.push(format!(
                "{label}: its image {} was not found; the drive is left out",
                image.display()
            )),
            Err(e) => return Err(e),
        }
    }
    if bundle.join("Snapshots.xml").exists() || bundle.join("Snapshots").is_dir() {
        notes.push(
            "the VM's Parallels snapshots are not imported; its disks are used in their current state"
                .into(),
        );
    }

    let mut boot = Vec::new();
    for b in &cfg.boot {
        let dev = match b {
            PrlBoot::HardDisk(_) => Some(BootDevice::Disk),
            PrlBoot::Cdrom(_) => Some(BootDevice::Dvd),
            PrlBoot::Network => Some(BootDevice::Net),
            PrlBoot::Floppy => {
                not_carried.push("booting from floppy".into());
                None
            }
            PrlBoot::Usb => {
                not_carried.push("booting from USB".into());
                None
            }
            PrlBoot::Other(n) => {
                not_carried.push(format!("boot device of type {n}"));
                None
            }
        };
        if let Some(dev) = dev {
            if !boot.contains(&dev) {
                boot.push(dev);
            }
        }
    }
    // The disk Parallels boots first goes first among the attachments.
    if let Some(PrlBoot::HardDisk(first)) =
        cfg.boot.iter().find(|b| matches!(b, PrlBoot::HardDisk(_)))
    {
        if let Some(i) = planned
            .iter()
            .position(|p| p.kind == DriveKind::Hdd && p.drive.index == *first)
        {
            let p = planned.remove(i);
            planned.insert(0, p);
        }
    }

    // Conversions write files, so they come after every check above.
    let mut converted: Vec<(usize, PathBuf)> = Vec::new();
    if let Some(to) = args.convert {
        let dir = out_dir.join(format!("{stem} disks"));
        let targets: Vec<(usize, PathBuf)> = planned
            .iter()
            .enumerate()
            .filter(|(_, p)| p.kind == DriveKind::Hdd)
            .map(|(i, p)| {
                let name = p
                    .image
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| format!("disk{i}"));
                (i, dir.join(format!("{name}.{}", to.format().name())))
            })
            .collect();
        if let Some((_, t)) = targets.iter().find(|(_, t)| t.exists()) {
            return Err(ImportError::Exists { path: t.clone() });
        }
        let made_dir = !dir.exists();
        std::fs::create_dir_all(&dir).map_err(|source| ImportError::Write {
            path: dir.clone(),
            source,
        })?;
        for (i, t) in &targets {
            let p = &planned[*i];
            tracing::info!("copying {} to {}", p.image.display(), t.display());
            if let Err(source) =
                convert_disk(&p.image, t, to.format(), std::slice::from_ref(&bundle))
            {
                for (_, done) in &converted {
                    let _ = std::fs::remove_file(done);
                }
                if made_dir {
                    let _ = std::fs::remove_dir(&dir);
                }
                return Err(ImportError::Disk {
                    what: format!("{}: copying to {}", p.label, t.display()),
                    source,
                });
            }
            converted.push((*i, t.clone()));
        }
    }

    let mut def = VmDef {
        name: cfg.name.clone(),
        memory: cfg.memory_mib.map(|m| Size(m << 20)),
        cpus: cfg.cpus,
        firmware: Some(match cfg.firmware {
            PrlFirmware::Bios => Firmware::Bios,
            PrlFirmware::Efi => Firmware::Efi,
        }),
        boot: (!boot.is_empty()).then(|| boot.clone()),
        ..VmDef::default()
    };
    let mut drives = Vec::new();
    for (i, p) in planned.iter().enumerate() {
        if !def
            .storagectl
            .iter()
            .any(|c| c.name.get_ref() == &p.ctl_name)
        {
            def.storagectl.push(StorageCtl {
                name: Spanned::new(0..0, p.ctl_name.clone()),
                kind: Spanned::new(0..0, p.ctl_type),
                hostiocache: None,
                ports: None,
            });
        }
        let copy = converted
            .iter()
            .find(|(j, _)| *j == i)
            .map(|(_, t)| t.clone());
        let medium = copy.clone().unwrap_or_else(|| p.image.clone());
        def.attach.push(Attach {
            ctl: Spanned::new(0..0, p.ctl_name.clone()),
            port: Spanned::new(0..0, p.port),
            device: p.ctl_type.is_ide().then(|| Spanned::new(0..0, p.device)),
            medium: relative_to(&medium, &out_dir),
            kind: p.kind,
            mtype: None,
            autoreset: None,
            nonrotational: OnOff(false),
            discard: OnOff(false),
            bwgroup: None,
            hotpluggable: OnOff(false),
        });
        drives.push(MappedDrive {
            drive: p.label.clone(),
            parallels: position_words(&p.drive),
            controller: p.ctl_name.clone(),
            controller_type: p.ctl_type.to_string(),
            port: p.port,
            device: p.device,
            medium: relative_to(&medium, &out_dir),
            format: match &copy {
                Some(_) => args
                    .convert
                    .map(|c| c.format().name())
                    .unwrap_or("")
                    .to_string(),
                None => p.format.clone(),
            },
            size: p.size,
            converted_from: copy.map(|_| p.image.clone()),
        });
    }
    if let Some(ctl) = def.storagectl.first() {
        notes.push(format!(
            "ferry's {} controller is not implemented yet: `ferry run` refuses this definition until it is",
            ctl.kind.get_ref()
        ));
    }
    if cfg
        .disks
        .iter()
        .all(|d| !matches!(d.backing, Backing::Image(_)))
    {
        notes.push("the VM has no hard disk image".into());
    }

    let text = format!(
        "# Made by `ferry import` from {}\n{}",
        bundle.display(),
        toml::to_string_pretty(&def).map_err(|e| ImportError::Internal {
            detail: e.to_string(),
            bundle: bundle.clone()
        })?
    );
    // What is written must read back as a valid definition.
    VmDef::parse(&text, &out).map_err(|e| ImportError::Internal {
        detail: e.to_string(),
        bundle: bundle.clone(),
    })?;
    write_atomically(&out, &text)?;

    Ok(Report {
        source: bundle,
        definition: out,
        name: cfg.name.clone(),
        guest: cfg.guest.as_ref().map(|g| g.describe()),
        memory_mib: cfg.memory_mib,
        cpus: cfg.cpus,
        firmware: match cfg.firmware {
            PrlFirmware::Bios => "bios".into(),
            PrlFirmware::Efi => "efi".into(),
        },
        boot: boot.iter().map(|b| b.to_string()).collect(),
        drives,
        not_carried,
        notes,
    })
}

/// The bundle folder: `NAME.pvm`, or the folder of a `config.pvs` given directly.
fn bundle_dir(path: &Path) -> Result<PathBuf, ImportError> {
    let not = |why: &str| ImportError::NotABundle {
        path: path.to_path_buf(),
        why: why.into(),
    };
    if !path.exists() {
        return Err(not("it does not exist"));
    }
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else if path.file_name().is_some_and(|n| n == "config.pvs") {
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf()
    } else {
        return Err(not("give the NAME.pvm folder (or its config.pvs)"));
    };
    if !dir.join("config.pvs").is_file() {
        return Err(not("it has no config.pvs"));
    }
    Ok(dir)
}

fn read_config(path: &Path) -> Result<PvmConfig, ImportError> {
    let meta = std::fs::metadata(path).map_err(|source| ImportError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.len() > pvm::MAX_CONFIG as u64 {
        return Err(ImportError::Config {
            path: path.to_path_buf(),
            source: PvmError::TooLarge,
        });
    }
    let bytes = std::fs::read(path).map_err(|source| ImportError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    pvm::parse(&text).map_err(|source| ImportError::Config {
        path: path.to_path_buf(),
        source,
    })
}

/// Where ferry puts a Parallels drive: the same kind of controller, the same position.
fn plan_drive(
    bundle: &Path,
    d: &Drive,
    label: &str,
    kind: DriveKind,
    not_carried: &mut Vec<String>,
) -> Result<Option<Planned>, ImportError> {
    let image = match &d.backing {
        Backing::Empty => return Ok(None),
        Backing::HostDevice(dev) => {
            not_carried.push(format!("{label}: it uses the host's drive {dev}"));
            return Ok(None);
        }
        Backing::Image(i) => i,
    };
    if !d.enabled {
        not_carried.push(format!("{label} ({image}): disabled in Parallels"));
        return Ok(None);
    }
    let (ctl_name, ctl_type) = match d.interface {
        Interface::Ide => ("IDE", ControllerType::IdePiix4),
        Interface::Sata => ("SATA", ControllerType::Ahci),
        Interface::Nvme => ("NVMe", ControllerType::Nvme),
        Interface::Scsi(ScsiModel::BusLogic) => ("SCSI", ControllerType::BusLogic),
        Interface::Scsi(ScsiModel::LsiSpi) => ("SCSI", ControllerType::LsiLogic),
        Interface::Scsi(ScsiModel::LsiSas) => ("SAS", ControllerType::LsiLogicSas),
        Interface::Scsi(ScsiModel::Other(_)) | Interface::Other(_) => {
            not_carried.push(format!(
                "{label} ({image}): on {}, which ferry has no model for",
                d.interface.name()
            ));
            return Ok(None);
        }
    };
    if kind == DriveKind::Dvd && !ctl_type.takes_dvd() {
        not_carried.push(format!("{label}: a CD/DVD drive on {}", d.interface.name()));
        return Ok(None);
    }
    let (port, device) = if ctl_type.is_ide() {
        (d.position / 2, d.position % 2)
    } else {
        (d.position, 0)
    };
    if port >= ctl_type.max_ports() {
        not_carried.push(format!(
            "{label} ({image}): position {} is beyond what a {ctl_type} controller has",
            d.position
        ));
        return Ok(None);
    }
    let path = find_image(bundle, image, label)?;
    // Opened (read-only) now, so a broken disk stops the import before anything is written.
    let what = label.to_string();
    let (format, size) = if kind == DriveKind::Hdd {
        let disk = Disk::open(&path, false, &[bundle.to_path_buf()]).map_err(|source| {
            ImportError::Disk {
                what: what.clone(),
                source,
            }
        })?;
        let top = &disk.layers()[0];
        if top.format() == ferry_storage::FormatKind::Raw {
            check_raw(&path).map_err(|detail| ImportError::Disk {
                what,
                source: StorageError::corrupt(&path, detail),
            })?;
        }
        (top.format().name().to_string(), disk.size())
    } else {
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        ("iso".to_string(), size)
    };
    Ok(Some(Planned {
        drive: d.clone(),
        label: label.to_string(),
        kind,
        image: path,
        ctl_name: ctl_name.into(),
        ctl_type,
        port,
        device,
        format,
        size,
    }))
}

/// A Parallels disk read as raw must look like one: a "Plain" image is whole sectors, and a
/// file that starts with a Parallels magic but did not open as Parallels is a broken one.
fn check_raw(path: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut head = [0u8; 16];
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let n = f.read(&mut head).map_err(|e| e.to_string())?;
    let magics: [&[u8]; 2] = [b"WithoutFreeSpace", b"WithouFreSpacExt"];
    if magics
        .iter()
        .any(|m| head[..n] == m[..n.min(16)] && n == 16)
    {
        return Err("it has a Parallels header that is cut short or damaged".into());
    }
    if len % 512 != 0 {
        return Err(format!(
            "it is not a disk image ferry can read (not Parallels, and {len} bytes is not a whole number of sectors)"
        ));
    }
    Ok(())
}

/// A drive's image: relative names are inside the bundle; absolute ones are often paths on
/// the Mac the bundle came from, so the same name inside the bundle is tried too.
fn find_image(bundle: &Path, name: &str, label: &str) -> Result<PathBuf, ImportError> {
    let p = Path::new(name);
    if p.is_relative() {
        let inside = bundle.join(p);
        if inside.exists() {
            return Ok(inside);
        }
        return Err(ImportError::MissingDisk {
            what: label.into(),
            image: inside,
            also: String::new(),
        });
    }
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    if let Some(file) = p.file_name() {
        let inside = bundle.join(file);
        if inside.exists() {
            return Ok(inside);
        }
        return Err(ImportError::MissingDisk {
            what: label.into(),
            image: p.to_path_buf(),
            also: format!(" (nor is it at {})", inside.display()),
        });
    }
    Err(ImportError::MissingDisk {
        what: label.into(),
        image: p.to_path_buf(),
        also: String::new(),
    })
}

fn position_words(d: &Drive) -> String {
    match d.interface {
        Interface::Ide => format!("IDE {}:{}", d.position / 2, d.position % 2),
        i => format!("{} position {}", i.name(), d.position),
    }
}

/// `path` relative to `dir` when it lies inside it (a VM.toml moves with its bundle).
fn relative_to(path: &Path, dir: &Path) -> PathBuf {
    let abs = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    match abs(path).strip_prefix(abs(dir)) {
        Ok(rel) if !rel.as_os_str().is_empty() => rel.to_path_buf(),
        _ => abs(path),
    }
}

/// Writes beside the target and renames, so a failure leaves no half-written file.
fn write_atomically(path: &Path, text: &str) -> Result<(), ImportError> {
    let err = |source| ImportError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}
