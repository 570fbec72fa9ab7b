//! `ferry run VM.toml`: the file's settings, flags over them, errors that name the key and
//! the line, and attachments opened by their medium type's rules before the run is refused
//! for want of a storage controller. Every case fails before a guest would start.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ferry_storage::{
    create_image, open_attachment, CreateOptions, FormatKind, MediumType, Variant,
};

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("vmtoml-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Just enough of a bzImage header to pass ferry's kernel check.
fn fake_kernel(path: &Path) {
    let mut h = vec![0u8; 0x1000];
    h[0x1fe] = 0x55;
    h[0x1ff] = 0xaa;
    h[0x202..0x206].copy_from_slice(b"HdrS");
    h[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    h[0x211] = 1;
    h[0x236] = 1;
    std::fs::write(path, h).unwrap();
}

fn vdi(path: &Path) {
    create_image(
        path,
        FormatKind::Vdi,
        &CreateOptions {
            size: 4 << 20,
            variant: Variant::Dynamic,
            parent: None,
        },
    )
    .unwrap();
}

/// Runs `ferry run` from `cwd` (not the VM.toml's folder, to test relative paths).
fn run_in(cwd: &Path, args: &[&str]) -> Output {
    ferry()
        .current_dir(cwd)
        .arg("run")
        .args(args)
        .output()
        .unwrap()
}

fn assert_clean_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(err.contains(needle), "'{needle}' not in: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.contains("error")).count(),
        1,
        "{err}"
    );
}

const STORAGE: &str = r#"
[[storagectl]]
name = "SATA"
type = "ahci"

[[attach]]
ctl = "SATA"
port = 0
medium = "disk.vdi"
"#;

#[test]
fn file_settings_with_flags_over_them() {
    let d = scratch("override");
    fake_kernel(&d.join("vmlinuz"));
    let vm = d.join("VM.toml");
    // The kernel path is relative to the file; the memory too small to boot.
    std::fs::write(&vm, "kernel = \"vmlinuz\"\nmemory = \"8M\"\ncpus = 1\n").unwrap();
    let elsewhere = scratch("override-cwd");
    let vm_s = vm.to_str().unwrap();
    assert_clean_error(&run_in(&elsewhere, &[vm_s]), "too small");
    // A flag wins over the file.
    assert_clean_error(
        &run_in(&elsewhere, &[vm_s, "--memory", "64T"]),
        "more than this host has",
    );
    assert_clean_error(
        &run_in(&elsewhere, &[vm_s, "--memory", "64M", "--cpus", "0"]),
        "at least one vCPU",
    );
}

#[test]
fn errors_name_the_key_and_line() {
    let d = scratch("errors");
    let vm = d.join("VM.toml");
    let vm_s = vm.to_str().unwrap();
    std::fs::write(&vm, "memory = \"1G\"\ncolour = \"red\"\n").unwrap();
    assert_clean_error(
        &run_in(&d, &[vm_s]),
        "VM.toml line 2 (colour = \"red\"): unknown key `colour`",
    );
    std::fs::write(&vm, format!("{STORAGE}mtype = \"sticky\"\n")).unwrap();
    assert_clean_error(
        &run_in(&d, &[vm_s]),
        "line 10 (mtype = \"sticky\"): 'sticky' is not a medium type",
    );
    std::fs::write(&vm, STORAGE.replace("type = \"ahci\"", "type = \"floppy\"")).unwrap();
    assert_clean_error(&run_in(&d, &[vm_s]), "line 4 (type = \"floppy\")");
    std::fs::write(&vm, STORAGE.replace("ctl = \"SATA\"", "ctl = \"IDE\"")).unwrap();
    assert_clean_error(
        &run_in(&d, &[vm_s]),
        "line 7 (ctl = \"IDE\"): ctl = 'IDE': no controller has that name",
    );
    std::fs::write(&vm, STORAGE.replace("port = 0", "port = 30")).unwrap();
    assert_clean_error(&run_in(&d, &[vm_s]), "line 8 (port = 30)");
    std::fs::write(&vm, "memory = [1, 2\n").unwrap();
    assert_clean_error(&run_in(&d, &[vm_s]), "VM.toml line 1");
    assert_clean_error(&run_in(&d, &["missing.toml"]), "cannot read missing.toml");
    // Flags follow the same rules; clap reports them (exit code 2).
    let out = run_in(&d, &["--attach", "ctl=SATA,port=0,medium=x,colour=red"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("unknown key `colour`"), "{err}");
}

#[test]
fn attachment_needs_a_controller_model() {
    let d = scratch("noctl");
    vdi(&d.join("disk.vdi"));
    let vm = d.join("VM.toml");
    std::fs::write(
        &vm,
        STORAGE.replace("type = \"ahci\"", "type = \"lsilogic\""),
    )
    .unwrap();
    let elsewhere = scratch("noctl-cwd");
    assert_clean_error(
        &run_in(&elsewhere, &[vm.to_str().unwrap()]),
        "storage controller type 'lsilogic' is not implemented yet",
    );
    // The same from flags alone.
    let disk = d.join("disk.vdi");
    assert_clean_error(
        &run_in(
            &d,
            &[
                "--storagectl",
                "name=NVMe,type=nvme",
                "--attach",
                &format!("ctl=NVMe,port=0,medium={}", disk.display()),
            ],
        ),
        "storage controller type 'nvme' is not implemented yet",
    );
    // A medium that is not there is reported before that.
    std::fs::remove_file(&disk).unwrap();
    assert_clean_error(&run_in(&elsewhere, &[vm.to_str().unwrap()]), "disk.vdi");
}

#[test]
fn copied_image_is_refused_with_advice() {
    let d = scratch("dup");
    vdi(&d.join("disk.vdi"));
    std::fs::copy(d.join("disk.vdi"), d.join("copy.vdi")).unwrap();
    let vm = d.join("VM.toml");
    std::fs::write(
        &vm,
        format!("{STORAGE}\n[[attach]]\nctl = \"SATA\"\nport = 1\nmedium = \"copy.vdi\"\n"),
    )
    .unwrap();
    let out = run_in(&d, &[vm.to_str().unwrap()]);
    assert_clean_error(&out, "have the same UUID");
    assert_clean_error(&out, "ferry medium set-uuid");
}

#[test]
fn image_in_use_is_refused() {
    let d = scratch("locked");
    vdi(&d.join("disk.vdi"));
    let vm = d.join("VM.toml");
    std::fs::write(&vm, STORAGE).unwrap();
    // This test process plays the other VM.
    let held = open_attachment(&d.join("disk.vdi"), MediumType::Normal, &d, &[]).unwrap();
    let out = run_in(&d, &[vm.to_str().unwrap()]);
    assert_clean_error(&out, "disk.vdi is in use by process");
    drop(held);
    // Read-only attachments share. Another test's child process, forked while `held` was
    // open and not yet exec'd, can keep the lock's open file alive for a moment: retry.
    let mut tries = 0;
    let _ro = loop {
        match open_attachment(&d.join("disk.vdi"), MediumType::Readonly, &d, &[]) {
            Ok(a) => break a,
            Err(e) if tries < 50 => {
                tries += 1;
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("{e}"),
        }
    };
    std::fs::write(
        &vm,
        format!("firmware = \"missing-bios.bin\"\n{STORAGE}mtype = \"readonly\"\n"),
    )
    .unwrap();
    // The media opened: what stops the run now is the missing firmware image.
    assert_clean_error(
        &run_in(&d, &[vm.to_str().unwrap()]),
        "cannot read the firmware image",
    );
}

#[test]
fn immutable_child_goes_to_the_vm_folder() {
    let d = scratch("immutable");
    let base = d.join("images");
    std::fs::create_dir_all(&base).unwrap();
    vdi(&base.join("base.vdi"));
    let vmdir = d.join("vm");
    std::fs::create_dir_all(&vmdir).unwrap();
    std::fs::write(
        vmdir.join("VM.toml"),
        format!(
            "firmware = \"missing-bios.bin\"\n{}",
            STORAGE.replace(
                "\"disk.vdi\"",
                "\"../images/base.vdi\"\nmtype = \"immutable\"",
            )
        ),
    )
    .unwrap();
    let out = run_in(&d, &[vmdir.join("VM.toml").to_str().unwrap()]);
    // The media opened (the child is made), then the missing firmware image stops the run.
    assert_clean_error(&out, "cannot read the firmware image");
    let snaps: Vec<_> = std::fs::read_dir(vmdir.join("Snapshots"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(snaps.len(), 1);
    assert!(snaps[0].file_name().to_string_lossy().ends_with(".vdi"));
}
