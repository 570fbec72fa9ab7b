//! A Parallels virtual machine's settings: `Name.pvm/config.pvs`, an XML document rooted at
//! `<ParallelsVirtualMachine>`. Only what a VM definition needs is read: name, vCPUs, memory,
//! firmware, hard disks and CD/DVD drives with their bus and position, and the boot order;
//! the rest is listed as not carried over.
//!
//! Element names and enum values follow the Parallels SDK (`PrlEnums.h`, `PrlOses.h`) and
//! public config.pvs files (Packer/Flatcar generators, dissect.hypervisor's tests). Assumed:
//! `InterfaceType` 3 is NVMe (Parallels Desktop's SDK; Virtuozzo's uses 3 for virtio-block),
//! and a drive without `<EmulatedType>` is an image file.

/// A config.pvs is tens of KiB; refuse anything absurd before parsing it.
pub const MAX_CONFIG: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PvmError {
    #[error("it is not XML: {0}")]
    Xml(String),
    #[error("its root element is <{0}>, not <ParallelsVirtualMachine>")]
    NotAVm(String),
    #[error("<{element}> {detail}")]
    Bad { element: String, detail: String },
    #[error("it is larger than {MAX_CONFIG} bytes, which no config.pvs is")]
    TooLarge,
}

/// The bus a drive sits on (PRL_MASS_STORAGE_INTERFACE_TYPE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interface {
    Ide,
    /// SCSI, with the controller model (PRL_CLUSTERED_DEVICE_SUBTYPE in `<SubType>`).
    Scsi(ScsiModel),
    Sata,
    Nvme,
    Other(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScsiModel {
    BusLogic,
    LsiSpi,
    LsiSas,
    Other(u32),
}

impl Interface {
    pub fn name(self) -> String {
        match self {
            Self::Ide => "IDE".into(),
            Self::Scsi(ScsiModel::BusLogic) => "SCSI (BusLogic)".into(),
            Self::Scsi(ScsiModel::LsiSpi) => "SCSI (LSI Logic)".into(),
            Self::Scsi(ScsiModel::LsiSas) => "SCSI (LSI Logic SAS)".into(),
            Self::Scsi(ScsiModel::Other(n)) => format!("SCSI (model {n})"),
            Self::Sata => "SATA".into(),
            Self::Nvme => "NVMe".into(),
            Self::Other(n) => format!("interface type {n}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    Bios,
    Efi,
}

/// What a drive is connected to on the host (PRL_VM_DEV_EMULATION_TYPE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// An image file (`.hdd` bundle, old `.hdd` file, `.iso`).
    Image(String),
    /// A host drive (`/dev/disk2`, a physical CD drive).
    HostDevice(String),
    /// Nothing in the drive.
    Empty,
}

/// A `<Hdd>` or `<CdRom>` element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drive {
    /// `<Index>`: the drive's number among its kind (boot entries refer to it).
    pub index: u32,
    pub enabled: bool,
    pub connected: bool,
    pub backing: Backing,
    pub interface: Interface,
    /// `<StackIndex>`: the position on its bus (IDE: channel * 2 + master/slave).
    pub position: u32,
    pub label: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootDevice {
    HardDisk(u32),
    Cdrom(u32),
    Floppy,
    Network,
    Usb,
    Other(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guest {
    pub os_type: u32,
    pub os_number: u32,
}

impl Guest {
    /// The guest OS in words, from PrlOses.h (a few common ones, else the family).
    pub fn describe(&self) -> String {
        let named = match self.os_number {
            0x0806 => Some("Windows 2000"),
            0x0807 => Some("Windows XP"),
            0x0808 => Some("Windows Server 2003"),
            0x0809 => Some("Windows Vista"),
            0x080B => Some("Windows 7"),
            0x080C => Some("Windows 8"),
            0x080E => Some("Windows 8.1"),
            0x080F => Some("Windows 10"),
            0x0906 => Some("Debian"),
            0x0907 => Some("Fedora"),
            0x090A => Some("Ubuntu"),
            0x090D => Some("CentOS"),
            _ => None,
        };
        if let Some(n) = named {
            return n.into();
        }
        match self.os_type {
            7 => "macOS".into(),
            8 => "Windows".into(),
            9 => "Linux".into(),
            10 => "FreeBSD".into(),
            12 => "MS-DOS".into(),
            n => format!("OS type {n}"),
        }
    }

    pub fn is_windows(&self) -> bool {
        self.os_type == 8
    }
}

/// The parts of a config.pvs that a VM definition takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvmConfig {
    pub name: Option<String>,
    pub uuid: Option<String>,
    pub guest: Option<Guest>,
    pub cpus: Option<u32>,
    /// `<RAM>` in MiB.
    pub memory_mib: Option<u64>,
    pub firmware: Firmware,
    pub disks: Vec<Drive>,
    pub cdroms: Vec<Drive>,
    /// In boot order, enabled entries only.
    pub boot: Vec<BootDevice>,
    /// Settings with no counterpart in ferry, in words.
    pub not_carried: Vec<String>,
}

type Node<'a> = roxmltree::Node<'a, 'a>;

fn child<'a>(n: Node<'a>, name: &str) -> Option<Node<'a>> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

fn children<'a>(n: Node<'a>, name: &'a str) -> impl Iterator<Item = Node<'a>> + 'a {
    n.children()
        .filter(move |c| c.is_element() && c.tag_name().name() == name)
}

fn path<'a>(n: Node<'a>, names: &[&str]) -> Option<Node<'a>> {
    names.iter().try_fold(n, |n, name| child(n, name))
}

fn text<'a>(n: Node<'a>, name: &str) -> Option<&'a str> {
    child(n, name).map(|c| c.text().unwrap_or("").trim())
}

/// A number in `<name>` of `n`; absent or empty is `None`, anything else unparsable an error.
fn num<T: std::str::FromStr>(n: Node, name: &str) -> Result<Option<T>, PvmError> {
    match text(n, name) {
        None | Some("") => Ok(None),
        Some(t) => t.parse::<T>().map(Some).map_err(|_| PvmError::Bad {
            element: format!("{}/{name}", n.tag_name().name()),
            detail: format!("is not a number: {t:?}"),
        }),
    }
}

fn flag(n: Node, name: &str, default: bool) -> Result<bool, PvmError> {
    Ok(num::<i64>(n, name)?.map_or(default, |v| v != 0))
}

/// Parses config.pvs text.
pub fn parse(xml: &str) -> Result<PvmConfig, PvmError> {
    if xml.len() > MAX_CONFIG {
        return Err(PvmError::TooLarge);
    }
    let doc = roxmltree::Document::parse(xml).map_err(|e| PvmError::Xml(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "ParallelsVirtualMachine" {
        return Err(PvmError::NotAVm(root.tag_name().name().into()));
    }
    let ident = child(root, "Identification");
    let name = ident
        .and_then(|i| text(i, "VmName"))
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    let uuid = ident
        .and_then(|i| text(i, "VmUuid"))
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_matches(['{', '}']).to_string());
    let settings = child(root, "Settings");
    let guest = match settings.and_then(|s| child(s, "General")) {
        Some(g) => match (num::<u32>(g, "OsType")?, num::<u32>(g, "OsNumber")?) {
            (Some(os_type), os_number) => Some(Guest {
                os_type,
                os_number: os_number.unwrap_or(0),
            }),
            _ => None,
        },
        None => None,
    };
    let hw = child(root, "Hardware");
    let cpus = match hw.and_then(|h| child(h, "Cpu")) {
        Some(c) => num::<u32>(c, "Number")?,
        None => None,
    };
    let memory_mib = match hw.and_then(|h| child(h, "Memory")) {
        Some(m) => num::<u64>(m, "RAM")?,
        None => None,
    };
    let startup = settings.and_then(|s| child(s, "Startup"));
    let efi = match startup.and_then(|s| child(s, "Bios")) {
        Some(b) => flag(b, "EfiEnabled", false)?,
        None => false,
    };
    let firmware = if efi { Firmware::Efi } else { Firmware::Bios };

    let mut not_carried = Vec::new();
    let mut disks = Vec::new();
    let mut cdroms = Vec::new();
    if let Some(hw) = hw {
        for (i, d) in children(hw, "Hdd").enumerate() {
            disks.push(drive(d, i)?);
        }
        for (i, d) in children(hw, "CdRom").enumerate() {
            cdroms.push(drive(d, i)?);
        }
        unsupported_hardware(hw, &mut not_carried)?;
    }
    if let Some(s) = settings {
        unsupported_settings(s, &mut not_carried)?;
    }
    let boot = match startup.and_then(|s| child(s, "BootingOrder")) {
        Some(order) => boot_order(order)?,
        None => Vec::new(),
    };
    Ok(PvmConfig {
        name,
        uuid,
        guest,
        cpus,
        memory_mib,
        firmware,
        disks,
        cdroms,
        boot,
        not_carried,
    })
}

fn drive(d: Node, ordinal: usize) -> Result<Drive, PvmError> {
    let index = num::<u32>(d, "Index")?.unwrap_or(ordinal as u32);
    let system = text(d, "SystemName").unwrap_or("").to_string();
    let backing = match (num::<u32>(d, "EmulatedType")?, system.is_empty()) {
        (_, true) => Backing::Empty,
        // PDT_USE_REAL_DEVICE
        (Some(0), false) => Backing::HostDevice(system),
        // PDT_USE_IMAGE_FILE, and files with no type recorded.
        (_, false) => Backing::Image(system),
    };
    let interface = match num::<u32>(d, "InterfaceType")?.unwrap_or(0) {
        0 => Interface::Ide,
        1 => Interface::Scsi(match num::<u32>(d, "SubType")?.unwrap_or(0) {
            0 => ScsiModel::BusLogic,
            1 => ScsiModel::LsiSpi,
            2 => ScsiModel::LsiSas,
            n => ScsiModel::Other(n),
        }),
        2 => Interface::Sata,
        3 => Interface::Nvme,
        n => Interface::Other(n),
    };
    Ok(Drive {
        index,
        enabled: flag(d, "Enabled", true)?,
        connected: flag(d, "Connected", true)?,
        backing,
        interface,
        position: num::<u32>(d, "StackIndex")?.unwrap_or(0),
        label: text(d, "UserFriendlyName").unwrap_or("").to_string(),
    })
}

fn boot_order(order: Node) -> Result<Vec<BootDevice>, PvmError> {
    let mut entries = Vec::new();
    for b in children(order, "BootDevice") {
        if !flag(b, "InUse", true)? {
            continue;
        }
        let index = num::<u32>(b, "Index")?.unwrap_or(0);
        // PRL_DEVICE_TYPE
        let dev = match num::<u32>(b, "Type")? {
            Some(6) => BootDevice::HardDisk(index),
            Some(5) => BootDevice::Cdrom(index),
            Some(3) => BootDevice::Floppy,
            Some(8) => BootDevice::Network,
            Some(15) => BootDevice::Usb,
            Some(n) => BootDevice::Other(n),
            None => continue,
        };
        let rank = num::<u32>(b, "BootingNumber")?.unwrap_or(u32::MAX);
        entries.push((rank, dev));
    }
    entries.sort_by_key(|(rank, _)| *rank);
    Ok(entries.into_iter().map(|(_, d)| d).collect())
}

/// Devices of the Parallels machine that ferry has no model for (yet).
fn unsupported_hardware(hw: Node, out: &mut Vec<String>) -> Result<(), PvmError> {
    for n in children(hw, "NetworkAdapter") {
        if flag(n, "Enabled", true)? {
            let mac = text(n, "MAC").unwrap_or("");
            out.push(format!(
                "network adapter {}{} (ferry has no network devices yet)",
                num::<u32>(n, "Index")?.unwrap_or(0),
                if mac.is_empty() {
                    String::new()
                } else {
                    format!(", MAC {mac}")
                }
            ));
        }
    }
    let simple = [
        ("Sound", "sound card"),
        ("Fdd", "floppy drive"),
        ("Serial", "serial port (give ferry --serial instead)"),
        ("Parallel", "parallel port"),
        ("Printer", "printer"),
        ("USB", "USB device"),
        ("GenericPciDevice", "PCI pass-through device"),
        ("GenericScsiDevice", "SCSI pass-through device"),
    ];
    for (tag, what) in simple {
        for n in children(hw, tag) {
            if flag(n, "Enabled", true)? {
                out.push(what.to_string());
            }
        }
    }
    if let Some(v) = child(hw, "Video") {
        if flag(v, "Enable3DAcceleration", false)? {
            out.push("3D acceleration (ferry has no display yet)".into());
        }
    }
    Ok(())
}

/// Host integration that lives in Parallels' settings.
fn unsupported_settings(s: Node, out: &mut Vec<String>) -> Result<(), PvmError> {
    if let Some(tools) = child(s, "Tools") {
        if let Some(host) = path(tools, &["SharedFolders", "HostSharing"]) {
            let folders: Vec<&str> = children(host, "SharedFolder")
                .map(|f| text(f, "Name").unwrap_or("?"))
                .collect();
            if !folders.is_empty() {
                out.push(format!("shared folders: {}", folders.join(", ")));
            } else if flag(host, "Enabled", false)? {
                out.push("shared folders (host sharing)".into());
            }
        }
        for (tag, what) in [
            ("ClipboardSync", "clipboard sharing"),
            ("DragAndDrop", "drag and drop"),
            ("TimeSync", "time sync through Parallels Tools"),
        ] {
            if child(tools, tag)
                .map(|t| flag(t, "Enabled", false))
                .transpose()?
                .unwrap_or(false)
            {
                out.push(what.to_string());
            }
        }
    }
    if let Some(enc) = child(s, "VmEncryptionInfo") {
        if flag(enc, "Enabled", false)? {
            out.push("VM encryption (decrypt the VM in Parallels before moving it)".into());
        }
    }
    // The guest side: Parallels Tools talk to a host that is gone.
    out.push(
        "Parallels Tools inside the guest (nothing answers them under ferry; uninstall them in the guest if they complain)"
            .into(),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const XP: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<ParallelsVirtualMachine schemaVersion="1.0" dyn_lists="VirtualAppliance 0">
  <Identification><VmUuid>{11111111-2222-3333-4444-555555555555}</VmUuid><VmName>Windows XP</VmName></Identification>
  <Settings>
    <General><OsType>8</OsType><OsNumber>2055</OsNumber></General>
    <Startup>
      <BootingOrder>
        <BootDevice id="0"><Index>0</Index><Type>5</Type><BootingNumber>1</BootingNumber><InUse>1</InUse></BootDevice>
        <BootDevice id="1"><Index>0</Index><Type>6</Type><BootingNumber>0</BootingNumber><InUse>1</InUse></BootDevice>
        <BootDevice id="2"><Index>0</Index><Type>8</Type><BootingNumber>2</BootingNumber><InUse>0</InUse></BootDevice>
      </BootingOrder>
      <Bios><EfiEnabled>0</EfiEnabled></Bios>
    </Startup>
    <Tools><SharedFolders><HostSharing><Enabled>1</Enabled>
      <SharedFolder><Name>Home</Name></SharedFolder></HostSharing></SharedFolders></Tools>
  </Settings>
  <Hardware>
    <Cpu><Number>2</Number></Cpu>
    <Memory><RAM>1024</RAM></Memory>
    <CdRom id="0"><Index>0</Index><Enabled>1</Enabled><Connected>1</Connected><EmulatedType>1</EmulatedType>
      <SystemName>/Users/me/xp.iso</SystemName><InterfaceType>0</InterfaceType><StackIndex>2</StackIndex></CdRom>
    <Hdd id="1"><Index>0</Index><Enabled>1</Enabled><Connected>1</Connected><EmulatedType>1</EmulatedType>
      <SystemName>winxp.hdd</SystemName><InterfaceType>0</InterfaceType><StackIndex>0</StackIndex></Hdd>
    <Hdd id="2"><Index>1</Index><EmulatedType>1</EmulatedType><SystemName>data.hdd</SystemName>
      <InterfaceType>1</InterfaceType><SubType>2</SubType><StackIndex>3</StackIndex></Hdd>
    <NetworkAdapter id="0"><Index>0</Index><Enabled>1</Enabled><MAC>001C42AABBCC</MAC></NetworkAdapter>
  </Hardware>
</ParallelsVirtualMachine>"#;

    #[test]
    fn windows_xp_machine() {
        let c = parse(XP).unwrap();
        assert_eq!(c.name.as_deref(), Some("Windows XP"));
        assert_eq!(
            c.uuid.as_deref(),
            Some("11111111-2222-3333-4444-555555555555")
        );
        assert_eq!(c.guest.as_ref().unwrap().describe(), "Windows XP");
        assert_eq!((c.cpus, c.memory_mib), (Some(2), Some(1024)));
        assert_eq!(c.firmware, Firmware::Bios);
        assert_eq!(c.disks.len(), 2);
        assert_eq!(c.disks[0].interface, Interface::Ide);
        assert_eq!(c.disks[0].backing, Backing::Image("winxp.hdd".into()));
        assert_eq!(c.disks[1].interface, Interface::Scsi(ScsiModel::LsiSas));
        assert_eq!(c.disks[1].position, 3);
        assert_eq!(c.cdroms[0].position, 2);
        assert_eq!(c.boot, vec![BootDevice::HardDisk(0), BootDevice::Cdrom(0)]);
        let nc = c.not_carried.join("; ");
        assert!(nc.contains("network adapter 0, MAC 001C42AABBCC"), "{nc}");
        assert!(nc.contains("shared folders: Home"), "{nc}");
        assert!(nc.contains("Parallels Tools"), "{nc}");
    }

    #[test]
    fn efi_and_minimal() {
        let c = parse(
            "<ParallelsVirtualMachine><Settings><Startup><Bios><EfiEnabled>1</EfiEnabled></Bios></Startup></Settings></ParallelsVirtualMachine>",
        )
        .unwrap();
        assert_eq!(c.firmware, Firmware::Efi);
        assert!(c.disks.is_empty() && c.name.is_none() && c.cpus.is_none());
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(matches!(
            parse("<ParallelsVirtualMachine>"),
            Err(PvmError::Xml(_))
        ));
        assert!(matches!(
            parse("<Parallels_disk_image/>"),
            Err(PvmError::NotAVm(_))
        ));
        let e = parse("<ParallelsVirtualMachine><Hardware><Cpu><Number>two</Number></Cpu></Hardware></ParallelsVirtualMachine>").unwrap_err();
        assert!(e.to_string().contains("Cpu/Number"), "{e}");
        assert!(parse("").is_err());
    }
}
