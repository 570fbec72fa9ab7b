//! virtio-scsi driven the way Linux's virtio_scsi driver drives it, over a raw image file.

use std::path::PathBuf;
use std::sync::Arc;

use ferry_storage::Disk;

use super::*;
use crate::scsi::{DiskParams, DiskUnit};
use crate::virtio::testing::Driver;

const RESP: usize = 12 + 96;

struct Image(PathBuf);
impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn image(name: &str, size: u64) -> (Image, Arc<Disk>) {
    let p = std::env::temp_dir().join(format!("ferry-vscsi-{}-{name}.raw", std::process::id()));
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    let disk = Disk::open(&p, true, &[]).unwrap();
    (Image(p), Arc::new(disk))
}

fn disk_unit(size: u64) -> LogicalUnit {
    LogicalUnit::Disk(
        DiskUnit::new(DiskParams {
            size_bytes: size,
            block_size: 512,
            nonrotational: true,
            discard: false,
            read_only: false,
            write_cache: true,
            vendor: "FERRY",
            product: "HARDDISK",
            serial: "S0".into(),
            wwn: 0,
        })
        .unwrap(),
    )
}

fn setup(name: &str) -> (Image, Driver) {
    let (img, disk) = image(name, 1 << 20);
    let mut dev = VirtioScsi::new(1);
    dev.attach(2, disk_unit(1 << 20), Some(disk), None).unwrap();
    (img, Driver::new(Box::new(dev), F_HOTPLUG | F_CHANGE))
}

fn header(target: u8, cdb: &[u8]) -> Vec<u8> {
    let mut h = vec![1, target, 0, 0, 0, 0, 0, 0];
    h.extend_from_slice(&7u64.to_le_bytes());
    h.extend_from_slice(&[0, 0, 0]);
    let mut c = cdb.to_vec();
    c.resize(32, 0);
    h.extend_from_slice(&c);
    h
}

/// (response code, SCSI status, sense key)
fn resp(r: &[u8]) -> (u8, u8, u8) {
    (r[11], r[10], r.get(12 + 2).copied().unwrap_or(0) & 0xf)
}

/// Runs a command on request queue 2 with `data_in` bytes of Data-In room.
fn cmd(d: &mut Driver, target: u8, cdb: &[u8], data_out: &[u8], data_in: usize) -> Vec<Vec<u8>> {
    let h = header(target, cdb);
    let out: Vec<&[u8]> = if data_out.is_empty() {
        vec![&h]
    } else {
        vec![&h, data_out]
    };
    let ins: Vec<usize> = if data_in == 0 {
        vec![RESP]
    } else {
        vec![RESP, data_in]
    };
    let (used, bufs) = d.request(2, &out, &ins);
    assert!(used.is_some(), "every request is answered");
    bufs
}

#[test]
fn inquiry_capacity_write_read() {
    let (img, mut d) = setup("rw");
    // The first command sees the power-on unit attention (06/29/00); Linux's scan eats it.
    let b = cmd(&mut d, 2, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(resp(&b[0]), (0, 2, 6));
    assert!(
        d.line.0.load(std::sync::atomic::Ordering::SeqCst),
        "INTx without MSI-X"
    );
    let b = cmd(&mut d, 2, &[0x12, 0, 0, 0, 96, 0], &[], 96);
    assert_eq!(resp(&b[0]), (0, 0, 0));
    assert_eq!(&b[1][8..13], b"FERRY");
    let resid = u32::from_le_bytes(b[0][4..8].try_into().unwrap());
    assert_eq!(resid as usize, 96 - usize::from(b[1][4]) - 5);
    let b = cmd(&mut d, 2, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
    assert_eq!(&b[1][..8], &[0, 0, 0x07, 0xff, 0, 0, 2, 0]);
    // WRITE(10) of two blocks at LBA 8, then READ(10) them back.
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    let b = cmd(&mut d, 2, &[0x2a, 0, 0, 0, 0, 8, 0, 0, 2, 0], &data, 0);
    assert_eq!(resp(&b[0]), (0, 0, 0));
    let b = cmd(&mut d, 2, &[0x28, 0, 0, 0, 0, 8, 0, 0, 2, 0], &[], 1024);
    assert_eq!(resp(&b[0]), (0, 0, 0));
    assert_eq!(b[1], data);
    // The bytes are in the image file where LBA 8 lives.
    let on_disk = std::fs::read(&img.0).unwrap();
    assert_eq!(&on_disk[4096..5120], &data[..]);
    // SYNCHRONIZE CACHE(10) reaches the medium and succeeds.
    let b = cmd(&mut d, 2, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(resp(&b[0]), (0, 0, 0));
    // Past the end: CHECK CONDITION, ILLEGAL REQUEST, nothing read.
    let b = cmd(&mut d, 2, &[0x28, 0, 0, 0, 0x08, 0, 0, 0, 1, 0], &[], 512);
    assert_eq!(resp(&b[0]), (0, 2, 5));
}

#[test]
fn hostile_requests_get_transport_errors() {
    let (_img, mut d) = setup("bad");
    // No unit on target 0: BAD_TARGET.
    let b = cmd(&mut d, 0, &[0x12, 0, 0, 0, 36, 0], &[], 36);
    assert_eq!(b[0][11], 3);
    // A LUN field that is not single-level addressing: BAD_TARGET too.
    let mut h = header(2, &[0x00]);
    h[0] = 0;
    let (_, b) = d.request(2, &[&h], &[RESP]);
    assert_eq!(b[0][11], 3);
    // A header cut short: FAILURE.
    let (used, b) = d.request(2, &[&[1, 2, 0]], &[RESP]);
    assert_eq!(used, Some(RESP as u32));
    assert_eq!(b[0][11], 9);
    // No room for the response: the chain comes back unused but returned.
    let h = header(2, &[0x00]);
    let (used, _) = d.request(2, &[&h], &[8]);
    assert_eq!(used, Some(0));
    // Eat the power-on unit attention, then a READ whose Data-In buffer is too small:
    // OVERRUN, not a write past the buffer.
    cmd(&mut d, 2, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    let (_, b) = d.request(
        2,
        &[&header(2, &[0x28, 0, 0, 0, 0, 0, 0, 0, 4, 0])],
        &[RESP, 512],
    );
    assert_eq!(b[0][11], 1);
    assert!(b[1].iter().all(|&x| x == 0xee));
    // A WRITE without its data: refused by the target (CHECK CONDITION) or the transport
    // (OVERRUN); never GOOD.
    let (_, b) = d.request(
        2,
        &[&header(2, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0])],
        &[RESP],
    );
    assert!(
        b[0][11] == 1 || (b[0][11] == 0 && b[0][10] == 2),
        "{:?}",
        &b[0][..16]
    );
}

#[test]
fn task_management_and_hotplug_events() {
    let (_img, mut d) = setup("tmf");
    // LOGICAL UNIT RESET on the control queue: FUNCTION COMPLETE.
    let mut tmf = 0u32.to_le_bytes().to_vec();
    tmf.extend_from_slice(&5u32.to_le_bytes());
    tmf.extend_from_slice(&[1, 2, 0, 0, 0, 0, 0, 0]);
    tmf.extend_from_slice(&0u64.to_le_bytes());
    let (used, b) = d.request(0, &[&tmf], &[1]);
    assert_eq!((used, b[0][0]), (Some(1), 0));
    // An unknown control request is returned unused.
    let (used, _) = d.request(0, &[&9u32.to_le_bytes()], &[4]);
    assert_eq!(used, Some(0));
    // No event pending: the driver's event buffer stays with the device.
    let (used, _) = d.request(1, &[], &[16]);
    assert_eq!(used, None);
}

/// virtio_scsi_ctrl_tmf: type, subtype, lun, id.
fn tmf(subtype: u32, target: u8, lun: u8, tag: u64) -> Vec<u8> {
    let mut t = 0u32.to_le_bytes().to_vec();
    t.extend_from_slice(&subtype.to_le_bytes());
    t.extend_from_slice(&[1, target, 0x40, lun, 0, 0, 0, 0]);
    t.extend_from_slice(&tag.to_le_bytes());
    t
}

/// Task management names commands by their tag. A command still on the host when it is
/// aborted is answered ABORTED once its transfer ends, and only then is the abort answered
/// (Linux reuses an aborted command's buffers as soon as the abort completes). Addressing
/// errors and the query functions are answered at once.
#[test]
fn task_management_waits_for_the_commands_it_cancels() {
    use ferry_storage::io::{BandwidthGroup, BandwidthGroupSpec, EngineOptions, IoEngine};
    let (_img, disk) = image("tmf-eng", 1 << 20);
    let mem = Driver::memory();
    // One request a second: after the first, each waits in the engine for about a second,
    // which keeps it in flight, not yet started, while task management names it.
    let group = Arc::new(BandwidthGroup::new(&BandwidthGroupSpec {
        name: "slow".into(),
        limit: 0,
        iops: 1,
    }));
    let opts = EngineOptions {
        bwgroup: Some(group),
        ..Default::default()
    };
    let engine = IoEngine::new(disk.clone(), mem.clone(), opts).unwrap();
    let mut dev = VirtioScsi::new(1);
    dev.attach(2, disk_unit(1 << 20), Some(disk), Some(engine))
        .unwrap();
    let mut d = Driver::with_memory(mem, Box::new(dev), 0);
    cmd(&mut d, 2, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    // READ(10) of 8 blocks, tag 7 (see `header`), twice: the second is held back.
    let b = cmd(&mut d, 2, &[0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0], &[], 4096);
    assert_eq!(resp(&b[0]), (0, 0, 0));
    let h = header(2, &[0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0]);
    let read = d.post(2, &[&h], &[RESP, 4096]);
    assert_eq!(d.answered(&read), None);
    // Addressing: no target 9, no LUN 1 on target 2; CLEAR ACA is rejected.
    assert_eq!(d.request(0, &[&tmf(0, 9, 0, 7)], &[1]).1[0][0], 3);
    assert_eq!(d.request(0, &[&tmf(0, 2, 1, 7)], &[1]).1[0][0], 12);
    assert_eq!(d.request(0, &[&tmf(2, 2, 0, 7)], &[1]).1[0][0], 11);
    // QUERY TASK: tag 7 is in the task set (FUNCTION SUCCEEDED), tag 8 is not.
    assert_eq!(d.request(0, &[&tmf(6, 2, 0, 7)], &[1]).1[0][0], 10);
    assert_eq!(d.request(0, &[&tmf(6, 2, 0, 8)], &[1]).1[0][0], 0);
    // ABORT TASK of a tag nobody uses: complete at once.
    assert_eq!(
        d.request(0, &[&tmf(0, 2, 0, 8)], &[1]),
        (Some(1), vec![vec![0]])
    );
    // ABORT TASK of tag 7: answered after the read, which the engine takes back (it was
    // still waiting for its bandwidth group) and answers on its next wake.
    let abort = d.post(0, &[&tmf(0, 2, 0, 7)], &[1]);
    assert_eq!(
        d.answered(&abort),
        None,
        "answered before the command ended"
    );
    let (used, b) = d.complete(read);
    assert_eq!(used, Some(RESP as u32), "an aborted command moves no data");
    assert_eq!(resp(&b[0]), (2, 0, 0), "response ABORTED");
    assert_eq!(d.complete(abort), (Some(1), vec![vec![0]]));
    // The target works on: the next command sees no trace of the abort.
    let b = cmd(&mut d, 2, &[0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0], &[], 4096);
    assert_eq!(resp(&b[0]), (0, 0, 0));
    // LOGICAL UNIT RESET: a write in flight is answered RESET, then the reset, and the unit
    // reports the reset to the next command (06/29/00).
    let h = header(2, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 8, 0]);
    let write = d.post(2, &[&h, &[0x5a; 4096]], &[RESP]);
    let reset = d.post(0, &[&tmf(5, 2, 0, 0)], &[1]);
    assert_eq!(d.answered(&reset), None);
    let (_, b) = d.complete(write);
    assert_eq!(resp(&b[0]), (4, 0, 0), "response RESET");
    assert_eq!(d.complete(reset), (Some(1), vec![vec![0]]));
    let b = cmd(&mut d, 2, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(resp(&b[0]), (0, 2, 6));
    // The write was still waiting for its bandwidth group: it never reached the disk.
    let b = cmd(&mut d, 2, &[0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0], &[], 4096);
    assert_eq!(resp(&b[0]), (0, 0, 0));
    assert!(b[1].iter().all(|&x| x == 0), "the reset write landed");
}

#[test]
fn event_for_a_removed_unit() {
    let mut dev = VirtioScsi::new(1);
    let (_img, disk) = image("ev", 1 << 20);
    dev.attach(4, disk_unit(1 << 20), Some(disk), None).unwrap();
    assert!(dev.attach(4, disk_unit(1 << 20), None, None).is_err());
    assert!(dev.detach(4).is_some());
    let mut d = Driver::new(Box::new(dev), F_HOTPLUG);
    let (used, b) = d.request(1, &[], &[16]);
    assert_eq!(used, Some(16));
    assert_eq!(
        u32::from_le_bytes(b[0][0..4].try_into().unwrap()),
        T_TRANSPORT_RESET
    );
    assert_eq!(&b[0][4..6], &[1, 4]);
    assert_eq!(
        u32::from_le_bytes(b[0][12..16].try_into().unwrap()),
        EVT_RESET_REMOVED
    );
}

/// The same commands with the data moved by an I/O engine (io_uring or threads), in both
/// host cache modes, including a FUA write (the flush after it).
#[test]
fn reads_and_writes_through_the_io_engine() {
    use ferry_storage::io::{EngineOptions, IoEngine};
    for host_cache in [true, false] {
        let (img, disk) = image(if host_cache { "eng-c" } else { "eng-d" }, 1 << 20);
        let mem = Driver::memory();
        let engine = IoEngine::new(
            disk.clone(),
            mem.clone(),
            EngineOptions {
                host_cache,
                ..Default::default()
            },
        )
        .unwrap();
        let mut dev = VirtioScsi::new(1);
        dev.attach(2, disk_unit(1 << 20), Some(disk), Some(engine))
            .unwrap();
        let mut d = Driver::with_memory(mem, Box::new(dev), 0);
        cmd(&mut d, 2, &[0x00, 0, 0, 0, 0, 0], &[], 0);
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 13 + 5) as u8).collect();
        // WRITE(10) with FUA (byte 1 bit 3), 8 blocks at LBA 16.
        let b = cmd(&mut d, 2, &[0x2a, 0x08, 0, 0, 0, 16, 0, 0, 8, 0], &data, 0);
        assert_eq!(resp(&b[0]), (0, 0, 0));
        let b = cmd(&mut d, 2, &[0x28, 0, 0, 0, 0, 16, 0, 0, 8, 0], &[], 4096);
        assert_eq!(resp(&b[0]), (0, 0, 0));
        assert_eq!(b[1], data);
        assert_eq!(
            u32::from_le_bytes(b[0][4..8].try_into().unwrap()),
            0,
            "no residual"
        );
        let b = cmd(&mut d, 2, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0);
        assert_eq!(resp(&b[0]), (0, 0, 0));
        let on_disk = std::fs::read(&img.0).unwrap();
        assert_eq!(&on_disk[8192..12288], &data[..]);
    }
}

/// Half-megabyte requests through the I/O engine, one after another: each completes with
/// its data, and nothing is left behind on the queue.
#[test]
fn large_requests_through_the_io_engine() {
    use ferry_storage::io::{EngineOptions, IoEngine};
    let (img, disk) = image("eng-large", 4 << 20);
    let mem = Driver::memory();
    let engine = IoEngine::new(disk.clone(), mem.clone(), EngineOptions::default()).unwrap();
    let mut dev = VirtioScsi::new(1);
    dev.attach(0, disk_unit(4 << 20), Some(disk), Some(engine))
        .unwrap();
    let mut d = Driver::with_memory(mem, Box::new(dev), 0);
    cmd(&mut d, 0, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    let len = 512 << 10;
    let data: Vec<u8> = (0..len as u32).map(|i| (i * 7 + i / 4099) as u8).collect();
    let blocks = (len / 512) as u16;
    let [hi, lo] = blocks.to_be_bytes();
    for round in 0..3u8 {
        let lba = 8 * u32::from(round);
        let [a, b, c, e] = lba.to_be_bytes();
        let w = cmd(&mut d, 0, &[0x2a, 0, a, b, c, e, 0, hi, lo, 0], &data, 0);
        assert_eq!(resp(&w[0]), (0, 0, 0), "write {round}");
        let r = cmd(&mut d, 0, &[0x28, 0, a, b, c, e, 0, hi, lo, 0], &[], len);
        assert_eq!(resp(&r[0]), (0, 0, 0), "read {round}");
        assert!(r[1] == data, "read {round} returned other bytes");
    }
    let on_disk = std::fs::read(&img.0).unwrap();
    assert!(on_disk[16 * 512..16 * 512 + len] == data[..]);
}

/// A read of data the host has cached finishes inside the submit call (io_uring copies it
/// inline): the device answers it in the same queue pass, without another wake of the
/// event loop (no device event is run here).
#[test]
fn a_cached_read_is_answered_in_the_queue_pass() {
    use ferry_storage::io::{EngineChoice, EngineOptions, IoEngine};
    let (_img, disk) = image("inline", 1 << 20);
    let mem = Driver::memory();
    let opts = EngineOptions {
        engine: EngineChoice::IoUring,
        ..Default::default()
    };
    let Ok(engine) = IoEngine::new(disk.clone(), mem.clone(), opts) else {
        eprintln!("no io_uring on this host: nothing to test");
        return;
    };
    let mut dev = VirtioScsi::new(1);
    dev.attach(0, disk_unit(1 << 20), Some(disk), Some(engine))
        .unwrap();
    let mut d = Driver::with_memory(mem, Box::new(dev), 0);
    cmd(&mut d, 0, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    // The write puts the blocks in the host's page cache.
    let data = vec![0xa5u8; 4096];
    let w = cmd(&mut d, 0, &[0x2a, 0, 0, 0, 0, 32, 0, 0, 8, 0], &data, 0);
    assert_eq!(resp(&w[0]), (0, 0, 0));
    let h = header(0, &[0x28, 0, 0, 0, 0, 32, 0, 0, 8, 0]);
    let read = d.post(2, &[&h], &[RESP, 4096]);
    assert!(
        d.answered(&read).is_some(),
        "the cached read waited for the event loop"
    );
    let (_, b) = d.complete(read);
    assert_eq!(resp(&b[0]), (0, 0, 0));
    assert_eq!(b[1], data);
}

/// A driver that breaks its available ring index (more entries than the queue holds) with
/// EVENT_IDX on: the device gives up on the queue instead of spinning on it.
#[test]
fn a_broken_ring_index_does_not_spin() {
    use vm_memory::{Bytes, GuestAddress};
    let (_img, disk) = image("spin", 1 << 20);
    let mut dev = VirtioScsi::new(1);
    dev.attach(0, disk_unit(1 << 20), Some(disk), None).unwrap();
    let mut d = Driver::new(Box::new(dev), crate::virtio::F_RING_EVENT_IDX);
    // Queue 2's available ring index (see testing.rs: rings at 0x10000 + q * 0x1000).
    d.mem
        .write_obj(40u16, GuestAddress(0x1_0000 + 2 * 0x1000 + 0x102))
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        d.dev.queue_notified(2);
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(std::time::Duration::from_secs(5)).is_ok(),
        "the device kept spinning on a broken ring"
    );
}

/// Inserting and ejecting a DVD: the driver that asked for VIRTIO_SCSI_F_CHANGE gets a
/// PARAM_CHANGE event with the unit attention's sense code, and the unit reports the change.
#[test]
fn media_change_events() {
    use crate::scsi::{CdParams, CdUnit};
    let (_img, disk) = image("dvd", 1 << 20);
    let mut dev = VirtioScsi::new(1);
    let cd = CdUnit::new(CdParams {
        vendor: "FERRY",
        product: "DVD-ROM",
        serial: "D0".into(),
        atapi: false,
    });
    dev.attach(3, LogicalUnit::Cd(cd), None, None).unwrap();
    let mut d = Driver::new(Box::new(dev), F_CHANGE);
    // Empty drive: NOT READY, MEDIUM NOT PRESENT (after the power-on attention).
    cmd(&mut d, 3, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    let b = cmd(&mut d, 3, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(resp(&b[0]), (0, 2, 2));
    let scsi = d
        .dev
        .device_mut()
        .as_any_mut()
        .downcast_mut::<VirtioScsi>()
        .unwrap();
    scsi.change_medium(3, Some(disk)).unwrap();
    assert!(scsi.change_medium(7, None).is_err());
    let (used, b) = d.request(1, &[], &[16]);
    assert_eq!(used, Some(16));
    assert_eq!(
        u32::from_le_bytes(b[0][0..4].try_into().unwrap()),
        T_PARAM_CHANGE
    );
    assert_eq!(&b[0][4..6], &[1, 3]);
    assert_eq!(u32::from_le_bytes(b[0][12..16].try_into().unwrap()), 0x28);
    // The unit reports MEDIUM CHANGED once, then reads the new medium in 2048-byte blocks.
    let b = cmd(&mut d, 3, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(resp(&b[0]), (0, 2, 6));
    let b = cmd(&mut d, 3, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
    assert_eq!(&b[1][..8], &[0, 0, 0x01, 0xff, 0, 0, 8, 0]);
    // Eject: another event, MEDIUM NOT PRESENT.
    let scsi = d
        .dev
        .device_mut()
        .as_any_mut()
        .downcast_mut::<VirtioScsi>()
        .unwrap();
    scsi.change_medium(3, None).unwrap();
    let (_, b) = d.request(1, &[], &[16]);
    assert_eq!(u32::from_le_bytes(b[0][12..16].try_into().unwrap()), 0x3a);
}
