//! Machine assembly: guest memory, the PC chipset on the port bus, ACPI, the kernel, vCPU
//! threads and the event loop, for one boot; `run` repeats boots when `--reboot` asks.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use ferry_devices::acpi_pm::{self, AcpiPm};
use ferry_devices::cmos::{self, BootClass, Cmos};
use ferry_devices::debug_port::DEBUG_PORT;
use ferry_devices::fw_cfg::{FwCfg, FW_CFG_PORT, FW_CFG_PORT_LEN};
use ferry_devices::i8042::{self, I8042};
use ferry_devices::pci::{
    self, host_bridge, isa_bridge, piix4_pm, DevFn, PciBarWindow, PciConfigIo, PciRoot,
};
use ferry_devices::pvpanic::{self, PvPanic};
use ferry_devices::serial::{self, Serial};
use ferry_devices::{Bus, BusDevice, ExitHandle};
use ferry_firmware::acpi::{write_acpi_tables, AcpiPlatform};
use ferry_firmware::fw_cfg::{bios_config, BiosSpec, FwCfgKey};
use ferry_firmware::image::FirmwareChoice;
use ferry_firmware::layout::PCI_MMIO32_END;
use ferry_firmware::{load_linux, LinuxBootSpec, MemoryMap};
use vm_memory::GuestAddress;

use crate::console::{Console, ConsoleInput, ConsoleInputHandler, SerialMode, SharedSink};
use crate::cpuid::patch_for_vcpu;
use crate::exit::{ExitState, Outcome};
use crate::firmware::{self, BootTimer, BootWatch, ConsoleTap, Firmware};
use crate::hypervisor::{self, Hypervisor};
use crate::ram::GuestRam;
use crate::storage::{
    attach_controllers, boot_paths, ControllerConfig, HotplugToggle, StorageHandler,
};
use crate::{host, msr, vcpu, VmmError};

/// I/O ports for PCI BARs: above the legacy devices, as the DSDT's _CRS offers them.
const PCI_IO_START: u64 = 0xc000;
const PCI_IO_END: u64 = 0x1_0000;

/// What the vCPUs start in.
#[derive(Debug, Clone)]
pub enum BootSpec {
    /// A Linux kernel loaded by ferry and entered in 64-bit mode.
    Linux(LinuxBootSpec),
    /// Firmware from the reset vector; it boots from the attached disks.
    Firmware(FirmwareBoot),
}

/// A boot through firmware.
#[derive(Debug, Clone)]
pub struct FirmwareBoot {
    pub firmware: FirmwareChoice,
    /// Kinds of boot device in the order the firmware tries them; empty: its own order.
    pub order: Vec<BootDevice>,
    /// How long the firmware may take to start a boot loader.
    pub timeout: Option<Duration>,
    /// Where the firmware's debug-port log goes.
    pub log: Option<PathBuf>,
    /// The machine's UUID (SMBIOS), in RFC 4122 byte order.
    pub uuid: [u8; 16],
    /// The VM's own UEFI variable store (made from OVMF's template when missing); None
    /// keeps the variables in memory for this run only.
    pub efi_vars: Option<PathBuf>,
}

/// A kind of boot device (VirtualBox's words).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootDevice {
    Disk,
    Dvd,
    Net,
}

/// Everything one `ferry run` needs.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub memory: u64,
    pub cpus: u32,
    pub boot: BootSpec,
    pub serial: SerialMode,
    /// Restart the guest when it resets instead of exiting.
    pub reboot: bool,
    /// Storage controllers with their disks and drives.
    pub storage: Vec<ControllerConfig>,
    /// Test hook: SIGUSR1 unplugs and replugs the unit on this (AHCI controller, port).
    pub hotplug_test: Option<(String, u8)>,
}

/// Boots the guest (again after each reset when `reboot` is set) and says how it ended.
pub fn run(cfg: &VmConfig) -> Result<Outcome, VmmError> {
    let firmware = validate(cfg)?;
    let hv = hypervisor::open()?;
    if let Some(why) = host::kvm_without_hardware_virtualization() {
        tracing::warn!(
            "this host has no hardware virtualization ({why}): guest code will be emulated and very slow"
        );
    }
    let max = hv.max_vcpus();
    if cfg.cpus as usize > max {
        return Err(VmmError::Config(format!(
            "--cpus {} is more than this host's KVM allows ({max}); use at most {max}",
            cfg.cpus
        )));
    }
    let console = Console::open(&cfg.serial)?;
    let sink = SharedSink::new(console.sink).map_err(|e| VmmError::Io {
        what: "eventfd".into(),
        source: e,
    })?;
    let signals = SignalPipes::install()?;
    let outcome = loop {
        let input = console.input.try_clone().map_err(|e| VmmError::Io {
            what: "console input".into(),
            source: e,
        })?;
        let outcome = boot_once(
            hv.as_ref(),
            cfg,
            firmware.as_ref(),
            sink.clone(),
            input,
            &signals,
        )?;
        match outcome {
            Outcome::Reset if cfg.reboot => {
                tracing::info!("the guest reset; booting it again (--reboot)");
            }
            o => break o,
        }
    };
    signals.uninstall();
    if let SerialMode::Unix(p) = &cfg.serial {
        let _ = std::fs::remove_file(p);
    }
    Ok(outcome)
}

/// Checks what can be checked before KVM is touched; loads the firmware image of a firmware
/// boot.
fn validate(cfg: &VmConfig) -> Result<Option<Firmware>, VmmError> {
    if cfg.cpus == 0 {
        return Err(VmmError::Config(
            "--cpus 0: a guest needs at least one vCPU".into(),
        ));
    }
    if cfg.cpus > 255 {
        return Err(VmmError::Config(format!(
            "--cpus {}: ferry supports at most 255 vCPUs",
            cfg.cpus
        )));
    }
    if let Some(host_mem) = host::host_memory() {
        if cfg.memory > host_mem {
            return Err(VmmError::Config(format!(
                "--memory {} MiB is more than this host has ({} MiB); give the guest less",
                cfg.memory >> 20,
                host_mem >> 20
            )));
        }
    }
    MemoryMap::new(cfg.memory)?;
    let linux = match &cfg.boot {
        BootSpec::Linux(linux) => linux,
        BootSpec::Firmware(fw) => {
            return firmware::load(fw).map(Some);
        }
    };
    if !linux.kernel.is_file() {
        return Err(VmmError::Config(format!(
            "the kernel {} does not exist or is not a file",
            linux.kernel.display()
        )));
    }
    ferry_firmware::linux::check_bzimage(&linux.kernel)?;
    if let Some(i) = &linux.initrd {
        if !i.is_file() {
            return Err(VmmError::Config(format!(
                "the initrd {} does not exist or is not a file",
                i.display()
            )));
        }
    }
    Ok(None)
}

fn insert(
    bus: &mut Bus,
    base: u64,
    len: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
) -> Result<(), VmmError> {
    bus.insert(base, len, dev)
        .map_err(|e| VmmError::Device(e.to_string()))
}

fn boot_once(
    hv: &dyn Hypervisor,
    cfg: &VmConfig,
    firmware: Option<&Firmware>,
    sink: SharedSink,
    input: ConsoleInput,
    signals: &SignalPipes,
) -> Result<Outcome, VmmError> {
    let map = MemoryMap::new(cfg.memory)?;
    let ranges: Vec<(GuestAddress, usize)> = map
        .ram_ranges()
        .into_iter()
        .map(|(a, s)| (a, s as usize))
        .collect();
    // Dropped last, after every device that holds a handle to the memory.
    let ram = GuestRam::new(&ranges).map_err(|e| VmmError::GuestMemory {
        size: cfg.memory >> 20,
        detail: e.to_string(),
    })?;
    let mem = ram.memory().clone();
    let cpus = cfg.cpus as u8;

    let vm = hv.create_vm()?;
    vm.map_memory(&mem)?;
    vm.create_pc_irqchip()?;

    let exit = Arc::new(ExitState::new().map_err(|e| VmmError::Io {
        what: "eventfd".into(),
        source: e,
    })?);
    let exit_handle: Arc<dyn ExitHandle> = exit.clone();

    // The PC chipset on the port bus.
    let mut pio = Bus::new();
    // A firmware boot watches what the firmware says, on its debug port and its console.
    let watch = matches!(cfg.boot, BootSpec::Firmware(_)).then(|| BootWatch::new(exit.clone()));
    let console_out: Box<dyn std::io::Write + Send> = match &watch {
        Some(w) => Box::new(ConsoleTap::new(sink.clone(), w.clone())),
        None => Box::new(sink.clone()),
    };
    let serial = Arc::new(Mutex::new(Serial::new(
        vm.edge_interrupt(serial::COM1_IRQ)?,
        console_out,
    )));
    insert(
        &mut pio,
        serial::COM1_PORT,
        serial::UART_PORT_LEN,
        serial.clone(),
    )?;
    let kbd = I8042::new(vm.edge_interrupt(i8042::KBD_IRQ)?, exit_handle.clone());
    insert(
        &mut pio,
        i8042::I8042_BASE,
        i8042::I8042_LEN,
        Arc::new(Mutex::new(kbd)),
    )?;
    let mut rtc = Cmos::new(
        cmos::MemoryLayout {
            low_end: map.low_end,
            high_size: map.high_size,
        },
        cpus,
    );
    if let BootSpec::Firmware(fw) = &cfg.boot {
        let classes: Vec<BootClass> = fw
            .order
            .iter()
            .map(|d| match d {
                BootDevice::Disk => BootClass::Disk,
                BootDevice::Dvd => BootClass::Cdrom,
                BootDevice::Net => BootClass::Network,
            })
            .collect();
        rtc.set_boot_order(&classes);
    }
    insert(
        &mut pio,
        cmos::CMOS_PORT,
        cmos::CMOS_LEN,
        Arc::new(Mutex::new(rtc)),
    )?;
    insert(
        &mut pio,
        acpi_pm::PM_BASE,
        acpi_pm::PM_LEN,
        Arc::new(Mutex::new(AcpiPm::new(exit_handle.clone()))),
    )?;
    insert(
        &mut pio,
        pvpanic::PVPANIC_PORT,
        1,
        Arc::new(Mutex::new(PvPanic::new(exit_handle.clone()))),
    )?;
    let mut root = PciRoot::new();
    root.add(DevFn::new(0, 0), Arc::new(Mutex::new(host_bridge())));
    root.add(DevFn::new(1, 0), Arc::new(Mutex::new(isa_bridge())));
    root.add(
        DevFn::new(1, 3),
        Arc::new(Mutex::new(piix4_pm(acpi_pm::PM_BASE as u16))),
    );
    let storage_handlers = attach_controllers(&vm, &mem, cfg.cpus, &mut root, &cfg.storage)?;
    let mut queue_handlers: Vec<Box<dyn MutEventSubscriber + Send>> = Vec::new();
    if let Some((name, port)) = &cfg.hotplug_test {
        let ahci = cfg
            .storage
            .iter()
            .zip(&storage_handlers)
            .find(|(c, _)| &c.name == name)
            .and_then(|(_, h)| h.ahci())
            .ok_or_else(|| {
                VmmError::Config(format!(
                    "the hot-plug test hook names '{name}', which is not an AHCI controller"
                ))
            })?;
        queue_handlers.push(Box::new(HotplugToggle::new(ahci, usize::from(*port))?));
    }
    queue_handlers.extend(
        storage_handlers
            .into_iter()
            .map(StorageHandler::into_subscriber),
    );
    root.set_fast_path_hook(vm.clone().fast_path_hook());
    let root = Arc::new(root);
    // What firmware would do before the kernel runs: give every BAR an address (SeaBIOS
    // assigns them again, in the same window).
    let mmio32_start = map.pci_mmio32_start();
    if !root.assign_bars(
        (mmio32_start, PCI_MMIO32_END + 1),
        (PCI_IO_START, PCI_IO_END),
    ) {
        return Err(VmmError::Device(
            "the PCI devices' BARs do not fit in the PCI hole".into(),
        ));
    }
    for (devfn, what) in root.describe() {
        tracing::info!("pci {devfn}: {what}");
    }
    insert(
        &mut pio,
        pci::PCI_CONFIG_IO_BASE,
        pci::PCI_CONFIG_IO_LEN,
        Arc::new(Mutex::new(PciConfigIo::new(
            root.clone(),
            exit_handle.clone(),
        ))),
    )?;
    insert(
        &mut pio,
        PCI_IO_START,
        PCI_IO_END - PCI_IO_START,
        Arc::new(Mutex::new(PciBarWindow::new(
            root.clone(),
            PCI_IO_START,
            true,
        ))),
    )?;
    let mut mmio = Bus::new();
    insert(
        &mut mmio,
        mmio32_start,
        PCI_MMIO32_END + 1 - mmio32_start,
        Arc::new(Mutex::new(PciBarWindow::new(
            root.clone(),
            mmio32_start,
            false,
        ))),
    )?;

    // What the guest finds in memory.
    let acpi = AcpiPlatform {
        cpus,
        pm1_evt_blk: acpi_pm::PM_BASE as u16,
        pm1_evt_len: acpi_pm::PM1_EVT_LEN,
        pm1_cnt_blk: (acpi_pm::PM_BASE + acpi_pm::PM1A_CNT_OFFSET) as u16,
        pm1_cnt_len: acpi_pm::PM1_CNT_LEN,
        pm_tmr_blk: (acpi_pm::PM_BASE + acpi_pm::PM_TMR_OFFSET) as u16,
        sci_irq: acpi_pm::SCI_IRQ,
        s5_slp_typ: acpi_pm::S5_SLP_TYP as u8,
        reset_port: (pci::PCI_CONFIG_IO_BASE + pci::RESET_CONTROL_OFFSET) as u16,
        reset_value: pci::RESET_VALUE,
        century_cmos_index: 0x32,
        pvpanic_port: pvpanic::PVPANIC_PORT as u16,
        pci_mmio32_start: mmio32_start,
    };
    let boot_state = match (&cfg.boot, firmware) {
        (BootSpec::Linux(linux), _) => {
            let rsdp = write_acpi_tables(&mem, &acpi)?;
            Some(load_linux(&mem, &map, linux, rsdp)?)
        }
        (BootSpec::Firmware(fw), Some(loaded)) => {
            firmware::map(&vm, &mem, &mut mmio, loaded)?;
            let watch = watch
                .clone()
                .unwrap_or_else(|| BootWatch::new(exit.clone()));
            let port = firmware::debug_port(fw.log.as_deref(), watch.clone())?;
            insert(&mut pio, DEBUG_PORT, 1, Arc::new(Mutex::new(port)))?;
            let mut fw_cfg = FwCfg::new(mem.clone());
            let spec = BiosSpec {
                uuid: fw.uuid,
                memory: &map,
                acpi: &acpi,
                boot_order: boot_paths(&cfg.storage, &fw.order),
                boot_menu: false,
                boot_menu_wait_ms: None,
                serial_console: true,
                // SeaBIOS retries after this; ferry ends the run when it says so.
                boot_fail_wait_ms: Some(1000),
            };
            for (key, data) in bios_config(&spec) {
                let added = match key {
                    FwCfgKey::Item(k) => fw_cfg.add_item(k, data),
                    FwCfgKey::File(name) => fw_cfg.add_file(&name, data),
                };
                added.map_err(|e| VmmError::Device(format!("fw_cfg: {e}")))?;
            }
            insert(
                &mut pio,
                FW_CFG_PORT,
                FW_CFG_PORT_LEN,
                Arc::new(Mutex::new(fw_cfg)),
            )?;
            if let Some(limit) = fw.timeout {
                queue_handlers.push(Box::new(BootTimer::new(limit, watch, exit.clone())?));
            }
            None
        }
        (BootSpec::Firmware(_), None) => {
            return Err(VmmError::Config("no firmware image was loaded".into()));
        }
    };

    // vCPUs.
    let supported = hv.supported_cpuid()?;
    let msrs = msr::boot_msrs();
    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);
    let stop = Arc::new(AtomicBool::new(false));
    let mut vcpus = Vec::new();
    for id in 0..cpus {
        let mut v = vm.create_vcpu(id)?;
        let mut cpuid = supported.clone();
        patch_for_vcpu(&mut cpuid, id, cpus);
        v.configure(&cpuid, &msrs)?;
        // Firmware starts where the CPU does after a reset, which is where KVM leaves it.
        if let (0, Some(state)) = (id, &boot_state) {
            v.set_boot_state(state)?;
        }
        vcpus.push(v);
    }
    let mut threads = Vec::new();
    for (id, v) in vcpus.into_iter().enumerate() {
        let ctx = vcpu::VcpuThreadContext {
            pio: pio.clone(),
            mmio: mmio.clone(),
            exit: exit.clone(),
            stop: stop.clone(),
        };
        match vcpu::spawn(id as u8, v, ctx) {
            Ok(t) => threads.push(t),
            Err(e) => {
                vcpu::stop_all(&stop, threads);
                return Err(VmmError::Io {
                    what: "starting a vCPU thread".into(),
                    source: e,
                });
            }
        }
    }
    let what = match (&cfg.boot, firmware) {
        (BootSpec::Linux(l), _) => format!("kernel {}", l.kernel.display()),
        (_, Some(loaded)) => format!("firmware {}", loaded.image.path.display()),
        (_, None) => String::new(),
    };
    tracing::info!(
        "guest started: {} MiB, {} vCPU(s), {what}",
        cfg.memory >> 20,
        cpus,
    );

    let result = event_loop(&exit, &serial, &sink, input, signals, queue_handlers);
    vcpu::stop_all(&stop, threads);
    sink.flush_pending();
    drop(vm);
    result
}

fn event_loop(
    exit: &Arc<ExitState>,
    serial: &Arc<Mutex<Serial>>,
    sink: &SharedSink,
    input: ConsoleInput,
    signals: &SignalPipes,
    queue_handlers: Vec<Box<dyn MutEventSubscriber + Send>>,
) -> Result<Outcome, VmmError> {
    let ev_err = |e: event_manager::Error| VmmError::EventLoop(e.to_string());
    let mut em: EventManager<Box<dyn MutEventSubscriber + Send>> =
        EventManager::new().map_err(ev_err)?;
    em.add_subscriber(Box::new(ExitWatcher(exit.clone())));
    em.add_subscriber(Box::new(ConsoleInputHandler::new(input, serial.clone())));
    em.add_subscriber(Box::new(signals.watcher(exit.clone())?));
    em.add_subscriber(Box::new(ConsoleFlusher(sink.clone())));
    for h in queue_handlers {
        em.add_subscriber(h);
    }
    loop {
        // While console output is buffered, wake up soon to push it out (a prompt without a
        // newline must still reach the user); otherwise sleep until something happens.
        let timeout = if sink.pending() { 20 } else { -1 };
        em.run_with_timeout(timeout).map_err(ev_err)?;
        if let Some(o) = exit.outcome() {
            return Ok(o);
        }
        if !sink.pending() {
            continue;
        }
        // Let a burst finish (each byte is a VM exit) before the write to the host.
        em.run_with_timeout(20).map_err(ev_err)?;
        sink.flush_pending();
    }
}

/// Wakes the loop when console output becomes pending.
struct ConsoleFlusher(SharedSink);

impl MutEventSubscriber for ConsoleFlusher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.wake_fd(), EventSet::IN)) {
            tracing::error!("console eventfd: {e}");
        }
    }
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.0.wake_fd().read();
    }
}

/// Wakes the loop when a device or vCPU ends the run.
struct ExitWatcher(Arc<ExitState>);

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.eventfd(), EventSet::IN)) {
            tracing::error!("exit eventfd: {e}");
        }
    }
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.0.eventfd().read();
    }
}

/// SIGINT and SIGTERM, delivered to the event loop through a socket pair each.
struct SignalPipes {
    pipes: Vec<(i32, UnixStream, signal_hook::SigId)>,
}

impl SignalPipes {
    fn install() -> Result<Self, VmmError> {
        let mut pipes = Vec::new();
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            let io = |source| VmmError::Io {
                what: "installing signal handlers".into(),
                source,
            };
            let (r, w) = UnixStream::pair().map_err(io)?;
            r.set_nonblocking(true).map_err(io)?;
            let id = signal_hook::low_level::pipe::register(sig, w).map_err(io)?;
            pipes.push((sig, r, id));
        }
        Ok(Self { pipes })
    }

    fn watcher(&self, exit: Arc<ExitState>) -> Result<SignalWatcher, VmmError> {
        let mut readers = Vec::new();
        for (sig, r, _) in &self.pipes {
            let r = r.try_clone().map_err(|source| VmmError::Io {
                what: "signal pipe".into(),
                source,
            })?;
            readers.push((*sig, r));
        }
        Ok(SignalWatcher { readers, exit })
    }

    fn uninstall(self) {
        for (_, _, id) in self.pipes {
            signal_hook::low_level::unregister(id);
        }
    }
}

struct SignalWatcher {
    readers: Vec<(i32, UnixStream)>,
    exit: Arc<ExitState>,
}

impl MutEventSubscriber for SignalWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, (_, r)) in self.readers.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(r, i as u32, EventSet::IN)) {
                tracing::error!("signal pipe: {e}");
            }
        }
    }
    fn process(&mut self, events: Events, _: &mut EventOps) {
        use std::io::Read;
        if let Some((sig, r)) = self.readers.get_mut(events.data() as usize) {
            let mut buf = [0u8; 16];
            let _ = r.read(&mut buf);
            tracing::info!("signal {sig}: stopping the guest");
            self.exit.set(Outcome::Signal(*sig));
        }
    }
}
