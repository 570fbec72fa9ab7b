//! The engine against plain guest memory and real files: data written through it is read
//! back and compared, bad requests are refused, host errors come back as errors, and
//! bandwidth groups hold their rate.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::error::StorageError;
use crate::layer::{Allocation, FormatKind, Layer, LowerLayers, ParentRef, Variant};
use crate::{create_image, CreateOptions, Disk};

const MIB: u64 = 1 << 20;

/// The scratch files a test thread made, removed when the thread (the test) ends.
struct Scratch(std::cell::RefCell<Vec<PathBuf>>);

impl Drop for Scratch {
    fn drop(&mut self) {
        for p in self.0.borrow().iter() {
            let _ = std::fs::remove_file(p);
            // The folder goes with the last test's files (fails quietly while others remain).
            if let Some(dir) = p.parent() {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

thread_local! {
    static SCRATCH: Scratch = const { Scratch(std::cell::RefCell::new(Vec::new())) };
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-io-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    SCRATCH.with(|s| s.0.borrow_mut().push(p.clone()));
    p
}

/// 16 MiB of guest memory in two regions, so scatter-gather entries can straddle them.
fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20), (GuestAddress(8 << 20), 8 << 20)])
        .unwrap()
}

fn raw_disk(name: &str, size: u64) -> Arc<Disk> {
    let p = scratch(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    Arc::new(Disk::open(&p, true, &[]).unwrap())
}

fn engine(disk: Arc<Disk>, mem: &GuestMemoryMmap, cache: bool, kind: EngineChoice) -> IoEngine {
    let opts = EngineOptions {
        host_cache: cache,
        discard: true,
        engine: kind,
        queue_depth: 32,
        threads: 4,
        ..Default::default()
    };
    IoEngine::new(disk, mem.clone(), opts).unwrap()
}

/// Waits for every outstanding request and returns the completions.
fn drain(e: &mut IoEngine) -> Vec<Completion> {
    let mut out = Vec::new();
    let until = Instant::now() + Duration::from_secs(10);
    while e.outstanding() > 0 {
        assert!(Instant::now() < until, "requests never completed");
        e.wait(Duration::from_millis(100));
        out.extend(e.completions());
    }
    out
}

fn run(e: &mut IoEngine, r: Request) -> Result<u64, IoError> {
    let tag = r.user_data;
    e.submit(r)?;
    let mut done = drain(e);
    assert_eq!(done.len(), 1);
    let c = done.remove(0);
    assert_eq!(c.user_data, tag);
    c.result
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i >> 9) as u8)
        .collect()
}

fn kinds() -> [EngineChoice; 2] {
    [EngineChoice::Auto, EngineChoice::ThreadPool]
}

#[test]
fn raw_roundtrip_in_both_engines_and_cache_modes() {
    let mem = memory();
    for kind in kinds() {
        for cache in [true, false] {
            let disk = raw_disk(&format!("rt-{kind:?}-{cache}.raw"), 4 * MIB);
            let mut e = engine(disk.clone(), &mem, cache, kind);
            // Three entries: aligned, one straddling the two memory regions, one unaligned
            // in memory (O_DIRECT needs a bounce buffer for it).
            let sg = vec![
                (GuestAddress(0x10000), 4096),
                (GuestAddress((8 << 20) - 2048), 8192),
                (GuestAddress(0x20001), 512),
            ];
            let data = pattern(4096 + 8192 + 512, 7);
            let mut pos = 0;
            for &(a, l) in &sg {
                mem.write_slice(&data[pos..pos + l], a).unwrap();
                pos += l;
            }
            assert_eq!(
                run(&mut e, Request::write(MIB + 512, sg, 1)).unwrap(),
                data.len() as u64
            );
            assert!(run(&mut e, Request::flush(2)).is_ok());
            // The file holds the bytes, in order.
            let file = std::fs::read(disk.layers()[0].path()).unwrap();
            assert_eq!(&file[(MIB + 512) as usize..][..data.len()], &data[..]);
            // Only the unaligned entry costs a copy, and only with O_DIRECT; with the host
            // cache on nothing is copied.
            let st = e.stats();
            if cache && kind == EngineChoice::Auto {
                assert_eq!((st.zero_copy, st.bounced), (1, 0), "{st:?}");
            } else if !cache {
                // The scratch folder's file system takes O_DIRECT (ext4, xfs, tmpfs >= 6.6).
                assert_eq!((st.zero_copy, st.bounced), (0, 1), "{st:?}");
            }
            // Read back elsewhere, aligned and not.
            for (addr, tag) in [(0x40000u64, 3), (0x60003, 4)] {
                let sg = vec![(GuestAddress(addr), data.len())];
                assert_eq!(
                    run(&mut e, Request::read(MIB + 512, sg, tag)).unwrap(),
                    data.len() as u64
                );
                let mut back = vec![0u8; data.len()];
                mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
                assert_eq!(back, data, "{kind:?} cache={cache} addr={addr:#x}");
            }
        }
    }
}

/// A large read through the page cache goes to io_uring's workers, so that several copy at
/// once; a small one, or one with O_DIRECT, is made inline. The data is the same.
#[test]
fn large_cached_reads_go_to_io_uring_workers() {
    let mem = memory();
    for cache in [true, false] {
        let disk = raw_disk(&format!("workers-{cache}.raw"), 4 * MIB);
        let mut e = engine(disk, &mem, cache, EngineChoice::Auto);
        if e.kind() != EngineKind::IoUring {
            eprintln!("no io_uring on this host: nothing to test");
            return;
        }
        let data = pattern(MIB as usize, 3);
        mem.write_slice(&data, GuestAddress(0x10_0000)).unwrap();
        let sg = vec![(GuestAddress(0x10_0000), data.len())];
        run(&mut e, Request::write(MIB, sg, 1)).unwrap();
        let sg = vec![(GuestAddress(0x30_0000), data.len())];
        run(&mut e, Request::read(MIB, sg, 2)).unwrap();
        let mut back = vec![0u8; data.len()];
        mem.read_slice(&mut back, GuestAddress(0x30_0000)).unwrap();
        assert!(back == data, "cache={cache}: the read returned other bytes");
        let sg = vec![(GuestAddress(0x50_0000), 4096)];
        run(&mut e, Request::read(MIB, sg, 3)).unwrap();
        assert_eq!(e.stats().on_workers, u64::from(cache), "cache={cache}");
    }
}

#[test]
fn many_requests_in_flight() {
    let mem = memory();
    for kind in kinds() {
        let disk = raw_disk(&format!("qd-{kind:?}.raw"), 8 * MIB);
        let mut e = engine(disk, &mem, false, kind);
        // 64 writes of 4 KiB at once (more than the queue depth: the rest wait in the engine).
        for i in 0..64u64 {
            let buf = pattern(4096, i as u8);
            mem.write_slice(&buf, GuestAddress(i * 4096)).unwrap();
            let off = (i * 37 % 2048) * 4096;
            e.submit(Request::write(off, vec![(GuestAddress(i * 4096), 4096)], i))
                .unwrap();
        }
        let done = drain(&mut e);
        assert_eq!(done.len(), 64);
        assert!(done.iter().all(|c| c.result.is_ok()));
        // Page-aligned guest buffers go to O_DIRECT as they are: no copy.
        let st = e.stats();
        assert_eq!((st.zero_copy, st.direct, st.bounced), (64, 64, 0), "{st:?}");
        for i in 0..64u64 {
            let off = (i * 37 % 2048) * 4096;
            let dst = 0x100000 + i * 4096;
            e.submit(Request::read(off, vec![(GuestAddress(dst), 4096)], 100 + i))
                .unwrap();
        }
        let done = drain(&mut e);
        assert_eq!(done.len(), 64);
        for i in 0..64u64 {
            let mut back = vec![0u8; 4096];
            mem.read_slice(&mut back, GuestAddress(0x100000 + i * 4096))
                .unwrap();
            assert_eq!(back, pattern(4096, i as u8), "{kind:?} request {i}");
        }
    }
}

#[test]
fn a_file_cut_short_reads_zeros_past_its_end() {
    let mem = memory();
    for kind in kinds() {
        for cache in [true, false] {
            let disk = raw_disk(&format!("cut-{kind:?}-{cache}.raw"), 4 * MIB);
            let path = disk.layers()[0].path().to_path_buf();
            let mut e = engine(disk, &mem, cache, kind);
            mem.write_slice(&pattern(2 * MIB as usize, 1), GuestAddress(0))
                .unwrap();
            run(
                &mut e,
                Request::write(MIB, vec![(GuestAddress(0), 2 * MIB as usize)], 1),
            )
            .unwrap();
            // Someone truncates the image under the running VM.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(2 * MIB)
                .unwrap();
            let dst = GuestAddress(4 << 20);
            mem.write_slice(&vec![0xee; 2 * MIB as usize], dst).unwrap();
            let n = run(&mut e, Request::read(MIB, vec![(dst, 2 * MIB as usize)], 2)).unwrap();
            assert_eq!(n, 2 * MIB);
            let mut back = vec![0u8; 2 * MIB as usize];
            mem.read_slice(&mut back, dst).unwrap();
            assert_eq!(
                &back[..MIB as usize],
                &pattern(2 * MIB as usize, 1)[..MIB as usize]
            );
            assert!(
                back[MIB as usize..].iter().all(|&b| b == 0),
                "{kind:?} cache={cache}"
            );
        }
    }
}

#[test]
fn long_scatter_gather_lists() {
    let mem = memory();
    for cache in [true, false] {
        let disk = raw_disk(&format!("long-sg-{cache}.raw"), 4 * MIB);
        let mut e = engine(disk, &mem, cache, EngineChoice::Auto);
        // 1100 entries of 512 bytes, every other 512 bytes of guest memory: more than one
        // readv takes.
        let sg: Vec<_> = (0..1100u64)
            .map(|i| (GuestAddress(i * 1024), 512))
            .collect();
        let data = pattern(1100 * 512, 4);
        for (i, &(a, l)) in sg.iter().enumerate() {
            mem.write_slice(&data[i * 512..][..l], a).unwrap();
        }
        assert_eq!(
            run(&mut e, Request::write(0, sg, 1)).unwrap(),
            data.len() as u64
        );
        let back_sg = vec![(GuestAddress(4 << 20), data.len())];
        run(&mut e, Request::read(0, back_sg, 2)).unwrap();
        let mut back = vec![0u8; data.len()];
        mem.read_slice(&mut back, GuestAddress(4 << 20)).unwrap();
        assert_eq!(back, data, "cache={cache}");
        assert_eq!(e.stats().bounced, 1);
    }
}

#[test]
fn bad_requests_are_refused_and_never_performed() {
    let mem = memory();
    let disk = raw_disk("bad.raw", MIB);
    let mut e = engine(disk.clone(), &mem, true, EngineChoice::Auto);
    mem.write_slice(&[0xaa; 4096], GuestAddress(0)).unwrap();
    let g = |a: u64, l: usize| vec![(GuestAddress(a), l)];
    let cases = [
        (Request::write(MIB - 512, g(0, 1024), 1), "past the end"),
        (
            Request::write(u64::MAX - 511, g(0, 512), 2),
            "wrapping offset",
        ),
        (Request::write(0, vec![], 3), "zero length"),
        (Request::discard(0, 0, 4), "zero-length discard"),
        (Request::write(100, g(0, 512), 5), "misaligned offset"),
        (Request::write(0, g(0, 100), 6), "misaligned length"),
        (
            Request::write(0, g(16 << 20, 512), 7),
            "outside guest memory",
        ),
        (
            Request::write(0, g((16 << 20) - 256, 512), 8),
            "straddles the end of memory",
        ),
        (
            Request::write(0, g(u64::MAX - 255, 512), 9),
            "wrapping guest address",
        ),
        (Request::discard(MIB, 512, 10), "discard past the end"),
    ];
    for (r, what) in cases {
        assert!(e.submit(r).is_err(), "{what} was accepted");
    }
    let mut r = Request::write(0, g(0, 512), 11);
    r.len = 1024;
    assert!(matches!(e.submit(r), Err(IoError::LengthMismatch { .. })));
    let huge = vec![(GuestAddress(0), 8 << 20); 9];
    assert!(matches!(
        e.submit(Request::read(0, huge, 12)),
        Err(IoError::OutOfRange { .. })
    ));
    let disk_big = raw_disk("big.raw", 256 * MIB);
    let mut big = engine(disk_big, &mem, true, EngineChoice::Auto);
    let huge = vec![(GuestAddress(0), 8 << 20); 9];
    assert!(matches!(
        big.submit(Request::read(0, huge, 13)),
        Err(IoError::TooLarge { .. })
    ));
    assert_eq!(e.outstanding(), 0);
    assert!(std::fs::read(disk.layers()[0].path())
        .unwrap()
        .iter()
        .all(|&b| b == 0));

    // Read-only disks and attachments without discard=on.
    let ro = Arc::new(Disk::open(disk.layers()[0].path(), false, &[]).unwrap());
    let mut e = IoEngine::new(ro, mem.clone(), EngineOptions::default()).unwrap();
    assert!(matches!(
        e.submit(Request::write(0, g(0, 512), 1)),
        Err(IoError::ReadOnly)
    ));
    let mut e = IoEngine::new(disk, mem.clone(), EngineOptions::default()).unwrap();
    assert!(matches!(
        e.submit(Request::discard(0, 512, 1)),
        Err(IoError::DiscardDisabled)
    ));
    assert!(run(&mut e, Request::read(0, g(0, 512), 2)).is_ok());
}

#[test]
fn discard_punches_raw_holes() {
    use std::os::unix::fs::MetadataExt;
    let mem = memory();
    for kind in kinds() {
        let disk = raw_disk(&format!("discard-{kind:?}.raw"), 4 * MIB);
        let path = disk.layers()[0].path().to_path_buf();
        let mut e = engine(disk, &mem, true, kind);
        mem.write_slice(&pattern(MIB as usize, 3), GuestAddress(0))
            .unwrap();
        run(
            &mut e,
            Request::write(MIB, vec![(GuestAddress(0), MIB as usize)], 1),
        )
        .unwrap();
        run(&mut e, Request::flush(2)).unwrap();
        let before = std::fs::metadata(&path).unwrap().blocks();
        assert_eq!(run(&mut e, Request::discard(MIB, MIB, 3)).unwrap(), MIB);
        let after = std::fs::metadata(&path).unwrap().blocks();
        assert!(
            after + 1024 < before,
            "{kind:?}: {before} -> {after} blocks"
        );
        run(
            &mut e,
            Request::read(MIB, vec![(GuestAddress(0), MIB as usize)], 4),
        )
        .unwrap();
        let mut back = vec![1u8; MIB as usize];
        mem.read_slice(&mut back, GuestAddress(0)).unwrap();
        assert!(
            back.iter().all(|&b| b == 0),
            "{kind:?}: stale data after discard"
        );
    }
}

#[test]
fn dynamic_images_go_through_the_image_layer() {
    let mem = memory();
    let path = scratch("dyn.vdi");
    let opts = CreateOptions {
        size: 8 * MIB,
        variant: Variant::Dynamic,
        parent: None,
    };
    drop(create_image(&path, FormatKind::Vdi, &opts).unwrap());
    let disk = Arc::new(Disk::open(&path, true, &[]).unwrap());
    let mut e = engine(disk, &mem, false, EngineChoice::Auto);
    assert_eq!(e.kind(), EngineKind::ThreadPool);
    let data = pattern(3 * MIB as usize, 9);
    mem.write_slice(&data, GuestAddress(0x1001)).unwrap();
    // Crosses blocks (VDI blocks are 1 MiB) from an unaligned guest buffer.
    run(
        &mut e,
        Request::write(MIB / 2, vec![(GuestAddress(0x1001), data.len())], 1),
    )
    .unwrap();
    run(&mut e, Request::flush(2)).unwrap();
    run(
        &mut e,
        Request::read(MIB / 2, vec![(GuestAddress(8 << 20), data.len())], 3),
    )
    .unwrap();
    let mut back = vec![0u8; data.len()];
    mem.read_slice(&mut back, GuestAddress(8 << 20)).unwrap();
    assert_eq!(back, data);
    // A discard of a whole block frees it: it reads as zeros, in this engine and after reopening.
    run(&mut e, Request::discard(2 * MIB, MIB, 4)).unwrap();
    run(&mut e, Request::flush(5)).unwrap();
    drop(e);
    let disk = Disk::open(&path, false, &[]).unwrap();
    let mut buf = vec![1u8; 3 * MIB as usize];
    disk.read_at(&mut buf, MIB / 2).unwrap();
    let (freed, kept) = (MIB as usize * 3 / 2, MIB as usize * 5 / 2);
    assert_eq!(&buf[..freed], &data[..freed]);
    assert!(
        buf[freed..kept].iter().all(|&b| b == 0),
        "stale data after discard"
    );
    assert_eq!(&buf[kept..], &data[kept..]);
}

#[test]
fn discard_never_shows_older_data() {
    use crate::layer::CreateParent;
    let mem = memory();
    let opts = |parent| CreateOptions {
        size: 4 * MIB,
        variant: Variant::Dynamic,
        parent,
    };
    // A VMDK (its layer cannot free) and a VDI child over a base holding data.
    let vmdk = scratch("discard.vmdk");
    drop(create_image(&vmdk, FormatKind::Vmdk, &opts(None)).unwrap());
    let base = scratch("discard-base.vdi");
    let child = scratch("discard-child.vdi");
    let b = create_image(&base, FormatKind::Vdi, &opts(None)).unwrap();
    b.write_at(
        &pattern(4 * MIB as usize, 5),
        0,
        &crate::layer::NoLowerLayers,
    )
    .unwrap();
    b.flush().unwrap();
    let parent = CreateParent {
        path: base.clone(),
        uuid: b.uuid(),
        modification_uuid: b.modification_uuid(),
        format: FormatKind::Vdi,
    };
    drop(b);
    drop(create_image(&child, FormatKind::Vdi, &opts(Some(parent))).unwrap());
    for path in [vmdk, child] {
        let disk = Arc::new(Disk::open(&path, true, &[]).unwrap());
        let mut e = engine(disk.clone(), &mem, true, EngineChoice::Auto);
        mem.write_slice(&pattern(MIB as usize, 6), GuestAddress(0))
            .unwrap();
        run(
            &mut e,
            Request::write(MIB, vec![(GuestAddress(0), MIB as usize)], 1),
        )
        .unwrap();
        // Partly inside the written range, partly over the parent's data.
        run(&mut e, Request::discard(MIB + 4096, 2 * MIB, 2)).unwrap();
        let mut buf = vec![1u8; 4 * MIB as usize];
        disk.read_at(&mut buf, 0).unwrap();
        let (s, t) = ((MIB + 4096) as usize, (3 * MIB + 4096) as usize);
        assert!(
            buf[s..t].iter().all(|&b| b == 0),
            "{}: older data after discard",
            path.display()
        );
        assert_eq!(&buf[MIB as usize..s], &pattern(MIB as usize, 6)[..4096]);
    }
}

/// A layer whose writes fail as a full host disk does.
struct FullLayer(PathBuf);

impl Layer for FullLayer {
    fn format(&self) -> FormatKind {
        FormatKind::Vdi
    }
    fn variant(&self) -> Variant {
        Variant::Dynamic
    }
    fn path(&self) -> &std::path::Path {
        &self.0
    }
    fn files(&self) -> Vec<PathBuf> {
        vec![]
    }
    fn host_files(&self) -> Vec<Arc<dyn crate::HostFile>> {
        vec![]
    }
    fn virtual_size(&self) -> u64 {
        MIB
    }
    fn uuid(&self) -> Option<crate::Uuid> {
        None
    }
    fn parent(&self) -> Option<ParentRef> {
        None
    }
    fn writable(&self) -> bool {
        true
    }
    fn block_status(&self, _: u64, len: u64) -> crate::Result<(Allocation, u64)> {
        Ok((Allocation::Zero, len))
    }
    fn read_at(&self, buf: &mut [u8], _: u64) -> crate::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64, _: &dyn LowerLayers) -> crate::Result<()> {
        Err(StorageError::io(
            &self.0,
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        ))
    }
    fn flush(&self) -> crate::Result<()> {
        Ok(())
    }
}

#[test]
fn host_errors_reach_the_device_and_the_engine_goes_on() {
    let mem = memory();
    let disk = Arc::new(Disk::from_layers(vec![Box::new(FullLayer("full.vdi".into()))]).unwrap());
    let mut e = engine(disk, &mem, true, EngineChoice::Auto);
    let err = run(&mut e, Request::write(0, vec![(GuestAddress(0), 4096)], 1)).unwrap_err();
    assert!(err.is_no_space(), "{err}");
    assert!(run(&mut e, Request::read(0, vec![(GuestAddress(0), 4096)], 2)).is_ok());
}

#[test]
fn flush_without_writes_completes_at_once() {
    let mem = memory();
    let disk = raw_disk("flush.raw", MIB);
    let mut e = engine(disk, &mem, false, EngineChoice::Auto);
    // The first flush syncs (the engine cannot know what was written before it opened).
    run(&mut e, Request::flush(1)).unwrap();
    e.submit(Request::flush(2)).unwrap();
    let done: Vec<_> = e.completions().collect();
    assert_eq!(done.len(), 1);
    assert!(done[0].result.is_ok());
}

/// Streams 256 KiB reads from two disks in one group for `secs`; returns MiB/s together.
fn stream(engines: &mut [IoEngine], secs: f64) -> f64 {
    const REQ: u64 = 256 << 10;
    let start = Instant::now();
    let mut moved = 0u64;
    let mut next = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for (i, e) in engines.iter_mut().enumerate() {
            while e.outstanding() < 4 {
                let addr = GuestAddress(((i as u64) << 22) + (next % 4) * REQ);
                let r = Request::read((next % 16) * REQ, vec![(addr, REQ as usize)], next);
                e.submit(r).unwrap();
                next += 1;
            }
        }
        // Short: the loop waits on one disk's eventfd, the other may be ready first.
        engines[0].wait(Duration::from_millis(1));
        for e in engines.iter_mut() {
            moved += e
                .completions()
                .map(|c| c.result.expect("read failed"))
                .sum::<u64>();
        }
    }
    moved as f64 / start.elapsed().as_secs_f64() / MIB as f64
}

/// The rate two disks reach together, within `want` ± 10%: measured again (twice at most)
/// when a second is off, as a host too busy to run the test thread for a while looks slow.
fn assert_rate(engines: &mut [IoEngine], want: f64) {
    let mut seen = Vec::new();
    for _ in 0..3 {
        let r = stream(engines, 1.0);
        seen.push(r);
        if (r - want).abs() <= want * 0.1 {
            return;
        }
    }
    panic!("two disks in a {want} MiB/s group moved {seen:.1?} MiB/s");
}

#[test]
fn bandwidth_group_shared_by_two_disks() {
    let mem = memory();
    let group = Arc::new(BandwidthGroup::new(&"name=G,limit=20M".parse().unwrap()));
    let mut engines: Vec<IoEngine> = (0..2)
        .map(|i| {
            let opts = EngineOptions {
                bwgroup: Some(group.clone()),
                ..Default::default()
            };
            IoEngine::new(raw_disk(&format!("bw{i}.raw"), 4 * MIB), mem.clone(), opts).unwrap()
        })
        .collect();
    stream(&mut engines, 0.2); // past the initial burst
    assert_rate(&mut engines, 20.0);
    group.set_limit(40 << 20);
    // The new limit applies within 100 ms.
    stream(&mut engines, 0.1);
    assert_rate(&mut engines, 40.0);
}

/// A request held back by its bandwidth group can be taken back and never reaches the disk;
/// one already on the host cannot, and finishes.
#[test]
fn cancel_takes_back_only_what_still_waits() {
    let mem = memory();
    let group = Arc::new(BandwidthGroup::new(&"name=slow,iops=1".parse().unwrap()));
    let opts = EngineOptions {
        bwgroup: Some(group),
        ..Default::default()
    };
    let disk = raw_disk("cancel.raw", MIB);
    let mut e = IoEngine::new(disk.clone(), mem.clone(), opts).unwrap();
    mem.write_slice(&[0xa1; 4096], GuestAddress(0)).unwrap();
    mem.write_slice(&[0xb2; 4096], GuestAddress(0x10000))
        .unwrap();
    e.submit(Request::write(0, vec![(GuestAddress(0), 4096)], 1))
        .unwrap();
    // One request a second: the second waits about a second for its turn.
    e.submit(Request::write(4096, vec![(GuestAddress(0x10000), 4096)], 2))
        .unwrap();
    assert_eq!(e.cancel_waiting(&[1, 2, 3]), 1);
    let mut done = drain(&mut e);
    done.sort_by_key(|c| c.user_data);
    assert_eq!(done.len(), 2);
    assert!(matches!(done[0].result, Ok(4096)), "{:?}", done[0].result);
    assert!(matches!(done[1].result, Err(IoError::Cancelled)));
    let mut b = vec![0u8; 8192];
    disk.read_at(&mut b, 0).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 0xa1));
    assert!(
        b[4096..].iter().all(|&x| x == 0),
        "the cancelled write landed"
    );
    assert_eq!(e.cancel_waiting(&[2]), 0, "nothing left to take back");
}

#[test]
fn engine_moves_to_the_event_loop_thread() {
    fn send<T: Send>() {}
    send::<IoEngine>();
    send::<Completion>();
    let mem = memory();
    let mut e = engine(raw_disk("send.raw", MIB), &mem, true, EngineChoice::Auto);
    let r =
        std::thread::spawn(move || run(&mut e, Request::read(0, vec![(GuestAddress(0), 512)], 1)))
            .join()
            .unwrap();
    assert_eq!(r.unwrap(), 512);
}

/// Throttled requests go on when the engine's own eventfd says so: an event loop that only
/// looks when the eventfd fires (as ferry's does) sees every request finish at the group's
/// pace, not at the pace of its own timeouts.
#[test]
fn throttled_requests_wake_the_event_loop() {
    let mem = memory();
    let group = Arc::new(BandwidthGroup::new(&"name=T,limit=2M".parse().unwrap()));
    let opts = EngineOptions {
        bwgroup: Some(group),
        ..Default::default()
    };
    let mut e = IoEngine::new(raw_disk("wake.raw", 4 * MIB), mem.clone(), opts).unwrap();
    const REQ: u64 = 256 << 10;
    for i in 0..6u64 {
        e.submit(Request::read(
            i * REQ,
            vec![(GuestAddress(i * REQ), REQ as usize)],
            i,
        ))
        .unwrap();
    }
    // 1.5 MiB at 2 MiB/s: under a second. Each wait gives up after 3 s, so a missing
    // wake-up shows as a run far longer than that.
    let start = Instant::now();
    let mut done = 0;
    while done < 6 && start.elapsed() < Duration::from_secs(20) {
        e.wait(Duration::from_secs(3));
        done += e.completions().count();
    }
    assert_eq!(done, 6);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "throttled requests took {:?}: the engine did not wake its event loop",
        start.elapsed()
    );
}

/// While plugged, requests stay with the engine (io_uring: queued, not yet handed to the
/// kernel, so none can complete); `unplug` starts them all, and all complete with their data.
#[test]
fn plugged_requests_start_at_unplug() {
    let mem = memory();
    let disk = raw_disk("plug.raw", 4 * MIB);
    let mut e = engine(disk.clone(), &mem, true, EngineChoice::Auto);
    if e.kind() != EngineKind::IoUring {
        eprintln!("no io_uring on this host: plugging only applies to it");
        return;
    }
    let data = pattern(8 * 4096, 3);
    mem.write_slice(&data, GuestAddress(0)).unwrap();
    e.plug();
    for i in 0..8u64 {
        let sg = vec![(GuestAddress(i * 4096), 4096)];
        e.submit(Request::write(i * 8192, sg, i)).unwrap();
    }
    e.wait(Duration::from_millis(200));
    assert_eq!(e.completions().count(), 0, "a plugged request ran");
    e.unplug();
    let mut done: Vec<_> = drain(&mut e).into_iter().map(|c| c.user_data).collect();
    done.sort_unstable();
    assert_eq!(done, (0..8).collect::<Vec<_>>());
    let file = std::fs::read(disk.layers()[0].path()).unwrap();
    for i in 0..8usize {
        assert_eq!(
            &file[i * 8192..][..4096],
            &data[i * 4096..][..4096],
            "write {i}"
        );
    }
}

/// `unplug_deferred` leaves the held requests in the ring until the handle is submitted
/// (a device makes that call after letting go of its lock); then they run and complete.
#[test]
fn deferred_submit_starts_held_requests() {
    let mem = memory();
    let disk = raw_disk("deferred.raw", 4 * MIB);
    let mut e = engine(disk.clone(), &mem, true, EngineChoice::Auto);
    if e.kind() != EngineKind::IoUring {
        eprintln!("no io_uring on this host: deferred submission only applies to it");
        return;
    }
    assert!(
        e.unplug_deferred().is_none(),
        "nothing held, nothing to submit"
    );
    let data = pattern(4 * 4096, 5);
    mem.write_slice(&data, GuestAddress(0)).unwrap();
    e.plug();
    for i in 0..4u64 {
        let sg = vec![(GuestAddress(i * 4096), 4096)];
        e.submit(Request::write(i * 4096, sg, i)).unwrap();
    }
    let later = e.unplug_deferred().expect("held requests");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        e.eventfd().read().is_err(),
        "a held request ran before the submit"
    );
    // From another thread, as a device's event loop does after unlocking.
    std::thread::spawn(move || later.submit()).join().unwrap();
    // Signalled by the kernel, before the engine submits or reaps anything itself.
    e.wait(Duration::from_secs(5));
    assert!(e.eventfd().read().is_ok(), "the submit started nothing");
    let mut done: Vec<_> = drain(&mut e).into_iter().map(|c| c.user_data).collect();
    done.sort_unstable();
    assert_eq!(done, (0..4).collect::<Vec<_>>());
    let file = std::fs::read(disk.layers()[0].path()).unwrap();
    assert_eq!(&file[..data.len()], &data[..]);
}
