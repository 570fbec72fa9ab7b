//! `ferry run`: boot a guest.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use ferry_vmm::{
    BootDevice as VmBootDevice, BootSpec, FirmwareBoot, FirmwareChoice, LinuxBootSpec, Outcome,
    SerialMode, VmConfig,
};

use std::sync::Arc;

use ferry_storage::io::{BandwidthGroup, BandwidthGroupSpec};
use ferry_storage::lock::ImageLock;
use ferry_storage::{AttachmentSet, MediumType, Placement};
use ferry_vmm::{ControllerConfig, ControllerKind, UnitConfig};

use crate::size::parse_size;
use crate::vmdef::storage::parse_flag;
use crate::vmdef::value::{BootDevice, DriveKind, Firmware, Serial, Size};
use crate::vmdef::{Attach, BwGroup, ControllerType, DefError, StorageCtl, VmDef};

/// Exit codes a script can tell apart.
const EXIT_ERROR: u8 = 1;
const EXIT_GUEST_PANIC: u8 = 3;
const EXIT_GUEST_FAILED: u8 = 4;
const EXIT_NO_BOOT: u8 = 5;

/// Boot a virtual machine and show its serial console.
///
/// The guest runs until it powers off (exit code 0), resets (exit code 0, or a fresh boot with
/// --reboot), panics (exit code 3, seen through the pvpanic device) or the hypervisor gives up on
/// it (exit code 4). Firmware that finds no bootable device, or starts no boot loader within
/// --boot-timeout, ends it with exit code 5. Ctrl-C or SIGTERM stops it (exit code 128 + the
/// signal number).
///
/// Without --kernel the guest boots from its disks through firmware (SeaBIOS by default;
/// its screen goes to the serial console).
///
/// Examples:
///   ferry run --storagectl name=sata,type=ahci --attach ctl=sata,port=0,medium=disk.vdi
///   ferry run --kernel vmlinuz --initrd initrd.img --cmdline "console=ttyS0" --memory 1G --cpus 2
///   ferry run VM.toml --memory 2G          (VM.toml settings, with more memory)
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct RunArgs {
    /// A VM definition (VM.toml) with any of the settings below; flags override it.
    #[arg(value_name = "VM.toml")]
    config: Option<PathBuf>,
    /// Guest RAM, with a K/M/G suffix (a bare number means MiB; default 512M). RAM beyond
    /// 3 GiB is placed above 4 GiB, past the PCI hole.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    memory: Option<u64>,
    /// Number of vCPUs (default 1).
    #[arg(long, value_name = "N")]
    cpus: Option<u32>,
    /// Linux kernel to boot directly (a bzImage such as /boot/vmlinuz-*).
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk for the kernel.
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Kernel command line (default console=ttyS0).
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Where the guest's first serial port (COM1) goes: stdio (default), file:PATH, or
    /// unix:PATH (a socket ferry listens on; connect with `socat - UNIX-CONNECT:PATH`).
    #[arg(long, value_name = "TARGET")]
    serial: Option<Serial>,
    /// Boot the guest again when it resets, instead of exiting.
    #[arg(long)]
    reboot: bool,
    /// Run without a display window (ferry has no display yet: every run is headless).
    #[arg(long)]
    headless: bool,
    /// Firmware for booting from disks: bios, efi, or a firmware image file.
    #[arg(long, value_name = "bios|efi|PATH")]
    firmware: Option<Firmware>,
    /// Boot order, e.g. disk,dvd,net.
    #[arg(long, value_name = "DEVICES", value_delimiter = ',')]
    boot: Option<Vec<BootDevice>>,
    /// Seconds the firmware may take to start a boot loader; past that the run ends (exit
    /// code 5).
    #[arg(long, value_name = "SECONDS")]
    boot_timeout: Option<u32>,
    /// Write the firmware's debug log (SeaBIOS's port 0x402) to this file.
    #[arg(long, value_name = "FILE")]
    firmware_log: Option<PathBuf>,
    /// The VM's UEFI variable store (--firmware efi), made from OVMF's template if missing.
    /// A VM.toml run keeps it beside the file (NAME.efivars); without either, variables
    /// last one run.
    #[arg(long, value_name = "FILE")]
    efi_vars: Option<PathBuf>,
    /// A storage controller: name=C,type=TYPE[,hostiocache=on|off][,ports=N]. TYPE: ide-piix3,
    /// ide-piix4, ide-ich6, ahci, lsilogic, lsilogic-sas, buslogic, nvme, virtio-scsi, usb-xhci.
    #[arg(long, value_name = "SPEC", value_parser = |s: &str| parse_flag::<StorageCtl>(s).map(|v| (v, s.to_string())))]
    storagectl: Vec<(StorageCtl, String)>,
    /// Attach a medium: ctl=C,port=P[,device=D],medium=PATH[,type=hdd|dvd][,mtype=MTYPE]
    /// [,autoreset=on|off][,nonrotational=on][,discard=on][,bwgroup=G][,hotpluggable=on].
    /// MTYPE: normal, immutable, writethrough, shareable, multiattach, readonly.
    #[arg(long, value_name = "SPEC", value_parser = |s: &str| parse_flag::<Attach>(s).map(|v| (v, s.to_string())))]
    attach: Vec<(Attach, String)>,
    /// A bandwidth group: name=G,limit=20M[,iops=N] (limit in bytes per second).
    #[arg(long, value_name = "SPEC", value_parser = |s: &str| parse_flag::<BwGroup>(s).map(|v| (v, s.to_string())))]
    bwgroup: Vec<(BwGroup, String)>,
}

/// The definition `ferry run` was given: the file, if any, with the flags over it.
fn definition(args: RunArgs) -> Result<VmDef, DefError> {
    let mut def = match &args.config {
        Some(p) => VmDef::load(p)?,
        None => VmDef::default(),
    };
    if let Some(m) = args.memory {
        def.memory = Some(Size(m));
    }
    if let Some(c) = args.cpus {
        def.cpus = Some(c);
    }
    if args.kernel.is_some() {
        def.kernel = args.kernel;
    }
    if args.initrd.is_some() {
        def.initrd = args.initrd;
    }
    if args.cmdline.is_some() {
        def.cmdline = args.cmdline;
    }
    if args.serial.is_some() {
        def.serial = args.serial;
    }
    if args.reboot {
        def.reboot = Some(true);
    }
    if args.headless {
        def.headless = Some(true);
    }
    if args.firmware.is_some() {
        def.firmware = args.firmware;
    }
    if args.boot.is_some() {
        def.boot = args.boot;
    }
    if args.boot_timeout.is_some() {
        def.boot_timeout = args.boot_timeout;
    }
    if args.firmware_log.is_some() {
        def.firmware_log = args.firmware_log;
    }
    if args.efi_vars.is_some() {
        def.efi_vars = args.efi_vars;
    }
    for (c, text) in args.storagectl {
        def.add_storagectl(c, &text);
    }
    for (b, text) in args.bwgroup {
        def.add_bwgroup(b, &text);
    }
    for (a, text) in args.attach {
        def.add_attach(a, &text);
    }
    def.check()?;
    Ok(def)
}

/// `FERRY_TEST_HOTPLUG=CONTROLLER:PORT`: the integration tests' stand-in for the control API
/// that is still to come; SIGUSR1 then unplugs or replugs that port's unit.
fn hotplug_test_hook() -> Option<(String, u8)> {
    let v = std::env::var("FERRY_TEST_HOTPLUG").ok()?;
    let parsed = v
        .rsplit_once(':')
        .and_then(|(c, p)| Some((c.to_string(), p.parse().ok()?)));
    if parsed.is_none() {
        tracing::warn!("FERRY_TEST_HOTPLUG={v} is not CONTROLLER:PORT; ignored");
    }
    parsed
}

/// Controller models that have a device behind them.
fn implemented(kind: ControllerType) -> bool {
    matches!(kind, ControllerType::VirtioScsi | ControllerType::Ahci)
}

/// The vmm's model for a controller type that has one.
fn kind_of(kind: ControllerType) -> ControllerKind {
    match kind {
        ControllerType::Ahci => ControllerKind::Ahci,
        _ => ControllerKind::VirtioScsi,
    }
}

/// The machine's controllers with their opened media, in the definition's order. The
/// returned locks must outlive the VM.
fn controllers(
    def: &VmDef,
    set: AttachmentSet,
) -> Result<(Vec<ControllerConfig>, Vec<ImageLock>), String> {
    let mut out: Vec<ControllerConfig> = def
        .storagectl
        .iter()
        .map(|c| ControllerConfig {
            name: c.name.get_ref().clone(),
            kind: kind_of(*c.kind.get_ref()),
            host_io_cache: c.hostiocache.is_none_or(|h| h.0),
            ports: c.ports.as_ref().map(|p| *p.get_ref()),
            units: Vec::new(),
        })
        .collect();
    // One shared limiter per group: every attachment naming it draws from the same budget.
    let groups: Vec<Arc<BandwidthGroup>> = def
        .bwgroup
        .iter()
        .map(|g| {
            Arc::new(BandwidthGroup::new(&BandwidthGroupSpec {
                name: g.name.get_ref().clone(),
                limit: g.limit.0,
                iops: g.iops.map_or(0, u64::from),
            }))
        })
        .collect();
    let mut locks = Vec::new();
    for (a, att) in def.attach.iter().zip(set.into_attachments()) {
        let Some(i) = def
            .storagectl
            .iter()
            .position(|c| c.name.get_ref() == a.ctl.get_ref())
        else {
            return Err(format!("no storage controller named '{}'", a.ctl.get_ref()));
        };
        let port = *a.port.get_ref();
        // virtio-scsi ports are SCSI targets 0..=255, AHCI's 0..30 (checked with the
        // definition).
        let port = u8::try_from(port).map_err(|_| {
            format!(
                "port {port} of controller '{}' is out of range (0..=255)",
                a.ctl.get_ref()
            )
        })?;
        if out[i].units.iter().any(|u| u.port == port) {
            return Err(format!(
                "port {port} of controller '{}' has two attachments",
                a.ctl.get_ref()
            ));
        }
        let mtype = a.mtype();
        let (disk, mut l) = att.split();
        locks.append(&mut l);
        let dvd = matches!(a.kind, DriveKind::Dvd);
        out[i].units.push(UnitConfig {
            port,
            medium: Some(Arc::new(disk)),
            path: a.medium.clone(),
            dvd,
            nonrotational: a.nonrotational.0,
            discard: a.discard.0,
            read_only: dvd || matches!(mtype, MediumType::Readonly),
            bwgroup: a
                .bwgroup
                .as_ref()
                .and_then(|n| groups.iter().find(|g| g.name() == n.get_ref()).cloned()),
        });
    }
    Ok((out, locks))
}

/// Opens every attachment by its medium type's rules (locks, duplicate UUIDs, differencing
/// children in the VM folder), then refuses controllers that do not exist yet.
fn open_storage(def: &VmDef) -> Result<AttachmentSet, String> {
    let vm_dir = def.folder().unwrap_or_else(|| PathBuf::from("."));
    let mut set = AttachmentSet::new();
    for a in &def.attach {
        let mut place = Placement::new(&vm_dir, &[]);
        if let Some(r) = a.autoreset {
            place.autoreset = r.0;
        }
        // A CD/DVD drive only reads its medium, whatever type the medium was given.
        let mtype = match a.kind {
            DriveKind::Dvd => MediumType::Readonly,
            DriveKind::Hdd => a.mtype(),
        };
        set.attach(&a.medium, mtype, &place)
            .map_err(|e| e.to_string())?;
    }
    for a in &def.attach {
        let Some(ctl) = def
            .storagectl
            .iter()
            .find(|c| c.name.get_ref() == a.ctl.get_ref())
        else {
            continue;
        };
        let kind = *ctl.kind.get_ref();
        if !implemented(kind) {
            return Err(format!(
                "storage controller type '{kind}' is not implemented yet, so {} cannot be attached to controller '{}'",
                a.medium.display(),
                a.ctl.get_ref()
            ));
        }
    }
    Ok(set)
}

pub fn run(args: RunArgs) -> ExitCode {
    let def = match definition(args) {
        Ok(d) => d,
        Err(e) => {
            crate::report(&e);
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let (storage, _locks) = match open_storage(&def).and_then(|set| controllers(&def, set)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ferry: error: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    if let Some(c) = def
        .storagectl
        .iter()
        .find(|c| !implemented(*c.kind.get_ref()))
    {
        eprintln!(
            "ferry: error: storage controller type '{}' is not implemented yet (available: virtio-scsi, ahci)",
            c.kind.get_ref()
        );
        return ExitCode::from(EXIT_ERROR);
    }
    let boot = match def.kernel {
        Some(kernel) => {
            if def.firmware.is_some() {
                tracing::warn!("--firmware is not used when a kernel is booted directly");
            }
            for (given, what) in [
                (def.boot.is_some(), "--boot"),
                (def.boot_timeout.is_some(), "--boot-timeout"),
                (def.firmware_log.is_some(), "--firmware-log"),
            ] {
                if given {
                    tracing::warn!(
                        "{what} is for firmware boots; a kernel booted directly ignores it"
                    );
                }
            }
            BootSpec::Linux(LinuxBootSpec {
                kernel,
                initrd: def.initrd,
                cmdline: def.cmdline.unwrap_or_else(|| "console=ttyS0".into()),
            })
        }
        None if def.attach.is_empty() => {
            eprintln!(
                "ferry: error: nothing to boot: attach a disk or DVD (--storagectl and --attach) for the firmware to boot, or pass --kernel FILE"
            );
            return ExitCode::from(EXIT_ERROR);
        }
        None => BootSpec::Firmware(FirmwareBoot {
            firmware: match def.firmware {
                None | Some(Firmware::Bios) => FirmwareChoice::Bios,
                Some(Firmware::Efi) => FirmwareChoice::Efi,
                Some(Firmware::File(p)) => FirmwareChoice::Path(p),
            },
            order: def
                .boot
                .unwrap_or_default()
                .into_iter()
                .map(|b| match b {
                    BootDevice::Disk => VmBootDevice::Disk,
                    BootDevice::Dvd => VmBootDevice::Dvd,
                    BootDevice::Net => VmBootDevice::Net,
                })
                .collect(),
            timeout: def
                .boot_timeout
                .map(|s| std::time::Duration::from_secs(s.into())),
            log: def.firmware_log,
            uuid: def.uuid.unwrap_or_else(uuid::Uuid::new_v4).into_bytes(),
            efi_vars: def.efi_vars.clone().or_else(|| {
                def.source.as_ref().map(|s| {
                    let stem = s.path.file_stem().unwrap_or_default().to_string_lossy();
                    s.path.with_file_name(format!("{stem}.efivars"))
                })
            }),
        }),
    };
    let serial = match def.serial.map(|s| s.0.parse::<SerialMode>()).transpose() {
        Ok(s) => s.unwrap_or(SerialMode::Stdio),
        Err(e) => {
            eprintln!("ferry: error: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let cfg = VmConfig {
        memory: def.memory.map_or(512 << 20, |m| m.0),
        cpus: def.cpus.unwrap_or(1),
        boot,
        serial,
        reboot: def.reboot.unwrap_or(false),
        storage,
        hotplug_test: hotplug_test_hook(),
    };
    match ferry_vmm::run(&cfg) {
        Ok(Outcome::PowerOff) => {
            tracing::info!("the guest powered off");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Reset) => {
            tracing::info!("the guest reset");
            ExitCode::SUCCESS
        }
        Ok(Outcome::GuestPanic) => {
            eprintln!("ferry: the guest kernel panicked");
            ExitCode::from(EXIT_GUEST_PANIC)
        }
        Ok(Outcome::VcpuFailed(why)) => {
            eprintln!("ferry: the guest stopped: {why}");
            ExitCode::from(EXIT_GUEST_FAILED)
        }
        Ok(Outcome::Signal(sig)) => ExitCode::from(128u8.wrapping_add(sig as u8)),
        Ok(Outcome::NoBootableDevice) => {
            eprintln!(
                "ferry: the firmware found no bootable device: attach a disk or DVD with a boot loader, and check --boot"
            );
            ExitCode::from(EXIT_NO_BOOT)
        }
        Ok(Outcome::BootTimeout(t)) => {
            eprintln!(
                "ferry: the firmware started no boot loader within {} s (--boot-timeout); see --firmware-log",
                t.as_secs()
            );
            ExitCode::from(EXIT_NO_BOOT)
        }
        Err(e) => {
            crate::report(&e);
            ExitCode::from(EXIT_ERROR)
        }
    }
}
