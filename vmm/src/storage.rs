//! Storage controllers on the machine: each becomes a PCI function on bus 0 with its units,
//! and its queues' doorbells are served by the event loop.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use ferry_devices::ahci::{Ahci, AhciParams, Unit as AhciUnit};
use ferry_devices::ata::{AtaDevice, AtaDiskParams, AtapiParams};
use ferry_devices::pci::{DevFn, PciRoot};
use ferry_devices::scsi::{CdParams, CdUnit, DiskParams, DiskUnit, LogicalUnit};
use ferry_devices::virtio::scsi::VirtioScsi;
use ferry_devices::virtio::{VirtioPci, VirtioPciParams};
use ferry_firmware::acpi::pci_intx_gsi;
use ferry_firmware::boot_path;
use ferry_storage::io::{BandwidthGroup, EngineOptions, IoEngine};
use ferry_storage::Disk;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::hypervisor::Vm;
use crate::machine::BootDevice;
use crate::VmmError;

/// The controller models ferry can put on the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControllerKind {
    VirtioScsi,
    Ahci,
}

impl ControllerKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::VirtioScsi => "virtio-scsi",
            Self::Ahci => "ahci",
        }
    }
}

/// One storage controller and what is attached to it.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub name: String,
    pub kind: ControllerKind,
    /// Buffered host I/O (on) or O_DIRECT (off).
    pub host_io_cache: bool,
    /// Ports the controller has, where the model takes a count (AHCI); None: its default.
    pub ports: Option<u32>,
    pub units: Vec<UnitConfig>,
}

/// A disk or CD/DVD drive on a controller port.
#[derive(Clone)]
pub struct UnitConfig {
    pub port: u8,
    /// The opened medium; None is an empty CD/DVD drive.
    pub medium: Option<Arc<Disk>>,
    /// Where the medium came from, for the log.
    pub path: PathBuf,
    pub dvd: bool,
    pub nonrotational: bool,
    pub discard: bool,
    pub read_only: bool,
    /// The bandwidth group the unit's I/O is held to.
    pub bwgroup: Option<Arc<BandwidthGroup>>,
}

impl std::fmt::Debug for UnitConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnitConfig")
            .field("port", &self.port)
            .field("path", &self.path)
            .field("dvd", &self.dvd)
            .finish_non_exhaustive()
    }
}

/// The first slot after the host bridge (00:00.0) and the ISA bridge (00:01.0).
const FIRST_SLOT: u8 = 2;

/// The PCI slot of the `index`th controller.
fn controller_slot(index: usize) -> Option<u8> {
    u8::try_from(index)
        .ok()
        .and_then(|i| FIRST_SLOT.checked_add(i))
        .filter(|&s| s < 32)
}

/// The firmware's boot order (OpenFirmware paths, as in QEMU's `bootorder` file): for each
/// kind in `order`, the units of that kind in controller and port order.
pub fn boot_paths(controllers: &[ControllerConfig], order: &[BootDevice]) -> Vec<String> {
    let mut paths = Vec::new();
    for kind in order {
        let want_dvd = match kind {
            BootDevice::Disk => false,
            BootDevice::Dvd => true,
            BootDevice::Net => {
                tracing::warn!("the boot order names net, but the machine has no network adapter");
                continue;
            }
        };
        for (i, c) in controllers.iter().enumerate() {
            let Some(slot) = controller_slot(i) else {
                continue;
            };
            for u in c.units.iter().filter(|u| u.dvd == want_dvd) {
                paths.push(match c.kind {
                    ControllerKind::VirtioScsi => {
                        boot_path::virtio_scsi_disk_path(slot, 0, u.port.into(), 0)
                    }
                    ControllerKind::Ahci => boot_path::ahci_disk_path(slot, 0, u.port),
                });
            }
        }
    }
    paths
}

/// Builds every controller and plugs it into `root`; returns the event handlers that the
/// event loop must run (doorbells and I/O completions).
pub fn attach_controllers(
    vm: &Arc<dyn Vm>,
    mem: &GuestMemoryMmap,
    cpus: u32,
    root: &mut PciRoot,
    controllers: &[ControllerConfig],
) -> Result<Vec<StorageHandler>, VmmError> {
    let mut handlers = Vec::new();
    for (i, c) in controllers.iter().enumerate() {
        let Some(slot) = controller_slot(i) else {
            return Err(VmmError::Config(format!(
                "too many storage controllers: bus 0 has no slot for '{}'",
                c.name
            )));
        };
        let gsi = pci_intx_gsi(slot, 0);
        let devfn = DevFn::new(slot, 0);
        let handler = match c.kind {
            ControllerKind::VirtioScsi => {
                let mut dev = VirtioScsi::new(cpus.clamp(1, 4) as u16);
                for u in &c.units {
                    let engine = engine(c, u, mem)?;
                    dev.attach(u.port, unit(c, u)?, u.medium.clone(), engine)
                        .map_err(|e| VmmError::Config(format!("controller '{}': {e}", c.name)))?;
                }
                let pci = VirtioPci::new(
                    Box::new(dev),
                    VirtioPciParams {
                        memory: mem.clone(),
                        msi: vm.clone().msi_sender(),
                        intx: vm.clone().level_interrupt(gsi),
                        intx_line: gsi as u8,
                        class: (0x01, 0x00, 0x00),
                    },
                )
                .map_err(|e| VmmError::Device(format!("{}: {e}", c.name)))?;
                let events: Vec<Arc<EventFd>> = (0..pci.queue_count())
                    .filter_map(|q| pci.queue_event(q))
                    .collect();
                let device_events = pci.device_events();
                let pci = Arc::new(Mutex::new(pci));
                root.add(devfn, pci.clone());
                StorageHandler::Virtio(QueueHandler {
                    device: pci,
                    events,
                    device_events,
                })
            }
            ControllerKind::Ahci => {
                let ports = c.ports.map_or(DEFAULT_AHCI_PORTS, |n| n as usize);
                let mut dev = Ahci::new(AhciParams {
                    memory: mem.clone(),
                    msi: vm.clone().msi_sender(),
                    intx: vm.clone().level_interrupt(gsi),
                    intx_line: gsi as u8,
                    ports,
                })
                .map_err(|e| VmmError::Config(format!("controller '{}': {e}", c.name)))?;
                for u in &c.units {
                    let ahci_unit = AhciUnit {
                        device: ata_device(c, u)?,
                        medium: u.medium.clone(),
                        engine: engine(c, u, mem)?,
                    };
                    dev.attach(usize::from(u.port), ahci_unit)
                        .map_err(|e| VmmError::Config(format!("controller '{}': {e}", c.name)))?;
                }
                let changed = dev.sources_changed();
                let kick = dev.kick_event();
                let dev = Arc::new(Mutex::new(dev));
                root.add(devfn, dev.clone());
                StorageHandler::Ahci(AhciHandler {
                    device: dev,
                    changed,
                    kick,
                    registered: Vec::new(),
                })
            }
        };
        tracing::info!(
            "storage controller '{}' ({}) at pci {devfn}, INTA on GSI {gsi}, {} unit(s)",
            c.name,
            c.kind.name(),
            c.units.len()
        );
        for u in &c.units {
            tracing::info!(
                "  port {}: {} {}{}",
                u.port,
                if u.dvd { "dvd" } else { "hdd" },
                u.path.display(),
                if u.read_only { " (read-only)" } else { "" }
            );
        }
        handlers.push(handler);
    }
    Ok(handlers)
}

/// VirtualBox's default port count for a SATA controller.
const DEFAULT_AHCI_PORTS: usize = 30;

/// The I/O engine that moves a unit's data (None for an empty drive).
fn engine(
    c: &ControllerConfig,
    u: &UnitConfig,
    mem: &GuestMemoryMmap,
) -> Result<Option<IoEngine>, VmmError> {
    let Some(m) = &u.medium else {
        return Ok(None);
    };
    let e = IoEngine::new(
        m.clone(),
        mem.clone(),
        EngineOptions {
            host_cache: c.host_io_cache,
            discard: u.discard,
            bwgroup: u.bwgroup.clone(),
            ..Default::default()
        },
    )
    .map_err(|e| VmmError::Device(e.to_string()))?;
    tracing::info!(
        "  port {}: I/O through {} (host cache {})",
        u.port,
        e.kind().name(),
        if c.host_io_cache { "on" } else { "off" }
    );
    Ok(Some(e))
}

/// The ATA disk or ATAPI drive on an AHCI port.
fn ata_device(c: &ControllerConfig, u: &UnitConfig) -> Result<AtaDevice, VmmError> {
    let serial = format!("FERRY-{}-{}", c.name, u.port);
    if u.dvd {
        let mut d = AtaDevice::atapi(AtapiParams {
            model: "FERRY DVD-ROM".into(),
            serial,
            firmware: FIRMWARE_REVISION.into(),
        });
        if let (Some(m), Some(drive)) = (&u.medium, d.as_atapi_mut()) {
            drive.insert(m.size());
        }
        return Ok(d);
    }
    let Some(m) = &u.medium else {
        return Err(VmmError::Config(format!(
            "controller '{}' port {}: a hard disk needs a medium",
            c.name, u.port
        )));
    };
    Ok(AtaDevice::disk(AtaDiskParams {
        size_bytes: m.size(),
        nonrotational: u.nonrotational,
        discard: u.discard,
        read_only: u.read_only,
        model: "FERRY HARDDISK".into(),
        serial,
        firmware: FIRMWARE_REVISION.into(),
        ncq: true,
    }))
}

const FIRMWARE_REVISION: &str = "1.0";

fn unit(c: &ControllerConfig, u: &UnitConfig) -> Result<LogicalUnit, VmmError> {
    let serial = format!("FERRY-{}-{}", c.name, u.port);
    if u.dvd {
        let mut cd = CdUnit::new(CdParams {
            vendor: "FERRY",
            product: "DVD-ROM",
            serial,
            atapi: false,
        });
        if let Some(m) = &u.medium {
            cd.insert(m.size());
        }
        return Ok(LogicalUnit::Cd(cd));
    }
    let Some(m) = &u.medium else {
        return Err(VmmError::Config(format!(
            "controller '{}' port {}: a hard disk needs a medium",
            c.name, u.port
        )));
    };
    let disk = DiskUnit::new(DiskParams {
        size_bytes: m.size(),
        block_size: 512,
        nonrotational: u.nonrotational,
        discard: u.discard,
        read_only: u.read_only,
        write_cache: true,
        vendor: "FERRY",
        product: "HARDDISK",
        serial,
        wwn: 0x5000_0000_0000_0000 | (u64::from(u.port) << 8),
    })
    .map_err(|e| VmmError::Config(format!("controller '{}' port {}: {e}", c.name, u.port)))?;
    Ok(LogicalUnit::Disk(disk))
}

/// What the event loop runs for one controller.
pub enum StorageHandler {
    Virtio(QueueHandler),
    Ahci(AhciHandler),
}

impl StorageHandler {
    /// The AHCI controller behind this handler, for hot-plug.
    pub fn ahci(&self) -> Option<Arc<Mutex<Ahci>>> {
        match self {
            Self::Ahci(h) => Some(h.device.clone()),
            Self::Virtio(_) => None,
        }
    }

    pub fn into_subscriber(self) -> Box<dyn MutEventSubscriber + Send> {
        match self {
            Self::Virtio(h) => Box::new(h),
            Self::Ahci(h) => Box::new(h),
        }
    }
}

/// Finishes an AHCI controller's commands when its ports' I/O engines complete them. The
/// set of engines changes with hot-plug; the controller's `changed` eventfd says when.
pub struct AhciHandler {
    device: Arc<Mutex<Ahci>>,
    changed: Arc<EventFd>,
    /// Software issued commands.
    kick: Arc<EventFd>,
    /// The engine eventfds registered now, with their ports.
    registered: Vec<(usize, EventFd)>,
}

/// Event data for the AHCI controller's own eventfds; ports use their index.
const AHCI_CHANGED: u32 = u32::MAX;
const AHCI_KICK: u32 = u32::MAX - 1;

impl AhciHandler {
    fn register(&mut self, ops: &mut EventOps) {
        for (_, fd) in self.registered.drain(..) {
            let _ = ops.remove(Events::new(&fd, EventSet::IN));
        }
        let events = self
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .io_events();
        for (port, fd) in events {
            if let Err(err) = ops.add(Events::with_data(&fd, port as u32, EventSet::IN)) {
                tracing::error!("AHCI port {port} I/O completions: {err}");
            }
            self.registered.push((port, fd));
        }
    }
}

impl MutEventSubscriber for AhciHandler {
    fn init(&mut self, ops: &mut EventOps) {
        let changed = Events::with_data(self.changed.as_ref(), AHCI_CHANGED, EventSet::IN);
        if let Err(err) = ops.add(changed) {
            tracing::error!("AHCI hot-plug events: {err}");
        }
        let kick = Events::with_data(self.kick.as_ref(), AHCI_KICK, EventSet::IN);
        if let Err(err) = ops.add(kick) {
            tracing::error!("AHCI command issue events: {err}");
        }
        self.register(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let data = events.data();
        if data == AHCI_CHANGED {
            self.register(ops);
            return;
        }
        let mut dev = self.device.lock().unwrap_or_else(|e| e.into_inner());
        if data == AHCI_KICK {
            let submits = dev.run_ports();
            drop(dev);
            if submits.is_empty() {
                return;
            }
            for s in submits {
                s.submit();
            }
            self.device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .reap_ports();
        } else {
            dev.io_event(data as usize);
        }
    }
}

/// Runs a controller's queues when their doorbells ring, and finishes its requests when
/// its I/O engines complete them.
pub struct QueueHandler {
    device: Arc<Mutex<VirtioPci>>,
    events: Vec<Arc<EventFd>>,
    device_events: Vec<Arc<EventFd>>,
}

/// Event data at and above this are device events; below, queue doorbells.
const DEVICE_EVENT: u32 = 1 << 16;

impl MutEventSubscriber for QueueHandler {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, e) in self.events.iter().enumerate() {
            if let Err(err) = ops.add(Events::with_data(e.as_ref(), i as u32, EventSet::IN)) {
                tracing::error!("queue {i} doorbell: {err}");
            }
        }
        for (i, e) in self.device_events.iter().enumerate() {
            let data = DEVICE_EVENT + i as u32;
            if let Err(err) = ops.add(Events::with_data(e.as_ref(), data, EventSet::IN)) {
                tracing::error!("I/O completions {i}: {err}");
            }
        }
    }

    fn process(&mut self, events: Events, _: &mut EventOps) {
        let data = events.data();
        let mut dev = self.device.lock().unwrap_or_else(|e| e.into_inner());
        if data >= DEVICE_EVENT {
            dev.device_event((data - DEVICE_EVENT) as usize);
        } else {
            dev.queue_notified(data as usize);
        }
    }
}

/// A test hook for hot-plug until ferry has a control API: each SIGUSR1 unplugs the unit on
/// one AHCI port of the running guest, or plugs it back. Only set up when the user asks for
/// it (`FERRY_TEST_HOTPLUG=CONTROLLER:PORT`); the guest cannot trigger it.
pub struct HotplugToggle {
    device: Arc<Mutex<Ahci>>,
    port: usize,
    parked: Option<AhciUnit>,
    signal: std::os::unix::net::UnixStream,
    id: signal_hook::SigId,
}

impl HotplugToggle {
    pub fn new(device: Arc<Mutex<Ahci>>, port: usize) -> Result<Self, VmmError> {
        let io = |source| VmmError::Io {
            what: "installing the SIGUSR1 handler for the hot-plug test hook".into(),
            source,
        };
        let (r, w) = std::os::unix::net::UnixStream::pair().map_err(io)?;
        r.set_nonblocking(true).map_err(io)?;
        let id =
            signal_hook::low_level::pipe::register(signal_hook::consts::SIGUSR1, w).map_err(io)?;
        Ok(Self {
            device,
            port,
            parked: None,
            signal: r,
            id,
        })
    }
}

impl Drop for HotplugToggle {
    fn drop(&mut self) {
        signal_hook::low_level::unregister(self.id);
    }
}

impl MutEventSubscriber for HotplugToggle {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.signal, EventSet::IN)) {
            tracing::error!("hot-plug test hook: {e}");
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        use std::io::Read;
        let mut buf = [0u8; 16];
        let _ = self.signal.read(&mut buf);
        let mut dev = self.device.lock().unwrap_or_else(|e| e.into_inner());
        let result = match self.parked.take() {
            Some(unit) => dev.plug(self.port, unit).map(|()| "plugged back"),
            None => dev.unplug(self.port).map(|u| {
                self.parked = Some(u);
                "unplugged"
            }),
        };
        match result {
            Ok(what) => tracing::info!("hot-plug test hook: port {} {what}", self.port),
            Err(e) => tracing::warn!("hot-plug test hook: {e}"),
        }
    }
}
