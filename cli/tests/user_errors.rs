//! Bad input from a user: one clear sentence on stderr, a non-zero exit, never a panic.
//! These run on any host: every case fails before a guest would start.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Just enough of a bzImage header to pass ferry's kernel check.
fn fake_kernel(dir: &Path) -> PathBuf {
    let mut h = vec![0u8; 0x1000];
    h[0x1fe] = 0x55;
    h[0x1ff] = 0xaa;
    h[0x202..0x206].copy_from_slice(b"HdrS");
    h[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    h[0x211] = 1;
    h[0x236] = 1;
    let p = dir.join("vmlinuz");
    std::fs::write(&p, h).unwrap();
    p
}

/// Asserts a clean failure whose message contains `needle`.
fn assert_clean_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(err.contains(needle), "'{needle}' not in: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
}

fn run(args: &[&str]) -> Output {
    ferry().arg("run").args(args).output().unwrap()
}

#[test]
fn missing_kernel() {
    let out = run(&["--kernel", "/nonexistent/vmlinuz"]);
    assert_clean_error(&out, "does not exist");
}

#[test]
fn no_kernel_at_all() {
    assert_clean_error(&run(&[]), "nothing to boot");
}

/// A raw disk to attach, so that a run gets as far as the firmware.
fn disk_args(dir: &Path) -> Vec<String> {
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    vec![
        "--storagectl".into(),
        "name=s,type=ahci".into(),
        "--attach".into(),
        format!("ctl=s,port=0,medium={}", disk.display()),
    ]
}

fn run_owned(args: &[String]) -> Output {
    ferry().arg("run").args(args).output().unwrap()
}

#[test]
fn firmware_file_missing() {
    let d = scratch("fwmissing");
    let mut a = disk_args(&d);
    a.extend(["--firmware".into(), "/nonexistent/bios.bin".into()]);
    assert_clean_error(&run_owned(&a), "/nonexistent/bios.bin");
}

#[test]
fn firmware_file_of_the_wrong_size() {
    let d = scratch("fwsize");
    let f = d.join("bios.bin");
    std::fs::write(&f, vec![0u8; 1000]).unwrap();
    let mut a = disk_args(&d);
    a.extend(["--firmware".into(), f.display().to_string()]);
    assert_clean_error(&run_owned(&a), "bios.bin");
}

#[test]
fn firmware_file_without_a_reset_vector() {
    let d = scratch("fwcorrupt");
    let f = d.join("bios.bin");
    std::fs::write(&f, vec![0u8; 256 << 10]).unwrap();
    let mut a = disk_args(&d);
    a.extend(["--firmware".into(), f.display().to_string()]);
    assert_clean_error(&run_owned(&a), "not a BIOS image");
}

#[test]
fn empty_boot_order() {
    let d = scratch("emptyboot");
    let toml = d.join("VM.toml");
    std::fs::write(&toml, "boot = []\n").unwrap();
    let mut a = vec![toml.display().to_string()];
    a.extend(disk_args(&d));
    assert_clean_error(&run_owned(&a), "the boot order is empty");
}

#[test]
fn not_a_bzimage() {
    let d = scratch("notbz");
    let f = d.join("notes.txt");
    std::fs::write(&f, "just text\n".repeat(200)).unwrap();
    assert_clean_error(
        &run(&["--kernel", f.to_str().unwrap()]),
        "not a Linux bzImage",
    );
}

#[test]
fn missing_initrd() {
    let d = scratch("noinitrd");
    let k = fake_kernel(&d);
    let out = run(&[
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        "/nonexistent/initrd",
    ]);
    assert_clean_error(&out, "initrd");
}

#[test]
fn memory_too_small() {
    let d = scratch("small");
    let k = fake_kernel(&d);
    let out = run(&["--kernel", k.to_str().unwrap(), "--memory", "8M"]);
    assert_clean_error(&out, "too small");
}

#[test]
fn memory_larger_than_host() {
    let d = scratch("huge");
    let k = fake_kernel(&d);
    let out = run(&["--kernel", k.to_str().unwrap(), "--memory", "64T"]);
    assert_clean_error(&out, "more than this host has");
}

#[test]
fn memory_not_a_size() {
    let out = run(&["--kernel", "x", "--memory", "lots"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not a size"), "{err}");
}

#[test]
fn zero_cpus() {
    let d = scratch("zero");
    let k = fake_kernel(&d);
    let out = run(&["--kernel", k.to_str().unwrap(), "--cpus", "0"]);
    assert_clean_error(&out, "at least one vCPU");
}

#[test]
fn too_many_cpus() {
    let d = scratch("many");
    let k = fake_kernel(&d);
    let out = run(&["--kernel", k.to_str().unwrap(), "--cpus", "1000"]);
    assert_clean_error(&out, "at most");
}

#[test]
fn bad_serial_target() {
    let out = run(&["--kernel", "x", "--serial", "tcp:1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("stdio, file:PATH or unix:PATH"), "{err}");
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Runs ferry in a private mount namespace where /dev is replaced, optionally as `nobody`.
fn run_with_private_dev(setup: &str, as_nobody: bool, kernel: &Path) -> Option<Output> {
    if !is_root() {
        eprintln!("skipped: needs root for a private mount namespace");
        return None;
    }
    let exe = env!("CARGO_BIN_EXE_ferry");
    let drop = if as_nobody {
        "setpriv --reuid=65534 --regid=65534 --clear-groups"
    } else {
        ""
    };
    let script = format!(
        "mount -t tmpfs tmpfs /dev && {setup} exec {drop} {exe} run --kernel {}",
        kernel.display()
    );
    Some(
        Command::new("unshare")
            .args(["-m", "sh", "-c", &script])
            .output()
            .unwrap(),
    )
}

#[test]
fn no_dev_kvm() {
    let d = scratch("nokvm");
    let k = fake_kernel(&d);
    if let Some(out) = run_with_private_dev("", false, &k) {
        assert_clean_error(&out, "/dev/kvm does not exist");
    }
}

#[test]
fn no_permission_on_dev_kvm() {
    let d = scratch("noperm");
    // nobody must be able to read the kernel file and its folder.
    std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let k = fake_kernel(&d);
    if let Some(out) = run_with_private_dev("mknod -m 600 /dev/kvm c 10 232 &&", true, &k) {
        assert_clean_error(&out, "no permission to open /dev/kvm");
    }
}
