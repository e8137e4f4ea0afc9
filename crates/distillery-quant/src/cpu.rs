//! Which family of kernels the products run: the best this CPU has, or a lower one the
//! `DISTILLERY_KERNELS` environment variable asks for (`portable`, `avx2`, `avx512`), so every
//! path can be tested and compared on one machine.

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
}

impl KernelFamily {
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
            Self::Avx512Vnni => "avx512",
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
        let cap = [
            KernelFamily::Portable,
            KernelFamily::Avx2,
            KernelFamily::Avx512Vnni,
        ]
        .into_iter()
        .find(|family| family.name() == requested);
        match cap {
            Some(cap) => cap.min(detected),
            None => {
                eprintln!(
                    "DISTILLERY_KERNELS={requested} is none of portable, avx2, avx512; using {}",
                    detected.name()
                );
                detected
            }
        }
    })
}
