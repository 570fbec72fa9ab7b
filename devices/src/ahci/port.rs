//! One AHCI port (AHCI 1.3.1, section 3.3): its registers, the device behind it, and the
//! command engine that fetches command headers and tables, hands the commands to the ATA
//! device core and posts the FISes that answer them.

use std::collections::HashMap;
use std::sync::Arc;

use ferry_storage::io::{DeferredSubmit, IoEngine, IoError, Request};
use ferry_storage::Disk;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::fis::{self, CommandHeader, HostFis, ACMD_LEN, ACMD_OFFSET, CFIS_LEN, HEADER_SIZE};
use super::sg::{self, Sg, SgReader};
use crate::ata::{
    status, AtaCompletion, AtaDevice, AtaIo, AtaResult, IoFailure, MediumIoKind, Protocol,
};

/// Register offsets within a port's 0x80 bytes.
pub mod reg {
    pub const CLB: u64 = 0x00;
    pub const CLBU: u64 = 0x04;
    pub const FB: u64 = 0x08;
    pub const FBU: u64 = 0x0c;
    pub const IS: u64 = 0x10;
    pub const IE: u64 = 0x14;
    pub const CMD: u64 = 0x18;
    pub const TFD: u64 = 0x20;
    pub const SIG: u64 = 0x24;
    pub const SSTS: u64 = 0x28;
    pub const SCTL: u64 = 0x2c;
    pub const SERR: u64 = 0x30;
    pub const SACT: u64 = 0x34;
    pub const CI: u64 = 0x38;
    /// Every register `Port::read` answers with something other than zero.
    pub const ALL: [u64; 14] = [
        CLB, CLBU, FB, FBU, IS, IE, CMD, TFD, SIG, SSTS, SCTL, SERR, SACT, CI,
    ];
}

/// PxIS bits.
pub mod irq {
    pub const DHRS: u32 = 1 << 0;
    pub const PSS: u32 = 1 << 1;
    pub const SDBS: u32 = 1 << 3;
    pub const PCS: u32 = 1 << 6;
    pub const PRCS: u32 = 1 << 22;
    pub const IFS: u32 = 1 << 27;
    pub const HBFS: u32 = 1 << 29;
    pub const TFES: u32 = 1 << 30;
    /// Bits software clears by writing ones (PCS and PRCS follow PxSERR instead).
    pub const RWC: u32 = !(PCS | PRCS);
}

/// PxCMD bits.
mod cmd {
    pub const ST: u32 = 1 << 0;
    pub const SUD: u32 = 1 << 1;
    pub const POD: u32 = 1 << 2;
    pub const CLO: u32 = 1 << 3;
    pub const FRE: u32 = 1 << 4;
    pub const CCS_SHIFT: u32 = 8;
    pub const CCS: u32 = 0x1f << CCS_SHIFT;
    pub const FR: u32 = 1 << 14;
    pub const CR: u32 = 1 << 15;
    pub const HPCP: u32 = 1 << 18;
    /// What software may set: ST, CLO, FRE, ATAPI, DLAE, ALPE, ASP, ICC.
    pub const WRITABLE: u32 = ST | CLO | FRE | (1 << 24) | (1 << 25) | (1 << 26) | (1 << 27);
}

/// PxSERR.DIAG: PhyRdy changed (N) and device presence changed (X).
const SERR_DIAG_N: u32 = 1 << 16;
const SERR_DIAG_X: u32 = 1 << 26;
/// PxSSTS with a device: present with communication (DET 3), Gen2 speed, active power state.
const SSTS_UP: u32 = 0x123;
/// PxTFD with no device: what software reads from an empty port.
const TFD_EMPTY: u32 = 0x7f;

/// The device on a port, the medium behind it, and the engine that moves its data.
pub struct Unit {
    pub device: AtaDevice,
    pub medium: Option<Arc<Disk>>,
    pub engine: Option<IoEngine>,
}

/// A command whose data the I/O engine is moving.
struct InFlight {
    slot: u8,
    io: AtaIo,
    ncq: bool,
    /// A FUA write waits for the flush after it.
    flushing: bool,
    /// The port's generation when it started: a stop or reset since then orphans it.
    generation: u64,
}

pub struct Port {
    clb: u64,
    fb: u64,
    is: u32,
    pub ie: u32,
    cmd: u32,
    tfd: u32,
    sig: u32,
    ssts: u32,
    sctl: u32,
    serr: u32,
    sact: u32,
    ci: u32,
    pub unit: Option<Unit>,
    /// Slots handed to the device and not finished (non-queued commands).
    issued: u32,
    /// A task-file error stopped the command engine until software restarts it (clears ST).
    halted: bool,
    generation: u64,
    in_flight: HashMap<u64, InFlight>,
    next_id: u64,
    /// The device's signature FIS waits for FIS receive to be enabled.
    signature_pending: bool,
    /// COMRESET asserted (PxSCTL.DET = 1).
    comreset: bool,
    /// Software reset asserted by a Device Control FIS.
    srst: bool,
    /// PxIS bits set since the HBA last looked (to decide whether to interrupt).
    raised: u32,
}

impl Port {
    pub fn new(unit: Option<Unit>, hotplug: bool) -> Self {
        let mut p = Self {
            clb: 0,
            fb: 0,
            is: 0,
            ie: 0,
            cmd: 0,
            tfd: TFD_EMPTY,
            sig: 0xffff_ffff,
            ssts: 0,
            sctl: 0,
            serr: 0,
            sact: 0,
            ci: 0,
            unit,
            issued: 0,
            halted: false,
            generation: 0,
            in_flight: HashMap::new(),
            next_id: 0,
            signature_pending: false,
            comreset: false,
            srst: false,
            raised: 0,
        };
        p.reset(hotplug);
        p
    }

    /// Power-on and HBA reset: every register but the command list and FIS addresses, and the
    /// device reset with its signature sent once FIS receive is on.
    pub fn reset(&mut self, hotplug: bool) {
        self.orphan_in_flight();
        self.is = 0;
        self.ie = 0;
        self.cmd = cmd::SUD | cmd::POD | if hotplug { cmd::HPCP } else { 0 };
        self.sctl = 0;
        self.serr = 0;
        self.sact = 0;
        self.ci = 0;
        self.issued = 0;
        self.halted = false;
        self.comreset = false;
        self.srst = false;
        self.raised = 0;
        self.link_up();
    }

    /// The device (if any) was reset and the link came up: signature and status.
    fn link_up(&mut self) {
        match self.unit.as_mut() {
            Some(u) => {
                u.device.reset();
                self.ssts = SSTS_UP;
                self.sig = u.device.signature();
                self.tfd = u32::from(u.device.reset_registers().status);
                self.signature_pending = true;
            }
            None => {
                self.ssts = 0;
                self.sig = 0xffff_ffff;
                self.tfd = TFD_EMPTY;
                self.signature_pending = false;
            }
        }
    }

    /// Forgets the commands the engine still runs: their completions are dropped. Those
    /// still waiting for the host (held by a bandwidth group) never start: a write that
    /// software stopped or reset the port to get rid of must not land later.
    fn orphan_in_flight(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        self.issued = 0;
        if self.in_flight.is_empty() {
            return;
        }
        let ids: Vec<u64> = self.in_flight.keys().copied().collect();
        if let Some(engine) = self.engine_mut() {
            engine.cancel_waiting(&ids);
        }
    }

    fn bit(slot: u8) -> u32 {
        1u32 << (slot & 31)
    }

    /// PxIS as software reads it: PCS and PRCS mirror PxSERR.DIAG.X and .N.
    fn effective_is(&self) -> u32 {
        let mut is = self.is;
        if self.serr & SERR_DIAG_X != 0 {
            is |= irq::PCS;
        }
        if self.serr & SERR_DIAG_N != 0 {
            is |= irq::PRCS;
        }
        is
    }

    /// Whether the port asks for an interrupt (PxIS & PxIE).
    pub fn interrupt_pending(&self) -> bool {
        self.effective_is() & self.ie != 0
    }

    /// Enabled PxIS bits raised since the last call.
    pub fn take_raised(&mut self) -> bool {
        let r = self.raised & self.ie != 0;
        self.raised = 0;
        r
    }

    fn raise(&mut self, bits: u32) {
        self.is |= bits & irq::RWC;
        self.raised |= bits;
    }

    pub fn read(&self, offset: u64) -> u32 {
        match offset {
            reg::CLB => self.clb as u32,
            reg::CLBU => (self.clb >> 32) as u32,
            reg::FB => self.fb as u32,
            reg::FBU => (self.fb >> 32) as u32,
            reg::IS => self.effective_is(),
            reg::IE => self.ie,
            reg::CMD => {
                let mut c = self.cmd;
                if c & cmd::FRE != 0 {
                    c |= cmd::FR;
                }
                // CR stays set until the engine's last orphaned command has come back, so
                // software that waits for it never reuses buffers the host still writes.
                if c & cmd::ST != 0 || !self.in_flight.is_empty() {
                    c |= cmd::CR;
                }
                c
            }
            reg::TFD => self.tfd,
            reg::SIG => self.sig,
            reg::SSTS => self.ssts,
            reg::SCTL => self.sctl,
            reg::SERR => self.serr,
            reg::SACT => self.sact,
            reg::CI => self.ci,
            _ => 0,
        }
    }

    pub fn write(&mut self, offset: u64, value: u32, mem: &GuestMemoryMmap) {
        match offset {
            reg::CLB => self.clb = (self.clb & !0xffff_ffff) | u64::from(value & !0x3ff),
            reg::CLBU => self.clb = (self.clb & 0xffff_ffff) | (u64::from(value) << 32),
            reg::FB => self.fb = (self.fb & !0xffff_ffff) | u64::from(value & !0xff),
            reg::FBU => self.fb = (self.fb & 0xffff_ffff) | (u64::from(value) << 32),
            reg::IS => self.is &= !(value & irq::RWC),
            reg::IE => self.ie = value & 0xfdc0_00ff,
            reg::CMD => self.write_cmd(value, mem),
            reg::SCTL => self.write_sctl(value, mem),
            reg::SERR => self.serr &= !value,
            // Software sets the bits of queued commands it is about to issue (SACT), then
            // issues slots (CI); both only while the command engine runs. The HBA fetches
            // the commands later, off the vCPU thread (see `Ahci::run_ports`).
            reg::SACT if self.cmd & cmd::ST != 0 => self.sact |= value,
            reg::CI if self.cmd & cmd::ST != 0 => self.ci |= value,
            _ => {}
        }
    }

    fn write_cmd(&mut self, value: u32, mem: &GuestMemoryMmap) {
        let old = self.cmd;
        self.cmd = (old & !cmd::WRITABLE) | (value & cmd::WRITABLE);
        if value & cmd::CLO != 0 {
            // Command List Override: BSY and DRQ clear so a reset FIS can be issued.
            self.tfd &= !u32::from(status::BSY | status::DRQ);
            self.cmd &= !cmd::CLO;
        }
        if old & cmd::ST != 0 && self.cmd & cmd::ST == 0 {
            // AHCI 1.3.1, 3.3.7: clearing ST clears PxCI, PxSACT and PxCMD.CCS.
            self.ci = 0;
            self.sact = 0;
            self.cmd &= !cmd::CCS;
            self.halted = false;
            self.orphan_in_flight();
        }
        if self.cmd & cmd::FRE != 0 && self.signature_pending {
            self.send_signature(mem);
        }
    }

    fn write_sctl(&mut self, value: u32, mem: &GuestMemoryMmap) {
        let old_det = self.sctl & 0xf;
        self.sctl = value & 0xfff;
        match (old_det, value & 0xf) {
            (_, 1) => {
                // COMRESET asserted: the link goes down and the device resets.
                self.comreset = true;
                self.orphan_in_flight();
                self.ssts = 0;
                self.tfd = u32::from(status::BSY);
                if let Some(u) = self.unit.as_mut() {
                    u.device.reset();
                }
            }
            (1, _) if self.comreset => {
                self.comreset = false;
                self.link_up();
                if self.cmd & cmd::FRE != 0 {
                    self.send_signature(mem);
                }
            }
            _ => {}
        }
    }

    /// The device's first D2H FIS after a reset: its signature.
    fn send_signature(&mut self, mem: &GuestMemoryMmap) {
        self.signature_pending = false;
        let Some(u) = self.unit.as_ref() else {
            return;
        };
        let sig = u.device.signature();
        let c = u.device.reset_registers();
        self.tfd = u32::from(c.error) << 8 | u32::from(c.status);
        self.sig = sig;
        self.post(mem, fis::RX_D2H, &fis::d2h(&c, true));
        self.raise(irq::DHRS);
    }

    /// Writes a FIS into the received-FIS area, if FIS receive is enabled.
    fn post(&self, mem: &GuestMemoryMmap, offset: u64, fis: &[u8]) {
        if self.cmd & cmd::FRE == 0 {
            return;
        }
        if mem
            .write_slice(fis, GuestAddress(self.fb.wrapping_add(offset)))
            .is_err()
        {
            tracing::debug!("ahci: the received-FIS area is outside guest memory");
        }
    }

    /// Whether slots wait for the command engine to fetch them.
    pub fn has_work(&self) -> bool {
        self.cmd & cmd::ST != 0 && self.ci & !self.issued != 0
    }

    /// Issues every slot software has set in PxCI that is not running yet, lowest first.
    /// The slots started in this pass go to the host in one submission, which the caller
    /// makes through the returned handle once it has let go of the controller's lock.
    pub fn run(&mut self, mem: &GuestMemoryMmap) -> Option<DeferredSubmit> {
        if let Some(e) = self.engine_mut() {
            e.plug();
        }
        self.start_ready(mem);
        self.engine_mut()?.unplug_deferred()
    }

    fn start_ready(&mut self, mem: &GuestMemoryMmap) {
        while self.cmd & cmd::ST != 0 && !self.halted && !self.comreset && self.unit.is_some() {
            let ready = self.ci & !self.issued;
            if ready == 0 {
                break;
            }
            let slot = ready.trailing_zeros() as u8;
            self.cmd = (self.cmd & !cmd::CCS) | (u32::from(slot) << cmd::CCS_SHIFT);
            self.start(slot, mem);
        }
    }

    fn header_addr(&self, slot: u8) -> u64 {
        self.clb.wrapping_add(u64::from(slot) * HEADER_SIZE)
    }

    /// Host bus fatal error (AHCI 1.3.1, 6.1.2): the HBA could not fetch a structure.
    fn fatal(&mut self, bit: u32) {
        tracing::debug!("ahci: fatal port error {bit:#x}");
        self.tfd |= u32::from(status::ERR);
        self.halted = true;
        self.raise(bit);
    }

    fn start(&mut self, slot: u8, mem: &GuestMemoryMmap) {
        let bit = Self::bit(slot);
        let mut raw = [0u8; 16];
        if mem
            .read_slice(&mut raw, GuestAddress(self.header_addr(slot)))
            .is_err()
        {
            self.ci &= !bit;
            return self.fatal(irq::HBFS);
        }
        let header = CommandHeader::parse(&raw);
        let mut table = [0u8; ACMD_OFFSET + ACMD_LEN];
        if mem
            .read_slice(&mut table, GuestAddress(header.ctba))
            .is_err()
        {
            self.ci &= !bit;
            return self.fatal(irq::HBFS);
        }
        let mut cfis = [0u8; CFIS_LEN];
        cfis.copy_from_slice(&table[..CFIS_LEN]);
        let packet = &table[ACMD_OFFSET..ACMD_OFFSET + ACMD_LEN];
        match HostFis::parse(&cfis).filter(|_| header.cfl >= 5) {
            None => {
                // Not a FIS a host sends: interface fatal error.
                self.ci &= !bit;
                self.fatal(irq::IFS)
            }
            Some(HostFis::Control(control)) => self.device_control(slot, control, mem),
            Some(HostFis::Command(tf)) => {
                let Some(prdt) = sg::read_prdt(mem, header.ctba, header.prdtl) else {
                    self.ci &= !bit;
                    return self.fatal(irq::HBFS);
                };
                let Some(unit) = self.unit.as_mut() else {
                    return;
                };
                let protocol = unit.device.protocol(&tf);
                let result = {
                    let mut out = SgReader::new(mem, &prdt);
                    unit.device.execute(&tf, packet, &mut out)
                };
                match result {
                    AtaResult::Complete(c) => {
                        let moved = sg::write(mem, &prdt, &c.data_in);
                        self.finish(slot, protocol, &c, moved as u32, mem);
                    }
                    AtaResult::Io(io) => self.start_io(slot, protocol, io, &prdt, mem),
                }
            }
        }
    }

    /// A Device Control FIS: software reset asserted, then released.
    fn device_control(&mut self, slot: u8, control: u8, mem: &GuestMemoryMmap) {
        self.ci &= !Self::bit(slot);
        if control & fis::CONTROL_SRST != 0 {
            self.srst = true;
            self.orphan_in_flight();
            if let Some(u) = self.unit.as_mut() {
                u.device.reset();
            }
        } else if self.srst {
            self.srst = false;
            self.signature_pending = true;
            if self.cmd & cmd::FRE != 0 {
                self.send_signature(mem);
            }
        }
    }

    fn start_io(
        &mut self,
        slot: u8,
        protocol: Protocol,
        io: AtaIo,
        prdt: &Sg,
        mem: &GuestMemoryMmap,
    ) {
        let bit = Self::bit(slot);
        let ncq = protocol == Protocol::DmaQueued;
        let data = match io.kind {
            MediumIoKind::Read | MediumIoKind::Write => sg::take(prdt, io.len),
            _ => Some(Vec::new()),
        };
        if ncq {
            // The device accepts the queued command: a D2H FIS with BSY clear, and the HBA
            // clears the slot's PxCI bit; PxSACT stays set until the SDB FIS.
            let accept = AtaCompletion {
                status: status::DRDY | status::DSC,
                error: 0,
                count: 0,
                lba: 0,
                device: 0,
                data_in: Vec::new(),
            };
            self.post(mem, fis::RX_D2H, &fis::d2h(&accept, false));
            self.tfd = u32::from(accept.status);
            self.ci &= !bit;
        } else {
            self.issued |= bit;
            self.tfd = u32::from(status::BSY | status::DRDY);
        }
        let Some(data) = data else {
            // The PRDT describes less than the command transfers.
            return self.io_finished(slot, ncq, &io, Err(IoFailure::Other), mem);
        };
        let queued = matches!(
            io.kind,
            MediumIoKind::Read | MediumIoKind::Write | MediumIoKind::Flush
        );
        let Some(unit) = self.unit.as_mut() else {
            return;
        };
        if let (true, Some(engine)) = (queued, unit.engine.as_mut()) {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            let req = match io.kind {
                MediumIoKind::Read => Request::read(io.offset, data, id),
                MediumIoKind::Write => Request::write(io.offset, data, id),
                _ => Request::flush(id),
            };
            match engine.submit(req) {
                Ok(()) => {
                    self.in_flight.insert(
                        id,
                        InFlight {
                            slot,
                            io,
                            ncq,
                            flushing: false,
                            generation: self.generation,
                        },
                    );
                }
                Err(e) => {
                    if !matches!(e, IoError::BadGuestMemory { .. }) {
                        tracing::debug!("ahci: the I/O engine refused a request: {e}");
                    }
                    self.io_finished(slot, ncq, &io, Err(IoFailure::Other), mem);
                }
            }
            return;
        }
        let result = match &unit.medium {
            Some(disk) => sg::perform(disk, &io, &data, mem),
            None => Err(IoFailure::Other),
        };
        self.io_finished(slot, ncq, &io, result, mem);
    }

    /// Collects the engine's finished transfers and answers their commands.
    /// Commands on the engine, orphaned ones included.
    pub fn in_flight_count(&self) -> usize {
        self.in_flight.len()
    }

    pub fn reap(&mut self, mem: &GuestMemoryMmap) {
        let Some(engine) = self.engine_mut() else {
            return;
        };
        let done: Vec<_> = engine.completions().collect();
        for c in done {
            let Some(mut f) = self.in_flight.remove(&c.user_data) else {
                continue;
            };
            if f.generation != self.generation {
                continue;
            }
            let result = c
                .result
                .as_ref()
                .map(|_| ())
                .map_err(IoFailure::from_engine);
            if result.is_ok() && f.io.fua && !f.flushing {
                f.flushing = true;
                if let Some(engine) = self.engine_mut() {
                    if engine.submit(Request::flush(c.user_data)).is_ok() {
                        self.in_flight.insert(c.user_data, f);
                        continue;
                    }
                }
            }
            self.io_finished(f.slot, f.ncq, &f.io, result, mem);
        }
    }

    fn io_finished(
        &mut self,
        slot: u8,
        ncq: bool,
        io: &AtaIo,
        result: Result<(), IoFailure>,
        mem: &GuestMemoryMmap,
    ) {
        let Some(unit) = self.unit.as_mut() else {
            return;
        };
        let ok = result.is_ok();
        let c = unit.device.io_done(io, result);
        if ncq {
            return self.ncq_finished(slot, &c, mem);
        }
        let moved = match io.kind {
            MediumIoKind::Read | MediumIoKind::Write if ok => io.len as u32,
            _ => 0,
        };
        self.finish(slot, Protocol::Dma, &c, moved, mem);
    }

    /// A queued command is done: a Set Device Bits FIS completes its tag, or reports the
    /// error that stops the queue (software then reads the NCQ error log).
    fn ncq_finished(&mut self, slot: u8, c: &AtaCompletion, mem: &GuestMemoryMmap) {
        let bit = Self::bit(slot);
        if c.status & status::ERR == 0 {
            self.sact &= !bit;
            self.post(
                mem,
                fis::RX_SDB,
                &fis::set_device_bits(c.status, c.error, bit),
            );
            self.tfd = (self.tfd & !0x77) | u32::from(c.status & 0x77);
            self.raise(irq::SDBS);
        } else {
            self.post(
                mem,
                fis::RX_SDB,
                &fis::set_device_bits(c.status, c.error, 0),
            );
            self.tfd = u32::from(c.error) << 8 | u32::from(c.status);
            self.halted = true;
            self.raise(irq::SDBS | irq::TFES);
        }
    }

    /// A non-queued command is done: the byte count, the PIO Setup FIS for PIO data, the
    /// D2H FIS with the result, the slot's PxCI bit cleared.
    fn finish(
        &mut self,
        slot: u8,
        protocol: Protocol,
        c: &AtaCompletion,
        moved: u32,
        mem: &GuestMemoryMmap,
    ) {
        let bit = Self::bit(slot);
        let prdbc = self.header_addr(slot).wrapping_add(4);
        if mem.write_obj(moved, GuestAddress(prdbc)).is_err() {
            tracing::debug!("ahci: the command header is outside guest memory");
        }
        let pio = matches!(
            protocol,
            Protocol::PioIn | Protocol::PioOut | Protocol::Packet { dma: false }
        );
        let mut bits = irq::DHRS;
        if pio {
            let to_host = protocol == Protocol::PioIn || !c.data_in.is_empty();
            self.post(
                mem,
                fis::RX_PIO_SETUP,
                &fis::pio_setup(c, to_host, moved.min(0xffff) as u16),
            );
            bits |= irq::PSS;
        }
        self.post(mem, fis::RX_D2H, &fis::d2h(c, true));
        self.tfd = u32::from(c.error) << 8 | u32::from(c.status);
        self.ci &= !bit;
        self.issued &= !bit;
        if c.status & status::ERR != 0 {
            // AHCI 1.3.1, 6.1.1: a task-file error stops the port until software restarts it.
            self.halted = true;
            bits |= irq::TFES;
        }
        self.raise(bits);
    }

    /// Hot-plug: a device appears on the port (AHCI 1.3.1, 10.10).
    pub fn plug(&mut self, unit: Unit, mem: &GuestMemoryMmap) {
        self.unit = Some(unit);
        self.link_up();
        self.serr |= SERR_DIAG_N | SERR_DIAG_X;
        self.raised |= irq::PCS | irq::PRCS;
        if self.cmd & cmd::FRE != 0 {
            self.send_signature(mem);
        }
    }

    /// Hot-unplug: the device goes; its commands are forgotten.
    pub fn unplug(&mut self) -> Option<Unit> {
        let u = self.unit.take()?;
        self.in_flight.clear();
        self.orphan_in_flight();
        self.link_up();
        self.serr |= SERR_DIAG_N | SERR_DIAG_X;
        self.raised |= irq::PCS | irq::PRCS;
        Some(u)
    }

    fn engine_mut(&mut self) -> Option<&mut IoEngine> {
        self.unit.as_mut()?.engine.as_mut()
    }

    pub fn engine_event(&self) -> Option<&vmm_sys_util::eventfd::EventFd> {
        self.unit.as_ref()?.engine.as_ref().map(|e| e.eventfd())
    }
}
