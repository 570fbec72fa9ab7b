//! One thread per vCPU: run, dispatch port and MMIO exits to the buses, repeat until stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_devices::Bus;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::exit::{ExitState, Outcome};
use crate::hypervisor::{Vcpu, VcpuExit};

pub struct VcpuThreadContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitState>,
    pub stop: Arc<AtomicBool>,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that knocks a vCPU thread out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), kick_handler) {
            tracing::warn!("cannot install the vCPU kick handler: {e}");
        }
    });
}

pub fn spawn(
    id: u8,
    mut vcpu: Box<dyn Vcpu>,
    ctx: VcpuThreadContext,
) -> std::io::Result<JoinHandle<()>> {
    install_kick_handler();
    std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || run_loop(id, vcpu.as_mut(), &ctx))
}

fn run_loop(id: u8, vcpu: &mut dyn Vcpu, ctx: &VcpuThreadContext) {
    while !ctx.stop.load(Ordering::Acquire) {
        match vcpu.run() {
            Ok(VcpuExit::IoIn { port, size, data }) => {
                for access in data.chunks_mut(size.max(1)) {
                    if !ctx.pio.read(u64::from(port), access) {
                        access.fill(0xff);
                    }
                }
            }
            Ok(VcpuExit::IoOut { port, size, data }) => {
                for access in data.chunks(size.max(1)) {
                    if !ctx.pio.write(u64::from(port), access) {
                        tracing::trace!("vcpu{id}: unclaimed write to port {port:#x}");
                    }
                }
            }
            Ok(VcpuExit::MmioRead { addr, data }) => {
                if !ctx.mmio.read(addr, data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioWrite { addr, data }) => {
                if !ctx.mmio.write(addr, data) {
                    tracing::trace!("vcpu{id}: unclaimed MMIO write at {addr:#x}");
                }
            }
            // The in-kernel LAPIC handles HLT; a backend that returns it gets a short nap.
            Ok(VcpuExit::Halt) => std::thread::sleep(Duration::from_millis(1)),
            Ok(VcpuExit::Shutdown) => {
                tracing::info!("vcpu{id}: triple fault; the machine resets");
                ctx.exit.set(Outcome::Reset);
                break;
            }
            Ok(VcpuExit::Interrupted | VcpuExit::Ignored) => {}
            Ok(VcpuExit::Failed(why)) => {
                ctx.exit
                    .set(Outcome::VcpuFailed(format!("vcpu{id}: {why}")));
                break;
            }
            Err(e) => {
                ctx.exit.set(Outcome::VcpuFailed(format!("vcpu{id}: {e}")));
                break;
            }
        }
    }
}

/// Stops vCPU threads: they see `stop` at their next exit, and the kick signal forces one.
pub fn stop_all(stop: &AtomicBool, threads: Vec<JoinHandle<()>>) {
    stop.store(true, Ordering::Release);
    for t in threads {
        // A kick can land just before KVM_RUN is entered; repeat until the thread is out.
        while !t.is_finished() {
            if let Err(e) = t.kill(kick_signal()) {
                tracing::debug!("kick: {e}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = t.join();
    }
}
