//! Which family of kernels the products run: the best this CPU has, or a lower one the
//! `DISTILLERY_KERNELS` environment variable asks for (`portable`, `avx2`, `avx512`, `amx`), so
//! every path can be tested and compared on one machine.

use std::sync::OnceLock;

/// The instruction families distillery's quantized products are written for, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KernelFamily {
    /// Plain Rust the compiler vectorizes for whatever the CPU has.
    Portable,
    /// x86-64 AVX2 with FMA and F16C: 256-bit integer and float arithmetic.
    Avx2,
    /// AVX-512 with VNNI (and VBMI for 3-bit codes): 8-bit dot products in one instruction.
    Avx512Vnni,
    /// AVX-512 VNNI and Intel AMX's 8-bit tile products (Sapphire Rapids and later Xeons):
    /// a matrix's products with several inputs, as a batch or a speculative check has them,
    /// in tiles of 16 channels by 32 columns.
    Amx,
}

impl KernelFamily {
    /// Every family, lowest first.
    pub const ALL: [Self; 4] = [Self::Portable, Self::Avx2, Self::Avx512Vnni, Self::Amx];

    /// The families' names, as `DISTILLERY_KERNELS` takes them, joined by `separator`.
    pub fn names(separator: &str) -> String {
        Self::ALL.map(Self::name).join(separator)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
            Self::Avx512Vnni => "avx512",
            Self::Amx => "amx",
        }
    }

    /// The best family this CPU runs.
    pub fn detected() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            let vnni = is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bw");
            if avx2 && vnni && amx_granted() {
                return Self::Amx;
            }
            if avx2 && vnni {
                return Self::Avx512Vnni;
            }
            if avx2 {
                return Self::Avx2;
            }
        }
        Self::Portable
    }
}

/// The family every product runs: the CPU's best, capped by `DISTILLERY_KERNELS`. An unknown
/// value is ignored with a warning, never a failure.
pub fn kernel_family() -> KernelFamily {
    static FAMILY: OnceLock<KernelFamily> = OnceLock::new();
    *FAMILY.get_or_init(|| {
        let detected = KernelFamily::detected();
        let Ok(requested) = std::env::var("DISTILLERY_KERNELS") else {
            return detected;
        };
        let cap = KernelFamily::ALL
            .into_iter()
            .find(|family| family.name() == requested);
        match cap {
            Some(cap) => cap.min(detected),
            None => {
                eprintln!(
                    "DISTILLERY_KERNELS={requested} is none of {}; using {}",
                    KernelFamily::names(", "),
                    detected.name()
                );
                detected
            }
        }
    })
}

/// Whether the CPU has AMX's tiles and 8-bit tile products and Linux lets this process use
/// them: their 8 KiB of registers are saved on a context switch only for processes that asked
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`), which this does once for all its
/// threads.
#[cfg(target_arch = "x86_64")]
fn amx_granted() -> bool {
    // Leaf 7 exists on every CPU with AVX2, which the caller checked.
    let features = std::arch::x86_64::__cpuid_count(7, 0);
    let (tiles, int8) = (features.edx >> 24 & 1 == 1, features.edx >> 25 & 1 == 1);
    tiles && int8 && request_tile_data()
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_data() -> bool {
    const ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let status: i64;
    // SAFETY: the arch_prctl system call with these arguments only changes which register
    // state the kernel saves for this process; it reads and writes no memory of ours.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") ARCH_PRCTL => status,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    status == 0
}

/// Other systems' permission calls are not written, so their CPUs keep the VNNI family.
#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tile_data() -> bool {
    false
}
