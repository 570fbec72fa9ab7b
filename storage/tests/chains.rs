//! Differencing chains across formats: a child of one format over a parent of another, parents
//! found by path or by UUID (beside the child, in the folder above, in the paths given), and the
//! clear errors for a missing parent, a UUID mismatch and a loop.

use std::path::{Path, PathBuf};

use ferry_storage::layer::CreateParent;
use ferry_storage::{
    create_image, open_image, CreateOptions, Disk, FormatKind, StorageError, Variant,
};

const MIB: u64 = 1 << 20;

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chains-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn base(path: &Path, kind: FormatKind, fill: u8) {
    let layer = create_image(
        path,
        kind,
        &CreateOptions {
            size: 8 * MIB,
            variant: Variant::Dynamic,
            parent: None,
        },
    )
    .unwrap();
    let disk = Disk::from_layers(vec![layer]).unwrap();
    disk.write_at(&vec![fill; MIB as usize], 0).unwrap();
    disk.flush().unwrap();
}

fn child(path: &Path, kind: FormatKind, parent: &Path) {
    let p = open_image(parent, false).unwrap();
    let opts = CreateOptions {
        size: p.virtual_size(),
        variant: Variant::Dynamic,
        parent: Some(CreateParent {
            path: parent.to_path_buf(),
            uuid: p.uuid(),
            modification_uuid: p.modification_uuid(),
            format: p.format(),
        }),
    };
    drop(p);
    create_image(path, kind, &opts).unwrap().flush().unwrap();
}

/// Writes through the chain at `top`, then checks what every byte reads as.
fn check_chain(top: &Path, expect_layers: usize) {
    let disk = Disk::open(top, true, &[]).unwrap();
    assert_eq!(
        disk.layers().len(),
        expect_layers,
        "layers of {}",
        top.display()
    );
    // Half a MiB into the parent's data and half past it, not aligned to any block.
    disk.write_at(&vec![0xb7; MIB as usize], MIB / 2 + 512)
        .unwrap();
    disk.flush().unwrap();
    drop(disk);
    let disk = Disk::open(top, false, &[]).unwrap();
    let mut buf = vec![0u8; 4 * MIB as usize];
    disk.read_at(&mut buf, 0).unwrap();
    let (a, rest) = buf.split_at(MIB as usize / 2 + 512);
    assert!(a.iter().all(|&b| b == 0xa1), "parent data shows through");
    let (b, c) = rest.split_at(MIB as usize);
    assert!(b.iter().all(|&x| x == 0xb7), "the child's write");
    assert!(c.iter().all(|&x| x == 0), "unwritten space reads zeros");
}

#[test]
fn vhd_child_over_vdi_parent() {
    let d = scratch("vhd-over-vdi");
    base(&d.join("base.vdi"), FormatKind::Vdi, 0xa1);
    child(&d.join("child.vhd"), FormatKind::Vhd, &d.join("base.vdi"));
    check_chain(&d.join("child.vhd"), 2);
}

#[test]
fn vdi_child_over_vhd_parent_found_by_uuid() {
    let d = scratch("vdi-over-vhd");
    base(&d.join("base.vhd"), FormatKind::Vhd, 0xa1);
    // VirtualBox's layout: children in Snapshots/, named by UUID only.
    std::fs::create_dir_all(d.join("Snapshots")).unwrap();
    child(
        &d.join("Snapshots/{child}.vdi"),
        FormatKind::Vdi,
        &d.join("base.vhd"),
    );
    check_chain(&d.join("Snapshots/{child}.vdi"), 2);
}

#[test]
fn three_levels_of_mixed_formats() {
    let d = scratch("three");
    base(&d.join("base.vdi"), FormatKind::Vdi, 0xa1);
    child(&d.join("mid.vdi"), FormatKind::Vdi, &d.join("base.vdi"));
    child(&d.join("top.vhd"), FormatKind::Vhd, &d.join("mid.vdi"));
    check_chain(&d.join("top.vhd"), 3);
}

#[test]
fn missing_parent_names_the_uuid() {
    let d = scratch("missing");
    base(&d.join("base.vdi"), FormatKind::Vdi, 0xa1);
    child(&d.join("child.vdi"), FormatKind::Vdi, &d.join("base.vdi"));
    let want = open_image(&d.join("base.vdi"), false)
        .unwrap()
        .uuid()
        .unwrap();
    // The parent moves away: not beside the child, not in the folder above.
    let elsewhere = scratch("missing-elsewhere").join("deeper");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::rename(d.join("base.vdi"), elsewhere.join("moved.vdi")).unwrap();
    match Disk::open(&d.join("child.vdi"), false, &[]) {
        Err(e @ StorageError::ParentNotFound { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&want.to_string()) && msg.contains("child.vdi"),
                "{msg}"
            );
        }
        other => panic!("expected ParentNotFound, got {:?}", other.map(|_| ())),
    }
    // Found again through a search path the user gives.
    let disk = Disk::open(&d.join("child.vdi"), false, &[elsewhere]).unwrap();
    assert_eq!(disk.layers().len(), 2);
}

#[test]
fn parent_path_with_the_wrong_uuid_is_a_mismatch() {
    let d = scratch("mismatch");
    base(&d.join("base.vdi"), FormatKind::Vdi, 0xa1);
    child(&d.join("child.vhd"), FormatKind::Vhd, &d.join("base.vdi"));
    // Another disk put where the parent was.
    std::fs::remove_file(d.join("base.vdi")).unwrap();
    base(&d.join("base.vdi"), FormatKind::Vdi, 0xa1);
    match Disk::open(&d.join("child.vhd"), false, &[]) {
        Err(StorageError::ParentMismatch { .. }) => {}
        other => panic!("expected ParentMismatch, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn a_loop_of_parents_is_an_error() {
    let d = scratch("loop");
    base(&d.join("p.vdi"), FormatKind::Vdi, 0xa1);
    child(&d.join("c.vdi"), FormatKind::Vdi, &d.join("p.vdi"));
    // Make a child of c and give it p's UUID: c -> "p" -> c.
    let p_uuid = open_image(&d.join("p.vdi"), false).unwrap().uuid().unwrap();
    child(&d.join("loop.vdi"), FormatKind::Vdi, &d.join("c.vdi"));
    std::fs::remove_file(d.join("p.vdi")).unwrap();
    let mut bytes = std::fs::read(d.join("loop.vdi")).unwrap();
    // VDI 1.1 header: the image's own UUID at 0x188, little-endian GUID layout.
    bytes[0x188..0x198].copy_from_slice(&p_uuid.to_bytes_le());
    std::fs::write(d.join("loop.vdi"), bytes).unwrap();
    match Disk::open(&d.join("c.vdi"), false, &[]) {
        Err(StorageError::ParentLoop { .. }) => {}
        other => panic!("expected ParentLoop, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn probing_ignores_the_file_name() {
    let d = scratch("probe");
    base(&d.join("disk.vdi"), FormatKind::Vdi, 0xa1);
    std::fs::rename(d.join("disk.vdi"), d.join("disk.vmdk")).unwrap();
    assert_eq!(
        open_image(&d.join("disk.vmdk"), false).unwrap().format(),
        FormatKind::Vdi
    );
    // A format ferry does not read is named, with the formats it tried.
    let mut q = vec![0u8; 4096];
    q[..4].copy_from_slice(b"QFI\xfb");
    std::fs::write(d.join("disk.qcow2"), &q).unwrap();
    let msg = open_image(&d.join("disk.qcow2"), false)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("qcow2") && msg.contains("vdi") && msg.contains("vhd"),
        "{msg}"
    );
}
