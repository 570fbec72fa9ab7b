//! ESX snapshot extents (read-only): COWD (vmfsSparse) and seSparse. No tool here writes them,
//! so a generator below builds minimal images from the layouts QEMU's block/vmdk.c reads, and
//! qemu-img, converting them to raw, vouches for the generator; ferry must read the same bytes,
//! alone and over a parent, and refuse damaged headers and tables with a clear error.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_storage::vmdk::{VmdkFormat, VmdkLayer};
use ferry_storage::*;

const SECTOR: u64 = 512;

fn scratch(name: &str) -> PathBuf {
    let d =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("esx-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn have_qemu_img() -> bool {
    Command::new("qemu-img").arg("--version").output().is_ok()
}

/// `qemu-img convert -O raw` of `image`: what QEMU reads (None without qemu-img).
fn qemu_raw(image: &Path) -> Option<Vec<u8>> {
    if !have_qemu_img() {
        eprintln!("qemu-img missing: no cross-check for {}", image.display());
        return None;
    }
    let out = image.with_extension("qemu.raw");
    let r = Command::new("qemu-img")
        .args(["convert", "-f", "vmdk", "-O", "raw"])
        .arg(image)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        r.status.success(),
        "qemu-img convert {}: {}",
        image.display(),
        String::from_utf8_lossy(&r.stderr)
    );
    Some(std::fs::read(&out).unwrap())
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8 | 1;
        }
    }
}

/// What a grain of the generated image holds.
#[derive(Clone, Copy, PartialEq, Debug)]
enum G {
    /// Not allocated: the parent's data.
    Free,
    /// seSparse only: reads as zeros, hiding the parent (entry type 2; 1 = unmapped).
    Zero(u64),
    Data,
}

/// A generated extent: its bytes (written sparsely) and the grains' contents.
struct Built {
    /// (offset, bytes) pieces of the file, and its length.
    pieces: Vec<(u64, Vec<u8>)>,
    len: u64,
}

impl Built {
    fn write(&self, path: &Path) {
        let f = std::fs::File::create(path).unwrap();
        f.set_len(self.len).unwrap();
        for (off, b) in &self.pieces {
            f.write_all_at(b, *off).unwrap();
        }
    }
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// A COWD extent of `sectors` with `gran`-sector grains, `map[g]` saying what grain g is and
/// `data` the disk's content (allocated grains are taken from it). Grains are stored in
/// reverse order, so a reader that assumed identity mapping would fail.
fn cowd(sectors: u32, gran: u32, map: &[G], data: &[u8]) -> Built {
    let per = 4096u64;
    let grain = u64::from(gran) * SECTOR;
    let tables = (u64::from(sectors)).div_ceil(per * u64::from(gran));
    let mut h = vec![0u8; 2048];
    h[..4].copy_from_slice(b"COWD");
    put32(&mut h, 4, 1); // version
    put32(&mut h, 8, 3); // flags: root, check-capable
    put32(&mut h, 12, sectors);
    put32(&mut h, 16, gran);
    put32(&mut h, 20, 4); // directory at sector 4
    put32(&mut h, 24, tables as u32);
    let dir_sectors = (tables * 4).div_ceil(SECTOR);
    let mut next = 4 + dir_sectors;
    let mut dir = vec![0u8; (dir_sectors * SECTOR) as usize];
    let mut pieces = Vec::new();
    let used: Vec<u64> = (0..tables)
        .filter(|t| {
            (t * per..((t + 1) * per).min(map.len() as u64)).any(|g| map[g as usize] == G::Data)
        })
        .collect();
    let mut table_at = std::collections::HashMap::new();
    for &t in used.iter().rev() {
        put32(&mut dir, (t * 4) as usize, next as u32);
        table_at.insert(t, next);
        next += per * 4 / SECTOR;
    }
    let mut tabs: std::collections::HashMap<u64, Vec<u8>> = used
        .iter()
        .map(|&t| (t, vec![0u8; (per * 4) as usize]))
        .collect();
    for g in (0..map.len() as u64).rev() {
        if map[g as usize] != G::Data {
            continue;
        }
        let t = tabs.get_mut(&(g / per)).unwrap();
        put32(t, ((g % per) * 4) as usize, next as u32);
        let s = (g * grain) as usize;
        let mut b = vec![0u8; grain as usize];
        let n = (data.len() - s).min(grain as usize);
        b[..n].copy_from_slice(&data[s..s + n]);
        pieces.push((next * SECTOR, b));
        next += u64::from(gran);
    }
    for (t, b) in tabs {
        pieces.push((table_at[&t] * SECTOR, b));
    }
    pieces.push((0, h));
    pieces.push((4 * SECTOR, dir));
    Built {
        pieces,
        len: next * SECTOR,
    }
}

/// A seSparse extent of `sectors`: 4 KiB grains, tables of 4096 u64 entries in a tables area
/// (indices given in reverse order of the directory), grains at scattered indices of the
/// grains area (some past 4096, so both halves of an entry's index matter).
fn sesparse(sectors: u64, map: &[G], data: &[u8]) -> Built {
    let per = 4096u64;
    let grain = 8 * SECTOR;
    let tables = sectors.div_ceil(per * 8);
    let dir_sectors = (tables * 8).div_ceil(SECTOR);
    let (vol_at, jh_at, j_at, dir_at) = (1u64, 2u64, 3u64, 8u64);
    let tables_at = dir_at + dir_sectors;
    let used: Vec<u64> = (0..tables)
        .filter(|t| {
            (t * per..((t + 1) * per).min(map.len() as u64)).any(|g| map[g as usize] != G::Free)
        })
        .collect();
    let tables_sectors = used.len() as u64 * 64;
    let (bitmap_at, backmap_at) = (tables_at + tables_sectors, tables_at + tables_sectors + 1);
    let grains_at = backmap_at + 1;
    let mut h = vec![0u8; 512];
    let fields = [
        0xcafe_babe,
        0x2_0000_0001,
        sectors,
        8,
        64,
        0,
        0,
        0,
        0,
        0,
        vol_at,
        1,
        jh_at,
        1,
        j_at,
        5,
        dir_at,
        dir_sectors,
        tables_at,
        tables_sectors,
        bitmap_at,
        1,
        backmap_at,
        1,
        grains_at,
        0,
    ];
    for (i, v) in fields.iter().enumerate() {
        put64(&mut h, i * 8, *v);
    }
    let mut vol = vec![0u8; 512];
    put64(&mut vol, 0, 0xcafe_cafe);
    put64(&mut vol, 8, used.len() as u64);
    put64(&mut vol, 16, 1);
    let mut dir = vec![0u8; (dir_sectors * SECTOR) as usize];
    let mut tabs = vec![vec![0u8; (per * 8) as usize]; used.len()];
    let mut pieces = Vec::new();
    let mut end = grains_at * SECTOR;
    let mut index = 0u64;
    for (k, &t) in used.iter().enumerate() {
        let slot = used.len() - 1 - k;
        put64(
            &mut dir,
            (t * 8) as usize,
            0x1000_0000_0000_0000 | slot as u64,
        );
        for g in t * per..((t + 1) * per).min(map.len() as u64) {
            let e = match map[g as usize] {
                G::Free => 0,
                G::Zero(kind) => kind << 60,
                G::Data => {
                    // Scattered: 4096 apart plus a step, so indices pass 4096 early.
                    index += 4099;
                    let s = (g * grain) as usize;
                    let mut b = vec![0u8; grain as usize];
                    let n = (data.len() - s).min(grain as usize);
                    b[..n].copy_from_slice(&data[s..s + n]);
                    let at = grains_at * SECTOR + index * grain;
                    pieces.push((at, b));
                    end = end.max(at + grain);
                    0x3000_0000_0000_0000 | ((index & 0xfff) << 48) | (index >> 12)
                }
            };
            put64(&mut tabs[slot], ((g % per) * 8) as usize, e);
        }
    }
    for (slot, b) in tabs.into_iter().enumerate() {
        pieces.push(((tables_at + slot as u64 * 64) * SECTOR, b));
    }
    // The grains area's size as ESXi would record it.
    put64(&mut h, 25 * 8, (end - grains_at * SECTOR) / SECTOR);
    pieces.push((0, h));
    pieces.push((vol_at * SECTOR, vol));
    pieces.push((dir_at * SECTOR, dir));
    Built {
        pieces,
        len: end.max((backmap_at + 1) * SECTOR),
    }
}

/// A descriptor naming one extent, as ESXi writes snapshot descriptors.
fn descriptor(
    create_type: &str,
    kind: &str,
    sectors: u64,
    file: &str,
    parent: Option<(&str, u32)>,
) -> String {
    let (pcid, hint) = match parent {
        Some((name, cid)) => (
            format!("{cid:08x}"),
            format!("parentFileNameHint=\"{name}\"\n"),
        ),
        None => ("ffffffff".into(), String::new()),
    };
    format!(
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=fffffffe\nparentCID={pcid}\n\
         createType=\"{create_type}\"\n{hint}\n# Extent description\nRW {sectors} {kind} \"{file}\"\n\n\
         # The Disk Data Base\n#DDB\n\nddb.longContentID = \"0123456789abcdef0123456789abcdef\"\n"
    )
}

/// Equal bytes, or a failure naming the first difference (not megabytes of both).
fn same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: {} != {}",
            got[i], want[i]
        );
    }
}

fn read_all(layer: &dyn Layer) -> Vec<u8> {
    let mut b = vec![0u8; layer.virtual_size() as usize];
    layer.read_at(&mut b, 0).unwrap();
    b
}

/// A grain map with every kind of run: whole free tables, data, zeros, isolated grains.
fn grain_map(grains: u64, with_zero: bool, rng: &mut Rng) -> Vec<G> {
    (0..grains)
        .map(|g| {
            let r = rng.next() % 10;
            if (4096..8192).contains(&g) {
                G::Free // a table with nothing: no table at all
            } else if g % 4096 < 5 || r < 3 {
                G::Data
            } else if with_zero && r < 5 {
                G::Zero(1 + (g & 1))
            } else {
                G::Free
            }
        })
        .collect()
}

/// Disk content for `map`: random bytes in data grains, zeros elsewhere; `last` cuts it.
fn content(map: &[G], grain: u64, size: u64, rng: &mut Rng) -> Vec<u8> {
    let mut d = vec![0u8; size as usize];
    for (g, &k) in map.iter().enumerate() {
        if k == G::Data {
            let s = g * grain as usize;
            let e = (s + grain as usize).min(d.len());
            rng.fill(&mut d[s..e]);
        }
    }
    d
}

fn check_state(layer: &dyn Layer, map: &[G], grain: u64) {
    let size = layer.virtual_size();
    for (g, &k) in map.iter().enumerate() {
        let off = g as u64 * grain;
        let want = match k {
            G::Free => Allocation::Unallocated,
            G::Zero(_) => Allocation::Zero,
            G::Data => Allocation::Data,
        };
        let (got, n) = layer.block_status(off, grain.min(size - off)).unwrap();
        assert_eq!((got, n), (want, grain.min(size - off)), "grain {g}");
    }
}

#[test]
fn vmdk_cowd_extent_reads_what_was_written() {
    let dir = scratch("cowd");
    let mut rng = Rng(0x5eed);
    // 12000 sectors in 2-sector grains: 6000 grains, 2 tables (the second partly used);
    // 1-sector grains (ESX's default) over a disk that is not a whole table.
    for (sectors, gran) in [(12_000u32, 2u32), (9_001, 1)] {
        let grain = u64::from(gran) * SECTOR;
        let size = u64::from(sectors) * SECTOR;
        let grains = size.div_ceil(grain);
        let map = grain_map(grains, false, &mut rng);
        let data = content(&map, grain, size, &mut rng);
        let name = format!("c{sectors}-{gran}");
        // Through a descriptor (an ESX 3 vmfsSparse snapshot).
        let ext = format!("{name}-delta.vmdk");
        cowd(sectors, gran, &map, &data).write(&dir.join(&ext));
        let desc = dir.join(format!("{name}.vmdk"));
        std::fs::write(
            &desc,
            descriptor("vmfsSparse", "VMFSSPARSE", u64::from(sectors), &ext, None),
        )
        .unwrap();
        let layer = VmdkFormat.open(&desc, false).unwrap();
        assert_eq!(layer.virtual_size(), size);
        same(&read_all(&*layer), &data, &name);
        check_state(&*layer, &map, grain);
        // Unaligned reads across grains and tables.
        let mut b = vec![0u8; 3 * 4096 * grain as usize / 2 + 77];
        let at = 4000 * grain + 311;
        let n = b.len().min((size - at) as usize);
        layer.read_at(&mut b[..n], at).unwrap();
        same(
            &b[..n],
            &data[at as usize..at as usize + n],
            "unaligned read",
        );
        assert_eq!(layer.files().len(), 2);
        if let Some(q) = qemu_raw(&desc) {
            same(&q, &data, &format!("{name}: qemu-img vs the generator"));
        }
        // The same data file opened on its own. (qemu-img cannot be the referee here: for a
        // bare COWD it looks for "CID" text at byte 512, which a real header does not have.)
        let bare = dir.join(&ext);
        let head = std::fs::read(&bare).unwrap();
        assert!(VmdkFormat.probe(&bare, &head[..512]));
        let layer = VmdkFormat.open(&bare, false).unwrap();
        same(&read_all(&*layer), &data, &format!("{name}: bare"));
        assert!(layer.parent().is_none());
        assert!(VmdkFormat.open(&bare, true).is_err(), "read-only");
        // Probing finds it as VMDK, and the disk opens by path.
        let disk = Disk::open(&bare, false, &[]).unwrap();
        assert_eq!(disk.layers()[0].format(), FormatKind::Vmdk);
    }
}

#[test]
fn vmdk_sesparse_extent_reads_what_was_written() {
    let dir = scratch("se");
    let mut rng = Rng(0xfeed);
    let grain = 8 * SECTOR;
    // Three tables (16 MiB each), the middle one absent, the last partly used.
    let sectors = 2 * 32768 + 4000;
    let size = sectors * SECTOR;
    let map = grain_map(size / grain, true, &mut rng);
    let data = content(&map, grain, size, &mut rng);
    let ext = "s-sesparse.vmdk";
    sesparse(sectors, &map, &data).write(&dir.join(ext));
    let desc = dir.join("s.vmdk");
    std::fs::write(
        &desc,
        descriptor("seSparse", "SESPARSE", sectors, ext, None),
    )
    .unwrap();
    let layer = VmdkFormat.open(&desc, false).unwrap();
    assert_eq!(layer.virtual_size(), size);
    same(&read_all(&*layer), &data, "seSparse");
    check_state(&*layer, &map, grain);
    let disk = Disk::from_layers(vec![layer]).unwrap();
    // Allocated ranges: data and zero grains, never the free ones.
    for (s, l) in disk.allocated_ranges().unwrap() {
        for g in s / grain..(s + l).div_ceil(grain) {
            assert_ne!(map[g as usize], G::Free, "grain {g} reported allocated");
        }
    }
    if let Some(q) = qemu_raw(&desc) {
        same(&q, &data, "seSparse: qemu-img vs the generator");
    }
    // The data file on its own: a clear pointer to the descriptor.
    let e = VmdkFormat.open(&dir.join(ext), false).err().unwrap();
    assert!(e.to_string().contains("descriptor"), "{e}");
}

/// Snapshots over a parent: free grains read the parent, zero grains hide it, data grains
/// are the snapshot's. qemu-img follows the same parentFileNameHint.
#[test]
fn vmdk_esx_snapshots_over_a_parent() {
    let dir = scratch("chain");
    let mut rng = Rng(0xabc);
    let sectors = 32768 + 1000;
    let size = sectors * SECTOR;
    // The base: a flat VMDK of random bytes, made by ferry.
    let base_path = dir.join("base.vmdk");
    let mut base_data = vec![0u8; size as usize];
    rng.fill(&mut base_data);
    let base = VmdkLayer::create(
        &base_path,
        &CreateOptions {
            size,
            variant: Variant::Fixed,
            parent: None,
        },
    )
    .unwrap();
    base.write_at(&base_data, 0, &NoLowerLayers).unwrap();
    base.flush().unwrap();
    let cid = base.cid();
    drop(base);
    for kind in ["SESPARSE", "VMFSSPARSE"] {
        let se = kind == "SESPARSE";
        let grain = if se { 8 * SECTOR } else { SECTOR };
        let map = grain_map(size / grain, se, &mut rng);
        let own = content(&map, grain, size, &mut rng);
        let ext = format!("child-{kind}.data.vmdk");
        if se {
            sesparse(sectors, &map, &own).write(&dir.join(&ext));
        } else {
            cowd(sectors as u32, 1, &map, &own).write(&dir.join(&ext));
        }
        let child = dir.join(format!("child-{kind}.vmdk"));
        let ct = if se { "seSparse" } else { "vmfsSparse" };
        std::fs::write(
            &child,
            descriptor(ct, kind, sectors, &ext, Some(("base.vmdk", cid))),
        )
        .unwrap();
        let mut want = base_data.clone();
        for (g, &k) in map.iter().enumerate() {
            let s = g * grain as usize;
            let e = (s + grain as usize).min(want.len());
            match k {
                G::Free => {}
                G::Zero(_) => want[s..e].fill(0),
                G::Data => want[s..e].copy_from_slice(&own[s..e]),
            }
        }
        let disk = Disk::open(&child, false, &[]).unwrap();
        assert_eq!(disk.layers().len(), 2, "{kind}: the parent was found");
        let mut got = vec![0u8; size as usize];
        disk.read_at(&mut got, 0).unwrap();
        same(&got, &want, kind);
        if let Some(q) = qemu_raw(&child) {
            same(&q, &want, &format!("{kind}: qemu-img vs the generator"));
        }
        // Writable: refused with a sentence that says how to attach it.
        let e = Disk::open(&child, true, &[]).err().unwrap();
        assert!(
            matches!(e, StorageError::Unsupported { .. }) && e.to_string().contains("read-only"),
            "{kind}: {e}"
        );
    }
}

/// A small valid image of each kind, for damaging: (descriptor, extent file).
fn small(dir: &Path, kind: &str) -> (PathBuf, PathBuf) {
    let mut rng = Rng(1);
    let sectors = 4096 * 8 + 64;
    let se = kind == "SESPARSE";
    // 4 KiB grains in both (COWD with 8-sector grains).
    let grain = 8 * SECTOR;
    let size = sectors * SECTOR;
    let mut map = vec![G::Free; (size / grain) as usize];
    map[0] = G::Data;
    map[4096] = G::Data;
    let data = content(&map, grain, size, &mut rng);
    let ext = dir.join(format!("{kind}-x.vmdk"));
    if se {
        sesparse(sectors, &map, &data).write(&ext);
    } else {
        cowd(sectors as u32, 8, &map, &data).write(&ext);
    }
    let desc = dir.join(format!("{kind}.vmdk"));
    let ct = if se { "seSparse" } else { "vmfsSparse" };
    std::fs::write(
        &desc,
        descriptor(ct, kind, sectors, &format!("{kind}-x.vmdk"), None),
    )
    .unwrap();
    let l = VmdkFormat.open(&desc, false).unwrap();
    same(
        &read_all(&*l),
        &data,
        &format!("{kind}: the undamaged image"),
    );
    (desc, ext)
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn le_at(path: &Path, at: u64, n: usize) -> u64 {
    let b = std::fs::read(path).unwrap();
    let mut v = [0u8; 8];
    v[..n].copy_from_slice(&b[at as usize..at as usize + n]);
    u64::from_le_bytes(v)
}

/// Opens and reads everything: the error, if any, with its kind.
fn failure(desc: &Path) -> StorageError {
    match VmdkFormat.open(desc, false) {
        Err(e) => e,
        Ok(l) => {
            let mut b = vec![0u8; l.virtual_size() as usize];
            match l.read_at(&mut b, 0) {
                Err(e) => e,
                Ok(()) => panic!("{} opened and read", desc.display()),
            }
        }
    }
}

fn expect(desc: &Path, unsupported: bool, words: &str) {
    let e = failure(desc);
    let kind_ok = if unsupported {
        matches!(e, StorageError::Unsupported { .. })
    } else {
        matches!(e, StorageError::Corrupt { .. })
    };
    assert!(
        kind_ok && e.to_string().contains(words),
        "{words:?}: got {e:?}"
    );
}

#[test]
fn vmdk_damaged_cowd_is_refused() {
    let dir = scratch("badcowd");
    let fresh = || small(&dir, "VMFSSPARSE");
    // Neither COWD nor KDMV: the KDMV parser says so.
    let (d, x) = fresh();
    patch(&x, 0, b"CAWD");
    expect(&d, false, "KDMV");
    let (d, x) = fresh();
    patch(&x, 4, &2u32.to_le_bytes());
    expect(&d, true, "version 2");
    let (d, x) = fresh();
    patch(&x, 16, &0u32.to_le_bytes());
    expect(&d, false, "grain of 0 sectors");
    // The directory too short for the disk, and past the end of the file.
    let (d, x) = fresh();
    patch(&x, 24, &1u32.to_le_bytes());
    expect(&d, false, "need 2");
    let (d, x) = fresh();
    patch(&x, 20, &0x00ff_ffffu32.to_le_bytes());
    expect(&d, false, "outside the file");
    // A table past the end of the file; a grain past the end (found when read).
    let (d, x) = fresh();
    patch(&x, 4 * SECTOR, &0x00ff_ffffu32.to_le_bytes());
    expect(&d, false, "past the end of the file");
    let (d, x) = fresh();
    let table = le_at(&x, 4 * SECTOR, 4);
    patch(&x, table * SECTOR, &0x00ff_fff0u32.to_le_bytes());
    expect(&d, false, "points past the end of the file");
    // The descriptor gives the extent more sectors than it holds.
    let (d, x) = fresh();
    patch(&x, 12, &100u32.to_le_bytes());
    expect(&d, false, "gives it");
    // Truncated below its header.
    let (d, x) = fresh();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&x)
        .unwrap()
        .set_len(100)
        .unwrap();
    expect(&d, false, "truncated");
}

#[test]
fn vmdk_damaged_sesparse_is_refused() {
    let dir = scratch("badse");
    let fresh = || small(&dir, "SESPARSE");
    let (d, x) = fresh();
    patch(&x, 0, &0xcafe_beefu64.to_le_bytes());
    expect(&d, false, "bad magic");
    let (d, x) = fresh();
    patch(&x, 8, &0x2_0000_0002u64.to_le_bytes());
    expect(&d, true, "version");
    let (d, x) = fresh();
    patch(&x, 24, &16u64.to_le_bytes());
    expect(&d, true, "grains of 16 sectors");
    let (d, x) = fresh();
    patch(&x, 48, &1u64.to_le_bytes());
    expect(&d, true, "reserved");
    let (d, x) = fresh();
    patch(&x, 16, &0u64.to_le_bytes());
    expect(&d, false, "capacity of 0");
    // Volatile header: bad magic, a journal to replay, past the end.
    let (d, x) = fresh();
    patch(&x, SECTOR, &1u64.to_le_bytes());
    expect(&d, false, "volatile header magic");
    let (d, x) = fresh();
    patch(&x, SECTOR + 24, &1u64.to_le_bytes());
    expect(&d, true, "journal");
    let (d, x) = fresh();
    patch(&x, 80, &u64::MAX.to_le_bytes());
    expect(&d, false, "volatile header at sector");
    // Directory: too small, past the end, an entry that is no table reference, a table index
    // past the tables area.
    let (d, x) = fresh();
    patch(&x, 17 * 8, &0u64.to_le_bytes());
    expect(&d, false, "too small");
    let (d, x) = fresh();
    patch(&x, 16 * 8, &(1u64 << 40).to_le_bytes());
    expect(&d, false, "grain directory at sector");
    let (d, x) = fresh();
    let gd = le_at(&x, 16 * 8, 8);
    patch(&x, gd * SECTOR, &0x2000_0000_0000_0000u64.to_le_bytes());
    expect(&d, false, "not a table reference");
    let (d, x) = fresh();
    patch(&x, gd * SECTOR, &0x1000_0000_0000_0009u64.to_le_bytes());
    expect(&d, false, "past the 2 of the tables area");
    // Table entries: an unknown type, a grain past the end, a free entry with stray bits.
    let tables = le_at(&x, 18 * 8, 8);
    let (d, x) = fresh();
    let slot = le_at(&x, gd * SECTOR, 8) & 0xffff_ffff;
    let entry0 = (tables + slot * 64) * SECTOR;
    patch(&x, entry0, &0x4000_0000_0000_0000u64.to_le_bytes());
    expect(&d, false, "unknown type");
    let (d, x) = fresh();
    patch(&x, entry0, &0x3000_0000_0fff_ffffu64.to_le_bytes());
    expect(&d, false, "points past the end of the file");
    let (d, x) = fresh();
    patch(&x, entry0, &0x0000_0000_0000_0001u64.to_le_bytes());
    expect(&d, false, "unknown type");
}
