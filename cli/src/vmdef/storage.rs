//! The storage part of a VM definition: controllers, attachments and bandwidth groups, as
//! `[[storagectl]]`, `[[attach]]` and `[[bwgroup]]` tables or `--storagectl`, `--attach` and
//! `--bwgroup` flags.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::value::{DriveKind, Mtype, OnOff, Size};

/// A storage controller model (DESIGN.md's TYPE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControllerType {
    IdePiix3,
    IdePiix4,
    IdeIch6,
    Ahci,
    LsiLogic,
    LsiLogicSas,
    BusLogic,
    Nvme,
    VirtioScsi,
    UsbXhci,
}

impl ControllerType {
    pub const ALL: [ControllerType; 10] = [
        Self::IdePiix3,
        Self::IdePiix4,
        Self::IdeIch6,
        Self::Ahci,
        Self::LsiLogic,
        Self::LsiLogicSas,
        Self::BusLogic,
        Self::Nvme,
        Self::VirtioScsi,
        Self::UsbXhci,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::IdePiix3 => "ide-piix3",
            Self::IdePiix4 => "ide-piix4",
            Self::IdeIch6 => "ide-ich6",
            Self::Ahci => "ahci",
            Self::LsiLogic => "lsilogic",
            Self::LsiLogicSas => "lsilogic-sas",
            Self::BusLogic => "buslogic",
            Self::Nvme => "nvme",
            Self::VirtioScsi => "virtio-scsi",
            Self::UsbXhci => "usb-xhci",
        }
    }

    pub fn is_ide(self) -> bool {
        matches!(self, Self::IdePiix3 | Self::IdePiix4 | Self::IdeIch6)
    }

    /// The most ports the model has (VirtualBox's limits; NVMe: namespaces).
    pub fn max_ports(self) -> u32 {
        match self {
            t if t.is_ide() => 2,
            Self::Ahci => 30,
            Self::LsiLogic | Self::BusLogic => 16,
            Self::LsiLogicSas => 255,
            Self::Nvme => 255,
            Self::VirtioScsi => 256,
            _ => 8,
        }
    }

    /// Whether the model takes `ports=N`.
    pub fn has_port_count(self) -> bool {
        matches!(
            self,
            Self::Ahci | Self::LsiLogicSas | Self::Nvme | Self::VirtioScsi | Self::UsbXhci
        )
    }

    pub fn takes_dvd(self) -> bool {
        !matches!(self, Self::Nvme)
    }
}

impl fmt::Display for ControllerType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ControllerType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|t| t.name()).collect();
                format!(
                    "'{s}' is not a storage controller type; use one of {}",
                    names.join(", ")
                )
            })
    }
}

impl Serialize for ControllerType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for ControllerType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// `[[storagectl]]` / `--storagectl name=C,type=TYPE[,hostiocache=on|off][,ports=N]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageCtl {
    pub name: Spanned<String>,
    #[serde(rename = "type")]
    pub kind: Spanned<ControllerType>,
    /// Use the host's page cache (on) or O_DIRECT (off); VirtualBox's default is off except for
    /// IDE and SATA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostiocache: Option<OnOff>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Spanned<u32>>,
}

/// `[[attach]]` / `--attach ctl=C,port=P[,device=D],medium=PATH[,type=hdd|dvd][,mtype=M]...`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attach {
    pub ctl: Spanned<String>,
    pub port: Spanned<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<Spanned<u32>>,
    pub medium: PathBuf,
    #[serde(rename = "type", default, skip_serializing_if = "is_hdd")]
    pub kind: DriveKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtype: Option<Mtype>,
    /// Immutable media: start from the base at each power-on (default on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoreset: Option<OnOff>,
    #[serde(default, skip_serializing_if = "is_off")]
    pub nonrotational: OnOff,
    #[serde(default, skip_serializing_if = "is_off")]
    pub discard: OnOff,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bwgroup: Option<Spanned<String>>,
    #[serde(default, skip_serializing_if = "is_off")]
    pub hotpluggable: OnOff,
}

fn is_hdd(k: &DriveKind) -> bool {
    *k == DriveKind::Hdd
}

fn is_off(v: &OnOff) -> bool {
    !v.0
}

impl Attach {
    pub fn device(&self) -> u32 {
        self.device.as_ref().map_or(0, |d| *d.get_ref())
    }

    pub fn mtype(&self) -> ferry_storage::MediumType {
        self.mtype
            .map_or(ferry_storage::MediumType::Normal, |m| m.0)
    }
}

/// `[[bwgroup]]` / `--bwgroup name=G,limit=20M[,iops=N]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BwGroup {
    pub name: Spanned<String>,
    /// Bytes per second.
    pub limit: Size,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u32>,
}

/// Keys whose flag values are numbers (every other value is a string).
const NUMERIC_KEYS: &[&str] = &["port", "device", "ports", "iops"];

/// Reads a `key=value,key=value` flag as the table it stands for, with the table's own
/// rules (unknown keys, wrong values). Errors leave out the flag: clap shows it.
pub fn parse_flag<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    let mut doc = toml::Table::new();
    for part in text.split(',') {
        let Some((k, v)) = part.split_once('=') else {
            return Err(format!("'{part}' is not key=value"));
        };
        let (k, v) = (k.trim(), v.trim());
        if doc.contains_key(k) {
            return Err(format!("{k} is given twice"));
        }
        let value = if NUMERIC_KEYS.contains(&k) {
            let n: i64 = v.parse().map_err(|_| format!("{k}={v} is not a number"))?;
            toml::Value::Integer(n)
        } else {
            toml::Value::String(v.to_string())
        };
        doc.insert(k.to_string(), value);
    }
    // Through TOML text, so the same deserializer (with its spans) reads flags and files.
    let src = toml::to_string(&doc).map_err(|e| e.to_string())?;
    toml::from_str(&src).map_err(|e| super::plain_message(e.message()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_read_like_tables() {
        let a: Attach =
            parse_flag("ctl=SATA,port=1,medium=disk.vdi,type=dvd,mtype=immutable,discard=on")
                .unwrap();
        assert_eq!(a.ctl.get_ref(), "SATA");
        assert_eq!(*a.port.get_ref(), 1);
        assert_eq!(a.kind, DriveKind::Dvd);
        assert_eq!(a.mtype(), ferry_storage::MediumType::Immutable);
        assert!(a.discard.0 && !a.nonrotational.0);
        let e = parse_flag::<Attach>("ctl=S,port=0,medium=x,colour=red").unwrap_err();
        assert!(e.contains("unknown key `colour`"), "{e}");
        let e = parse_flag::<Attach>("ctl=S,port=x,medium=m").unwrap_err();
        assert!(e.contains("port=x is not a number"), "{e}");
        let e = parse_flag::<StorageCtl>("name=S,type=floppy").unwrap_err();
        assert!(e.contains("not a storage controller type"), "{e}");
        let e = parse_flag::<Attach>("ctl=S,port=0,medium=m,mtype=sticky").unwrap_err();
        assert!(e.contains("not a medium type"), "{e}");
        let b: BwGroup = parse_flag("name=slow,limit=20M,iops=100").unwrap();
        assert_eq!((b.limit.0, b.iops), (20 << 20, Some(100)));
        assert!(parse_flag::<BwGroup>("name=slow").is_err());
    }
}
