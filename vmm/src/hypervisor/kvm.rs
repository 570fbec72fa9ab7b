//! The KVM backend: kvm-ioctls underneath the hypervisor seam.

use std::sync::{Arc, Mutex};

use ferry_devices::pci::{FastPathHook, RegisterMirror};
use ferry_devices::{EdgeInterrupt, LevelInterrupt, MsiSender};
use ferry_firmware::layout::HYPERVISOR_PAGES_START;
use ferry_firmware::linux::Segment;
use ferry_firmware::BootCpuState;
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_msi, kvm_msr_entry, kvm_pit_config, kvm_run, kvm_segment,
    kvm_userspace_memory_region, CpuId, Msrs, KVM_EXIT_IO_IN, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_READONLY, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch, VcpuExit as KvmExit, VcpuFd, VmFd};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{FlashMapping, Hypervisor, HypervisorError, Result, Vcpu, VcpuExit, Vm};
use crate::cpuid::CpuidEntry;

/// Where KVM puts the identity-map page and the three TSS pages Intel needs for real mode.
const IDENTITY_MAP_ADDR: u64 = HYPERVISOR_PAGES_START;
const TSS_ADDR: usize = (HYPERVISOR_PAGES_START + 0x1000) as usize;
/// Memory slots for read-only images (firmware) come after the RAM slots.
const ROM_SLOT_BASE: u32 = 64;
/// Register mirrors (see `RegisterMirror`) take slots from here, one per device.
const MIRROR_SLOT_BASE: u32 = 128;
const MIRROR_SLOTS: usize = 64;

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

fn call_err(what: &'static str) -> impl Fn(vmm_sys_util::errno::Error) -> HypervisorError {
    move |e| HypervisorError::Call {
        what,
        detail: e.to_string(),
    }
}

pub struct KvmHypervisor {
    kvm: Kvm,
}

impl KvmHypervisor {
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| match e.errno() {
            libc::ENOENT | libc::ENODEV | libc::ENXIO => HypervisorError::NoKvm,
            libc::EACCES | libc::EPERM => HypervisorError::KvmPermission,
            _ => HypervisorError::KvmOpen(e.to_string()),
        })?;
        for (cap, name) in [
            (Cap::Irqchip, "an in-kernel irqchip"),
            (Cap::UserMemory, "user memory regions"),
            (Cap::SetTssAddr, "KVM_SET_TSS_ADDR"),
            (Cap::Irqfd, "irqfd"),
            (Cap::Pit2, "the in-kernel PIT"),
            (Cap::ExtCpuid, "KVM_GET_SUPPORTED_CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(HypervisorError::MissingCapability(name));
            }
        }
        Ok(Self { kvm })
    }
}

impl Hypervisor for KvmHypervisor {
    fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(call_err("report its supported CPUID"))?;
        // KVM emulates the TSC-deadline timer but leaves the bit to the VMM; without it the
        // guest calibrates its LAPIC timer against the PIT, slowly and unreliably when nested.
        let tsc_deadline = self.kvm.check_extension(Cap::TscDeadlineTimer);
        Ok(cpuid
            .as_slice()
            .iter()
            .map(|e| CpuidEntry {
                ecx: if e.function == 1 && tsc_deadline {
                    e.ecx | LEAF1_ECX_TSC_DEADLINE
                } else {
                    e.ecx
                },
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                edx: e.edx,
            })
            .collect())
    }

    fn create_vm(&self) -> Result<Arc<dyn Vm>> {
        let fd = self.kvm.create_vm().map_err(call_err("create a VM"))?;
        Ok(Arc::new(KvmVm {
            fd,
            memory: Mutex::new(None),
            roms: Mutex::new(Vec::new()),
            mirrors: Mutex::new(Vec::new()),
        }))
    }
}

pub struct KvmVm {
    // Field order matters: the VM fd closes before the memory it maps is unmapped.
    fd: VmFd,
    memory: Mutex<Option<GuestMemoryMmap>>,
    roms: Mutex<Vec<GuestMemoryMmap>>,
    /// Register mirrors by slot (index + MIRROR_SLOT_BASE): where each is mapped. A mirror
    /// stays here after it is unmapped, so its memory outlives every mapping of it.
    mirrors: Mutex<Vec<(Arc<RegisterMirror>, Option<u64>)>>,
}

impl KvmVm {
    /// Maps a copy of `bytes` read-only at `gpa` in a new slot; returns the slot and the
    /// memory behind it (kept alive in `self.roms`).
    fn add_rom(&self, gpa: u64, bytes: &[u8]) -> Result<(u32, GuestMemoryMmap)> {
        let err = |detail: String| HypervisorError::Call {
            what: "map a firmware image",
            detail,
        };
        if !self.fd.check_extension(Cap::ReadonlyMem) {
            return Err(HypervisorError::MissingCapability(
                "read-only memory slots (for firmware images)",
            ));
        }
        let rom = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(gpa), bytes.len())])
            .map_err(|e| err(e.to_string()))?;
        rom.write_slice(bytes, GuestAddress(gpa))
            .map_err(|e| err(e.to_string()))?;
        let mut roms = self.roms.lock().unwrap_or_else(|e| e.into_inner());
        let slot = ROM_SLOT_BASE + roms.len() as u32;
        self.set_rom_slot(slot, gpa, &rom, true)?;
        roms.push(rom.clone());
        Ok((slot, rom))
    }

    /// Registers (or with `mapped` false, removes) a read-only slot over `rom`.
    fn set_rom_slot(&self, slot: u32, gpa: u64, rom: &GuestMemoryMmap, mapped: bool) -> Result<()> {
        let err = |detail: String| HypervisorError::Call {
            what: "map a firmware image",
            detail,
        };
        let region = rom.iter().next().ok_or_else(|| err("no region".into()))?;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| err(e.to_string()))?;
        let r = kvm_userspace_memory_region {
            slot,
            // Guest writes become MMIO exits: ROM ignores them, flash takes them as commands.
            flags: KVM_MEM_READONLY,
            guest_phys_addr: gpa,
            // Size 0 deletes the slot.
            memory_size: if mapped { region.len() } else { 0 },
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is the start of a live mapping of `region.len()` bytes owned by `rom`,
        // a clone of which stays in `self.roms` for as long as the VM lives; `self.fd` is
        // dropped before it.
        unsafe { self.fd.set_user_memory_region(r) }.map_err(call_err("map a firmware image"))
    }
}

/// A flash device's slot: removed while the device answers reads itself.
struct KvmFlash {
    vm: Arc<KvmVm>,
    slot: u32,
    gpa: u64,
    region: GuestMemoryMmap,
}

impl FlashMapping for KvmFlash {
    fn set_mapped(&self, mapped: bool) {
        if let Err(e) = self
            .vm
            .set_rom_slot(self.slot, self.gpa, &self.region, mapped)
        {
            tracing::error!("flash at {:#x}: {e}", self.gpa);
        }
    }

    fn update(&self, offset: u64, data: &[u8]) {
        if let Err(e) = self
            .region
            .write_slice(data, GuestAddress(self.gpa + offset))
        {
            tracing::error!("flash at {:#x}: {e}", self.gpa);
        }
    }
}

impl Vm for KvmVm {
    fn map_memory(&self, mem: &GuestMemoryMmap) -> Result<()> {
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| HypervisorError::Call {
                    what: "map guest memory",
                    detail: e.to_string(),
                })?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host` is the start of a live mapping of `region.len()` bytes owned by
            // `mem`; a clone of `mem` is stored in `self.memory` below, and `self.fd` is
            // dropped before it, so the mapping outlives every guest access through KVM.
            unsafe { self.fd.set_user_memory_region(r) }.map_err(call_err("map guest memory"))?;
        }
        *self.memory.lock().unwrap_or_else(|e| e.into_inner()) = Some(mem.clone());
        Ok(())
    }

    fn map_rom(&self, gpa: u64, bytes: &[u8]) -> Result<()> {
        self.add_rom(gpa, bytes).map(|_| ())
    }

    fn map_flash(self: Arc<Self>, gpa: u64, bytes: &[u8]) -> Result<Arc<dyn FlashMapping>> {
        let (slot, region) = self.add_rom(gpa, bytes)?;
        Ok(Arc::new(KvmFlash {
            vm: self,
            slot,
            gpa,
            region,
        }))
    }

    fn create_pc_irqchip(&self) -> Result<()> {
        self.fd
            .set_tss_address(TSS_ADDR)
            .map_err(call_err("set the TSS address"))?;
        self.fd
            .set_identity_map_address(IDENTITY_MAP_ADDR)
            .map_err(call_err("set the identity map address"))?;
        self.fd
            .create_irq_chip()
            .map_err(call_err("create the in-kernel PIC and IOAPIC"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(pit)
            .map_err(call_err("create the in-kernel PIT"))?;
        Ok(())
    }

    fn edge_interrupt(&self, gsi: u32) -> Result<Arc<dyn EdgeInterrupt>> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| HypervisorError::Call {
            what: "create an eventfd",
            detail: e.to_string(),
        })?;
        self.fd
            .register_irqfd(&evt, gsi)
            .map_err(call_err("register an irqfd"))?;
        Ok(Arc::new(Irqfd(evt)))
    }

    fn level_interrupt(self: Arc<Self>, gsi: u32) -> Arc<dyn LevelInterrupt> {
        Arc::new(IrqLine { vm: self, gsi })
    }

    fn msi_sender(self: Arc<Self>) -> Arc<dyn MsiSender> {
        Arc::new(MsiSignal(self))
    }

    fn fast_path_hook(self: Arc<Self>) -> Arc<dyn FastPathHook> {
        Arc::new(FastPaths(self))
    }

    fn create_vcpu(&self, id: u8) -> Result<Box<dyn Vcpu>> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(call_err("create a vCPU"))?;
        Ok(Box::new(KvmVcpu { fd }))
    }
}

/// A level-triggered GSI driven with KVM_IRQ_LINE. The handles keep the whole VM (fd and
/// memory, in their drop order) alive, never just the fd.
struct IrqLine {
    vm: Arc<KvmVm>,
    gsi: u32,
}

impl LevelInterrupt for IrqLine {
    fn set_level(&self, asserted: bool) {
        if let Err(e) = self.vm.fd.set_irq_line(self.gsi, asserted) {
            tracing::warn!("interrupt line {}: {e}", self.gsi);
        }
    }
}

struct MsiSignal(Arc<KvmVm>);

impl MsiSender for MsiSignal {
    fn send(&self, address: u64, data: u32) {
        let msi = kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        if let Err(e) = self.0.fd.signal_msi(msi) {
            tracing::warn!("MSI to {address:#x}: {e}");
        }
    }
}

/// Doorbells as ioeventfds (a guest write there signals the eventfd inside KVM) and register
/// mirrors as read-only slots (guest reads hit memory, writes exit as MMIO).
struct FastPaths(Arc<KvmVm>);

impl FastPaths {
    /// Maps (or with `at` None, removes) the slot of `mirror`, allocating one the first time.
    fn set_mirror(&self, mirror: &Arc<RegisterMirror>, at: Option<u64>) -> Result<()> {
        let mut mirrors = self.0.mirrors.lock().unwrap_or_else(|e| e.into_inner());
        let index = match mirrors.iter().position(|(m, _)| Arc::ptr_eq(m, mirror)) {
            Some(i) => i,
            None if at.is_none() => return Ok(()),
            None if mirrors.len() >= MIRROR_SLOTS => {
                return Err(HypervisorError::Call {
                    what: "map a register mirror",
                    detail: format!("more than {MIRROR_SLOTS} devices have one"),
                })
            }
            None => {
                if !self.0.fd.check_extension(Cap::ReadonlyMem) {
                    return Err(HypervisorError::MissingCapability(
                        "read-only memory slots (for register mirrors)",
                    ));
                }
                mirrors.push((mirror.clone(), None));
                mirrors.len() - 1
            }
        };
        if at.is_none() && mirrors[index].1.is_none() {
            // Not mapped: KVM refuses to delete an empty slot.
            return Ok(());
        }
        let r = kvm_userspace_memory_region {
            slot: MIRROR_SLOT_BASE + index as u32,
            flags: KVM_MEM_READONLY,
            guest_phys_addr: at.unwrap_or(mirrors[index].1.unwrap_or(0)),
            // Size 0 deletes the slot.
            memory_size: if at.is_some() { mirror.len() } else { 0 },
            userspace_addr: mirror.host_address() as u64,
        };
        // SAFETY: the mirror's mapping is `mirror.len()` bytes long, and a clone of its Arc
        // stays in `self.0.mirrors` for as long as the VM lives (its fd is dropped first).
        unsafe { self.0.fd.set_user_memory_region(r) }
            .map_err(call_err("map a register mirror"))?;
        mirrors[index].1 = at;
        Ok(())
    }
}

impl FastPathHook for FastPaths {
    fn attach(&self, addr: u64, event: &EventFd) {
        if let Err(e) = self
            .0
            .fd
            .register_ioevent(event, &IoEventAddress::Mmio(addr), NoDatamatch)
        {
            // The device still sees the write as an MMIO exit: slower, not wrong.
            tracing::warn!("ioeventfd at {addr:#x}: {e}");
        }
    }

    fn detach(&self, addr: u64, event: &EventFd) {
        if let Err(e) =
            self.0
                .fd
                .unregister_ioevent(event, &IoEventAddress::Mmio(addr), NoDatamatch)
        {
            tracing::debug!("removing ioeventfd at {addr:#x}: {e}");
        }
    }

    fn map_mirror(&self, addr: u64, mirror: &Arc<RegisterMirror>) {
        // A slot already mapped elsewhere moves: KVM cannot change a slot's address in place.
        if let Err(e) = self
            .set_mirror(mirror, None)
            .and_then(|()| self.set_mirror(mirror, Some(addr)))
        {
            // The registers still read through MMIO exits: slower, not wrong.
            tracing::warn!("register mirror at {addr:#x}: {e}");
        }
    }

    fn unmap_mirror(&self, addr: u64, mirror: &Arc<RegisterMirror>) {
        if let Err(e) = self.set_mirror(mirror, None) {
            tracing::warn!("removing the register mirror at {addr:#x}: {e}");
        }
    }
}

/// An irqfd: writing the eventfd pulses the GSI in the in-kernel irqchip.
struct Irqfd(EventFd);

impl EdgeInterrupt for Irqfd {
    fn trigger(&self) {
        if let Err(e) = self.0.write(1) {
            tracing::warn!("interrupt lost: {e}");
        }
    }
}

pub struct KvmVcpu {
    fd: VcpuFd,
}

fn kvm_segment(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: 0,
        unusable: u8::from(!s.present),
        padding: 0,
    }
}

impl KvmVcpu {
    fn set_lint_modes(&mut self) -> Result<()> {
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(call_err("read the local APIC"))?;
        for (reg, mode) in [
            (APIC_LVT_LINT0, APIC_MODE_EXTINT),
            (APIC_LVT_LINT1, APIC_MODE_NMI),
        ] {
            let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
            let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (i, b) in v.to_le_bytes().iter().enumerate() {
                lapic.regs[reg + i] = *b as i8;
            }
        }
        self.fd
            .set_lapic(&lapic)
            .map_err(call_err("program the local APIC"))
    }
}

impl Vcpu for KvmVcpu {
    fn configure(&mut self, cpuid: &[CpuidEntry], msrs: &[(u32, u64)]) -> Result<()> {
        let entries: Vec<kvm_cpuid_entry2> = cpuid
            .iter()
            .map(|e| kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
                ..Default::default()
            })
            .collect();
        let cpuid = CpuId::from_entries(&entries).map_err(|e| HypervisorError::Call {
            what: "accept the CPUID table",
            detail: format!("{e:?}"),
        })?;
        self.fd.set_cpuid2(&cpuid).map_err(call_err("set CPUID"))?;

        let entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let kvm_msrs = Msrs::from_entries(&entries).map_err(|e| HypervisorError::Call {
            what: "accept the MSR list",
            detail: format!("{e:?}"),
        })?;
        let set = self.fd.set_msrs(&kvm_msrs).map_err(call_err("set MSRs"))?;
        if set != msrs.len() {
            return Err(HypervisorError::Call {
                what: "set MSRs",
                detail: format!("MSR {:#x} was not accepted", msrs[set].0),
            });
        }

        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd
            .set_fpu(&fpu)
            .map_err(call_err("set the FPU state"))?;
        self.set_lint_modes()
    }

    fn set_boot_state(&mut self, st: &BootCpuState) -> Result<()> {
        let mut sregs = self
            .fd
            .get_sregs()
            .map_err(call_err("read special registers"))?;
        let code = kvm_segment(&st.code);
        let data = kvm_segment(&st.data);
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = kvm_segment(&st.tss);
        sregs.gdt.base = st.gdt_base;
        sregs.gdt.limit = st.gdt_limit;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr0 = st.cr0;
        sregs.cr3 = st.cr3;
        sregs.cr4 = st.cr4;
        sregs.efer = st.efer;
        self.fd
            .set_sregs(&sregs)
            .map_err(call_err("set special registers"))?;

        let mut regs = self.fd.get_regs().map_err(call_err("read registers"))?;
        regs.rflags = 0x2;
        regs.rip = st.rip;
        regs.rsp = st.rsp;
        regs.rbp = st.rsp;
        regs.rsi = st.rsi;
        self.fd.set_regs(&regs).map_err(call_err("set registers"))
    }

    fn run(&mut self) -> Result<VcpuExit<'_>> {
        // Port and MMIO exits are decoded below from kvm_run itself: kvm-ioctls hands over
        // string I/O (rep ins/outs, which SeaBIOS uses on fw_cfg) as one buffer of count *
        // size bytes without the access size, and the devices need each access on its own.
        let exit = match self.fd.run() {
            Ok(exit) => match exit {
                KvmExit::IoIn(..) | KvmExit::IoOut(..) => Pending::Io,
                KvmExit::MmioRead(..) | KvmExit::MmioWrite(..) => Pending::Mmio,
                KvmExit::Hlt => Pending::Done(VcpuExit::Halt),
                KvmExit::Shutdown => Pending::Done(VcpuExit::Shutdown),
                KvmExit::Intr => Pending::Done(VcpuExit::Interrupted),
                KvmExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => {
                    Pending::Done(VcpuExit::Shutdown)
                }
                KvmExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => Pending::Done(
                    VcpuExit::Failed("the guest asked KVM for a system shutdown".into()),
                ),
                KvmExit::FailEntry(reason, _) => Pending::Done(VcpuExit::Failed(format!(
                    "KVM could not enter the guest (hardware entry failure {reason:#x})"
                ))),
                KvmExit::InternalError => Pending::Done(VcpuExit::Failed(
                    "KVM hit an internal error emulating a guest instruction".into(),
                )),
                other => {
                    tracing::debug!("ignored vCPU exit {other:?}");
                    Pending::Done(VcpuExit::Ignored)
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Pending::Done(VcpuExit::Interrupted)
            }
            Err(e) => {
                return Err(HypervisorError::Call {
                    what: "run the vCPU",
                    detail: e.to_string(),
                })
            }
        };
        let run = self.fd.get_kvm_run();
        Ok(match exit {
            Pending::Done(e) => e,
            Pending::Io => {
                // SAFETY: the exit reason is KVM_EXIT_IO (kvm-ioctls just decoded it), so `io`
                // is the union member the kernel filled in.
                let io = unsafe { run.__bindgen_anon_1.io };
                let size = usize::from(io.size);
                let len = size * io.count as usize;
                let start = (run as *mut kvm_run).cast::<u8>();
                // SAFETY: the kernel puts the `count * size` data bytes at `data_offset` inside
                // the kvm_run mapping (as kvm-ioctls reads them too); the mapping lives as long
                // as `self.fd`, and the slice borrows `self` mutably, so nothing else aliases it.
                let data = unsafe {
                    std::slice::from_raw_parts_mut(start.add(io.data_offset as usize), len)
                };
                if u32::from(io.direction) == KVM_EXIT_IO_IN {
                    VcpuExit::IoIn {
                        port: io.port,
                        size,
                        data,
                    }
                } else {
                    VcpuExit::IoOut {
                        port: io.port,
                        size,
                        data,
                    }
                }
            }
            Pending::Mmio => {
                // SAFETY: the exit reason is KVM_EXIT_MMIO, so `mmio` is the member in use.
                let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
                let len = (mmio.len as usize).min(mmio.data.len());
                let addr = mmio.phys_addr;
                if mmio.is_write != 0 {
                    VcpuExit::MmioWrite {
                        addr,
                        data: &mmio.data[..len],
                    }
                } else {
                    VcpuExit::MmioRead {
                        addr,
                        data: &mut mmio.data[..len],
                    }
                }
            }
        })
    }
}

/// What a vCPU exit turned out to be, before its data is taken from kvm_run.
enum Pending {
    Io,
    Mmio,
    Done(VcpuExit<'static>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_register_mirror_maps_moves_and_unmaps() {
        let Ok(kvm) = KvmHypervisor::new() else {
            eprintln!("skipped: no usable /dev/kvm here");
            return;
        };
        let vm = Arc::new(KvmVm {
            fd: kvm.kvm.create_vm().unwrap(),
            memory: Mutex::new(None),
            roms: Mutex::new(Vec::new()),
            mirrors: Mutex::new(Vec::new()),
        });
        let paths = FastPaths(vm.clone());
        let mirror = Arc::new(RegisterMirror::new(0x1000).unwrap());
        // Not mapped yet: removing it is a no-op, not a KVM error.
        paths.set_mirror(&mirror, None).unwrap();
        paths.set_mirror(&mirror, Some(0xfeb0_0000)).unwrap();
        // A second mirror over the same page is refused (and logged by the hook, not fatal).
        let other = Arc::new(RegisterMirror::new(0x1000).unwrap());
        assert!(paths.set_mirror(&other, Some(0xfeb0_0000)).is_err());
        // The BAR moves: the hook unmaps and maps again, in the same slot.
        paths.map_mirror(0xfeb0_2000, &mirror);
        assert_eq!(vm.mirrors.lock().unwrap()[0].1, Some(0xfeb0_2000));
        // The old page is free again.
        paths.set_mirror(&other, Some(0xfeb0_0000)).unwrap();
        paths.unmap_mirror(0xfeb0_2000, &mirror);
        assert_eq!(vm.mirrors.lock().unwrap()[0].1, None);
    }
}
