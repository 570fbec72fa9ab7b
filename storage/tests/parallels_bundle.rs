//! Parallels bundles: padded disks (guest sector 0 stored after `Padding` sectors) and
//! snapshots ferry adds to a bundle. Content is checked byte for byte, and qemu-img referees
//! every .hds file ferry writes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use ferry_storage::host_file::LocalFile;
use ferry_storage::layer::{
    CreateOptions, CreateParent, FormatKind, ImageFormat, Layer, NoLowerLayers, Variant,
};
use ferry_storage::lock::{ImageLock, LockMode};
use ferry_storage::parallels::{Bundle, Descriptor, ParallelsFormat, ParallelsImage};
use ferry_storage::{StorageError, Uuid};

const MIB: u64 = 1 << 20;
const TOP: &str = "{5fbaabe3-6958-40ff-92a7-860e329aab41}";
const NIL: &str = "{00000000-0000-0000-0000-000000000000}";

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/parallels-tests")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Bytes no two sectors share, so a shift by one sector cannot go unnoticed.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let i = i as u32;
            (i.wrapping_mul(31) ^ (i >> 9).wrapping_mul(0x9e37) ^ seed) as u8
        })
        .collect()
}

fn new_hds(p: &Path, size: u64) -> ParallelsImage {
    let f = LocalFile::create(p).unwrap();
    ParallelsImage::create(Arc::new(f), size, Variant::Dynamic).unwrap()
}

fn read_hds(p: &Path) -> Vec<u8> {
    let img = ParallelsImage::open(Arc::new(LocalFile::open(p, false).unwrap()), false).unwrap();
    let mut b = vec![0u8; img.virtual_size() as usize];
    img.read_at(&mut b, 0).unwrap();
    b
}

fn qemu_check(p: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "parallels"])
        .arg(p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        p.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What qemu-img reads from one .hds file on its own.
fn qemu_raw(p: &Path) -> Vec<u8> {
    let raw = p.with_extension("qemu.raw");
    let _ = std::fs::remove_file(&raw);
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "parallels", "-O", "raw"])
        .arg(p)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(st.success());
    let b = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    b
}

fn params(size: u64, padding: u64) -> String {
    format!(
        "    <Disk_Parameters>
        <Disk_size>{size}</Disk_size>
        <Cylinders>16</Cylinders>
        <Heads>16</Heads>
        <Sectors>63</Sectors>
        <Padding>{padding}</Padding>
        <Encryption>
            <Engine>{NIL}</Engine>
            <Data></Data>
        </Encryption>
        <UID>{{0610bb35-447e-4aae-aa79-f1571d969081}}</UID>
        <Name>xp</Name>
        <Miscellaneous>
            <CompatLevel>level2</CompatLevel>
            <Bootable>1</Bootable>
        </Miscellaneous>
    </Disk_Parameters>
"
    )
}

/// A padded XP-style disk of two storages: a Compressed one and a Plain one whose `End` is
/// `Disk_size` (the padding pushes the guest's last sector past it).
#[test]
fn parallels_padded_bundle_reads_and_writes_one_sector_later() {
    let d = scratch("padded").join("xp.hdd");
    std::fs::create_dir_all(&d).unwrap();
    let disk = 8192u64; // guest sectors (4 MiB)
    let pad = 1u64;
    let total = disk + pad;
    let half = 4096u64;
    // What the stored (padded) disk holds: sector 0 is the padding.
    let mut stored = pattern((total * 512) as usize, 7);
    {
        let img = new_hds(&d.join("xp.hdd.0.hds"), half * 512);
        img.write_at(&stored[..(half * 512) as usize], 0, &NoLowerLayers)
            .unwrap();
        img.flush().unwrap();
    }
    std::fs::write(d.join("xp.hdd.1.hds"), &stored[(half * 512) as usize..]).unwrap();
    let xml = format!(
        "<?xml version='1.0' encoding='UTF-8'?>
<Parallels_disk_image Version=\"1.0\">
{}    <StorageData>
        <Storage><Start>0</Start><End>{half}</End><Blocksize>2048</Blocksize>
            <Image><GUID>{TOP}</GUID><Type>Compressed</Type><File>xp.hdd.0.hds</File></Image>
        </Storage>
        <Storage><Start>{half}</Start><End>{disk}</End><Blocksize>2048</Blocksize>
            <Image><GUID>{TOP}</GUID><Type>Plain</Type><File>xp.hdd.1.hds</File></Image>
        </Storage>
    </StorageData>
    <Snapshots><Shot><GUID>{TOP}</GUID><ParentGUID>{NIL}</ParentGUID></Shot></Snapshots>
</Parallels_disk_image>
",
        params(disk, pad)
    );
    std::fs::write(d.join("DiskDescriptor.xml"), xml).unwrap();

    let b = Bundle::open(&d, true).unwrap();
    assert_eq!(b.virtual_size(), disk * 512);
    let mut got = vec![0u8; (disk * 512) as usize];
    b.read_at(&mut got, 0).unwrap();
    assert!(
        got == stored[512..],
        "guest sector s is stored sector s + 1"
    );
    // An XP partition starts at sector 63: in the image it starts 4 KiB-aligned.
    b.write_at(b"NTFS boot", 63 * 512, &NoLowerLayers).unwrap();
    stored[64 * 512..64 * 512 + 9].copy_from_slice(b"NTFS boot");
    // Across the storages' boundary, and the guest's last sector (past the Plain's End).
    let w = pattern(1000, 99);
    b.write_at(&w, (half - 1) * 512 - 400, &NoLowerLayers)
        .unwrap();
    stored[(half * 512 - 400) as usize..(half * 512 + 600) as usize].copy_from_slice(&w);
    b.write_at(&[0xEE; 512], (disk - 1) * 512, &NoLowerLayers)
        .unwrap();
    stored[(disk * 512) as usize..].fill(0xEE);
    // Beyond the guest's end is refused (the padding does not add room).
    assert!(b.write_at(&[1; 512], disk * 512, &NoLowerLayers).is_err());
    b.flush().unwrap();
    drop(b);

    let hds0 = d.join("xp.hdd.0.hds");
    assert!(read_hds(&hds0) == stored[..(half * 512) as usize]);
    assert_eq!(&read_hds(&hds0)[32768..32768 + 9], b"NTFS boot");
    assert!(std::fs::read(d.join("xp.hdd.1.hds")).unwrap() == stored[(half * 512) as usize..]);
    // qemu-img reads the stored (padded) view of each file, and finds it sound.
    qemu_check(&hds0);
    assert!(qemu_raw(&hds0) == stored[..(half * 512) as usize]);

    let b = ParallelsFormat.open(&d, false).unwrap();
    b.read_at(&mut got, 0).unwrap();
    assert!(got == stored[512..], "after reopen");
    // Allocation is reported at guest offsets too: the first storage ends one sector early.
    let data = ferry_storage::Allocation::Data;
    assert_eq!(
        b.block_status(0, disk * 512).unwrap(),
        (data, half * 512 - 512)
    );
    assert_eq!(
        b.block_status(half * 512 - 512, disk * 512 - (half * 512 - 512))
            .unwrap(),
        (data, (disk - half + 1) * 512)
    );
}

/// A padded bundle whose first cluster is not allocated: a partial write there copies what
/// lies below the guest's disk as zeros (the padding has nothing below it) and keeps the
/// padding sector zero.
#[test]
fn parallels_padded_first_cluster_write_leaves_padding_zero() {
    let d = scratch("padded-cow").join("p.hdd");
    std::fs::create_dir_all(&d).unwrap();
    let disk = 4096u64;
    drop(new_hds(&d.join("p.hds"), (disk + 8) * 512));
    let xml = format!(
        "<Parallels_disk_image Version=\"1.0\">\n{}<StorageData><Storage><Start>0</Start><End>{}</End>\
         <Image><GUID>{TOP}</GUID><Type>Compressed</Type><File>p.hds</File></Image></Storage></StorageData>\
         </Parallels_disk_image>\n",
        params(disk, 8),
        disk + 8
    );
    std::fs::write(d.join("DiskDescriptor.xml"), xml).unwrap();
    let b = Bundle::open(&d, true).unwrap();
    b.write_at(&[5u8; 100], 10, &NoLowerLayers).unwrap();
    drop(b);
    let img = read_hds(&d.join("p.hds"));
    let mut want = vec![0u8; ((disk + 8) * 512) as usize];
    want[4096 + 10..4096 + 110].fill(5);
    assert!(img == want);
    qemu_check(&d.join("p.hds"));
}

/// A padded bundle of one image is read in place (`host_run` in the .hds file, past the
/// padding): the runs hold what the bundle reads, and a clone through the mapping copies the
/// guest's disk exactly.
#[test]
fn parallels_padded_bundle_runs_lie_in_its_image() {
    let d = scratch("padded-run").join("p.hdd");
    std::fs::create_dir_all(&d).unwrap();
    let disk = 8 * MIB / 512;
    let hds = d.join("p.hds");
    drop(new_hds(&hds, (disk + 63) * 512));
    let xml = format!(
        "<Parallels_disk_image Version=\"1.0\">\n{}<StorageData><Storage><Start>0</Start><End>{}</End>\
         <Image><GUID>{TOP}</GUID><Type>Compressed</Type><File>p.hds</File></Image></Storage></StorageData>\
         </Parallels_disk_image>\n",
        params(disk, 63),
        disk + 63
    );
    std::fs::write(d.join("DiskDescriptor.xml"), xml).unwrap();
    let b = Bundle::open(&d, true).unwrap();
    // Later clusters first: the file's order is not the disk's.
    b.write_at(&pattern(3 * MIB as usize, 4), 4 * MIB, &NoLowerLayers)
        .unwrap();
    b.write_at(&pattern(MIB as usize + 512, 5), 0, &NoLowerLayers)
        .unwrap();
    b.flush().unwrap();
    assert_eq!(b.mapped_file().as_deref(), Some(&*hds));
    let file = std::fs::read(&hds).unwrap();
    let mut found = 0;
    for start in (0..disk * 512).step_by(MIB as usize / 2) {
        let len = (2 * MIB).min(disk * 512 - start);
        let Some((host, run)) = b.host_run(start, len).unwrap() else {
            continue;
        };
        let mut want = vec![0u8; run as usize];
        b.read_at(&mut want, start).unwrap();
        assert!(
            file[host as usize..][..run as usize] == want,
            "run at {start}"
        );
        found += 1;
    }
    assert!(found > 0);
    let mut whole = vec![0u8; (disk * 512) as usize];
    b.read_at(&mut whole, 0).unwrap();
    drop(b);
    let out = d.parent().unwrap().join("out.raw");
    let opts = ferry_storage::medium::CloneOptions {
        format: FormatKind::Raw,
        variant: Variant::Dynamic,
        overwrite: true,
        threads: 2,
        search: vec![],
    };
    ferry_storage::medium::clone(&d, &out, &opts, &ferry_storage::medium::Silent).unwrap();
    assert!(std::fs::read(&out).unwrap() == whole);
}

const DESC_HEAD: &str = "<?xml version='1.0' encoding='UTF-8'?>
<Parallels_disk_image Version=\"1.0\">
";

/// A Parallels Desktop-like bundle with one storage and the current state at the predefined
/// top GUID, `content` written into it.
fn pd_bundle(d: &Path, size: u64, content: &[u8]) -> String {
    std::fs::create_dir_all(d).unwrap();
    let f = "pd.hdd.0.{5fbaabe3-6958-40ff-92a7-860e329aab41}.hds";
    let img = new_hds(&d.join(f), size);
    img.write_at(content, 0, &NoLowerLayers).unwrap();
    drop(img);
    let xml = format!(
        "{DESC_HEAD}{}    <StorageData>
        <Storage>
            <Start>0</Start>
            <End>{}</End>
            <Blocksize>2048</Blocksize>
            <Image>
                <GUID>{TOP}</GUID>
                <Type>Compressed</Type>
                <File>{f}</File>
            </Image>
        </Storage>
    </StorageData>
    <Snapshots>
        <Shot>
            <GUID>{TOP}</GUID>
            <ParentGUID>{NIL}</ParentGUID>
        </Shot>
    </Snapshots>
</Parallels_disk_image>
",
        params(size / 512, 0),
        size / 512
    );
    std::fs::write(d.join("DiskDescriptor.xml"), &xml).unwrap();
    std::fs::write(d.join("DiskDescriptor.xml.Backup"), &xml).unwrap();
    xml
}

fn snapshot_opts(dir: &Path, size: u64) -> CreateOptions {
    CreateOptions {
        size,
        variant: Variant::Dynamic,
        parent: Some(CreateParent {
            path: dir.to_path_buf(),
            uuid: None,
            modification_uuid: None,
            format: FormatKind::Parallels,
        }),
    }
}

fn listing(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn parallels_snapshot_in_bundle_freezes_the_old_state() {
    let d = scratch("snap").join("pd.hdd");
    let size = 4 * MIB;
    let a = pattern(size as usize, 1);
    let xml0 = pd_bundle(&d, size, &a);
    let base = d.join("pd.hdd.0.{5fbaabe3-6958-40ff-92a7-860e329aab41}.hds");
    let base_bytes = std::fs::read(&base).unwrap();

    let snap = ParallelsFormat
        .create(&d, &snapshot_opts(&d, size))
        .unwrap();
    assert_eq!(snap.virtual_size(), size);
    let mut model = a.clone();
    // A partial write into an unallocated cluster of the new top copies the rest from below.
    let w = pattern(3000, 2);
    snap.write_at(&w, MIB + 100, &NoLowerLayers).unwrap();
    model[(MIB + 100) as usize..(MIB + 3100) as usize].copy_from_slice(&w);
    snap.flush().unwrap();
    drop(snap);

    // The descriptor is the old one with exactly the new entries spliced in.
    let xml1 = std::fs::read_to_string(d.join("DiskDescriptor.xml")).unwrap();
    let desc = Descriptor::parse(&xml1, Path::new("x")).unwrap();
    let new = desc.top.expect("TopGUID written");
    let file = format!("pd.hdd.0.{{{new}}}.hds");
    let want = xml0
        .replace(
            "</File>\n            </Image>",
            &format!(
                "</File>\n            </Image>\n            <Image>\n                <GUID>{{{new}}}</GUID>\n                <Type>Compressed</Type>\n                <File>{file}</File>\n            </Image>"
            ),
        )
        .replace(
            "<Snapshots>\n        <Shot>",
            &format!("<Snapshots>\n        <TopGUID>{{{new}}}</TopGUID>\n        <Shot>"),
        )
        .replace(
            "</Shot>\n    </Snapshots>",
            &format!("</Shot>\n        <Shot>\n            <GUID>{{{new}}}</GUID>\n            <ParentGUID>{TOP}</ParentGUID>\n        </Shot>\n    </Snapshots>"),
        );
    assert_eq!(xml1, want);
    assert_eq!(
        std::fs::read_to_string(d.join("DiskDescriptor.xml.Backup")).unwrap(),
        xml1
    );
    assert_eq!(
        desc.chain(Path::new("x")).unwrap(),
        vec![new, Uuid::parse_str(TOP).unwrap()]
    );
    // Nothing else in the folder (no temporary files left).
    let mut files = vec![
        "DiskDescriptor.xml".to_string(),
        "DiskDescriptor.xml.Backup".to_string(),
        file.clone(),
        "pd.hdd.0.{5fbaabe3-6958-40ff-92a7-860e329aab41}.hds".to_string(),
    ];
    files.sort();
    assert_eq!(listing(&d), files);

    // The frozen state is byte for byte what it was.
    assert!(std::fs::read(&base).unwrap() == base_bytes);
    let b = Bundle::open(&d, false).unwrap();
    assert_eq!(b.depth(), 2);
    // Two files hold the disk now: nothing is read in place.
    assert_eq!(b.mapped_file(), None);
    assert_eq!(b.host_run(0, MIB).unwrap(), None);
    let mut got = vec![0u8; size as usize];
    b.read_at(&mut got, 0).unwrap();
    assert!(got == model);
    drop(b);
    // qemu-img: both files sound; the new one alone holds only its copied-on-write cluster.
    let top = d.join(&file);
    qemu_check(&top);
    qemu_check(&base);
    let mut alone = vec![0u8; size as usize];
    alone[MIB as usize..2 * MIB as usize].copy_from_slice(&model[MIB as usize..2 * MIB as usize]);
    assert!(qemu_raw(&top) == alone);

    // A second snapshot stacks on the first; the one TopGUID moves.
    let snap = ParallelsFormat
        .create(&d.join("DiskDescriptor.xml"), &snapshot_opts(&d, size))
        .unwrap();
    snap.write_at(&[0xAB; 512], size - 512, &NoLowerLayers)
        .unwrap();
    model[(size - 512) as usize..].fill(0xAB);
    drop(snap);
    let xml2 = std::fs::read_to_string(d.join("DiskDescriptor.xml")).unwrap();
    assert_eq!(xml2.matches("<TopGUID>").count(), 1);
    let desc = Descriptor::parse(&xml2, Path::new("x")).unwrap();
    let newer = desc.top.unwrap();
    assert_eq!(
        desc.chain(Path::new("x")).unwrap(),
        vec![newer, new, Uuid::parse_str(TOP).unwrap()]
    );
    let b = ParallelsFormat.open(&d, false).unwrap();
    b.read_at(&mut got, 0).unwrap();
    assert!(got == model);
    qemu_check(&d.join(format!("pd.hdd.0.{{{newer}}}.hds")));
}

#[test]
fn parallels_snapshot_without_snapshots_element_and_split_storages() {
    let d = scratch("snap-split").join("s.hdd");
    std::fs::create_dir_all(&d).unwrap();
    let size = 6 * MIB;
    let a = pattern(size as usize, 3);
    let half = (3 * MIB) as usize;
    let g = "{22222222-3333-4444-5555-666666666666}";
    let i0 = new_hds(&d.join("s0.hds"), 3 * MIB);
    i0.write_at(&a[..half], 0, &NoLowerLayers).unwrap();
    drop(i0);
    std::fs::write(d.join("s1.raw"), &a[half..]).unwrap();
    let xml = format!(
        "{DESC_HEAD}{}<StorageData><Storage><Start>0</Start><End>6144</End><Blocksize>128</Blocksize>\
         <Image><GUID>{g}</GUID><Type>Compressed</Type><File>s0.hds</File></Image></Storage>\
         <Storage><Start>6144</Start><End>12288</End>\
         <Image><GUID>{g}</GUID><Type>Plain</Type><File>s1.raw</File></Image></Storage></StorageData>\
         </Parallels_disk_image>\n",
        params(size / 512, 0)
    );
    std::fs::write(d.join("DiskDescriptor.xml"), &xml).unwrap();
    let snap = ParallelsFormat
        .create(&d, &snapshot_opts(&d, size))
        .unwrap();
    let w = pattern(MIB as usize, 4);
    let at = 3 * MIB - MIB / 2;
    snap.write_at(&w, at, &NoLowerLayers).unwrap();
    drop(snap);
    let mut model = a.clone();
    model[at as usize..(at + MIB) as usize].copy_from_slice(&w);

    let xml1 = std::fs::read_to_string(d.join("DiskDescriptor.xml")).unwrap();
    let desc = Descriptor::parse(&xml1, Path::new("x")).unwrap();
    let new = desc.top.unwrap();
    let g = Uuid::parse_str(g).unwrap();
    assert_eq!(desc.shots, vec![(g, Uuid::nil()), (new, g)]);
    assert!(xml1.starts_with(&xml[..xml.find("</Storage>").unwrap()]));
    let b = Bundle::open(&d, false).unwrap();
    assert_eq!(b.depth(), 2);
    let mut got = vec![0u8; size as usize];
    b.read_at(&mut got, 0).unwrap();
    assert!(got == model);
    // The plain extent was not written; each storage got its own new image, and the first
    // one the storage's Blocksize (128 sectors = 64 KiB clusters).
    assert!(std::fs::read(d.join("s1.raw")).unwrap() == a[half..]);
    let n0 = d.join(format!("s.hdd.0.{{{new}}}.hds"));
    let n1 = d.join(format!("s.hdd.1.{{{new}}}.hds"));
    let img = ParallelsImage::open(Arc::new(LocalFile::open(&n0, false).unwrap()), false).unwrap();
    assert_eq!(img.cluster_size(), 64 << 10);
    for f in [&n0, &n1] {
        qemu_check(f);
    }
}

#[test]
fn parallels_snapshot_refusals_change_nothing() {
    let d = scratch("snap-bad").join("pd.hdd");
    let size = 2 * MIB;
    let xml0 = pd_bundle(&d, size, &pattern(4096, 5));
    let before = listing(&d);
    let top = d.join("pd.hdd.0.{5fbaabe3-6958-40ff-92a7-860e329aab41}.hds");

    let err = |p: &Path, o: &CreateOptions| match ParallelsFormat.create(p, o) {
        Err(e) => e,
        Ok(_) => panic!("created"),
    };
    // The new image must be the bundle itself.
    let e = err(
        &d.parent().unwrap().join("other.hdd"),
        &snapshot_opts(&d, size),
    );
    assert!(matches!(e, StorageError::Unsupported { .. }), "{e}");
    let mut o = snapshot_opts(&d, size);
    o.variant = Variant::Fixed;
    assert!(matches!(err(&d, &o), StorageError::Unsupported { .. }));
    let e = err(&d, &snapshot_opts(&d, size + 512));
    assert!(matches!(e, StorageError::Invalid(_)), "{e}");
    // A loose image file has no room for a parent.
    let mut o = snapshot_opts(&d, size);
    o.parent.as_mut().unwrap().path = top.clone();
    let e = err(&d.parent().unwrap().join("child.hds"), &o);
    assert!(
        e.to_string().contains("only a .hdd bundle holds snapshots"),
        "{e}"
    );
    // A VM writing the current state.
    let lock = ImageLock::acquire(&top, LockMode::Exclusive).unwrap();
    let e = err(&d, &snapshot_opts(&d, size));
    assert!(e.to_string().contains("pd.hdd.0.{5fbaabe3"), "{e}");
    drop(lock);
    assert_eq!(listing(&d), before);
    assert_eq!(
        std::fs::read_to_string(d.join("DiskDescriptor.xml")).unwrap(),
        xml0
    );

    // A failure after the first new file is made (a storage past the disk's end, which
    // opens but takes no snapshot) removes it and leaves the descriptor.
    let broken = xml0.replace(
        "</StorageData>",
        &format!(
            "<Storage><Start>{}</Start><End>{}</End></Storage></StorageData>",
            size / 512,
            size / 512 + 100
        ),
    );
    std::fs::write(d.join("DiskDescriptor.xml"), &broken).unwrap();
    Bundle::open(&d, false).unwrap();
    let e = err(&d, &snapshot_opts(&d, size));
    assert!(e.to_string().contains("past the end of the disk"), "{e}");
    assert_eq!(listing(&d), before);
    assert_eq!(
        std::fs::read_to_string(d.join("DiskDescriptor.xml")).unwrap(),
        broken
    );
}

/// `reserve` before a copy's writes allocates the host blocks of exactly the clusters those
/// writes will add, where they will be added (one after the other at the end of the file),
/// so nothing is left allocated past the end of the image.
#[test]
fn parallels_reserve_allocates_the_clusters_the_next_writes_add() {
    use std::os::unix::fs::MetadataExt;
    let d = scratch("reserve");
    let p = d.join("r.hds");
    let img = new_hds(&p, 64 * MIB);
    let cluster = img.cluster_size();
    let data = pattern(2 * cluster as usize + 4096, 3);
    img.write_at(&data[..4096], 40 * MIB, &NoLowerLayers)
        .unwrap();
    let end = std::fs::metadata(&p).unwrap().len();
    let sectors = |p: &Path| std::fs::metadata(p).unwrap().blocks();
    let before = sectors(&p);
    // Cluster 40 is allocated already; the run reaches two more (41 and 42).
    let at = 40 * MIB + 4096;
    img.reserve(at, data.len() as u64);
    let reserved = sectors(&p) - before;
    if reserved == 0 {
        eprintln!("the scratch file system has no fallocate; nothing to test");
        return;
    }
    assert_eq!(reserved * 512, 2 * cluster, "two new clusters' worth");
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        end,
        "the length stays"
    );
    img.write_at(&data, at, &NoLowerLayers).unwrap();
    img.flush().unwrap();
    drop(img);
    let len = std::fs::metadata(&p).unwrap().len();
    assert_eq!(len, end + 2 * cluster);
    assert!(
        sectors(&p) * 512 <= len.next_multiple_of(4096),
        "blocks allocated past the end: {} bytes for a {len}-byte file",
        sectors(&p) * 512
    );
    let back = read_hds(&p);
    assert_eq!(&back[at as usize..at as usize + data.len()], &data[..]);
    qemu_check(&p);
}
