//! boot-bench: time to the guest kit's `GUEST-READY` line, and the VMM's memory at that moment,
//! for ferry and QEMU booting the same guest with the same memory (512 MiB) and vCPU count (1).
//! Two modes:
//! - direct (`--kernel`, `--initrd`): ferry, QEMU q35 and QEMU microvm load the same kernel +
//!   initramfs with the same command line;
//! - BIOS (`--disk`, `--bios`): ferry (`--firmware bios`) and QEMU q35 (`-bios`) run the same
//!   SeaBIOS image, which boots the guest kit's extlinux disk (boot.raw) from a virtio-scsi disk;
//!   the kernel's command line is the one in the disk's extlinux.conf. microvm has no BIOS disk
//!   boot and is left out. Each VMM opens the same private copy of the disk (ferry has no
//!   snapshot mode; the guest only reads it), with the host page cache on for both.
//!
//! Runs where `/dev/kvm` has hardware virtualization behind it: a user's host, or the nested
//! test host (tests/testhost) on machines without it. Driver: tests/bench/boot/run.sh.
//!
//! Each boot: spawn the VMM with its serial console on a pipe (the clock starts at spawn), read
//! until the `GUEST-READY` line, record the elapsed wall time and the VMM process's VmRSS, then
//! let the guest power off (killed after --exit-timeout). The VMMs take turns (ferry, q35,
//! microvm, ferry, ...) so that drift in the host's speed affects all of them alike. The result
//! is a table of medians, the ratios ferry/q35 and ferry/microvm, and the project's goal check,
//! which is text only: a slow number never fails the run. The exit status is non-zero only if a
//! VMM could not boot the guest at all (or on a usage error).

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitCode, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const USAGE: &str = "\
Usage: boot-bench --kernel FILE --initrd FILE [options]     (direct kernel boot)
       boot-bench --disk FILE [--bios FILE] [options]       (BIOS boot from a disk)

Boots the same guest N times with each VMM and reports the median time to the
guest's GUEST-READY console line and the VMM's RSS at that moment.

Direct kernel boot (ferry, QEMU q35, QEMU microvm):
  --kernel FILE         guest kernel (bzImage), e.g. target/guest-kit/vmlinuz
  --initrd FILE         initramfs, e.g. target/guest-kit/initramfs-base.cpio.gz
  --cmdline STR         kernel command line, the same for all VMMs
                        (default \"console=ttyS0 quiet ferry.wait=0\")
BIOS boot (ferry and QEMU q35; microvm has no BIOS disk boot):
  --disk FILE           raw BIOS-bootable disk, e.g. target/guest-kit/boot.raw,
                        on virtio-scsi; each VMM boots a private copy of it
  --bios FILE           SeaBIOS image, the same for both VMMs (default
                        /usr/share/seabios/bios-256k.bin): QEMU gets -bios FILE,
                        ferry --firmware bios with FERRY_FIRMWARE_DIR set to its
                        folder (--firmware FILE if it is not named bios-256k.bin)
  --scratch DIR         where the disk's copy goes (default: the temp folder)

Options:
  --runs N              boots per VMM (default 10)
  --vmm LIST            comma-separated subset of ferry,q35,microvm (default
                        all the mode has)
  --ferry PATH          ferry binary (default: ferry next to boot-bench, else on PATH)
  --qemu PATH           QEMU binary (default qemu-system-x86_64 on PATH)
  --qemu-cpu MODEL      QEMU -cpu model (default host)
  --qemu-accel ACCEL    QEMU accelerator (default kvm; tcg only to try the
                        commands on a host without KVM: the times mean nothing)
  --timeout SECS        give up on a boot without GUEST-READY after SECS (default 300)
  --exit-timeout SECS   kill the VMM if the guest has not powered off SECS after
                        GUEST-READY (default 60)
  --log-dir DIR         save each boot's output (console, then the VMM's stderr)
                        as DIR/<vmm>-<n>.log
  --echo                copy the VMMs' console output to stderr as it arrives
  --note TEXT           a remark printed with the results (e.g. where they were taken)
  --json                print the results as JSON instead of a table
  --json-out FILE       also write the JSON results to FILE
  -h, --help            this text

Exit status: 0 when every VMM reached GUEST-READY at least once (whatever the
numbers), 1 when a VMM never did (its output's tail is shown), 2 on a usage error.";

/// Guest RAM and vCPUs: the same for every VMM.
const MEMORY: &str = "512M";
const CPUS: &str = "1";
/// The line the guest kit prints when it is up.
const READY_MARKER: &str = "GUEST-READY";
/// Lines of output shown when a boot fails.
const TAIL_LINES: usize = 40;
/// Kernel console messages listed per VMM in the table output.
const MAX_MESSAGES: usize = 40;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Vmm {
    Ferry,
    Q35,
    Microvm,
}

impl Vmm {
    const ALL: [Vmm; 3] = [Vmm::Ferry, Vmm::Q35, Vmm::Microvm];

    fn name(self) -> &'static str {
        match self {
            Vmm::Ferry => "ferry",
            Vmm::Q35 => "q35",
            Vmm::Microvm => "microvm",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Vmm::Ferry => "ferry",
            Vmm::Q35 => "QEMU q35",
            Vmm::Microvm => "QEMU microvm",
        }
    }

    fn parse(s: &str) -> Option<Vmm> {
        Vmm::ALL.into_iter().find(|v| v.name() == s)
    }
}

/// What is booted, and how.
enum Mode {
    /// The VMM loads a kernel and an initramfs itself.
    Direct {
        kernel: PathBuf,
        initrd: PathBuf,
        cmdline: String,
    },
    /// SeaBIOS boots a disk (MBR + extlinux) on virtio-scsi.
    Bios {
        /// The disk as given (left untouched).
        disk: PathBuf,
        /// The copy both VMMs boot, made before the first boot and again if a boot changed it.
        work_disk: PathBuf,
        /// The SeaBIOS image, absolute.
        firmware: PathBuf,
    },
}

impl Mode {
    fn name(&self) -> &'static str {
        match self {
            Mode::Direct { .. } => "direct",
            Mode::Bios { .. } => "bios",
        }
    }

    /// The VMMs that can boot this way.
    fn vmms(&self) -> &'static [Vmm] {
        match self {
            Mode::Direct { .. } => &Vmm::ALL,
            Mode::Bios { .. } => &[Vmm::Ferry, Vmm::Q35],
        }
    }

    /// The goal the issue sets for this mode, in words.
    fn goal_text(&self) -> &'static str {
        match self {
            Mode::Direct { .. } => {
                "time at most half of q35's and at most microvm's; RSS at most a quarter of q35's"
            }
            Mode::Bios { .. } => "BIOS boot to GUEST-READY no slower than QEMU's (ratio <= 1.0)",
        }
    }
}

/// ferry finds SeaBIOS under this name in $FERRY_FIRMWARE_DIR (or /usr/share/seabios).
const SEABIOS_FILE: &str = "bios-256k.bin";
const SEABIOS_DEFAULT: &str = "/usr/share/seabios/bios-256k.bin";
const FIRMWARE_DIR_ENV: &str = "FERRY_FIRMWARE_DIR";

struct Config {
    mode: Mode,
    runs: usize,
    vmms: Vec<Vmm>,
    ferry: PathBuf,
    qemu: PathBuf,
    qemu_cpu: String,
    qemu_accel: String,
    ready_timeout: Duration,
    exit_timeout: Duration,
    log_dir: Option<PathBuf>,
    echo: bool,
    note: Option<String>,
    json: bool,
    json_out: Option<PathBuf>,
}

fn parse_args() -> Result<Config, String> {
    let mut args = std::env::args_os().skip(1);
    let mut kernel = None;
    let mut initrd = None;
    let mut cmdline = None;
    let mut disk = None;
    let mut bios = None;
    let mut scratch = None;
    let mut runs = 10usize;
    let mut vmms = None;
    let mut ferry = None;
    let mut qemu = PathBuf::from("qemu-system-x86_64");
    let mut qemu_cpu = "host".to_string();
    let mut qemu_accel = "kvm".to_string();
    let mut ready_timeout = 300u64;
    let mut exit_timeout = 60u64;
    let mut log_dir = None;
    let mut echo = false;
    let mut note = None;
    let mut json = false;
    let mut json_out = None;

    while let Some(arg) = args.next() {
        let arg = arg
            .into_string()
            .map_err(|a| format!("argument {a:?} is not UTF-8"))?;
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| format!("{name} needs a value"))?
                .into_string()
                .map_err(|a| format!("the value {a:?} of {name} is not UTF-8"))
        };
        match arg.as_str() {
            "--kernel" => kernel = Some(PathBuf::from(value(&arg)?)),
            "--initrd" => initrd = Some(PathBuf::from(value(&arg)?)),
            "--cmdline" => cmdline = Some(value(&arg)?),
            "--disk" => disk = Some(PathBuf::from(value(&arg)?)),
            "--bios" => bios = Some(PathBuf::from(value(&arg)?)),
            "--scratch" => scratch = Some(PathBuf::from(value(&arg)?)),
            "--runs" => runs = parse_number(&arg, &value(&arg)?)?,
            "--vmm" => {
                let mut list = Vec::new();
                for name in value(&arg)?.split(',').filter(|s| !s.is_empty()) {
                    let vmm = Vmm::parse(name).ok_or_else(|| {
                        format!("unknown VMM '{name}' (choose from ferry, q35, microvm)")
                    })?;
                    if !list.contains(&vmm) {
                        list.push(vmm);
                    }
                }
                vmms = Some(list);
            }
            "--ferry" => ferry = Some(PathBuf::from(value(&arg)?)),
            "--qemu" => qemu = PathBuf::from(value(&arg)?),
            "--qemu-cpu" => qemu_cpu = value(&arg)?,
            "--qemu-accel" => qemu_accel = value(&arg)?,
            "--timeout" => ready_timeout = parse_number(&arg, &value(&arg)?)?,
            "--exit-timeout" => exit_timeout = parse_number(&arg, &value(&arg)?)?,
            "--log-dir" => log_dir = Some(PathBuf::from(value(&arg)?)),
            "--echo" => echo = true,
            "--note" => note = Some(value(&arg)?),
            "--json" => json = true,
            "--json-out" => json_out = Some(PathBuf::from(value(&arg)?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument '{other}'")),
        }
    }

    let mode = match disk {
        Some(disk) => {
            for (given, name) in [
                (kernel.is_some(), "--kernel"),
                (initrd.is_some(), "--initrd"),
                (cmdline.is_some(), "--cmdline"),
            ] {
                if given {
                    return Err(format!(
                        "{name} is for direct kernel boot; a BIOS boot (--disk) takes the \
                         kernel and its command line from the disk"
                    ));
                }
            }
            let firmware = bios.unwrap_or_else(|| PathBuf::from(SEABIOS_DEFAULT));
            for (what, path) in [("disk", &disk), ("BIOS image", &firmware)] {
                if !path.is_file() {
                    return Err(format!("the {what} {} is not a file", path.display()));
                }
            }
            // Absolute, as the report names it wherever it is read.
            let firmware = std::fs::canonicalize(&firmware)
                .map_err(|e| format!("cannot resolve {}: {e}", firmware.display()))?;
            let scratch = scratch.unwrap_or_else(std::env::temp_dir);
            let scratch = std::fs::canonicalize(&scratch)
                .ok()
                .filter(|d| d.is_dir())
                .ok_or_else(|| {
                    format!("the scratch folder {} is not a folder", scratch.display())
                })?;
            let work_disk = scratch.join(format!("boot-bench-{}.raw", std::process::id()));
            Mode::Bios {
                disk,
                work_disk,
                firmware,
            }
        }
        None => {
            for (given, name) in [(bios.is_some(), "--bios"), (scratch.is_some(), "--scratch")] {
                if given {
                    return Err(format!("{name} is for a BIOS boot: give --disk FILE too"));
                }
            }
            let kernel = kernel.ok_or("--kernel (or --disk for a BIOS boot) is required")?;
            let initrd = initrd.ok_or("--initrd is required")?;
            for (what, path) in [("kernel", &kernel), ("initrd", &initrd)] {
                if !path.is_file() {
                    return Err(format!("the {what} {} is not a file", path.display()));
                }
            }
            let cmdline = cmdline.unwrap_or_else(|| "console=ttyS0 quiet ferry.wait=0".into());
            if cmdline.contains("ferry.script=") {
                return Err(
                    "the command line must not run a script: the guest is to power off right \
                     after GUEST-READY"
                        .into(),
                );
            }
            Mode::Direct {
                kernel,
                initrd,
                cmdline,
            }
        }
    };
    if runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    let vmms = match vmms {
        None => mode.vmms().to_vec(),
        Some(list) => {
            let (kept, dropped): (Vec<Vmm>, Vec<Vmm>) =
                list.into_iter().partition(|v| mode.vmms().contains(v));
            for v in dropped {
                let how = match mode {
                    Mode::Direct { .. } => "direct kernel",
                    Mode::Bios { .. } => "BIOS disk",
                };
                eprintln!("boot-bench: {} has no {how} boot: left out", v.label());
            }
            kept
        }
    };
    if vmms.is_empty() {
        return Err("--vmm lists no VMM that can boot this way".into());
    }
    let ferry = ferry.unwrap_or_else(default_ferry);
    Ok(Config {
        mode,
        runs,
        vmms,
        ferry,
        qemu,
        qemu_cpu,
        qemu_accel,
        ready_timeout: Duration::from_secs(ready_timeout),
        exit_timeout: Duration::from_secs(exit_timeout),
        log_dir,
        echo,
        note,
        json,
        json_out,
    })
}

fn parse_number<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{name} needs a number, not '{value}'"))
}

/// `ferry` next to this program (the driver copies both into one folder), else on PATH.
fn default_ferry() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("ferry")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("ferry"))
}

impl Config {
    /// The command line of one boot: what is common to a VMM's boots in either mode, then what
    /// the mode adds.
    fn command(&self, vmm: Vmm) -> Command {
        let mut cmd;
        match vmm {
            Vmm::Ferry => {
                cmd = Command::new(&self.ferry);
                cmd.arg("run");
                match &self.mode {
                    Mode::Direct {
                        kernel,
                        initrd,
                        cmdline,
                    } => {
                        cmd.arg("--kernel")
                            .arg(kernel)
                            .arg("--initrd")
                            .arg(initrd)
                            .arg("--cmdline")
                            .arg(cmdline);
                    }
                    Mode::Bios {
                        work_disk,
                        firmware,
                        ..
                    } => {
                        // `--firmware bios` as a user would run it, finding this very image
                        // through FERRY_FIRMWARE_DIR; a differently named image by its path.
                        match firmware.parent() {
                            Some(dir) if firmware.file_name() == Some(SEABIOS_FILE.as_ref()) => {
                                cmd.env(FIRMWARE_DIR_ENV, dir).args(["--firmware", "bios"]);
                            }
                            _ => {
                                cmd.arg("--firmware").arg(firmware);
                            }
                        }
                        let mut attach = std::ffi::OsString::from("ctl=s,port=0,medium=");
                        attach.push(work_disk);
                        cmd.args(["--storagectl", "name=s,type=virtio-scsi", "--attach"])
                            .arg(attach)
                            .args(["--boot", "disk"]);
                    }
                }
                cmd.args(["--memory", MEMORY, "--cpus", CPUS]);
            }
            Vmm::Q35 | Vmm::Microvm => {
                cmd = Command::new(&self.qemu);
                if self.qemu_accel == "kvm" {
                    cmd.arg("-enable-kvm");
                } else {
                    cmd.args(["-accel", &self.qemu_accel]);
                }
                cmd.args(["-machine", vmm.name()])
                    .args(["-cpu", &self.qemu_cpu])
                    .args(["-m", MEMORY, "-smp", CPUS])
                    // -nodefaults: no NIC, VGA, monitor, parallel port or CD drive; the one
                    // serial port goes to stdout (microvm's isa-serial, q35's COM1). With no
                    // VGA, SeaBIOS shows its screen on that serial port, as in ferry.
                    .args([
                        "-nographic",
                        "-nodefaults",
                        "-serial",
                        "stdio",
                        "-no-reboot",
                    ]);
                match &self.mode {
                    Mode::Direct {
                        kernel,
                        initrd,
                        cmdline,
                    } => {
                        cmd.arg("-kernel")
                            .arg(kernel)
                            .arg("-initrd")
                            .arg(initrd)
                            .arg("-append")
                            .arg(cmdline);
                    }
                    Mode::Bios {
                        work_disk,
                        firmware,
                        ..
                    } => {
                        // The disk as ferry has it: raw, read-write on the host page cache
                        // (ferry's default, hostiocache=on), one virtio-scsi disk; boot order
                        // disk first, like ferry's --boot disk.
                        let mut drive = std::ffi::OsString::from("if=none,id=d,format=raw,");
                        drive.push("cache=writeback,file=");
                        drive.push(qemu_escape(work_disk));
                        cmd.arg("-bios")
                            .arg(firmware)
                            .args(["-device", "virtio-scsi-pci,id=s", "-drive"])
                            .arg(drive)
                            .args(["-device", "scsi-hd,drive=d,bus=s.0", "-boot", "order=c"]);
                    }
                }
            }
        }
        cmd
    }
}

/// A path as a QEMU option value: commas doubled.
fn qemu_escape(path: &Path) -> std::ffi::OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = Vec::new();
    for &b in path.as_os_str().as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    std::ffi::OsString::from_vec(out)
}

/// What the stdout reader reports to the main thread.
enum Event {
    Ready {
        elapsed: Duration,
        rss_kib: Option<u64>,
        line: String,
    },
    Eof,
}

struct Boot {
    /// Spawn to the GUEST-READY line.
    ready: Duration,
    rss_kib: Option<u64>,
    /// The guest's own uptime printed on the GUEST-READY line.
    guest_uptime: Option<f64>,
    /// How the VMM ended after GUEST-READY.
    end: String,
    powered_off: bool,
}

struct Attempt {
    result: Result<Boot, String>,
    /// Console output, then the VMM's stderr.
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn read_stdout(
    mut out: ChildStdout,
    pid: u32,
    start: Instant,
    echo: bool,
    tx: mpsc::Sender<Event>,
) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 8192];
    let mut line_start = 0;
    let mut ready_seen = false;
    loop {
        let n = match out.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if echo {
            eprint!("{}", String::from_utf8_lossy(&buf[..n]));
        }
        all.extend_from_slice(&buf[..n]);
        while let Some(pos) = all[line_start..].iter().position(|&b| b == b'\n') {
            let end = line_start + pos;
            if !ready_seen {
                let line = String::from_utf8_lossy(&all[line_start..end]);
                if line.contains(READY_MARKER) {
                    // Time and memory first, before anything else can delay them.
                    let elapsed = start.elapsed();
                    let rss_kib = vm_rss_kib(pid);
                    ready_seen = true;
                    let line = line.trim().to_string();
                    let _ = tx.send(Event::Ready {
                        elapsed,
                        rss_kib,
                        line,
                    });
                }
            }
            line_start = end + 1;
        }
    }
    let _ = tx.send(Event::Eof);
    all
}

fn read_all(mut err: ChildStderr) -> Vec<u8> {
    let mut all = Vec::new();
    let _ = err.read_to_end(&mut all);
    all
}

/// Waits up to `timeout` for the child to exit; kills it after that.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> (Option<ExitStatus>, bool) {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return (Some(status), false),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            _ => break,
        }
    }
    let _ = child.kill();
    (child.wait().ok(), true)
}

fn describe(status: Option<ExitStatus>) -> String {
    match status {
        Some(s) => s.to_string(),
        None => "unknown exit status".into(),
    }
}

fn boot_once(cfg: &Config, vmm: Vmm) -> Attempt {
    let mut cmd = cfg.command(vmm);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            return Attempt {
                result: Err(format!("cannot start {:?}: {e}", cmd.get_program())),
                stdout: Vec::new(),
                stderr: Vec::new(),
            }
        }
    };
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let echo = cfg.echo;
    let out_thread = thread::spawn(move || read_stdout(stdout, pid, start, echo, tx));
    let err_thread = thread::spawn(move || read_all(stderr));

    let result = match rx.recv_timeout(cfg.ready_timeout) {
        Ok(Event::Ready {
            elapsed,
            rss_kib,
            line,
        }) => {
            let guest_uptime = line
                .split_whitespace()
                .skip_while(|w| !w.contains(READY_MARKER))
                .nth(1)
                .and_then(|w| w.parse().ok());
            let ready_at = Instant::now();
            let (status, killed) = wait_or_kill(&mut child, cfg.exit_timeout);
            let after = ready_at.elapsed().as_secs_f64();
            let powered_off = !killed && status.is_some_and(|s| s.success());
            let end = if killed {
                format!(
                    "killed: no power-off within {}s of GUEST-READY",
                    cfg.exit_timeout.as_secs()
                )
            } else {
                format!(
                    "exited {:.1}s after GUEST-READY ({})",
                    after,
                    describe(status)
                )
            };
            Ok(Boot {
                ready: elapsed,
                rss_kib,
                guest_uptime,
                end,
                powered_off,
            })
        }
        Ok(Event::Eof) | Err(mpsc::RecvTimeoutError::Disconnected) => {
            let (status, _) = wait_or_kill(&mut child, Duration::from_secs(10));
            Err(format!(
                "the output ended without a {READY_MARKER} line ({})",
                describe(status)
            ))
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!(
                "no {READY_MARKER} line within {}s (killed)",
                cfg.ready_timeout.as_secs()
            ))
        }
    };
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    Attempt {
        result,
        stdout,
        stderr,
    }
}

/// Everything measured for one VMM.
struct Series {
    vmm: Vmm,
    command: String,
    version: String,
    boots: Vec<Result<Boot, String>>,
    /// Set when the VMM never reached GUEST-READY: the tail of its last output.
    failure_tail: Option<String>,
    /// Kernel console messages (timestamp removed) and in how many boots each appeared.
    messages: Vec<(String, usize)>,
}

impl Series {
    fn ok(&self) -> impl Iterator<Item = &Boot> {
        self.boots.iter().filter_map(|b| b.as_ref().ok())
    }

    fn median_ready_ms(&self) -> Option<f64> {
        median(self.ok().map(|b| b.ready.as_secs_f64() * 1000.0).collect())
    }

    fn median_rss_mib(&self) -> Option<f64> {
        median(
            self.ok()
                .filter_map(|b| b.rss_kib)
                .map(|k| k as f64 / 1024.0)
                .collect(),
        )
    }

    fn median_guest_uptime(&self) -> Option<f64> {
        median(self.ok().filter_map(|b| b.guest_uptime).collect())
    }

    fn min_max_ready_ms(&self) -> Option<(f64, f64)> {
        let v: Vec<f64> = self.ok().map(|b| b.ready.as_secs_f64() * 1000.0).collect();
        let min = v.iter().copied().reduce(f64::min)?;
        let max = v.iter().copied().reduce(f64::max)?;
        Some((min, max))
    }

    fn record_messages(&mut self, console: &[u8]) {
        let text = String::from_utf8_lossy(console);
        let mut seen: Vec<String> = Vec::new();
        for line in text.lines() {
            let Some(msg) = kernel_message(line) else {
                continue;
            };
            if seen.iter().any(|m| m == msg) {
                continue;
            }
            seen.push(msg.to_string());
            match self.messages.iter_mut().find(|(m, _)| m == msg) {
                Some((_, count)) => *count += 1,
                None => self.messages.push((msg.to_string(), 1)),
            }
        }
    }
}

/// The text of a kernel console line `[   12.345678] text`, without the timestamp.
fn kernel_message(line: &str) -> Option<&str> {
    let line = line.trim_end_matches('\r');
    let rest = line.trim_start().strip_prefix('[')?;
    let (stamp, text) = rest.split_once(']')?;
    let stamp = stamp.trim();
    if stamp.is_empty() || !stamp.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return None;
    }
    let text = text.trim();
    (!text.is_empty()).then_some(text)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

fn tail(stdout: &[u8], stderr: &[u8]) -> String {
    let text = format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(stdout),
        String::from_utf8_lossy(stderr)
    );
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

fn shell_words(cmd: &Command) -> String {
    let quote = |a: &std::ffi::OsStr| {
        let s = a.to_string_lossy();
        if !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+".contains(c))
        {
            s.into_owned()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    let env = cmd
        .get_envs()
        .filter_map(|(k, v)| v.map(|v| format!("{}={}", k.to_string_lossy(), quote(v))));
    env.chain(
        std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(quote),
    )
    .collect::<Vec<_>>()
    .join(" ")
}

/// The private copy of the disk that a BIOS boot runs from: made once, and made again before a
/// boot if the previous one changed it (the guest only reads its disk, so that should not happen;
/// it is counted and reported if it does).
struct DiskCopy<'a> {
    source: &'a Path,
    copy: &'a Path,
    /// Length and modification time of the copy as made.
    made: Option<(u64, std::time::SystemTime)>,
    /// Boots after which the copy had changed.
    changed: usize,
}

impl<'a> DiskCopy<'a> {
    fn new(source: &'a Path, copy: &'a Path) -> Self {
        DiskCopy {
            source,
            copy,
            made: None,
            changed: 0,
        }
    }

    fn stamp(&self) -> Option<(u64, std::time::SystemTime)> {
        let m = std::fs::metadata(self.copy).ok()?;
        Some((m.len(), m.modified().ok()?))
    }

    /// Makes sure the copy is as the source, before a boot (outside the timed part). The copy is
    /// synced so that no write-back of it overlaps a boot.
    fn ready(&mut self) -> Result<(), String> {
        if let Some(made) = self.made {
            if self.stamp() == Some(made) {
                return Ok(());
            }
            self.changed += 1;
        }
        let what = |e: std::io::Error| {
            format!(
                "cannot copy {} to {}: {e}",
                self.source.display(),
                self.copy.display()
            )
        };
        std::fs::copy(self.source, self.copy).map_err(what)?;
        std::fs::File::open(self.copy)
            .and_then(|f| f.sync_all())
            .map_err(what)?;
        self.made = self.stamp();
        Ok(())
    }
}

impl Drop for DiskCopy<'_> {
    fn drop(&mut self) {
        if self.made.is_some() {
            let _ = std::fs::remove_file(self.copy);
        }
    }
}

fn version(cfg: &Config, vmm: Vmm) -> String {
    let program = match vmm {
        Vmm::Ferry => &cfg.ferry,
        Vmm::Q35 | Vmm::Microvm => &cfg.qemu,
    };
    match Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        Err(e) => format!("cannot run {}: {e}", program.display()),
    }
}

fn main() -> ExitCode {
    let cfg = match parse_args() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("boot-bench: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Some(dir) = &cfg.log_dir {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("boot-bench: cannot create {}: {e}", dir.display());
            return ExitCode::from(2);
        }
    }

    let mut disk_copy = match &cfg.mode {
        Mode::Bios {
            disk, work_disk, ..
        } => Some(DiskCopy::new(disk, work_disk)),
        Mode::Direct { .. } => None,
    };

    let mut series: Vec<Series> = cfg
        .vmms
        .iter()
        .map(|&vmm| Series {
            vmm,
            command: shell_words(&cfg.command(vmm)),
            version: version(&cfg, vmm),
            boots: Vec::new(),
            failure_tail: None,
            messages: Vec::new(),
        })
        .collect();

    for run in 1..=cfg.runs {
        for s in series.iter_mut() {
            if s.failure_tail.is_some() {
                continue; // it could not boot at all: do not wait for it N times
            }
            if let Some(copy) = disk_copy.as_mut() {
                if let Err(e) = copy.ready() {
                    eprintln!("boot-bench: {e}");
                    return ExitCode::from(2);
                }
            }
            eprint!("boot-bench: {} boot {run}/{} ... ", s.vmm.label(), cfg.runs);
            let attempt = boot_once(&cfg, s.vmm);
            match &attempt.result {
                Ok(b) => eprintln!(
                    "GUEST-READY after {:.0} ms (guest uptime {}), RSS {}; {}",
                    b.ready.as_secs_f64() * 1000.0,
                    b.guest_uptime.map_or("?".into(), |u| format!("{u:.2}s")),
                    b.rss_kib
                        .map_or("?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
                    b.end
                ),
                Err(e) => eprintln!("FAILED: {e}"),
            }
            if let Some(dir) = &cfg.log_dir {
                let mut log = attempt.stdout.clone();
                log.extend_from_slice(b"\n--- stderr ---\n");
                log.extend_from_slice(&attempt.stderr);
                let path = dir.join(format!("{}-{run}.log", s.vmm.name()));
                if let Err(e) = std::fs::write(&path, log) {
                    eprintln!("boot-bench: cannot write {}: {e}", path.display());
                }
            }
            s.record_messages(&attempt.stdout);
            let failed = attempt.result.is_err();
            s.boots.push(attempt.result);
            if failed && s.ok().next().is_none() {
                s.failure_tail = Some(tail(&attempt.stdout, &attempt.stderr));
            }
        }
    }

    // A boot that changed the disk is found before the next one; check after the last too.
    let disk_changed = disk_copy.as_mut().map(|copy| {
        if copy.made.is_some() && copy.stamp() != copy.made {
            copy.changed += 1;
        }
        copy.changed
    });
    let json = report_json(&cfg, &series, disk_changed);
    if let Some(path) = &cfg.json_out {
        if let Err(e) = std::fs::write(path, format!("{json}\n")) {
            eprintln!("boot-bench: cannot write {}: {e}", path.display());
        }
    }
    if cfg.json {
        println!("{json}");
    } else {
        print!("{}", report_text(&cfg, &series, disk_changed));
    }

    let mut code = ExitCode::SUCCESS;
    for s in &series {
        if let Some(tail) = &s.failure_tail {
            let why = s
                .boots
                .last()
                .and_then(|b| b.as_ref().err())
                .map_or("", String::as_str);
            eprintln!(
                "\nboot-bench: {} could not boot the guest: {why}\ncommand: {}\n\
                 last {TAIL_LINES} lines of its output:\n{tail}",
                s.vmm.label(),
                s.command
            );
            code = ExitCode::FAILURE;
        }
    }
    code
}

/// ferry's figures divided by another VMM's: (time, RSS).
fn ratios(series: &[Series], other: Vmm) -> (Option<f64>, Option<f64>) {
    let find = |v: Vmm| series.iter().find(|s| s.vmm == v);
    let (Some(f), Some(o)) = (find(Vmm::Ferry), find(other)) else {
        return (None, None);
    };
    let div = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    (
        div(f.median_ready_ms(), o.median_ready_ms()),
        div(f.median_rss_mib(), o.median_rss_mib()),
    )
}

/// The goal checks from the issues, per mode (see `Mode::goal_text`): for a direct boot, time at
/// most half of q35's and at most microvm's, RSS at most a quarter of q35's; for a BIOS boot,
/// time at most q35's. Each: (JSON key, text label, met?), `None` where a figure is missing.
fn goal(mode: &Mode, series: &[Series]) -> Vec<(&'static str, &'static str, Option<bool>)> {
    let (tq, rq) = ratios(series, Vmm::Q35);
    let (tm, _) = ratios(series, Vmm::Microvm);
    match mode {
        Mode::Direct { .. } => vec![
            (
                "time_at_most_half_q35",
                "time <= 0.5 x q35",
                tq.map(|r| r <= 0.5),
            ),
            (
                "time_at_most_microvm",
                "time <= microvm",
                tm.map(|r| r <= 1.0),
            ),
            (
                "rss_at_most_quarter_q35",
                "RSS <= 0.25 x q35",
                rq.map(|r| r <= 0.25),
            ),
        ],
        Mode::Bios { .. } => vec![(
            "time_at_most_q35",
            "time <= q35 (ferry/q35 <= 1.0)",
            tq.map(|r| r <= 1.0),
        )],
    }
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

fn verdict(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "not measured",
    }
}

fn report_text(cfg: &Config, series: &[Series], disk_changed: Option<usize>) -> String {
    let mut o = String::new();
    match &cfg.mode {
        Mode::Direct {
            kernel,
            initrd,
            cmdline,
        } => {
            let _ = writeln!(o, "\nDirect kernel boot to GUEST-READY: {} boots per VMM, memory {MEMORY}, {CPUS} vCPU, command line \"{cmdline}\"", cfg.runs);
            let _ = writeln!(
                o,
                "kernel {}, initrd {}",
                kernel.display(),
                initrd.display()
            );
        }
        Mode::Bios { disk, firmware, .. } => {
            let _ = writeln!(o, "\nBIOS boot to GUEST-READY: {} boots per VMM, memory {MEMORY}, {CPUS} vCPU, disk on virtio-scsi", cfg.runs);
            let _ = writeln!(
                o,
                "disk {} (a private copy), firmware {} (both VMMs)",
                disk.display(),
                firmware.display()
            );
            if let Some(n) = disk_changed.filter(|&n| n > 0) {
                let _ = writeln!(
                    o,
                    "warning: {n} boot(s) changed the disk's copy (it was made again before the next boot)"
                );
            }
        }
    }
    if let Some(note) = &cfg.note {
        let _ = writeln!(o, "note: {note}");
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<13} {:>7} {:>12} {:>21} {:>11} {:>15}",
        "VMM", "boots", "ready ms", "min..max ms", "RSS MiB", "guest uptime s"
    );
    for s in series {
        let ok = s.ok().count();
        let _ = writeln!(
            o,
            "{:<13} {:>7} {:>12} {:>21} {:>11} {:>15}",
            s.vmm.label(),
            format!("{ok}/{}", s.boots.len()),
            fmt_opt(s.median_ready_ms(), 0),
            s.min_max_ready_ms()
                .map_or("-".into(), |(a, b)| format!("{a:.0}..{b:.0}")),
            fmt_opt(s.median_rss_mib(), 1),
            fmt_opt(s.median_guest_uptime(), 2),
        );
    }
    let _ = writeln!(
        o,
        "(medians; ready ms: wall time from spawn to the GUEST-READY line; RSS: the VMM's VmRSS \
         at that moment; guest uptime: what the guest printed on that line)"
    );
    let _ = writeln!(o);
    for other in [Vmm::Q35, Vmm::Microvm] {
        if !series.iter().any(|s| s.vmm == other) || !series.iter().any(|s| s.vmm == Vmm::Ferry) {
            continue;
        }
        let (t, r) = ratios(series, other);
        let _ = writeln!(
            o,
            "ferry/{:<8} time {:>6}   RSS {:>6}",
            other.name(),
            fmt_opt(t, 2),
            fmt_opt(r, 2)
        );
    }
    let _ = writeln!(o, "\nGoal ({}):", cfg.mode.goal_text());
    for (_, label, met) in goal(&cfg.mode, series) {
        let _ = writeln!(o, "  {:<32} {}", format!("{label}:"), verdict(met));
    }
    let _ = writeln!(o, "(information only: a slow figure does not fail the run)");

    for s in series {
        let _ = writeln!(o, "\n{}: {}", s.vmm.label(), s.version);
        let _ = writeln!(o, "  command: {}", s.command);
        let ends: Vec<&str> = s.ok().map(|b| b.end.as_str()).collect();
        let off = s.ok().filter(|b| b.powered_off).count();
        if !ends.is_empty() {
            let _ = writeln!(
                o,
                "  after GUEST-READY: {off} of {} powered off by themselves (first: {})",
                ends.len(),
                ends[0]
            );
        }
        for (i, b) in s.boots.iter().enumerate() {
            if let Err(e) = b {
                let _ = writeln!(o, "  boot {} failed: {e}", i + 1);
            }
        }
        if s.messages.is_empty() {
            let _ = writeln!(o, "  kernel messages on the console: none");
        } else {
            let _ = writeln!(
                o,
                "  kernel messages on the console (in how many of {} boots):",
                s.boots.len()
            );
            for (msg, count) in s.messages.iter().take(MAX_MESSAGES) {
                let _ = writeln!(o, "    [{count}] {msg}");
            }
            if s.messages.len() > MAX_MESSAGES {
                let _ = writeln!(
                    o,
                    "    ... {} more (see --log-dir or --json)",
                    s.messages.len() - MAX_MESSAGES
                );
            }
        }
    }
    o
}

fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_num(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.3}"),
        _ => "null".into(),
    }
}

fn json_bool(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "true",
        Some(false) => "false",
        None => "null",
    }
}

fn report_json(cfg: &Config, series: &[Series], disk_changed: Option<usize>) -> String {
    let path = |p: &Path| json_str(&p.to_string_lossy());
    let null = || "null".to_string();
    // Every key in both modes; those of the other mode are null.
    let (cmdline, kernel, initrd, disk, firmware) = match &cfg.mode {
        Mode::Direct {
            kernel,
            initrd,
            cmdline,
        } => (
            json_str(cmdline),
            path(kernel),
            path(initrd),
            null(),
            null(),
        ),
        Mode::Bios { disk, firmware, .. } => (null(), null(), null(), path(disk), path(firmware)),
    };
    let mut o = String::new();
    let _ = write!(
        o,
        "{{\"benchmark\":\"boot\",\"mode\":{},\"marker\":{},\"runs\":{},\"memory\":{},\
         \"cpus\":{},\"cmdline\":{cmdline},\"kernel\":{kernel},\"initrd\":{initrd},\
         \"disk\":{disk},\"firmware\":{firmware},\"disk_changed_boots\":{},\"note\":{},\
         \"vmms\":[",
        json_str(cfg.mode.name()),
        json_str(READY_MARKER),
        cfg.runs,
        json_str(MEMORY),
        CPUS,
        disk_changed.map_or_else(null, |n| n.to_string()),
        cfg.note.as_deref().map_or_else(null, json_str),
    );
    for (i, s) in series.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        let _ = write!(
            o,
            "{{\"name\":{},\"label\":{},\"version\":{},\"command\":{},\"boots_ok\":{},\
             \"boots_failed\":{},\"median_ready_ms\":{},\"median_rss_mib\":{},\
             \"median_guest_uptime_s\":{},\"boots\":[",
            json_str(s.vmm.name()),
            json_str(s.vmm.label()),
            json_str(&s.version),
            json_str(&s.command),
            s.ok().count(),
            s.boots.len() - s.ok().count(),
            json_num(s.median_ready_ms()),
            json_num(s.median_rss_mib()),
            json_num(s.median_guest_uptime()),
        );
        for (j, b) in s.boots.iter().enumerate() {
            if j > 0 {
                o.push(',');
            }
            match b {
                Ok(b) => {
                    let _ = write!(
                        o,
                        "{{\"ready_ms\":{},\"rss_mib\":{},\"guest_uptime_s\":{},\
                         \"powered_off\":{},\"end\":{}}}",
                        json_num(Some(b.ready.as_secs_f64() * 1000.0)),
                        json_num(b.rss_kib.map(|k| k as f64 / 1024.0)),
                        json_num(b.guest_uptime),
                        b.powered_off,
                        json_str(&b.end)
                    );
                }
                Err(e) => {
                    let _ = write!(o, "{{\"error\":{}}}", json_str(e));
                }
            }
        }
        let _ = write!(o, "],\"kernel_messages\":[");
        for (j, (msg, count)) in s.messages.iter().enumerate() {
            if j > 0 {
                o.push(',');
            }
            let _ = write!(o, "{{\"text\":{},\"boots\":{count}}}", json_str(msg));
        }
        let _ = write!(
            o,
            "],\"failure_tail\":{}}}",
            s.failure_tail.as_deref().map_or("null".into(), json_str)
        );
    }
    let (tq, rq) = ratios(series, Vmm::Q35);
    let (tm, rm) = ratios(series, Vmm::Microvm);
    let _ = write!(
        o,
        "],\"ratios\":{{\"time_ferry_q35\":{},\"time_ferry_microvm\":{},\"rss_ferry_q35\":{},\
         \"rss_ferry_microvm\":{}}},\"goal\":{{\"text\":{}",
        json_num(tq),
        json_num(tm),
        json_num(rq),
        json_num(rm),
        json_str(cfg.mode.goal_text()),
    );
    for (key, _, met) in goal(&cfg.mode, series) {
        let _ = write!(o, ",\"{key}\":{}", json_bool(met));
    }
    o.push_str("}}");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn kernel_message_strips_timestamp() {
        assert_eq!(
            kernel_message("[   10.717188] XSAVE consistency problem: size 2696\r"),
            Some("XSAVE consistency problem: size 2696")
        );
        assert_eq!(kernel_message("GUEST-READY 1.23"), None);
        assert_eq!(kernel_message("[ok] fine"), None);
    }

    #[test]
    fn qemu_option_values_double_commas() {
        assert_eq!(qemu_escape(Path::new("/tmp/a,b.raw")), "/tmp/a,,b.raw");
        assert_eq!(qemu_escape(Path::new("/tmp/ab.raw")), "/tmp/ab.raw");
    }

    #[test]
    fn json_escapes() {
        assert_eq!(json_str("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }
}
