//! Small value types of a VM definition, each read from TOML or from a `key=value` flag with
//! the same rules, and written back the way a user would type them.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::size::parse_size;

/// A size in bytes: `"512M"`, `"4G"`, or a bare number of MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if n != 0 && n.is_multiple_of(1u64 << shift) {
                return write!(f, "{}{suffix}", n >> shift);
            }
        }
        // Not a whole KiB: rounded up, since a bare number would mean MiB.
        write!(f, "{}K", n.div_ceil(1024))
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"512M\" or \"4G\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                self.visit_str(&v.to_string())
            }
        }
        d.deserialize_any(V)
    }
}

/// A switch: `true`/`false` in TOML, `on`/`off` on the command line (either works in both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OnOff(pub bool);

impl Serialize for OnOff {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bool(self.0)
    }
}

impl<'de> Deserialize<'de> for OnOff {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = OnOff;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("on or off (true or false)")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<OnOff, E> {
                Ok(OnOff(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OnOff, E> {
                match v {
                    "on" | "true" | "yes" => Ok(OnOff(true)),
                    "off" | "false" | "no" => Ok(OnOff(false)),
                    _ => Err(E::custom(format!("'{v}' is not on or off"))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// A value of a type that has a `FromStr` and a name: read as a string, written as its name.
macro_rules! string_value {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_string())
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(de::Error::custom)
            }
        }
    };
}

/// A medium type (wrapping the storage layer's, to read and write it here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mtype(pub ferry_storage::MediumType);

impl fmt::Display for Mtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name())
    }
}

impl FromStr for Mtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse().map(Mtype)
    }
}
string_value!(Mtype);

/// What the guest boots: `bios`, `efi`, or a firmware image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Firmware {
    Bios,
    Efi,
    File(PathBuf),
}

impl fmt::Display for Firmware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bios => f.write_str("bios"),
            Self::Efi => f.write_str("efi"),
            Self::File(p) => write!(f, "{}", p.display()),
        }
    }
}

impl FromStr for Firmware {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bios" => Ok(Self::Bios),
            "efi" => Ok(Self::Efi),
            "" => Err("firmware must be bios, efi or the path of a firmware image".into()),
            p => Ok(Self::File(p.into())),
        }
    }
}
string_value!(Firmware);

/// One entry of the boot order (VirtualBox's words).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootDevice {
    Disk,
    Dvd,
    Net,
}

impl fmt::Display for BootDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Disk => "disk",
            Self::Dvd => "dvd",
            Self::Net => "net",
        })
    }
}

impl FromStr for BootDevice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "disk" => Ok(Self::Disk),
            "dvd" => Ok(Self::Dvd),
            "net" => Ok(Self::Net),
            _ => Err(format!("'{s}' is not a boot device; use disk, dvd or net")),
        }
    }
}
string_value!(BootDevice);

/// Where COM1 goes, kept as the user wrote it and checked by the VMM's own parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serial(pub String);

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Serial {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse::<ferry_vmm::SerialMode>()?;
        Ok(Self(s.to_string()))
    }
}
string_value!(Serial);

/// The kind of drive an attachment is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DriveKind {
    #[default]
    Hdd,
    Dvd,
}

impl fmt::Display for DriveKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Hdd => "hdd",
            Self::Dvd => "dvd",
        })
    }
}

impl FromStr for DriveKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hdd" => Ok(Self::Hdd),
            "dvd" => Ok(Self::Dvd),
            _ => Err(format!("'{s}' is not a drive type; use hdd or dvd")),
        }
    }
}
string_value!(DriveKind);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_trip() {
        for s in ["512M", "4G", "1536K", "20M", "1T"] {
            let v = Size(parse_size(s).unwrap());
            assert_eq!(v.to_string(), s);
        }
        assert_eq!(Size(1000).to_string(), "1K");
    }
}
