//! CPUID as ferry presents it: the hypervisor's supported leaves with the hypervisor bit set
//! and a topology of one socket with N single-threaded cores. Hypervisor-neutral.

/// One CPUID leaf/subleaf.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// Backend flags (KVM: whether `index` is significant); carried through untouched.
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Bits needed to number `n` items.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Fills in vCPU `id` of `count`: APIC IDs, core counts and the hypervisor bit.
pub fn patch_for_vcpu(leaves: &mut [CpuidEntry], id: u8, count: u8) {
    let id = u32::from(id);
    let count = u32::from(count.max(1));
    let core_bits = bits_for(count);
    for e in leaves.iter_mut() {
        match e.function {
            1 => {
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                // Initial APIC ID, logical processors per package, CLFLUSH line size (8 qwords).
                e.ebx = (id << 24) | (count.min(255) << 16) | (8 << 8) | (e.ebx & 0xff);
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            // Intel deterministic cache parameters: cores per package in EAX[31:26], no sharing
            // between threads (EAX[25:14] = 0).
            4 if e.eax & 0x1f != 0 => {
                e.eax = (e.eax & 0x3fff) | ((count - 1) << 26);
            }
            // Extended topology (Intel 0xB, and 0x1F where present): SMT level, then core level.
            0xb | 0x1f => {
                let (shift, n, level_type) = match e.index {
                    0 => (0, 1, 1),
                    1 => (core_bits, count, 2),
                    _ => (0, 0, 0),
                };
                e.eax = shift;
                e.ebx = n;
                e.ecx = (level_type << 8) | (e.index & 0xff);
                e.edx = id;
            }
            // AMD: cores per package (NC) and the APIC-ID bits that number them.
            0x8000_0008 => {
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
            }
            // AMD topology extensions: one thread per core, this vCPU's APIC ID.
            0x8000_001e => {
                e.eax = id;
                e.ebx = id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves() -> Vec<CpuidEntry> {
        vec![
            CpuidEntry {
                function: 1,
                edx: LEAF1_EDX_HTT,
                ..Default::default()
            },
            CpuidEntry {
                function: 4,
                eax: 0x121,
                ..Default::default()
            },
            CpuidEntry {
                function: 0xb,
                index: 0,
                ..Default::default()
            },
            CpuidEntry {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
            CpuidEntry {
                function: 0x8000_0008,
                ecx: 0x3,
                ..Default::default()
            },
        ]
    }

    #[test]
    fn single_cpu() {
        let mut l = leaves();
        patch_for_vcpu(&mut l, 0, 1);
        assert_ne!(l[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(l[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!(l[1].eax >> 26, 0);
        assert_eq!(l[4].ecx & 0xff, 0);
    }

    #[test]
    fn four_cpus_topology() {
        let mut l = leaves();
        patch_for_vcpu(&mut l, 3, 4);
        assert_eq!(l[0].ebx >> 24, 3);
        assert_eq!((l[0].ebx >> 16) & 0xff, 4);
        assert_eq!(l[1].eax >> 26, 3);
        assert_eq!(l[1].eax & 0x3fff, 0x121);
        assert_eq!((l[2].ebx, l[2].ecx >> 8, l[2].edx), (1, 1, 3));
        assert_eq!((l[3].eax, l[3].ebx, l[3].ecx >> 8), (2, 4, 2));
        assert_eq!(l[4].ecx & 0xff, 3);
        assert_eq!((l[4].ecx >> 12) & 0xf, 2);
    }

    #[test]
    fn bits() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(bits_for), [0, 1, 2, 2, 3, 3, 4]);
    }
}
