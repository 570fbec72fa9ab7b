//! Requests come from the guest: offsets, lengths and scatter-gather lists are whatever a
//! hostile driver writes. The I/O engine must refuse bad ones (never perform them), perform
//! good ones, and never panic, touch memory outside guest RAM, or grow the image.
#![no_main]

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_storage::io::{EngineOptions, IoEngine, IoOp, Request};
use ferry_storage::Disk;
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const DISK: u64 = 1 << 20;
const RAM: u64 = 2 << 20;

struct Fixture {
    engine: IoEngine,
    path: PathBuf,
}

thread_local! {
    static FIXTURE: RefCell<Option<Fixture>> = const { RefCell::new(None) };
}

fn fixture() -> Fixture {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("ferry-fuzz-io-{}.raw", std::process::id()));
    std::fs::File::create(&path).unwrap().set_len(DISK).unwrap();
    let disk = Arc::new(Disk::open(&path, true, &[]).unwrap());
    // Two regions with a hole between them: entries may straddle or fall into it.
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), (RAM / 2) as usize),
        (GuestAddress(RAM), (RAM / 2) as usize),
    ])
    .unwrap();
    let opts = EngineOptions {
        discard: true,
        queue_depth: 8,
        threads: 2,
        ..Default::default()
    };
    let engine = IoEngine::new(disk, mem, opts).unwrap();
    Fixture { engine, path }
}

/// Small numbers most of the time (so requests are often valid), anything sometimes.
fn num(b: &[u8], scale: u64) -> u64 {
    let mut v = [0u8; 8];
    v[..b.len().min(8)].copy_from_slice(&b[..b.len().min(8)]);
    let raw = u64::from_le_bytes(v);
    if raw & 1 == 0 {
        (raw >> 1) % scale
    } else {
        raw
    }
}

fuzz_target!(|data: &[u8]| {
    FIXTURE.with(|f| {
        let mut f = f.borrow_mut();
        let fx = f.get_or_insert_with(fixture);
        for chunk in data.chunks(40) {
            if chunk.len() < 8 {
                break;
            }
            let op = [IoOp::Read, IoOp::Write, IoOp::Flush, IoOp::Discard][chunk[0] as usize % 4];
            let offset = num(&chunk[1..5], DISK) & !0x1ff | u64::from(chunk[5] & 1) * 7;
            let mut sg = Vec::new();
            for e in chunk[6..].chunks(8).take(chunk[0] as usize / 4 % 4 + 1) {
                let addr = num(&e[..e.len().min(5)], 2 * RAM);
                let len = num(&e[e.len().min(5)..], 16 << 10) as usize;
                sg.push((GuestAddress(addr), len));
            }
            let req = match op {
                IoOp::Read => Request::read(offset, sg, 1),
                IoOp::Write => Request::write(offset, sg, 1),
                IoOp::Flush => Request::flush(1),
                IoOp::Discard => Request::discard(offset, num(&chunk[6..], 2 * DISK), 1),
            };
            let want = req.len;
            if fx.engine.submit(req).is_ok() {
                let until = Instant::now() + Duration::from_secs(5);
                while fx.engine.outstanding() > 0 {
                    assert!(Instant::now() < until, "a request never completed");
                    fx.engine.wait(Duration::from_millis(50));
                    for c in fx.engine.completions() {
                        if let (Ok(n), IoOp::Read | IoOp::Write) = (c.result, op) {
                            assert_eq!(n, want);
                        }
                    }
                }
            }
        }
        assert_eq!(std::fs::metadata(&fx.path).unwrap().len(), DISK, "the image grew");
    });
});
