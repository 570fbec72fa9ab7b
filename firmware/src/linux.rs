//! Direct Linux boot: the bzImage, initrd and command line placed in guest memory, the zero
//! page with the e820 map, and the CPU state for the 64-bit boot protocol entry.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::{Error as LoaderError, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;
use crate::FirmwareError;

/// What to boot.
#[derive(Debug, Clone)]
pub struct LinuxBootSpec {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// A segment register as the vCPU should hold it; hypervisor-neutral.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    pub db: bool,
    pub s: bool,
    pub l: bool,
    pub g: bool,
}

impl Segment {
    /// Decodes a GDT descriptor, so the registers match the table the guest can read.
    pub fn from_descriptor(selector: u16, d: u64) -> Self {
        let base = ((d >> 16) & 0xff_ffff) | ((d >> 32) & 0xff00_0000);
        let limit = ((d & 0xffff) | ((d >> 32) & 0xf_0000)) as u32;
        let g = (d >> 55) & 1 == 1;
        Self {
            base,
            limit: if g { (limit << 12) | 0xfff } else { limit },
            selector,
            type_: ((d >> 40) & 0xf) as u8,
            s: (d >> 44) & 1 == 1,
            dpl: ((d >> 45) & 3) as u8,
            present: (d >> 47) & 1 == 1,
            l: (d >> 53) & 1 == 1,
            db: (d >> 54) & 1 == 1,
            g,
        }
    }
}

/// The boot vCPU's state at the 64-bit entry point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootCpuState {
    pub rip: u64,
    pub rsp: u64,
    pub rsi: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub gdt_base: u64,
    pub gdt_limit: u16,
    pub code: Segment,
    pub data: Segment,
    pub tss: Segment,
}

// The boot protocol asks for __BOOT_CS = 0x10 and __BOOT_DS = 0x18.
const GDT: [u64; 5] = [
    0,
    0,
    0x00af_9b00_0000_ffff, // 0x10: 64-bit code
    0x00cf_9300_0000_ffff, // 0x18: data
    0x008f_8b00_0000_ffff, // 0x20: 64-bit TSS (busy), required by VMX for TR
];
const CODE_SEL: u16 = 0x10;
const DATA_SEL: u16 = 0x18;
const TSS_SEL: u16 = 0x20;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const XLF_KERNEL_64: u16 = 1;
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const CAN_USE_HEAP: u8 = 0x80;
const KERNEL_BOOT_FLAG: u16 = 0xaa55;
/// The 64-bit entry point sits this far into the protected-mode kernel.
const ENTRY_64_OFFSET: u64 = 0x200;
/// Where the initrd may end when the header gives no limit (boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Checks that `path` is a bzImage with a 64-bit entry point, without touching guest memory,
/// so a wrong file is reported before anything else is set up.
pub fn check_bzimage(path: &Path) -> Result<(), FirmwareError> {
    use std::io::Read;
    let mut head = [0u8; 0x240];
    let mut f = File::open(path).map_err(|source| FirmwareError::OpenKernel {
        path: path.to_path_buf(),
        source,
    })?;
    let not = || FirmwareError::NotBzImage {
        path: path.to_path_buf(),
    };
    f.read_exact(&mut head).map_err(|_| not())?;
    let u16_at = |o: usize| u16::from_le_bytes([head[o], head[o + 1]]);
    let magic = u32::from_le_bytes([head[0x202], head[0x203], head[0x204], head[0x205]]);
    // "HdrS", and LOADED_HIGH: a bzImage rather than an old zImage.
    if magic != HDR_MAGIC || u16_at(0x1fe) != KERNEL_BOOT_FLAG || head[0x211] & 1 == 0 {
        return Err(not());
    }
    if u16_at(0x206) < 0x020c || u16_at(0x236) & XLF_KERNEL_64 == 0 {
        return Err(FirmwareError::NotX86_64 {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

fn mem_err(what: &'static str) -> impl Fn(vm_memory::GuestMemoryError) -> FirmwareError {
    move |e| FirmwareError::GuestMemory {
        what,
        detail: e.to_string(),
    }
}

/// Loads kernel, initrd and command line into `mem` and returns the boot vCPU's state.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    map: &MemoryMap,
    spec: &LinuxBootSpec,
    rsdp_addr: u64,
) -> Result<BootCpuState, FirmwareError> {
    let mut kernel = File::open(&spec.kernel).map_err(|source| FirmwareError::OpenKernel {
        path: spec.kernel.clone(),
        source,
    })?;
    let loaded = BzImage::load(mem, None, &mut kernel, Some(GuestAddress(KERNEL_START))).map_err(
        |e| match e {
            LoaderError::Bzimage(
                linux_loader::loader::bzimage::Error::ReadBzImageCompressedKernel,
            ) => FirmwareError::KernelTooBig {
                path: spec.kernel.clone(),
                detail: "it is larger than the guest's RAM".into(),
            },
            _ => FirmwareError::NotBzImage {
                path: spec.kernel.clone(),
            },
        },
    )?;
    let mut hdr = loaded
        .setup_header
        .ok_or_else(|| FirmwareError::NotBzImage {
            path: spec.kernel.clone(),
        })?;
    if hdr.header != HDR_MAGIC {
        return Err(FirmwareError::NotBzImage {
            path: spec.kernel.clone(),
        });
    }
    if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(FirmwareError::NotX86_64 {
            path: spec.kernel.clone(),
        });
    }
    // linux-loader put the protected-mode kernel at the header's code32_start (at or above
    // KERNEL_START, not necessarily at it). The 64-bit entry point lies ENTRY_64_OFFSET bytes
    // into it, so a shorter image has none; the decompressed kernel needs init_size bytes from
    // the load address.
    let load = loaded.kernel_load.0;
    let image_len = loaded.kernel_end - load;
    if image_len <= ENTRY_64_OFFSET {
        return Err(FirmwareError::NotBzImage {
            path: spec.kernel.clone(),
        });
    }
    let kernel_end = load + u64::from(hdr.init_size).max(image_len);
    if kernel_end > map.low_end {
        return Err(FirmwareError::KernelTooBig {
            path: spec.kernel.clone(),
            detail: format!(
                "it needs {} MiB but the guest has {} MiB below 4 GiB",
                kernel_end >> 20,
                map.low_end >> 20
            ),
        });
    }

    // Command line.
    let max = if hdr.cmdline_size > 0 {
        hdr.cmdline_size as usize
    } else {
        255
    }
    .min(CMDLINE_MAX - 1);
    if spec.cmdline.len() > max {
        return Err(FirmwareError::CmdlineTooLong {
            len: spec.cmdline.len(),
            max,
        });
    }
    if spec.cmdline.contains('\0') {
        return Err(FirmwareError::CmdlineInvalid);
    }
    let mut bytes = spec.cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(mem_err("the kernel command line"))?;

    // Initrd, as high in low memory as the kernel allows.
    let (initrd_addr, initrd_size) = match &spec.initrd {
        Some(path) => load_initrd(mem, map, path, &hdr, kernel_end)?,
        None => (0, 0),
    };

    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.boot_flag = KERNEL_BOOT_FLAG;
    hdr.loadflags |= CAN_USE_HEAP;
    hdr.heap_end_ptr = 0xfe00;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.ramdisk_image = initrd_addr as u32;
    hdr.ramdisk_size = initrd_size as u32;

    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: rsdp_addr,
        ..Default::default()
    };
    let e820 = map.e820();
    if e820.len() > params.e820_table.len() {
        return Err(FirmwareError::Layout("too many e820 entries".into()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(|e| FirmwareError::GuestMemory {
        what: "the zero page",
        detail: e.to_string(),
    })?;

    write_page_tables(mem)?;
    for (i, d) in GDT.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(mem_err("the GDT"))?;
    }

    Ok(BootCpuState {
        rip: load + ENTRY_64_OFFSET,
        rsp: BOOT_STACK,
        rsi: ZERO_PAGE_ADDR,
        cr0: CR0_PE | CR0_ET | CR0_PG,
        cr3: PML4_ADDR,
        cr4: CR4_PAE,
        efer: EFER_LME | EFER_LMA,
        gdt_base: GDT_ADDR,
        gdt_limit: (GDT.len() * 8 - 1) as u16,
        code: Segment::from_descriptor(CODE_SEL, GDT[2]),
        data: Segment::from_descriptor(DATA_SEL, GDT[3]),
        tss: Segment::from_descriptor(TSS_SEL, GDT[4]),
    })
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    map: &MemoryMap,
    path: &Path,
    hdr: &linux_loader::bootparam::setup_header,
    kernel_end: u64,
) -> Result<(u64, u64), FirmwareError> {
    let open_err = |source| FirmwareError::OpenInitrd {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    let addr_max = if hdr.initrd_addr_max != 0 {
        u64::from(hdr.initrd_addr_max)
    } else {
        DEFAULT_INITRD_ADDR_MAX
    };
    let top = (addr_max + 1).min(map.low_end);
    let too_big = || FirmwareError::InitrdTooBig {
        path: path.to_path_buf(),
        size,
    };
    let addr = top.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if addr < kernel_end.next_multiple_of(4096) {
        return Err(too_big());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(mem_err("the initrd"))?;
    Ok((addr, size))
}

/// Identity-maps the first 4 GiB with 2 MiB pages.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), FirmwareError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    mem.write_obj(PDPT_ADDR | PRESENT_RW, GuestAddress(PML4_ADDR))
        .map_err(mem_err("the page tables"))?;
    let mut pd = vec![0u8; 4 * 4096];
    for (i, chunk) in pd.chunks_exact_mut(8).enumerate() {
        let entry = ((i as u64) << 21) | PRESENT_RW | PAGE_SIZE_2M;
        chunk.copy_from_slice(&entry.to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PD_ADDR))
        .map_err(mem_err("the page tables"))?;
    for i in 0..4u64 {
        mem.write_obj(
            (PD_ADDR + i * 4096) | PRESENT_RW,
            GuestAddress(PDPT_ADDR + i * 8),
        )
        .map_err(mem_err("the page tables"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_boot_descriptors() {
        let code = Segment::from_descriptor(CODE_SEL, GDT[2]);
        assert!(code.l && code.present && code.s && code.g && !code.db);
        assert_eq!(code.type_, 0xb);
        assert_eq!(code.limit, 0xffff_ffff);
        let data = Segment::from_descriptor(DATA_SEL, GDT[3]);
        assert!(data.db && !data.l);
        assert_eq!(data.type_, 3);
        let tss = Segment::from_descriptor(TSS_SEL, GDT[4]);
        assert!(!tss.s);
        assert_eq!(tss.type_, 0xb);
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    #[test]
    fn rejects_files_that_are_not_kernels() {
        let dir = std::env::temp_dir().join(format!("ferry-fw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bogus = dir.join("bogus");
        std::fs::write(&bogus, vec![0x5a; 8192]).unwrap();
        let tiny = dir.join("tiny");
        std::fs::write(&tiny, b"hi").unwrap();
        let map = MemoryMap::new(64 << 20).unwrap();
        for k in [&bogus, &tiny] {
            let spec = LinuxBootSpec {
                kernel: k.clone(),
                initrd: None,
                cmdline: String::new(),
            };
            assert!(matches!(
                load_linux(&mem(), &map, &spec, 0),
                Err(FirmwareError::NotBzImage { .. })
            ));
        }
        let spec = LinuxBootSpec {
            kernel: dir.join("missing"),
            initrd: None,
            cmdline: String::new(),
        };
        assert!(matches!(
            load_linux(&mem(), &map, &spec, 0),
            Err(FirmwareError::OpenKernel { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A file with just enough of a bzImage header to pass `check_bzimage`.
    pub fn fake_bzimage(path: &Path, xloadflags: u16) {
        let mut h = vec![0u8; 0x1000];
        h[0x1fe..0x200].copy_from_slice(&KERNEL_BOOT_FLAG.to_le_bytes());
        h[0x202..0x206].copy_from_slice(&HDR_MAGIC.to_le_bytes());
        h[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        h[0x211] = 1;
        h[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        std::fs::write(path, h).unwrap();
    }

    #[test]
    fn header_check() {
        let dir = std::env::temp_dir().join(format!("ferry-hdr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("k");
        fake_bzimage(&k, 1);
        check_bzimage(&k).unwrap();
        fake_bzimage(&k, 0);
        assert!(matches!(
            check_bzimage(&k),
            Err(FirmwareError::NotX86_64 { .. })
        ));
        std::fs::write(&k, b"short").unwrap();
        assert!(matches!(
            check_bzimage(&k),
            Err(FirmwareError::NotBzImage { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rejects_image_without_entry_point_or_room() {
        // Found by fuzz/bzimage_header: a header whose code32_start is the end of RAM and no
        // protected-mode code loaded with rip = 0x400_0200, outside the 64 MiB guest.
        let dir = std::env::temp_dir().join(format!("ferry-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("k");
        let map = MemoryMap::new(64 << 20).unwrap();
        let spec = LinuxBootSpec {
            kernel: k.clone(),
            initrd: None,
            cmdline: String::new(),
        };
        let image = |code32_start: u32, init_size: u32, payload: usize| {
            fake_bzimage(&k, XLF_KERNEL_64);
            let mut h = std::fs::read(&k).unwrap();
            h[0x1f1] = 1; // setup_sects: the protected-mode code starts at 0x400
            h.truncate(0x400);
            h[0x214..0x218].copy_from_slice(&code32_start.to_le_bytes());
            h[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
            h.resize(0x400 + payload, 0x90);
            std::fs::write(&k, h).unwrap();
        };
        image(64 << 20, 16 << 20, 0);
        assert!(matches!(
            load_linux(&mem(), &map, &spec, 0),
            Err(FirmwareError::NotBzImage { .. })
        ));
        // init_size counts from where the kernel is loaded, not from KERNEL_START.
        image(56 << 20, 16 << 20, 0x1000);
        assert!(matches!(
            load_linux(&mem(), &map, &spec, 0),
            Err(FirmwareError::KernelTooBig { .. })
        ));
        image(KERNEL_START as u32, 16 << 20, 0x1000);
        let state = load_linux(&mem(), &map, &spec, 0).unwrap();
        assert_eq!(state.rip, KERNEL_START + ENTRY_64_OFFSET);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let m = mem();
        write_page_tables(&m).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 3);
        let pdpt3: u64 = m.read_obj(GuestAddress(PDPT_ADDR + 24)).unwrap();
        assert_eq!(pdpt3 & !0xfff, PD_ADDR + 3 * 4096);
        let last: u64 = m.read_obj(GuestAddress(PD_ADDR + 4 * 4096 - 8)).unwrap();
        assert_eq!(last & !0xfff, (1u64 << 32) - (2 << 20));
    }
}
