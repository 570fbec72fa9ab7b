//! Medium types and image locks: how a VM opens its attachments, the duplicate-UUID check for
//! copied images, and locks that refuse a second VM, and QEMU, while an image is in use.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ferry_storage::attachment::open_attachment_with;
use ferry_storage::{
    create_image, open_attachment, AttachmentSet, CreateOptions, Disk, FormatKind, MediumType,
    Placement, StorageError, Variant,
};

const MIB: u64 = 1 << 20;

/// Tests here take OFD locks and some spawn qemu-img: a fork while another test holds a lock
/// gives the child that lock's open file description until it execs, so a test that drops a
/// lock and takes it again could find it still held. One test at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("medium-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn image(path: &Path, kind: FormatKind, variant: Variant, fill: u8) {
    let layer = create_image(
        path,
        kind,
        &CreateOptions {
            size: 4 * MIB,
            variant,
            parent: None,
        },
    )
    .unwrap();
    let disk = Disk::from_layers(vec![layer]).unwrap();
    disk.write_at(&vec![fill; 4096], 0).unwrap();
    disk.flush().unwrap();
}

fn first_byte(disk: &Disk) -> u8 {
    let mut b = [0u8; 512];
    disk.read_at(&mut b, 0).unwrap();
    b[0]
}

fn qemu_img() -> bool {
    Command::new("qemu-img").arg("--version").output().is_ok()
}

#[test]
fn normal_medium_is_one_vm_at_a_time() {
    let _serial = serial();
    let d = scratch("normal");
    let img = d.join("disk.vdi");
    image(&img, FormatKind::Vdi, Variant::Dynamic, 1);
    let a = open_attachment(&img, MediumType::Normal, &d, &[]).unwrap();
    let e = open_attachment(&img, MediumType::Normal, &d.join("other-vm"), &[])
        .err()
        .expect("a second open must be refused");
    assert!(matches!(e, StorageError::Locked { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("disk.vdi is in use by"), "{msg}");
    // Not even read-only while it is being written.
    assert!(open_attachment(&img, MediumType::Readonly, &d, &[]).is_err());
    a.disk.write_at(&[7u8; 512], 0).unwrap();
    drop(a);
    let b = open_attachment(&img, MediumType::Normal, &d, &[]).unwrap();
    assert_eq!(first_byte(&b.disk), 7);
}

#[test]
fn readonly_media_share_and_refuse_writes() {
    let _serial = serial();
    let d = scratch("readonly");
    let img = d.join("disk.vdi");
    image(&img, FormatKind::Vdi, Variant::Dynamic, 3);
    let a = open_attachment(&img, MediumType::Readonly, &d, &[]).unwrap();
    let b = open_attachment(&img, MediumType::Readonly, &d, &[]).unwrap();
    assert!(a.disk.write_at(&[0u8; 512], 0).is_err());
    assert_eq!(first_byte(&b.disk), 3);
    assert!(open_attachment(&img, MediumType::Normal, &d, &[]).is_err());
}

#[test]
fn immutable_resets_at_power_on_unless_autoreset_is_off() {
    let _serial = serial();
    let d = scratch("immutable");
    let img = d.join("base.vdi");
    image(&img, FormatKind::Vdi, Variant::Dynamic, 5);
    let vm = d.join("vm");
    let a = open_attachment(&img, MediumType::Immutable, &vm, &[]).unwrap();
    let child = a.child.clone().unwrap();
    assert!(
        child.starts_with(vm.join("Snapshots")),
        "{}",
        child.display()
    );
    a.disk.write_at(&[9u8; 512], 0).unwrap();
    assert_eq!(first_byte(&a.disk), 9);
    a.disk.flush().unwrap();
    drop(a);
    // The base never changed.
    assert_eq!(first_byte(&Disk::open(&img, false, &[]).unwrap()), 5);
    // Power-on again: a fresh child.
    let b = open_attachment(&img, MediumType::Immutable, &vm, &[]).unwrap();
    assert_eq!(first_byte(&b.disk), 5);
    b.disk.write_at(&[8u8; 512], 0).unwrap();
    b.disk.flush().unwrap();
    drop(b);
    let keep = Placement {
        autoreset: false,
        ..Placement::new(&vm, &[])
    };
    let c = open_attachment_with(&img, MediumType::Immutable, &keep).unwrap();
    assert_eq!(first_byte(&c.disk), 8);
    // The same VM twice at once: its child is locked.
    assert!(open_attachment_with(&img, MediumType::Immutable, &keep).is_err());
    // Another VM uses the same base with its own child.
    let other = open_attachment(&img, MediumType::Immutable, &d.join("vm2"), &[]).unwrap();
    assert_eq!(first_byte(&other.disk), 5);
    // Nobody may write the base meanwhile.
    assert!(open_attachment(&img, MediumType::Normal, &d, &[]).is_err());
}

#[test]
fn multiattach_gives_each_vm_its_own_persistent_child() {
    let _serial = serial();
    let d = scratch("multi");
    let img = d.join("base.vdi");
    image(&img, FormatKind::Vdi, Variant::Dynamic, 2);
    let (vm1, vm2) = (d.join("vm1"), d.join("vm2"));
    let a = open_attachment(&img, MediumType::Multiattach, &vm1, &[]).unwrap();
    let b = open_attachment(&img, MediumType::Multiattach, &vm2, &[]).unwrap();
    a.disk.write_at(&[11u8; 512], 0).unwrap();
    a.disk.flush().unwrap();
    assert_eq!(first_byte(&b.disk), 2);
    drop((a, b));
    // Kept across power-ons.
    let a = open_attachment(&img, MediumType::Multiattach, &vm1, &[]).unwrap();
    assert_eq!(first_byte(&a.disk), 11);
}

#[test]
fn immutable_needs_a_base_with_a_uuid() {
    let _serial = serial();
    let d = scratch("immraw");
    let img = d.join("disk.raw");
    image(&img, FormatKind::Raw, Variant::Fixed, 1);
    let e = open_attachment(&img, MediumType::Immutable, &d, &[])
        .err()
        .unwrap();
    assert!(e.to_string().contains("has no UUID"), "{e}");
}

#[test]
fn shareable_is_for_fixed_images_only() {
    let _serial = serial();
    let d = scratch("shareable");
    let dynamic = d.join("dyn.vdi");
    image(&dynamic, FormatKind::Vdi, Variant::Dynamic, 1);
    let e = open_attachment(&dynamic, MediumType::Shareable, &d, &[])
        .err()
        .unwrap();
    assert!(e.to_string().contains("only a fixed-size image"), "{e}");
    let fixed = d.join("fixed.vdi");
    image(&fixed, FormatKind::Vdi, Variant::Fixed, 1);
    let a = open_attachment(&fixed, MediumType::Shareable, &d, &[]).unwrap();
    let b = open_attachment(&fixed, MediumType::Shareable, &d.join("vm2"), &[]).unwrap();
    a.disk.write_at(&[4u8; 512], 0).unwrap();
    a.disk.flush().unwrap();
    assert_eq!(first_byte(&b.disk), 4);
    // A normal attachment still cannot take it.
    assert!(open_attachment(&fixed, MediumType::Normal, &d, &[]).is_err());
}

#[test]
fn copied_image_is_a_duplicate_uuid() {
    let _serial = serial();
    let d = scratch("dup");
    let img = d.join("disk.vdi");
    image(&img, FormatKind::Vdi, Variant::Dynamic, 1);
    let copy = d.join("copy.vdi");
    std::fs::copy(&img, &copy).unwrap();
    let place = Placement::new(&d, &[]);
    let mut set = AttachmentSet::new();
    set.attach(&img, MediumType::Normal, &place).unwrap();
    let e = set
        .attach(&copy, MediumType::Normal, &place)
        .err()
        .expect("a copy with the same UUID must be refused");
    assert!(matches!(e, StorageError::DuplicateUuid { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("ferry medium set-uuid"), "{msg}");
    assert!(msg.contains("clone"), "{msg}");
    assert!(msg.contains("copy.vdi"), "{msg}");
}

#[test]
fn same_image_twice_in_one_vm() {
    let _serial = serial();
    let d = scratch("twice");
    let img = d.join("disk.vdi");
    image(&img, FormatKind::Vdi, Variant::Dynamic, 1);
    let place = Placement::new(&d, &[]);
    let mut set = AttachmentSet::new();
    set.attach(&img, MediumType::Normal, &place).unwrap();
    let e = set.attach(&img, MediumType::Normal, &place).err().unwrap();
    assert!(e.to_string().contains("attached twice"), "{e}");
    // Read-only twice is fine.
    drop(set);
    let mut set = AttachmentSet::new();
    set.attach(&img, MediumType::Readonly, &place).unwrap();
    set.attach(&img, MediumType::Readonly, &place).unwrap();
    assert_eq!(set.attachments().len(), 2);
}

#[test]
fn qemu_refuses_an_image_ferry_writes() {
    let _serial = serial();
    if !qemu_img() {
        eprintln!("skipped: qemu-img is not installed");
        return;
    }
    let d = scratch("qemu-refused");
    let img = d.join("disk.vdi");
    image(&img, FormatKind::Vdi, Variant::Dynamic, 1);
    let info = |force: bool| {
        let mut c = Command::new("qemu-img");
        c.arg("info");
        if force {
            c.arg("-U");
        }
        c.arg(&img).output().unwrap()
    };
    let a = open_attachment(&img, MediumType::Normal, &d, &[]).unwrap();
    let out = info(false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "qemu-img opened an image ferry writes"
    );
    assert!(err.contains("lock"), "{err}");
    // qemu-img's force-share still reads it, as it would from a QEMU VM.
    assert!(info(true).status.success());
    drop(a);
    assert!(info(false).status.success());
    // A read-only attachment lets qemu-img look.
    let r = open_attachment(&img, MediumType::Readonly, &d, &[]).unwrap();
    let out = info(false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ...but not write under a VM that reads it.
    let write = || {
        Command::new("qemu-io")
            .args(["-f", "vdi", "-c", "write -P 0x55 0 512"])
            .arg(&img)
            .output()
            .unwrap()
    };
    let out = write();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("lock"),
        "qemu-io wrote an image ferry reads: {text}"
    );
    drop(r);
    let out = write();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ferry_refuses_an_image_qemu_writes() {
    let _serial = serial();
    if !qemu_img() {
        eprintln!("skipped: qemu-img is not installed");
        return;
    }
    let d = scratch("qemu-holds");
    let img = d.join("disk.vdi");
    image(&img, FormatKind::Vdi, Variant::Dynamic, 1);
    // qemu-io keeps the image open (read-write) while it waits for commands on stdin.
    let mut qemu = Command::new("qemu-io")
        .args(["-f", "vdi"])
        .arg(&img)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut held = false;
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let probe = Command::new("qemu-img")
            .arg("info")
            .arg(&img)
            .output()
            .unwrap();
        if !probe.status.success() {
            held = true;
            break;
        }
    }
    assert!(held, "qemu-io did not lock the image");
    let e = open_attachment(&img, MediumType::Normal, &d, &[])
        .err()
        .expect("ferry must refuse an image QEMU writes");
    let msg = e.to_string();
    assert!(matches!(e, StorageError::Locked { .. }), "{msg}");
    assert!(msg.contains("qemu-io"), "the holder should be named: {msg}");
    // Reading beside a QEMU writer is refused too (QEMU does not share "write").
    assert!(open_attachment(&img, MediumType::Readonly, &d, &[]).is_err());
    let mut stdin = qemu.stdin.take().unwrap();
    let _ = stdin.write_all(b"quit\n");
    drop(stdin);
    qemu.wait().unwrap();
    open_attachment(&img, MediumType::Normal, &d, &[]).unwrap();
}
