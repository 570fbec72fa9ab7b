//! The MSRs a 64-bit Linux guest expects to find in a known state at boot. The TSC is left
//! alone: KVM synchronizes it across vCPUs when they are created, and a later write per vCPU
//! can leave them apart.

const IA32_SYSENTER_CS: u32 = 0x174;
const IA32_SYSENTER_ESP: u32 = 0x175;
const IA32_SYSENTER_EIP: u32 = 0x176;
const IA32_MISC_ENABLE: u32 = 0x1a0;
const MTRR_DEF_TYPE: u32 = 0x2ff;
const STAR: u32 = 0xc000_0081;
const LSTAR: u32 = 0xc000_0082;
const CSTAR: u32 = 0xc000_0083;
const SYSCALL_MASK: u32 = 0xc000_0084;
const KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back: without it memory is uncached and the guest crawls.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (IA32_SYSENTER_CS, 0),
        (IA32_SYSENTER_ESP, 0),
        (IA32_SYSENTER_EIP, 0),
        (STAR, 0),
        (CSTAR, 0),
        (KERNEL_GS_BASE, 0),
        (SYSCALL_MASK, 0),
        (LSTAR, 0),
        (IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}
