//! `ferry run`: boot a guest.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use ferry_vmm::{LinuxBootSpec, Outcome, SerialMode, VmConfig};

use crate::size::parse_size;

/// Exit codes a script can tell apart.
const EXIT_ERROR: u8 = 1;
const EXIT_GUEST_PANIC: u8 = 3;
const EXIT_GUEST_FAILED: u8 = 4;

/// Boot a virtual machine and show its serial console.
///
/// The guest runs until it powers off (exit code 0), resets (exit code 0, or a fresh boot with
/// --reboot), panics (exit code 3, seen through the pvpanic device) or the hypervisor gives up on
/// it (exit code 4). Ctrl-C or SIGTERM stops it (exit code 128 + the signal number).
///
/// Example:
///   ferry run --kernel vmlinuz --initrd initrd.img --cmdline "console=ttyS0" --memory 1G --cpus 2
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct RunArgs {
    /// Guest RAM, with a K/M/G suffix (a bare number means MiB). RAM beyond 3 GiB is placed
    /// above 4 GiB, past the PCI hole.
    #[arg(long, default_value = "512M", value_parser = parse_size, value_name = "SIZE")]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    cpus: u32,
    /// Linux kernel to boot directly (a bzImage such as /boot/vmlinuz-*).
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk for the kernel.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(
        long,
        value_name = "STR",
        default_value = "console=ttyS0",
        requires = "kernel"
    )]
    cmdline: String,
    /// Where the guest's first serial port (COM1) goes: stdio, file:PATH, or unix:PATH (a
    /// socket ferry listens on; connect with `socat - UNIX-CONNECT:PATH`).
    #[arg(long, default_value = "stdio", value_name = "TARGET")]
    serial: SerialMode,
    /// Boot the guest again when it resets, instead of exiting.
    #[arg(long)]
    reboot: bool,
    /// Run without a display window (ferry has no display yet: every run is headless).
    #[arg(long)]
    headless: bool,
}

pub fn run(args: RunArgs) -> ExitCode {
    let Some(kernel) = args.kernel else {
        eprintln!(
            "ferry: error: nothing to boot: pass --kernel FILE (booting from a disk through firmware is not available yet)"
        );
        return ExitCode::from(EXIT_ERROR);
    };
    let _ = args.headless;
    let cfg = VmConfig {
        memory: args.memory,
        cpus: args.cpus,
        boot: LinuxBootSpec {
            kernel,
            initrd: args.initrd,
            cmdline: args.cmdline,
        },
        serial: args.serial,
        storage: Vec::new(),
        reboot: args.reboot,
    };
    match ferry_vmm::run(&cfg) {
        Ok(Outcome::PowerOff) => {
            tracing::info!("the guest powered off");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Reset) => {
            tracing::info!("the guest reset");
            ExitCode::SUCCESS
        }
        Ok(Outcome::GuestPanic) => {
            eprintln!("ferry: the guest kernel panicked");
            ExitCode::from(EXIT_GUEST_PANIC)
        }
        Ok(Outcome::VcpuFailed(why)) => {
            eprintln!("ferry: the guest stopped: {why}");
            ExitCode::from(EXIT_GUEST_FAILED)
        }
        Ok(Outcome::Signal(sig)) => ExitCode::from(128u8.wrapping_add(sig as u8)),
        Err(e) => {
            crate::report(&e);
            ExitCode::from(EXIT_ERROR)
        }
    }
}
