//! The HBA driven the way Linux's ahci driver drives it: ports started, commands built in
//! guest memory, PxCI written, FISes and interrupts checked; data over a raw image file.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_storage::io::{EngineOptions, IoEngine};
use ferry_storage::Disk;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::port::{irq, reg};
use super::*;
use crate::ata::{AtaDevice, AtaDiskParams, AtapiParams};
use crate::interrupt::testing::{Line, Msis};

const CLB: u64 = 0x10000;
const FB: u64 = 0x18000;
const CT: u64 = 0x20000;
const DATA: u64 = 0x100000;
const DISK_SIZE: u64 = 4 << 20;

struct Image(PathBuf);
impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn image(name: &str) -> (Image, Arc<Disk>) {
    let p = std::env::temp_dir().join(format!("ferry-ahci-{}-{name}.raw", std::process::id()));
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(DISK_SIZE).unwrap();
    let disk = Disk::open(&p, true, &[]).unwrap();
    (Image(p), Arc::new(disk))
}

fn disk_device(discard: bool) -> AtaDevice {
    AtaDevice::disk(AtaDiskParams {
        size_bytes: DISK_SIZE,
        nonrotational: true,
        discard,
        read_only: false,
        model: "FERRY HARDDISK".into(),
        serial: "S0".into(),
        firmware: "1.0".into(),
        ncq: true,
    })
}

struct Tb {
    dev: Ahci,
    mem: GuestMemoryMmap,
    line: Arc<Line>,
    msis: Arc<Msis>,
}

fn port_reg(port: usize, r: u64) -> u64 {
    0x100 + port as u64 * 0x80 + r
}

/// A command FIS (Register H2D) with the C bit set.
fn h2d(command: u8, features: u16, count: u16, lba: u64, device: u8) -> [u8; 20] {
    let mut f = [0u8; 20];
    f[0] = 0x27;
    f[1] = 0x80;
    f[2] = command;
    f[3] = features as u8;
    f[4] = lba as u8;
    f[5] = (lba >> 8) as u8;
    f[6] = (lba >> 16) as u8;
    f[7] = device;
    f[8] = (lba >> 24) as u8;
    f[9] = (lba >> 32) as u8;
    f[10] = (lba >> 40) as u8;
    f[11] = (features >> 8) as u8;
    f[12] = count as u8;
    f[13] = (count >> 8) as u8;
    f
}

impl Tb {
    fn new(ports: usize) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let line = Arc::new(Line::default());
        let msis = Arc::new(Msis::default());
        let dev = Ahci::new(AhciParams {
            memory: mem.clone(),
            msi: msis.clone(),
            intx: line.clone(),
            intx_line: 11,
            ports,
        })
        .unwrap();
        Self {
            dev,
            mem,
            line,
            msis,
        }
    }

    fn with_disk(name: &str, engine: bool) -> (Image, Self) {
        Self::with_engine(name, engine.then(EngineOptions::default))
    }

    /// A disk on port 1, its data through an I/O engine with `opts` (None: inline).
    fn with_engine(name: &str, opts: Option<EngineOptions>) -> (Image, Self) {
        let (img, disk) = image(name);
        let mut tb = Self::new(4);
        let engine = opts.map(|o| IoEngine::new(disk.clone(), tb.mem.clone(), o).unwrap());
        tb.dev
            .attach(
                1,
                Unit {
                    device: disk_device(true),
                    medium: Some(disk),
                    engine,
                },
            )
            .unwrap();
        (img, tb)
    }

    fn w(&mut self, off: u64, v: u32) {
        self.dev.bar_write(5, off, &v.to_le_bytes());
    }

    /// A register read through the device; every register in the mirror must read the
    /// same, since the guest reads them there where the hypervisor maps it.
    fn r(&mut self, off: u64) -> u32 {
        self.assert_mirror();
        let mut b = [0u8; 4];
        self.dev.bar_read(5, off, &mut b);
        u32::from_le_bytes(b)
    }

    fn assert_mirror(&mut self) {
        for at in (0..ABAR_SIZE).step_by(4) {
            let mut b = [0u8; 4];
            self.dev.bar_read(5, at, &mut b);
            assert_eq!(
                self.dev.mirror.load(at),
                u32::from_le_bytes(b),
                "the mirror of register {at:#x} lags"
            );
        }
    }

    fn pr(&mut self, port: usize, r: u64) -> u32 {
        self.r(port_reg(port, r))
    }

    fn pw(&mut self, port: usize, r: u64, v: u32) {
        self.w(port_reg(port, r), v)
    }

    /// What ahci_port_start and ahci_start_engine do.
    fn start(&mut self, port: usize) {
        self.w(0x04, 1 << 31 | 1 << 1);
        self.pw(port, reg::CLB, CLB as u32);
        self.pw(port, reg::CLBU, 0);
        self.pw(port, reg::FB, FB as u32);
        self.pw(port, reg::FBU, 0);
        self.pw(port, reg::SERR, u32::MAX);
        self.pw(port, reg::IE, u32::MAX);
        self.pw(port, reg::CMD, 1 << 4);
        self.pw(port, reg::IS, u32::MAX);
        self.w(0x08, u32::MAX);
        self.pw(port, reg::CMD, 1 << 4 | 1);
    }

    /// Builds slot `slot`'s header and table and issues it; `prd` is (address, bytes).
    fn issue(
        &mut self,
        port: usize,
        slot: u8,
        fis: [u8; 20],
        acmd: Option<&[u8]>,
        prd: &[(u64, u32)],
        write: bool,
    ) {
        let ct = CT + u64::from(slot) * 0x1000;
        let mut dw0 = 5u32 | (prd.len() as u32) << 16;
        if write {
            dw0 |= 1 << 6;
        }
        if acmd.is_some() {
            dw0 |= 1 << 5;
        }
        let h = CLB + u64::from(slot) * 32;
        self.mem.write_obj(dw0, GuestAddress(h)).unwrap();
        self.mem
            .write_obj(0xdead_beefu32, GuestAddress(h + 4))
            .unwrap();
        self.mem.write_obj(ct, GuestAddress(h + 8)).unwrap();
        self.mem
            .write_slice(&[0u8; 0x80], GuestAddress(ct))
            .unwrap();
        self.mem.write_slice(&fis, GuestAddress(ct)).unwrap();
        if let Some(a) = acmd {
            self.mem.write_slice(a, GuestAddress(ct + 0x40)).unwrap();
        }
        for (i, &(addr, len)) in prd.iter().enumerate() {
            let e = ct + 0x80 + i as u64 * 16;
            self.mem.write_obj(addr, GuestAddress(e)).unwrap();
            self.mem.write_obj(len - 1, GuestAddress(e + 12)).unwrap();
        }
        if fis[2] == 0x60 || fis[2] == 0x61 {
            self.pw(port, reg::SACT, 1 << slot);
        }
        self.pw(port, reg::CI, 1 << slot);
        // The event loop's part: the kick fired, the HBA fetches the command.
        self.dev
            .run_ports()
            .into_iter()
            .for_each(DeferredSubmit::submit);
    }

    fn prdbc(&self, slot: u8) -> u32 {
        self.mem
            .read_obj(GuestAddress(CLB + u64::from(slot) * 32 + 4))
            .unwrap()
    }

    fn rx(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(FB + offset))
            .unwrap();
        v
    }

    /// Runs the event loop's part until every issued and queued slot of `port` is done.
    fn wait(&mut self, port: usize) {
        let t = Instant::now();
        while self.pr(port, reg::CI) | self.pr(port, reg::SACT) != 0 {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "commands never finished"
            );
            std::thread::sleep(Duration::from_millis(1));
            self.dev.io_event(port);
            self.dev
                .run_ports()
                .into_iter()
                .for_each(DeferredSubmit::submit);
        }
    }

    fn data(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

#[test]
fn identity_and_port_presence() {
    let (_img, mut tb) = Tb::with_disk("ident", false);
    assert_eq!(tb.dev.config_read(0), 0x2829_8086);
    assert_eq!(tb.dev.config_read(2) >> 8, 0x01_0601);
    assert_eq!(tb.dev.declared_bars(), vec![(5, BarKind::Memory32, 0x1000)]);
    let cap = tb.r(0x00);
    assert_eq!(cap & 0x1f, 3, "four ports");
    assert_eq!((cap >> 8) & 0x1f, 31, "32 slots");
    assert_ne!(cap & (1 << 30), 0, "NCQ");
    assert_eq!(tb.r(0x0c), 0xf);
    assert_eq!(tb.r(0x04) >> 31, 1, "AHCI enabled");
    assert_eq!(tb.pr(1, reg::SSTS), 0x123);
    assert_eq!(tb.pr(1, reg::SIG), 0x0000_0101);
    assert_eq!(tb.pr(0, reg::SSTS), 0);
    assert_eq!(tb.pr(0, reg::TFD), 0x7f);
    // The signature FIS arrives once FIS receive is on.
    tb.start(1);
    assert_eq!(tb.rx(0x40, 1)[0], 0x34);
    assert_eq!(tb.pr(1, reg::TFD) & 0xff, 0x50);
    assert_ne!(tb.pr(1, reg::CMD) & (1 << 15), 0, "CR with ST");
    assert_ne!(tb.pr(1, reg::CMD) & (1 << 14), 0, "FR with FRE");
}

/// Writing PxCI only records the slot and kicks the event loop; the command runs there.
#[test]
fn issuing_kicks_the_event_loop_which_runs_the_command() {
    let (_img, mut tb) = Tb::with_disk("kick", false);
    tb.start(1);
    let kick = tb.dev.kick_event();
    assert!(kick.read().is_err(), "nothing issued yet");
    let h = CLB;
    tb.mem.write_obj(5u32 | 1 << 16, GuestAddress(h)).unwrap();
    tb.mem.write_obj(CT, GuestAddress(h + 8)).unwrap();
    tb.mem
        .write_slice(&h2d(0xec, 0, 0, 0, 0), GuestAddress(CT))
        .unwrap();
    tb.mem.write_obj(DATA, GuestAddress(CT + 0x80)).unwrap();
    tb.mem.write_obj(511u32, GuestAddress(CT + 0x8c)).unwrap();
    tb.pw(1, reg::CI, 1);
    assert_eq!(tb.pr(1, reg::CI), 1, "not run on the vCPU's write");
    assert_eq!(kick.read().unwrap(), 1);
    tb.dev
        .run_ports()
        .into_iter()
        .for_each(DeferredSubmit::submit);
    assert_eq!(tb.pr(1, reg::CI), 0);
    assert_eq!(tb.prdbc(0), 512);
}

#[test]
fn identify_through_pio_data_in() {
    let (_img, mut tb) = Tb::with_disk("identify", false);
    tb.start(1);
    tb.pw(1, reg::IS, u32::MAX);
    tb.w(0x08, u32::MAX);
    tb.line.0.store(false, Ordering::SeqCst);
    tb.issue(1, 0, h2d(0xec, 0, 0, 0, 0), None, &[(DATA, 512)], false);
    assert_eq!(tb.pr(1, reg::CI), 0);
    assert_eq!(tb.prdbc(0), 512);
    let pio = tb.rx(0x20, 20);
    assert_eq!(pio[0], 0x5f);
    assert_eq!(pio[15], 0x50, "E_Status is the result Linux reads");
    let id = tb.data(DATA, 512);
    // Model at words 27..47, byte-swapped.
    assert_eq!(&id[54..62], b"EFRR YAH");
    assert_ne!(tb.pr(1, reg::IS) & (irq::DHRS | irq::PSS), 0);
    assert_eq!(tb.r(0x08), 1 << 1);
    assert!(tb.line.0.load(Ordering::SeqCst), "INTx asserted");
    tb.pw(1, reg::IS, u32::MAX);
    tb.w(0x08, u32::MAX);
    assert!(!tb.line.0.load(Ordering::SeqCst), "INTx released");
}

fn write_read_roundtrip(tb: &mut Tb, img: &Image) {
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    tb.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    // WRITE DMA EXT: 16 sectors at LBA 100 from two PRD entries.
    tb.issue(
        1,
        3,
        h2d(0x35, 0, 16, 100, 0x40),
        None,
        &[(DATA, 4096), (DATA + 4096, 4096)],
        true,
    );
    tb.wait(1);
    assert_eq!(tb.prdbc(3), 8192);
    assert_eq!(tb.pr(1, reg::TFD) & 0xff, 0x50);
    let on_disk = std::fs::read(&img.0).unwrap();
    assert_eq!(&on_disk[51200..51200 + 8192], &data[..]);
    // READ DMA EXT back into another buffer.
    tb.issue(
        1,
        4,
        h2d(0x25, 0, 16, 100, 0x40),
        None,
        &[(DATA + 0x10000, 8192)],
        false,
    );
    tb.wait(1);
    assert_eq!(tb.data(DATA + 0x10000, 8192), data);
    assert_eq!(tb.rx(0x40, 3), vec![0x34, 0x40, 0x50]);
}

#[test]
fn dma_write_and_read_inline() {
    let (img, mut tb) = Tb::with_disk("inline", false);
    tb.start(1);
    write_read_roundtrip(&mut tb, &img);
}

#[test]
fn dma_write_and_read_through_the_io_engine() {
    let (img, mut tb) = Tb::with_disk("engine", true);
    tb.start(1);
    write_read_roundtrip(&mut tb, &img);
}

/// Stopping the port (PxCMD.ST cleared) orphans its commands; one still held by a bandwidth
/// group is taken back from the engine and never reaches the disk, and PxCMD.CR drops as
/// soon as the engine has handed it back.
#[test]
fn a_stopped_port_drops_commands_that_never_started() {
    use ferry_storage::io::{BandwidthGroup, BandwidthGroupSpec};
    // One request a second: after the first, the next waits about a second in the engine.
    let group = Arc::new(BandwidthGroup::new(&BandwidthGroupSpec {
        name: "slow".into(),
        limit: 0,
        iops: 1,
    }));
    let opts = EngineOptions {
        bwgroup: Some(group),
        ..Default::default()
    };
    let (img, mut tb) = Tb::with_engine("held", Some(opts));
    tb.start(1);
    for slot in 0..2u8 {
        let buf = DATA + u64::from(slot) * 4096;
        tb.mem
            .write_slice(&[0x5a + slot; 4096], GuestAddress(buf))
            .unwrap();
        // WRITE FPDMA QUEUED, 8 sectors at LBA slot * 8.
        tb.issue(
            1,
            slot,
            h2d(0x61, 8, u16::from(slot) << 3, u64::from(slot) * 8, 0x40),
            None,
            &[(buf, 4096)],
            true,
        );
    }
    // Software gives up on both (as libata's error handler does) and stops the port.
    tb.pw(1, reg::CMD, 1 << 4);
    assert_eq!(tb.pr(1, reg::SACT), 0);
    let t = Instant::now();
    while tb.pr(1, reg::CMD) & (1 << 15) != 0 {
        assert!(t.elapsed() < Duration::from_millis(500), "CR stayed set");
        std::thread::sleep(Duration::from_millis(1));
        tb.dev.io_event(1);
    }
    // The first was on the host already and landed; the second never started.
    std::thread::sleep(Duration::from_millis(1200));
    let on_disk = std::fs::read(&img.0).unwrap();
    assert!(on_disk[..4096].iter().all(|&b| b == 0x5a));
    assert!(
        on_disk[4096..8192].iter().all(|&b| b == 0),
        "the held write landed after the port stopped"
    );
}

#[test]
fn ncq_commands_complete_with_set_device_bits() {
    let (img, mut tb) = Tb::with_disk("ncq", true);
    tb.start(1);
    // Enable MSI: completions then come as messages.
    let cap = 0x40 + 8; // after the 8-byte PM capability
    assert_eq!(tb.dev.config_read(cap / 4) & 0xff, 0x05);
    tb.dev
        .config_write(cap / 4 + 1, 0, &0xfee0_0000u32.to_le_bytes());
    tb.dev.config_write(cap / 4 + 3, 0, &0x41u32.to_le_bytes());
    tb.dev.config_write(cap / 4, 2, &1u16.to_le_bytes());
    let mut expect = vec![0u8; 0];
    for slot in 0..8u8 {
        let block: Vec<u8> = vec![slot + 1; 4096];
        let buf = DATA + u64::from(slot) * 4096;
        tb.mem.write_slice(&block, GuestAddress(buf)).unwrap();
        expect.extend_from_slice(&block);
        // WRITE FPDMA QUEUED: 8 sectors in FEATURES, tag in COUNT bits 3..8.
        tb.issue(
            1,
            slot,
            h2d(0x61, 8, u16::from(slot) << 3, u64::from(slot) * 8, 0x40),
            None,
            &[(buf, 4096)],
            true,
        );
    }
    assert_eq!(tb.pr(1, reg::CI), 0, "queued commands leave PxCI at once");
    tb.wait(1);
    assert_eq!(tb.rx(0x58, 2), vec![0xa1, 0x40]);
    assert_ne!(tb.pr(1, reg::IS) & irq::SDBS, 0);
    assert!(!tb.msis.0.lock().unwrap().is_empty(), "MSI sent");
    assert!(!tb.line.0.load(Ordering::SeqCst), "no INTx with MSI");
    let on_disk = std::fs::read(&img.0).unwrap();
    assert_eq!(&on_disk[..8 * 4096], &expect[..]);
    // READ FPDMA QUEUED of all eight in one command.
    tb.issue(
        1,
        9,
        h2d(0x60, 64, 9 << 3, 0, 0x40),
        None,
        &[(DATA + 0x100000, 32768)],
        false,
    );
    tb.wait(1);
    assert_eq!(tb.data(DATA + 0x100000, 32768), expect);
}

#[test]
fn a_task_file_error_stops_the_port_until_it_restarts() {
    let (_img, mut tb) = Tb::with_disk("tfe", true);
    tb.start(1);
    // READ DMA EXT past the end of the disk: IDNF.
    tb.issue(
        1,
        0,
        h2d(0x25, 0, 8, DISK_SIZE / 512, 0x40),
        None,
        &[(DATA, 4096)],
        false,
    );
    tb.wait(1);
    let tfd = tb.pr(1, reg::TFD);
    assert_eq!(tfd & 0x01, 1, "ERR");
    assert_eq!((tfd >> 8) & 0x10, 0x10, "IDNF");
    assert_ne!(tb.pr(1, reg::IS) & irq::TFES, 0);
    // Halted: a new command is not run.
    tb.issue(1, 1, h2d(0xe7, 0, 0, 0, 0x40), None, &[], false);
    assert_eq!(tb.pr(1, reg::CI), 2);
    // ahci_stop_engine / ahci_start_engine, as libata's error handler does.
    tb.pw(1, reg::CMD, 1 << 4);
    assert_eq!(tb.pr(1, reg::CI), 0);
    tb.pw(1, reg::CMD, 1 << 4 | 1);
    tb.issue(1, 1, h2d(0xe7, 0, 0, 0, 0x40), None, &[], false);
    tb.wait(1);
    assert_eq!(tb.pr(1, reg::TFD) & 0xff, 0x50);
}

#[test]
fn structures_outside_guest_memory_are_host_bus_errors() {
    let (_img, mut tb) = Tb::with_disk("hbfs", false);
    tb.start(1);
    // PRD pointing past guest memory on a read: the data cannot land; the command fails.
    tb.issue(
        1,
        0,
        h2d(0x25, 0, 1, 0, 0x40),
        None,
        &[(1 << 40, 512)],
        false,
    );
    assert_eq!(tb.pr(1, reg::CI), 0);
    assert_ne!(tb.pr(1, reg::TFD) & 1, 0);
    tb.pw(1, reg::CMD, 1 << 4);
    tb.pw(1, reg::CMD, 1 << 4 | 1);
    // A command table outside guest memory.
    let h = CLB + 2 * 32;
    tb.mem.write_obj(5u32, GuestAddress(h)).unwrap();
    tb.mem.write_obj(1u64 << 40, GuestAddress(h + 8)).unwrap();
    tb.pw(1, reg::CI, 1 << 2);
    tb.dev
        .run_ports()
        .into_iter()
        .for_each(DeferredSubmit::submit);
    assert_ne!(tb.pr(1, reg::IS) & irq::HBFS, 0);
    assert_eq!(tb.pr(1, reg::CI), 0);
    // A command list outside guest memory.
    tb.pw(1, reg::CMD, 1 << 4);
    tb.pw(1, reg::CLB, 0xffff_fc00);
    tb.pw(1, reg::CLBU, 0xffff);
    tb.pw(1, reg::CMD, 1 << 4 | 1);
    tb.pw(1, reg::CI, 1);
    tb.dev
        .run_ports()
        .into_iter()
        .for_each(DeferredSubmit::submit);
    assert_eq!(tb.pr(1, reg::CI), 0);
}

#[test]
fn a_fis_that_is_not_register_h2d_is_an_interface_error() {
    let (_img, mut tb) = Tb::with_disk("ifs", false);
    tb.start(1);
    let mut f = h2d(0xec, 0, 0, 0, 0);
    f[0] = 0x46;
    tb.issue(1, 0, f, None, &[(DATA, 512)], false);
    assert_ne!(tb.pr(1, reg::IS) & irq::IFS, 0);
    assert_eq!(tb.pr(1, reg::CI), 0);
}

#[test]
fn comreset_and_software_reset_send_the_signature() {
    let (_img, mut tb) = Tb::with_disk("reset", false);
    tb.start(1);
    tb.pw(1, reg::CMD, 1 << 4);
    // libata's ahci_hardreset puts a BSY FIS in the area, then COMRESET.
    tb.mem
        .write_slice(&[0x34, 0, 0x80], GuestAddress(FB + 0x40))
        .unwrap();
    tb.pw(1, reg::SCTL, 0x301);
    assert_eq!(tb.pr(1, reg::SSTS) & 0xf, 0);
    tb.pw(1, reg::SCTL, 0x300);
    assert_eq!(tb.pr(1, reg::SSTS), 0x123);
    assert_eq!(tb.rx(0x40, 3), vec![0x34, 0x40, 0x50]);
    assert_eq!(tb.pr(1, reg::SIG), 0x101);
    // Software reset: SRST set then cleared through Device Control FISes.
    tb.pw(1, reg::CMD, 1 << 4 | 1);
    tb.mem
        .write_slice(&[0u8; 20], GuestAddress(FB + 0x40))
        .unwrap();
    let mut ctl = [0u8; 20];
    ctl[0] = 0x27;
    ctl[15] = 0x04;
    tb.issue(1, 0, ctl, None, &[], false);
    assert_eq!(tb.pr(1, reg::CI), 0);
    ctl[15] = 0;
    tb.issue(1, 0, ctl, None, &[], false);
    assert_eq!(tb.rx(0x40, 1)[0], 0x34);
    assert_eq!(tb.rx(0x40 + 12, 1)[0], 1, "count 1 of the signature");
}

#[test]
fn hba_reset_clears_ports() {
    let (_img, mut tb) = Tb::with_disk("hr", false);
    tb.start(1);
    tb.w(0x04, 1);
    assert_eq!(tb.r(0x04), 1 << 31, "HR self-clears, IE off");
    assert_eq!(tb.pr(1, reg::CMD) & 1, 0);
    assert_eq!(tb.pr(1, reg::IE), 0);
    assert_eq!(tb.pr(1, reg::SSTS), 0x123);
}

#[test]
fn hot_unplug_and_plug_back() {
    let (img, mut tb) = Tb::with_disk("hotplug", true);
    tb.start(1);
    tb.pw(1, reg::IS, u32::MAX);
    tb.w(0x08, u32::MAX);
    let unit = tb.dev.unplug(1).unwrap();
    assert_eq!(tb.pr(1, reg::SSTS), 0);
    assert_ne!(tb.pr(1, reg::IS) & (irq::PCS | irq::PRCS), 0);
    assert!(tb.line.0.load(Ordering::SeqCst));
    assert!(tb.dev.io_events().is_empty());
    assert!(tb.dev.unplug(1).is_err());
    // libata clears SError and the interrupt.
    tb.pw(1, reg::SERR, u32::MAX);
    tb.pw(1, reg::IS, u32::MAX);
    tb.w(0x08, u32::MAX);
    assert!(!tb.line.0.load(Ordering::SeqCst));
    tb.dev.plug(1, unit).unwrap();
    assert_eq!(tb.pr(1, reg::SSTS), 0x123);
    assert_ne!(tb.pr(1, reg::IS) & irq::PCS, 0);
    assert_eq!(tb.dev.io_events().len(), 1);
    tb.pw(1, reg::SERR, u32::MAX);
    tb.pw(1, reg::IS, u32::MAX);
    tb.pw(1, reg::CMD, 1 << 4);
    tb.pw(1, reg::CMD, 1 << 4 | 1);
    write_read_roundtrip(&mut tb, &img);
}

#[test]
fn atapi_packet_commands_reach_the_cd_unit() {
    let mut tb = Tb::new(2);
    let (_img, disk) = image("atapi");
    let mut device = AtaDevice::atapi(AtapiParams {
        model: "FERRY DVD-ROM".into(),
        serial: "C0".into(),
        firmware: "1.0".into(),
    });
    device.as_atapi_mut().unwrap().insert(DISK_SIZE);
    tb.dev
        .attach(
            0,
            Unit {
                device,
                medium: Some(disk),
                engine: None,
            },
        )
        .unwrap();
    assert_eq!(tb.pr(0, reg::SIG), 0xeb14_0101);
    tb.start(0);
    // INQUIRY through PACKET with PIO.
    let inquiry = [0x12u8, 0, 0, 0, 36, 0, 0, 0, 0, 0, 0, 0];
    tb.issue(
        0,
        0,
        h2d(0xa0, 0, 0, 0xffff00, 0),
        Some(&inquiry),
        &[(DATA, 36)],
        false,
    );
    assert_eq!(tb.prdbc(0), 36);
    assert_eq!(tb.data(DATA, 1)[0], 0x05, "a CD/DVD device");
    // The POWER ON unit attention on TEST UNIT READY: check condition, sense key 6.
    tb.pw(0, reg::IS, u32::MAX);
    tb.issue(0, 1, h2d(0xa0, 0, 0, 0, 0), Some(&[0u8; 12]), &[], false);
    assert_eq!(tb.pr(0, reg::TFD) & 0xff, 0x51);
    assert_eq!(tb.pr(0, reg::TFD) >> 12, 6);
    tb.pw(0, reg::CMD, 1 << 4);
    tb.pw(0, reg::CMD, 1 << 4 | 1);
    // READ(10) of one 2048-byte block with DMA.
    let read = [0x28u8, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0];
    tb.issue(
        0,
        2,
        h2d(0xa0, 1, 0, 0, 0),
        Some(&read),
        &[(DATA, 2048)],
        false,
    );
    assert_eq!(tb.pr(0, reg::TFD) & 0xff & 1, 0);
    assert_eq!(tb.prdbc(2), 2048);
}

/// Random register writes and random command lists: the HBA never panics and never
/// writes outside guest memory (vm-memory would refuse it).
#[test]
fn hostile_registers_and_command_tables() {
    let (_img, mut tb) = Tb::with_disk("fuzz", true);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..3000 {
        let r = next();
        match r % 5 {
            0 => {
                let off = (next() % 0x1000) & !3;
                tb.w(off, next() as u32);
            }
            1 => {
                let mut junk = [0u8; 256];
                junk.iter_mut().for_each(|b| *b = next() as u8);
                let at = CLB + (next() % 0x4000);
                tb.mem.write_slice(&junk, GuestAddress(at)).unwrap();
            }
            2 => {
                let slot = (next() % 32) as u8;
                let mut f = h2d(
                    next() as u8,
                    next() as u16,
                    next() as u16,
                    next(),
                    next() as u8,
                );
                if next() % 4 == 0 {
                    f[2] = [0x25, 0x35, 0x60, 0x61, 0x06, 0xa0, 0xec][(next() % 7) as usize];
                }
                let prd = [(next() % (32 << 20), (next() % 70000) as u32 + 1)];
                tb.start(1);
                tb.issue(1, slot, f, Some(&[next() as u8; 16]), &prd, next() % 2 == 0);
            }
            3 => {
                tb.dev.io_event(1);
                tb.dev
                    .run_ports()
                    .into_iter()
                    .for_each(DeferredSubmit::submit);
            }
            _ => {
                let mut b = [0u8; 8];
                tb.dev
                    .bar_read(5, next() % 0x1000, &mut b[..(1 + round % 8)]);
            }
        }
    }
}

/// A PRDT shorter than the command's transfer, and a slot issued again while it runs: the
/// command fails with ABRT, and the second issue changes nothing.
#[test]
fn short_prdt_and_a_slot_issued_twice() {
    let (_img, mut tb) = Tb::with_disk("short", true);
    tb.start(1);
    // READ DMA EXT of 8 sectors into 512 bytes of PRDT.
    tb.issue(1, 0, h2d(0x25, 0, 8, 0, 0x40), None, &[(DATA, 512)], false);
    tb.wait(1);
    assert_eq!(tb.pr(1, reg::TFD) & 0xff, 0x51);
    assert_eq!((tb.pr(1, reg::TFD) >> 8) & 0x04, 0x04, "ABRT");
    assert_eq!(tb.prdbc(0), 0);
    tb.pw(1, reg::CMD, 1 << 4);
    tb.pw(1, reg::CMD, 1 << 4 | 1);
    // No PRDT at all for a data command.
    tb.issue(1, 1, h2d(0x25, 0, 1, 0, 0x40), None, &[], false);
    tb.wait(1);
    assert_eq!(tb.pr(1, reg::TFD) & 0xff, 0x51);
    tb.pw(1, reg::CMD, 1 << 4);
    tb.pw(1, reg::CMD, 1 << 4 | 1);
    // Slot 2 issued, then issued again before the event loop ran: one command.
    tb.issue(1, 2, h2d(0x25, 0, 8, 0, 0x40), None, &[(DATA, 4096)], false);
    tb.pw(1, reg::CI, 1 << 2);
    tb.dev
        .run_ports()
        .into_iter()
        .for_each(DeferredSubmit::submit);
    tb.wait(1);
    assert_eq!(tb.pr(1, reg::TFD) & 0xff, 0x50);
    assert_eq!(tb.prdbc(2), 4096);
}

/// The host changes the DVD: the next packet command reports MEDIUM CHANGED, and reads come
/// from the new medium.
#[test]
fn medium_change_on_an_atapi_port() {
    let mut tb = Tb::new(1);
    let device = AtaDevice::atapi(AtapiParams {
        model: "FERRY DVD-ROM".into(),
        serial: "C0".into(),
        firmware: "1.0".into(),
    });
    tb.dev
        .attach(
            0,
            Unit {
                device,
                medium: None,
                engine: None,
            },
        )
        .unwrap();
    tb.start(0);
    let tur = [0u8; 12];
    // POWER ON unit attention first, then NOT READY (no medium).
    tb.issue(0, 0, h2d(0xa0, 0, 0, 0, 0), Some(&tur), &[], false);
    tb.pw(0, reg::CMD, 1 << 4);
    tb.pw(0, reg::CMD, 1 << 4 | 1);
    tb.issue(0, 0, h2d(0xa0, 0, 0, 0, 0), Some(&tur), &[], false);
    assert_eq!(tb.pr(0, reg::TFD) >> 12, 2, "NOT READY");
    tb.pw(0, reg::CMD, 1 << 4);
    tb.pw(0, reg::CMD, 1 << 4 | 1);
    let (_img, disk) = image("newdvd");
    let pattern = vec![0x5au8; 2048];
    std::fs::write(
        &_img.0,
        [pattern.clone(), vec![0; DISK_SIZE as usize - 2048]].concat(),
    )
    .unwrap();
    tb.dev.change_medium(0, Some(disk)).unwrap();
    tb.issue(0, 0, h2d(0xa0, 0, 0, 0, 0), Some(&tur), &[], false);
    assert_eq!(
        tb.pr(0, reg::TFD) >> 12,
        6,
        "UNIT ATTENTION: medium changed"
    );
    tb.pw(0, reg::CMD, 1 << 4);
    tb.pw(0, reg::CMD, 1 << 4 | 1);
    let read = [0x28u8, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
    tb.issue(
        0,
        1,
        h2d(0xa0, 1, 0, 0, 0),
        Some(&read),
        &[(DATA, 2048)],
        false,
    );
    assert_eq!(tb.pr(0, reg::TFD) & 1, 0);
    assert_eq!(tb.data(DATA, 2048), pattern);
    assert!(tb.dev.change_medium(0, None).is_ok());
    assert!(matches!(
        tb.dev.change_medium(3, None),
        Err(AhciError::NoSuchPort { .. })
    ));
}
