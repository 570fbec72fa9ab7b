//! Firmware images: finding SeaBIOS or OVMF where Debian installs them, checking a file is a
//! plausible image, and where the PC maps it (its end at 4 GiB, its last 128 KiB also below
//! 1 MiB, where the CPU's real-mode reset jump lands).

use std::path::{Path, PathBuf};

use crate::layout::{BIOS_END, FOUR_GIB};
use crate::FirmwareError;

/// Searched before the system directories.
pub const FIRMWARE_DIR_ENV: &str = "FERRY_FIRMWARE_DIR";

const MIN_SIZE: usize = 64 << 10;
const MAX_SIZE: usize = 16 << 20;
/// Images are whole pages (OVMF_CODE_4M.fd is 3.5 MiB minus 16 KiB).
const GRANULE: usize = 4 << 10;
/// How much of the image's top also appears at 0xe0000..0x100000.
const LOW_WINDOW: usize = 128 << 10;

const SEABIOS_DIR: &str = "/usr/share/seabios";
const SEABIOS_FILE: &str = "bios-256k.bin";
const OVMF_DIR: &str = "/usr/share/OVMF";
/// (code, vars) pairs: Debian's 4 MiB build first, then the older 2 MiB one.
const OVMF_FILES: [(&str, &str); 2] = [
    ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"),
    ("OVMF_CODE.fd", "OVMF_VARS.fd"),
];
/// A combined image (code and variable store in one file), as some distributions ship.
const OVMF_COMBINED: &str = "/usr/share/qemu/OVMF.fd";

/// What the user asked to boot (`--firmware bios|efi|PATH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirmwareChoice {
    Bios,
    Efi,
    Path(PathBuf),
}

/// The files that make up a firmware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareFiles {
    pub code: PathBuf,
    /// OVMF's variable store template, which a VM gets its own copy of.
    pub vars: Option<PathBuf>,
}

impl FirmwareChoice {
    /// Finds the firmware's files, in `$FERRY_FIRMWARE_DIR` first.
    pub fn find(&self) -> Result<FirmwareFiles, FirmwareError> {
        let dir = std::env::var_os(FIRMWARE_DIR_ENV).map(PathBuf::from);
        self.find_in(dir.as_deref())
    }

    fn find_in(&self, first: Option<&Path>) -> Result<FirmwareFiles, FirmwareError> {
        let dirs = |system: &'static str| first.into_iter().chain([Path::new(system)]);
        let (candidates, what, package): (Vec<FirmwareFiles>, _, _) = match self {
            FirmwareChoice::Path(p) => {
                return Ok(FirmwareFiles {
                    code: p.clone(),
                    vars: None,
                })
            }
            FirmwareChoice::Bios => (
                dirs(SEABIOS_DIR)
                    .map(|d| FirmwareFiles {
                        code: d.join(SEABIOS_FILE),
                        vars: None,
                    })
                    .collect(),
                "BIOS (SeaBIOS)",
                "seabios",
            ),
            FirmwareChoice::Efi => (
                dirs(OVMF_DIR)
                    .flat_map(|d| {
                        OVMF_FILES.iter().map(move |(c, v)| FirmwareFiles {
                            code: d.join(c),
                            vars: Some(d.join(v)),
                        })
                    })
                    .chain([FirmwareFiles {
                        code: OVMF_COMBINED.into(),
                        vars: None,
                    }])
                    .collect(),
                "UEFI (OVMF)",
                "ovmf",
            ),
        };
        let found = candidates
            .iter()
            .find(|f| f.code.is_file() && f.vars.as_ref().is_none_or(|v| v.is_file()));
        match found {
            Some(f) => {
                tracing::debug!(code = %f.code.display(), "found firmware");
                Ok(f.clone())
            }
            None => Err(FirmwareError::FirmwareMissing {
                what,
                looked: candidates
                    .iter()
                    .map(|f| f.code.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                package,
            }),
        }
    }
}

/// What kind of firmware an image holds, from its contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirmwareKind {
    /// A legacy BIOS such as SeaBIOS: real-mode code with a jump at its reset vector.
    Bios,
    /// UEFI (OVMF): the image starts with a firmware volume.
    Efi,
}

#[derive(Debug, Clone)]
pub struct FirmwareImage {
    pub bytes: Vec<u8>,
    pub path: PathBuf,
    pub kind: FirmwareKind,
}

impl FirmwareImage {
    pub fn load(path: &Path) -> Result<Self, FirmwareError> {
        let bytes = std::fs::read(path).map_err(|source| FirmwareError::OpenFirmware {
            path: path.into(),
            source,
        })?;
        Self::from_bytes(bytes, path.into())
    }

    pub fn from_bytes(bytes: Vec<u8>, path: PathBuf) -> Result<Self, FirmwareError> {
        let size = bytes.len();
        if !(MIN_SIZE..=MAX_SIZE).contains(&size) || !size.is_multiple_of(GRANULE) {
            return Err(FirmwareError::FirmwareSize {
                path,
                size: size as u64,
            });
        }
        // A UEFI firmware volume header carries "_FVH" at offset 40.
        let kind = if &bytes[40..44] == b"_FVH" {
            FirmwareKind::Efi
        } else {
            // The CPU starts 16 bytes below 4 GiB; a BIOS jumps from there (SeaBIOS: a far
            // jump to f000:e05b).
            if !matches!(bytes[size - 16], 0xea | 0xe9) {
                return Err(FirmwareError::NotBios { path });
            }
            FirmwareKind::Bios
        };
        Ok(Self { bytes, path, kind })
    }

    /// Where the image is mapped: it ends at 4 GiB.
    pub fn base(&self) -> u64 {
        FOUR_GIB - self.bytes.len() as u64
    }

    /// The top of the image (at most 128 KiB) that also appears below 1 MiB, ending at
    /// 0x100000, and its guest address.
    pub fn low_bios(&self) -> (u64, &[u8]) {
        let len = self.bytes.len().min(LOW_WINDOW);
        (BIOS_END - len as u64, &self.bytes[self.bytes.len() - len..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bios(size: usize) -> Vec<u8> {
        let mut b = vec![0u8; size];
        b[size - 16..size - 11].copy_from_slice(&[0xea, 0x5b, 0xe0, 0x00, 0xf0]);
        b[size - 1] = 0x77;
        b
    }

    #[test]
    fn sizes_and_reset_vector_are_checked() {
        let p = PathBuf::from("x.bin");
        let small = FirmwareImage::from_bytes(bios(64 << 10), p.clone()).unwrap();
        assert_eq!(small.kind, FirmwareKind::Bios);
        assert_eq!(small.base(), 0xffff_0000);
        let (gpa, low) = small.low_bios();
        assert_eq!((gpa, low.len()), (0xf_0000, 64 << 10));

        let big = FirmwareImage::from_bytes(bios(256 << 10), p.clone()).unwrap();
        assert_eq!(big.base(), 0xfffc_0000);
        let (gpa, low) = big.low_bios();
        assert_eq!((gpa, low.len()), (0xe_0000, 128 << 10));
        assert_eq!(low[low.len() - 16], 0xea);
        assert_eq!(*low.last().unwrap(), 0x77);

        for size in [0, 32 << 10, (64 << 10) + 512, 32 << 20] {
            let e = FirmwareImage::from_bytes(vec![0xea; size], p.clone()).unwrap_err();
            assert!(matches!(e, FirmwareError::FirmwareSize { .. }), "{size}");
        }
        let e = FirmwareImage::from_bytes(vec![0u8; 128 << 10], p.clone()).unwrap_err();
        assert!(e.to_string().contains("not a BIOS image"));

        let mut fv = vec![0u8; 2 << 20];
        fv[40..44].copy_from_slice(b"_FVH");
        let efi = FirmwareImage::from_bytes(fv, p).unwrap();
        assert_eq!(efi.kind, FirmwareKind::Efi);
        assert_eq!(efi.base(), 0xffe0_0000);
    }

    #[test]
    fn real_seabios_loads() {
        let found = [
            "/usr/share/seabios/bios-256k.bin",
            "/tmp/fw/x/usr/share/seabios/bios-256k.bin",
        ]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file());
        let Some(path) = found else {
            return;
        };
        let img = FirmwareImage::load(path).unwrap();
        assert_eq!(img.kind, FirmwareKind::Bios);
        assert_eq!(img.base(), 0xfffc_0000);
        // The reset vector: jmp far f000:e05b.
        let (_, low) = img.low_bios();
        assert_eq!(
            &low[low.len() - 16..low.len() - 11],
            &[0xea, 0x5b, 0xe0, 0x00, 0xf0]
        );
    }

    #[test]
    fn finder_prefers_the_override_dir_and_names_the_package() {
        let dir = std::env::temp_dir().join(format!("ferry-fwimg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bios_path = dir.join("bios-256k.bin");
        std::fs::write(&bios_path, bios(256 << 10)).unwrap();
        let f = FirmwareChoice::Bios.find_in(Some(&dir)).unwrap();
        assert_eq!(f.code, bios_path);

        std::fs::write(dir.join("OVMF_CODE.fd"), b"").unwrap();
        std::fs::write(dir.join("OVMF_VARS.fd"), b"").unwrap();
        let f = FirmwareChoice::Efi.find_in(Some(&dir)).unwrap();
        assert_eq!(f.code, dir.join("OVMF_CODE.fd"));
        assert_eq!(f.vars, Some(dir.join("OVMF_VARS.fd")));

        let empty = dir.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        if !Path::new(OVMF_DIR).exists() && !Path::new(OVMF_COMBINED).exists() {
            let e = FirmwareChoice::Efi.find_in(Some(&empty)).unwrap_err();
            assert!(e.to_string().contains("apt-get install ovmf"), "{e}");
        }
        if !Path::new(SEABIOS_DIR).join(SEABIOS_FILE).exists() {
            let e = FirmwareChoice::Bios.find_in(Some(&empty)).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("apt-get install seabios"), "{msg}");
            assert!(msg.contains("/usr/share/seabios/bios-256k.bin"), "{msg}");
        }
        let p = PathBuf::from("/some/where.bin");
        assert_eq!(
            FirmwareChoice::Path(p.clone()).find_in(None).unwrap().code,
            p
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
