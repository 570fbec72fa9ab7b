//! `ferry medium ...` as users run it: output, exit codes, bad input, interruptions.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use ferry_storage::{create_image, CreateOptions, Disk, FormatKind, Variant};

const MIB: u64 = 1 << 20;

fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env("FERRY_LOG", "error")
        .output()
        .unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-cli-medium-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn image(path: &Path, format: FormatKind, size: u64, data: u64) {
    let layer = create_image(
        path,
        format,
        &CreateOptions {
            size,
            variant: Variant::Dynamic,
            parent: None,
        },
    )
    .unwrap();
    let disk = Disk::from_layers(vec![layer]).unwrap();
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut buf = vec![0u8; MIB as usize];
    for chunk in 0..data / MIB {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        disk.write_at(&buf, chunk * MIB).unwrap();
    }
    disk.flush().unwrap();
}

fn content(path: &Path) -> Vec<u8> {
    let disk = Disk::open(path, false, &[]).unwrap();
    let mut buf = vec![0u8; disk.size() as usize];
    disk.read_at(&mut buf, 0).unwrap();
    buf
}

/// One `ferry: error:` line on stderr and a failing exit.
fn assert_one_sentence(out: &Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what}: succeeded");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: stderr is {err:?}");
    assert!(lines[0].starts_with("ferry: error: "), "{what}: {err:?}");
    assert!(!err.contains("panicked"), "{what}: {err}");
}

#[test]
fn bad_input_gives_one_sentence_and_leaves_the_file_alone() {
    let dir = scratch("bad");
    // A VDI cut short, a VDI whose map points two entries at one block, a qcow2 file, a VHD
    // whose footer checksum is wrong.
    let truncated = dir.join("truncated.vdi");
    image(&truncated, FormatKind::Vdi, 8 * MIB, MIB);
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..300]).unwrap();
    let corrupt = dir.join("corrupt.vdi");
    image(&corrupt, FormatKind::Vdi, 8 * MIB, 2 * MIB);
    let mut b = std::fs::read(&corrupt).unwrap();
    let off = u32::from_le_bytes(b[0x154..0x158].try_into().unwrap()) as usize;
    let first: [u8; 4] = b[off..off + 4].try_into().unwrap();
    b[off + 4..off + 8].copy_from_slice(&first);
    std::fs::write(&corrupt, &b).unwrap();
    let qcow = dir.join("disk.qcow2");
    assert!(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", p(&qcow), "8M"])
        .status()
        .unwrap()
        .success());
    let vhd = dir.join("sum.vhd");
    image(&vhd, FormatKind::Vhd, 8 * MIB, MIB);
    let mut b = std::fs::read(&vhd).unwrap();
    b[0x30] ^= 0x40;
    let n = b.len();
    b[n - 512 + 0x30] ^= 0x40;
    std::fs::write(&vhd, &b).unwrap();
    let out = dir.join("out.vdi");
    for bad in [&truncated, &corrupt, &qcow, &vhd] {
        let before = std::fs::read(bad).unwrap();
        let f = p(bad);
        let runs: Vec<Vec<&str>> = vec![
            vec!["medium", "info", f],
            vec!["medium", "info", f, "--json"],
            vec!["medium", "clone", f, p(&out), "--format", "vdi"],
            vec!["medium", "resize", f, "--size", "16M"],
            vec!["medium", "compact", f],
            vec!["medium", "merge", f],
            vec!["medium", "set-uuid", f],
            vec!["medium", "create", f, "--format", "vdi", "--size", "1M"],
        ];
        for args in runs {
            let o = ferry(&args);
            assert_one_sentence(&o, &format!("{args:?}"));
            assert!(
                std::fs::read(bad).unwrap() == before,
                "{args:?} changed {f}"
            );
            assert!(!out.exists(), "{args:?} left {}", out.display());
        }
        // check reports damage (exit 2) or refuses a non-image (exit 1), never changes it.
        for args in [
            vec!["medium", "check", f],
            vec!["medium", "check", f, "--repair"],
        ] {
            let o = ferry(&args);
            assert!(!o.status.success(), "{args:?}");
            assert!(
                std::fs::read(bad).unwrap() == before,
                "{args:?} changed {f}"
            );
        }
    }
    // Impossible arguments.
    let good = dir.join("good.vdi");
    image(&good, FormatKind::Vdi, 8 * MIB, MIB);
    let before = std::fs::read(&good).unwrap();
    let g = p(&good);
    for args in [
        vec!["medium", "resize", g, "--size", "0"],
        vec!["medium", "resize", g, "--size", "4M"],
        vec!["medium", "resize", g, "--size", "512K", "--allow-shrink"],
        vec!["medium", "set-uuid", g, "not-a-uuid"],
        vec!["medium", "merge", g],
        vec!["medium", "clone", g, g, "--format", "vdi", "--overwrite"],
        vec!["medium", "info", "/nonexistent/disk.vdi"],
    ] {
        let o = ferry(&args);
        assert_one_sentence(&o, &format!("{args:?}"));
        assert!(
            std::fs::read(&good).unwrap() == before,
            "{args:?} changed it"
        );
    }
    for args in [
        vec![
            "medium",
            "create",
            p(&out),
            "--format",
            "vdi",
            "--size",
            "lots",
        ],
        vec![
            "medium",
            "create",
            p(&out),
            "--format",
            "qcow2",
            "--size",
            "1M",
        ],
        vec!["medium", "create", p(&out), "--size", "1M"],
        vec![
            "medium",
            "create",
            p(&out),
            "--format",
            "vdi",
            "--size",
            "0",
        ],
        vec![
            "medium",
            "create",
            p(&out),
            "--format",
            "vdi",
            "--variant",
            "stream",
            "--size",
            "1M",
        ],
    ] {
        let o = ferry(&args);
        assert!(!o.status.success(), "{args:?}");
        assert!(!out.exists());
        assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn create_info_clone_round_trip() {
    let dir = scratch("round");
    let base = dir.join("base.vmdk");
    let o = ferry(&[
        "medium",
        "create",
        p(&base),
        "--format",
        "vmdk",
        "--size",
        "32M",
    ]);
    assert!(o.status.success(), "{o:?}");
    let child = dir.join("child.vmdk");
    let o = ferry(&["medium", "create", p(&child), "--parent", p(&base)]);
    assert!(o.status.success(), "{o:?}");
    let o = ferry(&["medium", "info", p(&child), "--json"]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["format"], "vmdk");
    assert_eq!(v["variant"], "dynamic");
    assert_eq!(v["virtual_size"], 32 * MIB);
    let chain = v["chain"].as_array().unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1]["uuid"], v["parent_uuid"]);
    assert!(chain[1]["file"].as_str().unwrap().ends_with("base.vmdk"));
    assert!(v["host_bytes"].as_u64().unwrap() < MIB);
    // Text output names the chain.
    let o = ferry(&["medium", "info", p(&child)]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("chain (top to base)") && text.contains("base.vmdk"),
        "{text}"
    );
    // Clone refuses an existing target unless --overwrite; no progress bar off a terminal.
    let dst = dir.join("flat.vhd");
    std::fs::write(&dst, b"keep").unwrap();
    let o = ferry(&["medium", "clone", p(&child), p(&dst), "--format", "vhd"]);
    assert_one_sentence(&o, "clone onto an existing file");
    assert_eq!(std::fs::read(&dst).unwrap(), b"keep");
    let o = ferry(&[
        "medium",
        "clone",
        p(&child),
        p(&dst),
        "--format",
        "vhd",
        "--overwrite",
    ]);
    assert!(o.status.success(), "{o:?}");
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = ferry(&["medium", "check", p(&dst), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["status"], "clean", "{v}");
    assert!(o.status.success());
    // --no-sync writes the same image (only without flushing it).
    let fast = dir.join("fast.vdi");
    let o = ferry(&[
        "medium",
        "clone",
        p(&dst),
        p(&fast),
        "--format",
        "vdi",
        "--no-sync",
    ]);
    assert!(o.status.success(), "{o:?}");
    assert!(content(&fast) == content(&dst));
    let o = ferry(&[
        "medium",
        "clone",
        p(&dst),
        p(&fast),
        "--format",
        "vdi",
        "--no-sync",
        "--overwrite",
    ]);
    assert!(
        !o.status.success(),
        "--no-sync with --overwrite must be refused"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_exit_codes_and_json() {
    let dir = scratch("check");
    let img = dir.join("leak.vdi");
    image(&img, FormatKind::Vdi, 8 * MIB, 2 * MIB);
    let mut b = std::fs::read(&img).unwrap();
    let off = u32::from_le_bytes(b[0x154..0x158].try_into().unwrap()) as usize;
    b[off..off + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&img, &b).unwrap();
    let o = ferry(&["medium", "check", p(&img), "--json"]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["status"], "leaks");
    assert_eq!(v["leaked_blocks"], 1);
    let o = ferry(&["medium", "check", p(&img), "--repair"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let o = ferry(&["medium", "check", p(&img)]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts `ferry args`, kills it with SIGKILL after `after`, and waits for it.
fn kill_after(args: &[&str], after: Duration) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn kill_9_leaves_the_source_intact() {
    let dir = scratch("kill");
    let src = dir.join("src.vdi");
    image(&src, FormatKind::Vdi, 256 * MIB, 160 * MIB);
    let want = content(&src);
    let before = std::fs::read(&src).unwrap();
    for ms in [30, 150, 400] {
        let dst = dir.join("dst.vmdk");
        kill_after(
            &["medium", "clone", p(&src), p(&dst), "--format", "vmdk"],
            Duration::from_millis(ms),
        );
        assert!(
            std::fs::read(&src).unwrap() == before,
            "clone changed its source"
        );
        // Either complete or absent: never a half image under the target's name.
        if dst.exists() {
            assert!(content(&dst) == want);
            std::fs::remove_file(&dst).unwrap();
        }
        kill_after(&["medium", "compact", p(&src)], Duration::from_millis(ms));
        assert!(
            content(&src) == want,
            "compact interrupted after {ms} ms lost data"
        );
    }
    // Merge: the child's disk reads the same whatever point the merge reached.
    let child = dir.join("child.vdi");
    let o = ferry(&["medium", "create", p(&child), "--parent", p(&src)]);
    assert!(o.status.success(), "{o:?}");
    {
        let disk = Disk::open(&child, true, &[]).unwrap();
        let fill = vec![0x5au8; 64 * MIB as usize];
        disk.write_at(&fill, 8 * MIB).unwrap();
        disk.flush().unwrap();
    }
    let want = content(&child);
    kill_after(&["medium", "merge", p(&child)], Duration::from_millis(100));
    let now = if child.exists() {
        content(&child)
    } else {
        content(&src)
    };
    assert!(
        now == want,
        "an interrupted merge changed the disk's content"
    );
    // Run again to the end: the parent then holds it all.
    if child.exists() {
        let o = ferry(&["medium", "merge", p(&child)]);
        assert!(o.status.success(), "{o:?}");
    }
    assert!(content(&src) == want);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `create B.hdd --parent B.hdd` adds a snapshot inside a Parallels bundle: same content,
/// a second level, and the descriptor names the new top.
#[test]
fn parallels_bundle_snapshot_from_the_command_line() {
    let dir = scratch("hdd").join("b.hdd");
    std::fs::create_dir_all(&dir).unwrap();
    let top = "{5fbaabe3-6958-40ff-92a7-860e329aab41}";
    image(&dir.join("b.hds"), FormatKind::Parallels, 4 * MIB, 2 * MIB);
    std::fs::write(
        dir.join("DiskDescriptor.xml"),
        format!(
            "<Parallels_disk_image Version=\"1.0\"><Disk_Parameters><Disk_size>8192</Disk_size>\
             <Padding>0</Padding></Disk_Parameters><StorageData><Storage><Start>0</Start>\
             <End>8192</End><Image><GUID>{top}</GUID><Type>Compressed</Type><File>b.hds</File>\
             </Image></Storage></StorageData><Snapshots><Shot><GUID>{top}</GUID>\
             <ParentGUID>{{00000000-0000-0000-0000-000000000000}}</ParentGUID></Shot></Snapshots>\
             </Parallels_disk_image>"
        ),
    )
    .unwrap();
    let before = content(&dir);
    let other = dir.parent().unwrap().join("c.hdd");
    for args in [
        vec!["medium", "create", p(&other), "--parent", p(&dir)],
        vec![
            "medium",
            "create",
            p(&dir),
            "--parent",
            p(&dir),
            "--size",
            "1M",
        ],
    ] {
        assert_one_sentence(&ferry(&args), &format!("{args:?}"));
    }
    let o = ferry(&["medium", "create", p(&dir), "--parent", p(&dir)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("created "));
    let xml = std::fs::read_to_string(dir.join("DiskDescriptor.xml")).unwrap();
    assert_eq!(xml.matches("<Shot>").count(), 2);
    assert_eq!(xml.matches("<TopGUID>").count(), 1);
    assert!(content(&dir) == before);
}
