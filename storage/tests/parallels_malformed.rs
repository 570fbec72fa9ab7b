//! Parallels: every kind of broken input ends in one clear error naming the file, never a
//! panic or a huge allocation.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_storage::host_file::{FailingFile, HostFile, LocalFile};
use ferry_storage::layer::{CreateOptions, ImageFormat, Layer, NoLowerLayers, Variant};
use ferry_storage::parallels::{Bundle, ParallelsFormat, ParallelsImage};
use ferry_storage::StorageError;

const MIB: u64 = 1 << 20;

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/parallels-tests")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A good 8 MiB image with clusters 0 and 2 allocated.
fn good_image(dir: &Path) -> Vec<u8> {
    let p = dir.join("good.hds");
    let _ = std::fs::remove_file(&p);
    {
        let opts = CreateOptions {
            size: 8 * MIB,
            variant: Variant::Dynamic,
            parent: None,
        };
        let img = ParallelsFormat.create(&p, &opts).unwrap();
        img.write_at(&[1u8; 512], 0, &NoLowerLayers).unwrap();
        img.write_at(&[2u8; 512], 2 * MIB, &NoLowerLayers).unwrap();
    }
    std::fs::read(&p).unwrap()
}

fn open_bytes(dir: &Path, name: &str, bytes: &[u8]) -> Result<ParallelsImage, StorageError> {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    ParallelsImage::open(Arc::new(LocalFile::open(&p, false).unwrap()), false)
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Expects a Corrupt error naming the file and mentioning `word`.
fn corrupt(r: Result<ParallelsImage, StorageError>, word: &str) {
    match r {
        Err(StorageError::Corrupt { path, detail }) => {
            assert!(path.to_str().unwrap().ends_with(".hds"), "{path:?}");
            assert!(detail.contains(word), "{detail:?} lacks {word:?}");
        }
        Err(e) => panic!("expected Corrupt({word}), got {e}"),
        Ok(_) => panic!("expected Corrupt({word}), it opened"),
    }
}

#[test]
fn header_and_bat_errors() {
    let d = scratch("malformed");
    let good = good_image(&d);
    assert!(open_bytes(&d, "ok.hds", &good).is_ok());
    // Data of cluster 0 sits at data_off (cluster 1 of the file) in a fresh image.
    let bat0 = u32::from_le_bytes(good[64..68].try_into().unwrap());
    assert_eq!(bat0, 2048);

    let mut b = good.clone();
    b[0] = b'X';
    corrupt(open_bytes(&d, "magic.hds", &b), "magic");

    let mut b = good.clone();
    put32(&mut b, 16, 3);
    corrupt(open_bytes(&d, "version.hds", &b), "version");

    corrupt(open_bytes(&d, "short.hds", &good[..40]), "too short");

    let mut b = good.clone();
    put32(&mut b, 28, 0);
    corrupt(open_bytes(&d, "tracks0.hds", &b), "cluster size");

    let mut b = good.clone();
    put32(&mut b, 28, u32::MAX);
    corrupt(open_bytes(&d, "tracksbig.hds", &b), "too large");

    // A BAT of 2^32-1 entries would be 16 GiB: refused from the file size, not allocated.
    let mut b = good.clone();
    put32(&mut b, 32, u32::MAX);
    corrupt(
        open_bytes(&d, "bathuge.hds", &b),
        "past the end of the file",
    );

    // A disk far larger than its BAT could ever map (Ext header: 64-bit sectors).
    let mut b = good.clone();
    b[..16].copy_from_slice(b"WithouFreSpacExt");
    b[36..44].copy_from_slice(&u64::MAX.to_le_bytes());
    corrupt(open_bytes(&d, "size.hds", &b), "absurd");

    let mut b = good.clone();
    put32(&mut b, 32, 200);
    put32(&mut b, 48, 1);
    corrupt(open_bytes(&d, "dataoff.hds", &b), "overlaps the BAT");

    let mut b = good.clone();
    put32(&mut b, 64 + 4, 1_000_000);
    corrupt(open_bytes(&d, "pasteof.hds", &b), "past the end");

    let mut b = good.clone();
    put32(&mut b, 64 + 4, 1);
    corrupt(open_bytes(&d, "intobat.hds", &b), "inside the header/BAT");

    let mut b = good.clone();
    let e = u32::from_le_bytes(b[64..68].try_into().unwrap());
    put32(&mut b, 64 + 4, e + 100);
    corrupt(open_bytes(&d, "overlap.hds", &b), "overlap");

    // Truncated data area: the last cluster's BAT entry now points past EOF.
    corrupt(
        open_bytes(&d, "trunc.hds", &good[..good.len() - (MIB as usize) - 10]),
        "past the end",
    );

    let mut b = good.clone();
    b[56..64].copy_from_slice(&(1u64 << 40).to_le_bytes());
    corrupt(open_bytes(&d, "extoff.hds", &b), "format extension");

    // An Ext image with a data offset that is not cluster aligned.
    let mut b = good.clone();
    b[..16].copy_from_slice(b"WithouFreSpacExt");
    put32(&mut b, 48, 2049);
    put32(&mut b, 64, 0);
    put32(&mut b, 72, 0);
    corrupt(
        open_bytes(&d, "extalign.hds", &b),
        "multiple of the cluster",
    );
}

#[test]
fn out_of_range_and_read_only() {
    let d = scratch("range");
    let good = good_image(&d);
    let img = open_bytes(&d, "ok.hds", &good).unwrap();
    let mut b = [0u8; 16];
    assert!(matches!(
        img.read_at(&mut b, 8 * MIB - 8),
        Err(StorageError::OutOfRange { .. })
    ));
    assert!(matches!(
        img.read_at(&mut b, u64::MAX - 2),
        Err(StorageError::OutOfRange { .. })
    ));
    assert!(matches!(
        img.write_at(&b, 0, &NoLowerLayers),
        Err(StorageError::ReadOnly { .. })
    ));
    img.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [1u8; 16]);
}

#[test]
fn failing_file_during_create_and_open_is_an_error() {
    let d = scratch("failopen");
    let good = good_image(&d);
    let p = d.join("f.hds");
    std::fs::write(&p, &good).unwrap();
    let inner: Arc<dyn HostFile> = Arc::new(LocalFile::open(&p, true).unwrap());
    // Opening for write must mark the header; with no writes allowed that fails cleanly.
    let r = ParallelsImage::open(Arc::new(FailingFile::new(inner, 0)), true);
    assert!(matches!(r, Err(StorageError::Io { .. })));
    // The file was not touched.
    assert_eq!(std::fs::read(&p).unwrap(), good);
    for k in 0..4 {
        let p = d.join(format!("c{k}.hds"));
        let inner: Arc<dyn HostFile> = Arc::new(LocalFile::create(&p).unwrap());
        let r = ParallelsImage::create(
            Arc::new(FailingFile::new(inner, k)),
            4 * MIB,
            Variant::Fixed,
        );
        assert!(r.is_err(), "k={k}");
    }
}

fn bundle_xml(size_sectors: u64, storages: &str, shots: &str, padding: u32) -> String {
    format!(
        r#"<?xml version='1.0' encoding='UTF-8'?>
<Parallels_disk_image Version="1.0">
    <Disk_Parameters>
        <Disk_size>{size_sectors}</Disk_size>
        <Cylinders>16</Cylinders>
        <Heads>16</Heads>
        <Sectors>32</Sectors>
        <Padding>{padding}</Padding>
        <UID>{{0610bb35-447e-4aae-aa79-f1571d969081}}</UID>
    </Disk_Parameters>
    <StorageData>{storages}</StorageData>
    <Snapshots>{shots}</Snapshots>
</Parallels_disk_image>
"#
    )
}

const TOP: &str = "{5fbaabe3-6958-40ff-92a7-860e329aab41}";
const BASE: &str = "{11111111-2222-3333-4444-555555555555}";
const NIL: &str = "{00000000-0000-0000-0000-000000000000}";

fn storage(start: u64, end: u64, images: &[(&str, &str, &str)]) -> String {
    let mut s =
        format!("<Storage><Start>{start}</Start><End>{end}</End><Blocksize>2048</Blocksize>");
    for (g, t, f) in images {
        s += &format!("<Image><GUID>{g}</GUID><Type>{t}</Type><File>{f}</File></Image>");
    }
    s + "</Storage>"
}

fn shot(g: &str, p: &str) -> String {
    format!("<Shot><GUID>{g}</GUID><ParentGUID>{p}</ParentGUID></Shot>")
}

fn make_hds(p: &Path, size: u64, writes: &[(u64, u8, usize)]) {
    let _ = std::fs::remove_file(p);
    let opts = CreateOptions {
        size,
        variant: Variant::Dynamic,
        parent: None,
    };
    let img = ParallelsFormat.create(p, &opts).unwrap();
    for &(off, v, len) in writes {
        img.write_at(&vec![v; len], off, &NoLowerLayers).unwrap();
    }
}

fn bundle_err(dir: &Path, xml: &str) -> StorageError {
    std::fs::write(dir.join("DiskDescriptor.xml"), xml).unwrap();
    match Bundle::open(dir, false) {
        Err(e) => e,
        Ok(_) => panic!("bundle opened: {xml}"),
    }
}

#[test]
fn bundle_errors() {
    let d = scratch("bundle-bad").join("b.hdd");
    std::fs::create_dir_all(&d).unwrap();
    make_hds(&d.join("top.hds"), 4 * MIB, &[]);
    make_hds(&d.join("base.hds"), 4 * MIB, &[]);
    let sectors = 4 * MIB / 512;
    let one = storage(
        0,
        sectors,
        &[
            (TOP, "Compressed", "top.hds"),
            (BASE, "Compressed", "base.hds"),
        ],
    );

    let e = bundle_err(&d, "<Parallels_disk_image><Disk_Parameters>");
    assert!(
        matches!(&e, StorageError::Corrupt { detail, .. } if detail.contains("bad XML")),
        "{e}"
    );
    assert!(e.to_string().contains("DiskDescriptor.xml"));

    let e = bundle_err(&d, "<Other/>");
    assert!(e.to_string().contains("root element"), "{e}");

    let e = bundle_err(
        &d,
        &bundle_xml(
            sectors,
            &storage(0, sectors, &[(TOP, "Compressed", "nothere.hds")]),
            &shot(TOP, NIL),
            0,
        ),
    );
    assert!(
        matches!(&e, StorageError::Io { path, .. } if path.ends_with("nothere.hds")),
        "{e}"
    );

    let e = bundle_err(
        &d,
        &bundle_xml(sectors, &one, &(shot(TOP, BASE) + &shot(BASE, TOP)), 0),
    );
    assert!(e.to_string().contains("loop"), "{e}");

    let e = bundle_err(&d, &bundle_xml(sectors, &one, &shot(TOP, BASE), 0));
    assert!(e.to_string().contains("not listed"), "{e}");

    let e = bundle_err(
        &d,
        &bundle_xml(
            sectors,
            &storage(0, sectors, &[(TOP, "Compressed", "top.hds")]),
            &(shot(TOP, BASE) + &shot(BASE, NIL)),
            0,
        ),
    );
    assert!(e.to_string().contains("no image for snapshot"), "{e}");

    // Padded: the images must hold the padding too, and these hold only Disk_size.
    let e = bundle_err(
        &d,
        &bundle_xml(sectors, &one, &(shot(TOP, BASE) + &shot(BASE, NIL)), 1),
    );
    assert!(
        matches!(&e, StorageError::Corrupt { path, detail } if path.ends_with("top.hds") && detail.contains(&format!("range {} bytes", 4 * MIB + 512))),
        "{e}"
    );
    let e = bundle_err(
        &d,
        &bundle_xml(sectors, &one, &shot(TOP, NIL), u64::MAX as u32),
    );
    assert!(
        e.to_string().contains("short of") || e.to_string().contains("holds"),
        "{e}"
    );

    let e = bundle_err(
        &d,
        &bundle_xml(2 * sectors, &one, &(shot(TOP, BASE) + &shot(BASE, NIL)), 0),
    );
    assert!(e.to_string().contains("short of Disk_size"), "{e}");

    let gap = storage(0, 100, &[(TOP, "Plain", "top.hds")])
        + &storage(200, sectors, &[(TOP, "Plain", "top.hds")]);
    let e = bundle_err(&d, &bundle_xml(sectors, &gap, &shot(TOP, NIL), 0));
    assert!(e.to_string().contains("gap"), "{e}");

    let e = bundle_err(
        &d,
        &bundle_xml(
            sectors,
            &storage(0, sectors, &[(TOP, "Compressed", "../x.hds")]),
            &shot(TOP, NIL),
            0,
        ),
    );
    assert!(e.to_string().contains("outside the bundle"), "{e}");

    let e = bundle_err(
        &d,
        &bundle_xml(
            sectors,
            &storage(0, sectors, &[(TOP, "Zipped", "top.hds")]),
            &shot(TOP, NIL),
            0,
        ),
    );
    assert!(e.to_string().contains("unknown Type"), "{e}");

    let e = bundle_err(&d, &bundle_xml(u64::MAX, &one, &shot(TOP, NIL), 0));
    assert!(e.to_string().contains("absurd"), "{e}");

    // An extent smaller than its range.
    make_hds(&d.join("small.hds"), MIB, &[]);
    let e = bundle_err(
        &d,
        &bundle_xml(
            sectors,
            &storage(0, sectors, &[(TOP, "Compressed", "small.hds")]),
            &shot(TOP, NIL),
            0,
        ),
    );
    assert!(
        matches!(&e, StorageError::Corrupt { path, .. } if path.ends_with("small.hds")),
        "{e}"
    );

    std::fs::remove_file(d.join("DiskDescriptor.xml")).unwrap();
    assert!(matches!(
        Bundle::open(&d, false),
        Err(StorageError::Io { .. })
    ));
}

#[test]
fn two_snapshot_bundle_reads_through_and_writes_copy_on_write() {
    let d = scratch("bundle-chain").join("chain.hdd");
    std::fs::create_dir_all(&d).unwrap();
    let size = 6 * MIB;
    // Split into two storages of 3 MiB each, each with a base and a top snapshot file.
    make_hds(
        &d.join("chain.hdd.0.base.hds"),
        3 * MIB,
        &[(0, 1, 2 * MIB as usize)],
    );
    make_hds(&d.join("chain.hdd.0.top.hds"), 3 * MIB, &[(MIB, 2, 4096)]);
    make_hds(
        &d.join("chain.hdd.1.base.hds"),
        3 * MIB,
        &[(MIB, 3, MIB as usize)],
    );
    make_hds(&d.join("chain.hdd.1.top.hds"), 3 * MIB, &[]);
    let half = 3 * MIB / 512;
    let storages = storage(
        0,
        half,
        &[
            (BASE, "Compressed", "chain.hdd.0.base.hds"),
            (TOP, "Compressed", "chain.hdd.0.top.hds"),
        ],
    ) + &storage(
        half,
        2 * half,
        &[
            (TOP, "Compressed", "chain.hdd.1.top.hds"),
            (BASE, "Compressed", "chain.hdd.1.base.hds"),
        ],
    );
    let xml = bundle_xml(
        size / 512,
        &storages,
        &(shot(BASE, NIL) + &shot(TOP, BASE)),
        0,
    );
    std::fs::write(d.join("DiskDescriptor.xml"), xml).unwrap();

    let mut model = vec![0u8; size as usize];
    model[..2 * MIB as usize].fill(1);
    model[MIB as usize..MIB as usize + 4096].fill(2);
    // The top's cluster 1 was written without a lower layer: the rest of it is its own zeros.
    model[MIB as usize + 4096..2 * MIB as usize].fill(0);
    model[4 * MIB as usize..5 * MIB as usize].fill(3);
    {
        let f = ParallelsFormat;
        assert!(f.probe(&d, &[]));
        let b = f.open(&d, true).unwrap();
        assert_eq!(b.virtual_size(), size);
        assert_eq!(b.parent(), None);
        assert_eq!(b.files().len(), 5);
        let mut got = vec![0u8; size as usize];
        b.read_at(&mut got, 0).unwrap();
        assert!(got == model, "chain reads wrong");
        // A partial write in the top over base data keeps the base's bytes around it, and a
        // write across the storage boundary lands in both tops.
        b.write_at(&[9u8; 100], 50, &NoLowerLayers).unwrap();
        model[50..150].fill(9);
        b.write_at(&[8u8; 2000], 3 * MIB - 1000, &NoLowerLayers)
            .unwrap();
        model[3 * MIB as usize - 1000..3 * MIB as usize + 1000].fill(8);
        b.flush().unwrap();
        b.read_at(&mut got, 0).unwrap();
        assert!(got == model, "after writes");
    }
    let b = Bundle::open(&d, false).unwrap();
    assert_eq!(b.depth(), 2);
    let mut got = vec![0u8; size as usize];
    b.read_at(&mut got, 0).unwrap();
    assert!(got == model, "after reopen");
    // The base files were not written.
    let base = ParallelsImage::open(
        Arc::new(LocalFile::open(&d.join("chain.hdd.0.base.hds"), false).unwrap()),
        false,
    )
    .unwrap();
    let mut x = vec![0u8; 200];
    base.read_at(&mut x, 0).unwrap();
    assert!(x.iter().all(|&v| v == 1));
    // Every .hds stays a valid image for qemu-img.
    for f in [
        "chain.hdd.0.base.hds",
        "chain.hdd.0.top.hds",
        "chain.hdd.1.base.hds",
        "chain.hdd.1.top.hds",
    ] {
        let out = std::process::Command::new("qemu-img")
            .args(["check", "-f", "parallels"])
            .arg(d.join(f))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
