//! Storage controllers on the machine: each becomes a PCI function on bus 0 with its units,
//! and its queues' doorbells are served by the event loop.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use ferry_devices::pci::{DevFn, PciRoot};
use ferry_devices::scsi::{CdParams, CdUnit, DiskParams, DiskUnit, LogicalUnit};
use ferry_devices::virtio::scsi::VirtioScsi;
use ferry_devices::virtio::{VirtioPci, VirtioPciParams};
use ferry_firmware::acpi::pci_intx_gsi;
use ferry_storage::io::{BandwidthGroup, EngineOptions, IoEngine};
use ferry_storage::Disk;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::hypervisor::Vm;
use crate::VmmError;

/// The controller models ferry can put on the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControllerKind {
    VirtioScsi,
}

impl ControllerKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::VirtioScsi => "virtio-scsi",
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

/// The first slot after the host bridge.
const FIRST_SLOT: u8 = 1;

/// Builds every controller and plugs it into `root`; returns the queue handlers that the
/// event loop must run.
pub fn attach_controllers(
    vm: &Arc<dyn Vm>,
    mem: &GuestMemoryMmap,
    cpus: u32,
    root: &mut PciRoot,
    controllers: &[ControllerConfig],
) -> Result<Vec<QueueHandler>, VmmError> {
    let mut handlers = Vec::new();
    for (i, c) in controllers.iter().enumerate() {
        let slot = FIRST_SLOT + i as u8;
        if slot >= 32 {
            return Err(VmmError::Config(format!(
                "too many storage controllers: bus 0 has no slot for '{}'",
                c.name
            )));
        }
        let gsi = pci_intx_gsi(slot, 0);
        match c.kind {
            ControllerKind::VirtioScsi => {
                let mut dev = VirtioScsi::new(cpus.clamp(1, 4) as u16);
                for u in &c.units {
                    let engine = match &u.medium {
                        Some(m) => Some(
                            IoEngine::new(
                                m.clone(),
                                mem.clone(),
                                EngineOptions {
                                    host_cache: c.host_io_cache,
                                    discard: u.discard,
                                    bwgroup: u.bwgroup.clone(),
                                    ..Default::default()
                                },
                            )
                            .map_err(|e| VmmError::Device(e.to_string()))?,
                        ),
                        None => None,
                    };
                    if let Some(e) = &engine {
                        tracing::info!(
                            "  port {}: I/O through {} (host cache {})",
                            u.port,
                            e.kind().name(),
                            if c.host_io_cache { "on" } else { "off" }
                        );
                    }
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
                root.add(DevFn::new(slot, 0), pci.clone());
                tracing::info!(
                    "storage controller '{}' ({}) at pci {}, INTA on GSI {gsi}, {} unit(s)",
                    c.name,
                    c.kind.name(),
                    DevFn::new(slot, 0),
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
                handlers.push(QueueHandler {
                    device: pci,
                    events,
                    device_events,
                });
            }
        }
    }
    Ok(handlers)
}

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
