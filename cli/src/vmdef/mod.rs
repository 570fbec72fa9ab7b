//! A VM definition: everything `ferry run` takes on its command line, as a VM.toml file.
//! `ferry run VM.toml [flags]` reads the file and lets flags override it.
//!
//! ```toml
//! name = "Windows XP"
//! memory = "1G"
//! cpus = 2
//! firmware = "bios"            # bios, efi, or a firmware image
//! boot = ["disk", "dvd"]
//! boot_timeout = 30            # seconds the firmware may take to start a boot loader
//! uuid = "4a1b0c5e-2f3d-4e6a-9b8c-7d6e5f4a3b2c"   # the machine's UUID (SMBIOS)
//!
//! [[storagectl]]
//! name = "IDE"
//! type = "ide-piix4"
//!
//! [[attach]]
//! ctl = "IDE"
//! port = 0
//! device = 0
//! medium = "Windows XP.pvm/harddisk.hdd"   # relative to this file's folder
//! ```

pub mod storage;
pub mod value;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use storage::{Attach, BwGroup, ControllerType, StorageCtl};
use value::{BootDevice, DriveKind, Firmware, Serial, Size};

/// A VM.toml is a few KiB; refuse to read a huge file by mistake.
const MAX_FILE: u64 = 1 << 20;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Size>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<Vec<BootDevice>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_timeout: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_log: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<uuid::Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub efi_vars: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<Serial>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headless: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub storagectl: Vec<StorageCtl>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attach: Vec<Attach>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bwgroup: Vec<BwGroup>,
    /// The file this came from, to turn spans into line numbers.
    #[serde(skip)]
    pub source: Option<Source>,
    /// The flag text of entries that came from the command line (they have no line).
    #[serde(skip)]
    pub flag_text: FlagText,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub path: PathBuf,
    pub text: String,
}

/// For each storage entry from a flag, the flag as typed, by (table, index).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlagText(Vec<(&'static str, usize, String)>);

#[derive(Debug, thiserror::Error)]
pub enum DefError {
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{where_}: {message}")]
    Invalid { where_: String, message: String },
}

impl VmDef {
    /// Reads and checks a VM.toml; relative paths in it are taken from its folder.
    pub fn load(path: &Path) -> Result<Self, DefError> {
        let read_err = |source| DefError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        if meta.is_dir() {
            return Err(DefError::Invalid {
                where_: path.display().to_string(),
                message: "is a folder, not a VM.toml file".into(),
            });
        }
        if meta.len() > MAX_FILE {
            return Err(DefError::Invalid {
                where_: path.display().to_string(),
                message: format!("is larger than {MAX_FILE} bytes, which no VM definition is"),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        Self::parse(&text, path)
    }

    /// Parses VM.toml text that lives at `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, DefError> {
        let source = Source {
            path: path.to_path_buf(),
            text: text.to_string(),
        };
        let mut def: VmDef = toml::from_str(text).map_err(|e| DefError::Invalid {
            where_: source.place(e.span()),
            message: plain_message(e.message()),
        })?;
        let dir = path.parent().unwrap_or(Path::new("")).to_path_buf();
        def.resolve_paths(&dir);
        def.source = Some(source);
        def.check()?;
        Ok(def)
    }

    /// The folder a VM keeps its own files in (Snapshots/): its VM.toml's folder.
    pub fn folder(&self) -> Option<PathBuf> {
        let s = self.source.as_ref()?;
        Some(
            s.path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf(),
        )
    }

    /// Relative paths in a file are relative to the file, not to where ferry runs.
    fn resolve_paths(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        for p in [
            &mut self.kernel,
            &mut self.initrd,
            &mut self.firmware_log,
            &mut self.efi_vars,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        if let Some(Firmware::File(p)) = &mut self.firmware {
            fix(p);
        }
        if let Some(Serial(s)) = &mut self.serial {
            for prefix in ["file:", "unix:"] {
                if let Some(p) = s.strip_prefix(prefix) {
                    let mut pb = PathBuf::from(p);
                    fix(&mut pb);
                    *s = format!("{prefix}{}", pb.display());
                }
            }
        }
        for a in &mut self.attach {
            fix(&mut a.medium);
        }
    }

    pub fn add_storagectl(&mut self, c: StorageCtl, text: &str) {
        // A flag naming an existing controller replaces it.
        self.storagectl
            .retain(|o| o.name.get_ref() != c.name.get_ref());
        self.flag_text
            .0
            .push(("storagectl", self.storagectl.len(), text.to_string()));
        self.storagectl.push(c);
    }

    pub fn add_attach(&mut self, a: Attach, text: &str) {
        // A flag for an occupied slot replaces what the file put there.
        self.attach.retain(|o| {
            !(o.ctl.get_ref() == a.ctl.get_ref()
                && o.port.get_ref() == a.port.get_ref()
                && o.device() == a.device())
        });
        self.flag_text
            .0
            .push(("attach", self.attach.len(), text.to_string()));
        self.attach.push(a);
    }

    pub fn add_bwgroup(&mut self, b: BwGroup, text: &str) {
        self.bwgroup
            .retain(|o| o.name.get_ref() != b.name.get_ref());
        self.flag_text
            .0
            .push(("bwgroup", self.bwgroup.len(), text.to_string()));
        self.bwgroup.push(b);
    }

    /// Where an entry came from, in words: the file's line or the flag.
    fn place(&self, table: &'static str, index: usize, span: std::ops::Range<usize>) -> String {
        if let Some((_, _, t)) = self
            .flag_text
            .0
            .iter()
            .find(|(tb, i, _)| *tb == table && *i == index)
        {
            return format!("--{table} {t}");
        }
        match &self.source {
            Some(s) => s.place(Some(span)),
            None => format!("[[{table}]] {}", index + 1),
        }
    }

    /// The rules that no single value can check: names that must exist, slots used once,
    /// ports within the controller.
    pub fn check(&self) -> Result<(), DefError> {
        let bad = |where_: String, message: String| Err(DefError::Invalid { where_, message });
        for (i, c) in self.storagectl.iter().enumerate() {
            let here = || self.place("storagectl", i, c.name.span());
            if c.name.get_ref().is_empty() {
                return bad(here(), "a controller needs a name".into());
            }
            if self.storagectl[..i]
                .iter()
                .any(|o| o.name.get_ref() == c.name.get_ref())
            {
                return bad(
                    here(),
                    format!("there is already a controller named '{}'", c.name.get_ref()),
                );
            }
            let kind = *c.kind.get_ref();
            if let Some(p) = &c.ports {
                let here = || self.place("storagectl", i, p.span());
                if !kind.has_port_count() {
                    return bad(
                        here(),
                        format!(
                            "ports: a {kind} controller has a fixed number of ports ({})",
                            kind.max_ports()
                        ),
                    );
                }
                if *p.get_ref() == 0 || *p.get_ref() > kind.max_ports() {
                    return bad(
                        here(),
                        format!(
                            "ports = {}: a {kind} controller has 1 to {} ports",
                            p.get_ref(),
                            kind.max_ports()
                        ),
                    );
                }
            }
        }
        for (i, b) in self.bwgroup.iter().enumerate() {
            let here = || self.place("bwgroup", i, b.name.span());
            if self.bwgroup[..i]
                .iter()
                .any(|o| o.name.get_ref() == b.name.get_ref())
            {
                return bad(
                    here(),
                    format!(
                        "there is already a bandwidth group named '{}'",
                        b.name.get_ref()
                    ),
                );
            }
            if b.limit.0 == 0 {
                return bad(here(), "limit must be above 0".into());
            }
        }
        for (i, a) in self.attach.iter().enumerate() {
            let here = |span| self.place("attach", i, span);
            let Some(ctl) = self
                .storagectl
                .iter()
                .find(|c| c.name.get_ref() == a.ctl.get_ref())
            else {
                return bad(
                    here(a.ctl.span()),
                    format!(
                        "ctl = '{}': no controller has that name; add it with [[storagectl]] or --storagectl name={},type=TYPE",
                        a.ctl.get_ref(),
                        a.ctl.get_ref()
                    ),
                );
            };
            let kind = *ctl.kind.get_ref();
            let ports = ctl
                .ports
                .as_ref()
                .map_or(kind.max_ports(), |p| *p.get_ref());
            if *a.port.get_ref() >= ports {
                return bad(
                    here(a.port.span()),
                    format!(
                        "port = {}: controller '{}' ({kind}) has ports 0 to {}",
                        a.port.get_ref(),
                        a.ctl.get_ref(),
                        ports - 1
                    ),
                );
            }
            if let Some(d) = &a.device {
                let max = if kind.is_ide() { 1 } else { 0 };
                if *d.get_ref() > max {
                    let why = if kind.is_ide() {
                        "an IDE channel has devices 0 (master) and 1 (slave)".to_string()
                    } else {
                        format!("a {kind} port has only device 0")
                    };
                    return bad(here(d.span()), format!("device = {}: {why}", d.get_ref()));
                }
            }
            if a.kind == DriveKind::Dvd && !kind.takes_dvd() {
                return bad(
                    here(a.ctl.span()),
                    format!("type = dvd: a {kind} controller cannot hold a CD/DVD drive"),
                );
            }
            if let Some(prev) = self.attach[..i].iter().find(|o| {
                o.ctl.get_ref() == a.ctl.get_ref()
                    && o.port.get_ref() == a.port.get_ref()
                    && o.device() == a.device()
            }) {
                return bad(
                    here(a.port.span()),
                    format!(
                        "port {} device {} of controller '{}' already holds {}",
                        a.port.get_ref(),
                        a.device(),
                        a.ctl.get_ref(),
                        prev.medium.display()
                    ),
                );
            }
            if let Some(g) = &a.bwgroup {
                if !self.bwgroup.iter().any(|b| b.name.get_ref() == g.get_ref()) {
                    return bad(
                        here(g.span()),
                        format!(
                            "bwgroup = '{}': no bandwidth group has that name; add it with [[bwgroup]] or --bwgroup name={},limit=SIZE",
                            g.get_ref(),
                            g.get_ref()
                        ),
                    );
                }
            }
            if a.autoreset.is_some() && a.mtype() != ferry_storage::MediumType::Immutable {
                return bad(
                    here(a.port.span()),
                    "autoreset applies to immutable media only".into(),
                );
            }
        }
        if let Some(boot) = &self.boot {
            if boot.is_empty() {
                return bad(
                    self.top_place("boot"),
                    "the boot order is empty: list at least one of disk, dvd, net".into(),
                );
            }
            for (i, b) in boot.iter().enumerate() {
                if boot[..i].contains(b) {
                    return bad(
                        self.top_place("boot"),
                        format!("{b} is in the boot order twice"),
                    );
                }
            }
        }
        if self.boot_timeout == Some(0) {
            return bad(
                self.top_place("boot_timeout"),
                "boot_timeout must be at least 1 second".into(),
            );
        }
        if self.kernel.is_none() {
            for (key, given) in [
                ("initrd", self.initrd.is_some()),
                ("cmdline", self.cmdline.is_some()),
            ] {
                if given {
                    return bad(
                        self.top_place(key),
                        format!(
                            "{key} is for a kernel booted directly; give kernel (or --kernel) too"
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    /// Where a top-level key is: its line in the file, else the flag.
    fn top_place(&self, key: &str) -> String {
        if let Some(s) = &self.source {
            let at = s.text.lines().enumerate().find(|(_, l)| {
                l.trim_start()
                    .strip_prefix(key)
                    .is_some_and(|r| r.trim_start().starts_with('='))
            });
            if let Some((n, _)) = at {
                return format!("{} line {}", s.path.display(), n + 1);
            }
        }
        format!("--{key}")
    }
}

/// serde's words for TOML's: a field is a key.
pub fn plain_message(m: &str) -> String {
    m.trim()
        .replace("unknown field", "unknown key")
        .replace("missing field", "missing key")
}

impl Source {
    /// "VM.toml line 7 (mtype = "sticky")": the line, and its text, which names the key.
    pub fn place(&self, span: Option<std::ops::Range<usize>>) -> String {
        let file = self.path.display();
        let Some(span) = span else {
            return file.to_string();
        };
        let start = span.start.min(self.text.len());
        let before = self.text.get(..start).unwrap_or("");
        let line_no = before.matches('\n').count() + 1;
        let line = self.text.lines().nth(line_no - 1).unwrap_or("").trim();
        if line.is_empty() {
            return format!("{file} line {line_no}");
        }
        let shown: String = line.chars().take(60).collect();
        let more = if shown.len() < line.len() { "..." } else { "" };
        format!("{file} line {line_no} ({shown}{more})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<VmDef, String> {
        VmDef::parse(text, Path::new("/vms/xp/VM.toml")).map_err(|e| e.to_string())
    }

    const XP: &str = r#"
name = "Windows XP"
memory = "1G"
cpus = 2
boot = ["disk", "dvd"]

[[storagectl]]
name = "IDE"
type = "ide-piix4"

[[attach]]
ctl = "IDE"
port = 0
device = 0
medium = "xp.pvm/harddisk.hdd"
mtype = "immutable"
autoreset = false

[[attach]]
ctl = "IDE"
port = 1
medium = "/isos/xp.iso"
type = "dvd"
bwgroup = "slow"

[[bwgroup]]
name = "slow"
limit = "20M"
"#;

    #[test]
    fn reads_a_full_definition() {
        let d = parse(XP).unwrap();
        assert_eq!(d.memory, Some(Size(1 << 30)));
        assert_eq!(
            d.attach[0].medium,
            PathBuf::from("/vms/xp/xp.pvm/harddisk.hdd")
        );
        assert_eq!(d.attach[1].medium, PathBuf::from("/isos/xp.iso"));
        assert_eq!(d.folder(), Some(PathBuf::from("/vms/xp")));
        // Written and read back: the same definition.
        let text = toml::to_string_pretty(&d).unwrap();
        let again = VmDef::parse(&text, Path::new("/elsewhere/VM.toml")).unwrap();
        assert_eq!(again.attach, d.attach);
        assert_eq!(again.bwgroup, d.bwgroup);
        assert_eq!(again.memory, d.memory);
    }

    #[test]
    fn errors_name_key_and_line() {
        let e = parse("memory = \"1G\"\ncolour = \"red\"\n").unwrap_err();
        assert!(e.contains("VM.toml line 2") && e.contains("colour"), "{e}");
        let e = parse(&XP.replace("mtype = \"immutable\"", "mtype = \"sticky\"")).unwrap_err();
        assert!(e.contains("line 16") && e.contains("mtype"), "{e}");
        let e =
            parse(&XP.replace("ctl = \"IDE\"\nport = 1", "ctl = \"SATA\"\nport = 1")).unwrap_err();
        assert!(e.contains("line 20") && e.contains("'SATA'"), "{e}");
        let e = parse(&XP.replace("port = 1", "port = 0")).unwrap_err();
        assert!(e.contains("already holds"), "{e}");
        let e = parse(&XP.replace("port = 1", "port = 2")).unwrap_err();
        assert!(e.contains("ports 0 to 1"), "{e}");
        let e = parse(&XP.replace("name = \"slow\"", "name = \"fast\"")).unwrap_err();
        assert!(e.contains("bwgroup = 'slow'"), "{e}");
        let e = parse("memory = \"lots\"").unwrap_err();
        assert!(e.contains("line 1") && e.contains("not a size"), "{e}");
        let e = parse("cpus = \"two\"").unwrap_err();
        assert!(e.contains("line 1") && e.contains("cpus"), "{e}");
        let e = parse("initrd = \"x\"").unwrap_err();
        assert!(e.contains("line 1") && e.contains("kernel"), "{e}");
        let e = parse("[[attach]]\nctl = \"x\"\n").unwrap_err();
        assert!(e.contains("port") || e.contains("medium"), "{e}");
    }
}
