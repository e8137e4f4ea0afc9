//! Sixteen `f32` lanes as the few-row products hold a running sum: one AVX-512 register, two
//! AVX2 registers, or a plain array. Each does the same arithmetic (every product added to its
//! sum in one fused multiply-add, rounded once; the lanes added in halves), so a kernel written
//! once over [`Lanes`] gives the same bits on every CPU. Fused, because Intel's cores multiply
//! and add on the same two ports: a separate multiply and add took both ports twice. The
//! portable lanes fuse through `f32::mul_add`, in software on a CPU without FMA. The kernels
//! are compiled for each family explicitly: left to auto-vectorization, the same loop ran at
//! full vector width for four rows and at a fifth of it for two, depending on how the compiler
//! chose to unroll it.

/// The lanes of one running sum.
pub const LANES: usize = 16;

pub trait Lanes: Copy {
    /// Rows of a few-row product that meet each pass of weights together: their broadcast
    /// inputs stay in registers beside the pass's four weight blocks, or, past what the family
    /// holds, come from the first-level cache.
    const ROWS_AT_ONCE: usize;
    fn zero() -> Self;
    fn load(values: &[f32; LANES]) -> Self;
    fn splat(value: f32) -> Self;
    /// `self + a * b` lane by lane, fused: rounded once.
    fn add_product(self, a: Self, b: Self) -> Self;
    fn store(self, out: &mut [f32; LANES]);
    /// The lanes added in halves: lane `k + 8` onto lane `k`, then `k + 4`, `k + 2`, `k + 1`.
    fn sum(self) -> f32;
}

#[derive(Clone, Copy)]
pub struct Portable([f32; LANES]);

impl Lanes for Portable {
    const ROWS_AT_ONCE: usize = 4;

    #[inline(always)]
    fn zero() -> Self {
        Self([0.0; LANES])
    }

    #[inline(always)]
    fn load(values: &[f32; LANES]) -> Self {
        Self(*values)
    }

    #[inline(always)]
    fn splat(value: f32) -> Self {
        Self([value; LANES])
    }

    #[inline(always)]
    fn add_product(self, a: Self, b: Self) -> Self {
        Self(std::array::from_fn(|k| a.0[k].mul_add(b.0[k], self.0[k])))
    }

    #[inline(always)]
    fn store(self, out: &mut [f32; LANES]) {
        *out = self.0;
    }

    #[inline(always)]
    fn sum(self) -> f32 {
        let mut lanes = self.0;
        let mut width = LANES / 2;
        while width > 0 {
            for k in 0..width {
                lanes[k] += lanes[k + width];
            }
            width /= 2;
        }
        lanes[0]
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    // SAFETY (every block below): these methods run only inside functions compiled with
    // AVX2 and FMA (`Avx2`) or AVX-512F (`Avx512`) enabled, which `with_lanes!` calls only on
    // a CPU whose kernel family includes them; loads and stores go through references to
    // exactly sixteen floats.
    use super::{LANES, Lanes};
    use std::arch::x86_64::*;

    /// The last four lanes' sums: `[0 + 2, 1 + 3]`, then `0 + 1`.
    #[inline(always)]
    unsafe fn sum_of_four(four: __m128) -> f32 {
        unsafe {
            let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
            _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps::<1>(two, two)))
        }
    }

    /// Eight lanes added into four: lane `k + 4` onto lane `k`.
    #[inline(always)]
    unsafe fn halve_eight(eight: __m256) -> __m128 {
        unsafe {
            _mm_add_ps(
                _mm256_castps256_ps128(eight),
                _mm256_extractf128_ps::<1>(eight),
            )
        }
    }

    /// Lanes 0-7 in the first register, 8-15 in the second.
    #[derive(Clone, Copy)]
    pub struct Avx2([__m256; 2]);

    impl Lanes for Avx2 {
        // Four weight blocks take eight of sixteen registers: more rows at once than four only
        // read more broadcasts back from cache.
        const ROWS_AT_ONCE: usize = 4;

        #[inline(always)]
        fn zero() -> Self {
            unsafe { Self([_mm256_setzero_ps(); 2]) }
        }

        #[inline(always)]
        fn load(values: &[f32; LANES]) -> Self {
            let at = values.as_ptr();
            unsafe { Self([_mm256_loadu_ps(at), _mm256_loadu_ps(at.add(8))]) }
        }

        #[inline(always)]
        fn splat(value: f32) -> Self {
            unsafe { Self([_mm256_set1_ps(value); 2]) }
        }

        #[inline(always)]
        fn add_product(self, a: Self, b: Self) -> Self {
            unsafe {
                Self([
                    _mm256_fmadd_ps(a.0[0], b.0[0], self.0[0]),
                    _mm256_fmadd_ps(a.0[1], b.0[1], self.0[1]),
                ])
            }
        }

        #[inline(always)]
        fn store(self, out: &mut [f32; LANES]) {
            let at = out.as_mut_ptr();
            unsafe {
                _mm256_storeu_ps(at, self.0[0]);
                _mm256_storeu_ps(at.add(8), self.0[1]);
            }
        }

        #[inline(always)]
        fn sum(self) -> f32 {
            unsafe { sum_of_four(halve_eight(_mm256_add_ps(self.0[0], self.0[1]))) }
        }
    }

    #[derive(Clone, Copy)]
    pub struct Avx512(__m512);

    impl Lanes for Avx512 {
        // Thirty-two registers: the largest few-row product meets each pass of weights in
        // one group, the broadcasts that do not fit read back from the first-level cache.
        const ROWS_AT_ONCE: usize = 8;

        #[inline(always)]
        fn zero() -> Self {
            unsafe { Self(_mm512_setzero_ps()) }
        }

        #[inline(always)]
        fn load(values: &[f32; LANES]) -> Self {
            unsafe { Self(_mm512_loadu_ps(values.as_ptr())) }
        }

        #[inline(always)]
        fn splat(value: f32) -> Self {
            unsafe { Self(_mm512_set1_ps(value)) }
        }

        #[inline(always)]
        fn add_product(self, a: Self, b: Self) -> Self {
            unsafe { Self(_mm512_fmadd_ps(a.0, b.0, self.0)) }
        }

        #[inline(always)]
        fn store(self, out: &mut [f32; LANES]) {
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), self.0) }
        }

        #[inline(always)]
        fn sum(self) -> f32 {
            unsafe {
                let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(self.0)));
                sum_of_four(halve_eight(_mm256_add_ps(
                    _mm512_castps512_ps256(self.0),
                    high,
                )))
            }
        }
    }
}

/// `kernel::<L>(arguments)` with the lanes of a [`KernelFamily`] (an expression; by default
/// the [family in use](distillery_quant::cpu::kernel_family), which `DISTILLERY_KERNELS` can
/// lower), each instantiation compiled with its family's instructions enabled. Arguments are
/// written `name: type`.
///
/// [`KernelFamily`]: distillery_quant::cpu::KernelFamily
macro_rules! with_lanes {
    ($kernel:ident($($argument:ident: $type:ty),* $(,)?)) => {
        $crate::lanes::with_lanes!(
            @in distillery_quant::cpu::kernel_family(),
            $kernel($($argument: $type),*)
        )
    };
    (@in $family:expr, $kernel:ident($($argument:ident: $type:ty),* $(,)?)) => {{
        use distillery_quant::cpu::KernelFamily;
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($argument: $type),*) {
                $kernel::<$crate::lanes::Avx2>($($argument),*)
            }
            #[target_feature(enable = "avx512f")]
            fn avx512($($argument: $type),*) {
                $kernel::<$crate::lanes::Avx512>($($argument),*)
            }
            match $family {
                KernelFamily::Portable => $kernel::<$crate::lanes::Portable>($($argument),*),
                // SAFETY: a CPU is given a family only when it has the family's instructions
                // (the AVX2 family's include FMA; the AVX-512 family's VL and BW extend
                // AVX-512F).
                KernelFamily::Avx2 => unsafe { avx2($($argument),*) },
                KernelFamily::Avx512Vnni | KernelFamily::Amx => unsafe { avx512($($argument),*) },
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _: KernelFamily = $family;
            $kernel::<$crate::lanes::Portable>($($argument),*)
        }
    }};
}

pub(crate) use with_lanes;
