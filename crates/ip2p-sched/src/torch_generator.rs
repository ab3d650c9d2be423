//! `torch.Generator("cpu")` and its `torch.randn` in float32, so that a seed gives the noise
//! diffusers draws.
//!
//! torch's CPU normal sampling has two paths, chosen by the tensor's size:
//! - 16 or more elements: every element first gets a 24-bit uniform in [0, 1) (one engine
//!   output each), then Box–Muller runs in f32 on blocks of 16 (element `j` and `j + 8` of a
//!   block are one pair). When the size is not a multiple of 16, 16 fresh uniforms redo the
//!   last 16 elements.
//! - fewer: one f64 Box–Muller sample per element from two 53-bit uniforms (two engine
//!   outputs each), its sine twin cached in the generator for the next such draw.
//!
//! torch evaluates the f32 block's log, sine and cosine in one of two ways ([`NormalKernel`]):
//! with the C library (ARM, e.g. Apple silicon, and x86 without AVX2), or with Cephes
//! polynomials on x86 CPUs with AVX2 (AVX-512 CPUs included). They differ by up to tens of ulps,
//! so both are here, and [`NormalKernel::host`] picks the one torch picks on this CPU.

use std::f64::consts::PI;
use std::ops::Range;

use crate::cephes;
use crate::mt19937::Mt19937;

/// How torch's f32 Box–Muller evaluates its log, sine and cosine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormalKernel {
    /// torch on x86-64 CPUs with AVX2 and FMA (AVX-512 ones too): Cephes polynomials.
    Avx2,
    /// torch elsewhere (ARM, older x86): the C library's `logf`, `sinf`, `cosf`.
    Portable,
}

impl NormalKernel {
    /// The kernel torch uses on this CPU.
    pub fn host() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Self::Avx2;
        }
        Self::Portable
    }
}

/// torch's CPU generator: the MT19937 engine and the cached f64 normal of the scalar path.
#[derive(Debug, Clone)]
pub struct TorchGenerator {
    engine: Mt19937,
    seed: u64,
    next_normal: Option<f64>,
    kernel: NormalKernel,
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)` (torch keeps the seed's low 32 bits), drawing
    /// as torch does on this CPU.
    pub fn new(seed: u64) -> Self {
        Self::with_kernel(seed, NormalKernel::host())
    }

    /// The same generator, drawing as torch does with `kernel`.
    pub fn with_kernel(seed: u64, kernel: NormalKernel) -> Self {
        Self {
            engine: Mt19937::new(seed),
            seed,
            next_normal: None,
            kernel,
        }
    }

    pub fn kernel(&self) -> NormalKernel {
        self.kernel
    }

    /// The seed it was made with (`generator.initial_seed()`).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// One engine output (`generator.random()`).
    fn random(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// Two engine outputs, the first in the high half (`generator.random64()`).
    fn random64(&mut self) -> u64 {
        let hi = self.random() as u64;
        let lo = self.random() as u64;
        (hi << 32) | lo
    }

    /// Uniform in [0, 1) with f32's 24 bits of precision.
    fn uniform_f32(&mut self) -> f32 {
        (self.random() & ((1 << 24) - 1)) as f32 / (1u32 << 24) as f32
    }

    /// Uniform in [0, 1) with f64's 53 bits of precision.
    fn uniform_f64(&mut self) -> f64 {
        (self.random64() & ((1 << 53) - 1)) as f64 / (1u64 << 53) as f64
    }

    /// One f64 standard normal of the scalar path, reusing the cached twin when there is one.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * PI * u1;
        self.next_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(numel, generator=self, dtype=torch.float32)`, flattened.
    ///
    /// Bit for bit torch's draw with the same [`NormalKernel`] (the portable one also needs the
    /// same C library, whose `logf`/`sinf`/`cosf` both sides call).
    pub fn randn(&mut self, numel: usize) -> Vec<f32> {
        self.randn_range(numel, 0..numel)
    }

    /// Elements `range` of `randn(numel)`, leaving the generator exactly where `randn(numel)`
    /// would (all the uniforms are drawn; only the blocks in `range` are transformed). This is
    /// how one chunk of a batch takes its rows of the whole batch's draw.
    ///
    /// # Panics
    /// If `range` is not within `0..numel` (callers check their rows first).
    pub fn randn_range(&mut self, numel: usize, range: Range<usize>) -> Vec<f32> {
        assert!(
            range.start <= range.end && range.end <= numel,
            "randn_range: {range:?} outside 0..{numel}"
        );
        if numel < 16 {
            let all: Vec<f32> = (0..numel).map(|_| self.normal_f64() as f32).collect();
            return all[range].to_vec();
        }
        let mut data: Vec<f32> = (0..numel).map(|_| self.uniform_f32()).collect();
        let ragged = !numel.is_multiple_of(16);
        // Elements from `kept_end` on are overwritten by the redone last block.
        let kept_end = if ragged { numel - 16 } else { numel };
        for start in (0..=numel - 16).step_by(16) {
            if start < kept_end.min(range.end) && start + 16 > range.start {
                box_muller_16(&mut data[start..start + 16], self.kernel);
            }
        }
        if ragged {
            let tail = &mut data[numel - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail, self.kernel);
        }
        data.truncate(range.end);
        data.drain(..range.start);
        data
    }
}

/// torch's 16-element f32 Box–Muller: uniforms `u[j]`, `u[j + 8]` become the pair's cosine and
/// sine samples.
fn box_muller_16(data: &mut [f32], kernel: NormalKernel) {
    for j in 0..8 {
        let u1 = 1.0 - data[j]; // (0, 1] for the log
        let u2 = data[j + 8];
        let (radius, sin, cos) = match kernel {
            NormalKernel::Avx2 => {
                // The angle is an f32 product with 2π rounded to f32.
                let (sin, cos) = cephes::sincos(std::f32::consts::TAU * u2);
                ((-2.0 * cephes::log(u1)).sqrt(), sin, cos)
            }
            NormalKernel::Portable => {
                // The angle is formed in f64 and rounded once.
                let theta = (2.0 * PI * u2 as f64) as f32;
                ((-2.0 * u1.ln()).sqrt(), theta.sin(), theta.cos())
            }
        };
        // torch writes fma(x, std, mean) with std 1 and mean 0: `+ 0.0` keeps its -0 → +0.
        data[j] = radius * cos + 0.0;
        data[j + 8] = radius * sin + 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::TorchGenerator;

    #[test]
    fn a_range_is_the_same_elements_and_leaves_the_same_state() {
        for numel in [7, 16, 37, 64, 100] {
            let full = TorchGenerator::new(3).randn(numel);
            for range in [0..numel, 1..numel / 2, numel / 2..numel, numel - 3..numel] {
                let mut g = TorchGenerator::new(3);
                assert_eq!(
                    g.randn_range(numel, range.clone()),
                    full[range.clone()],
                    "{numel} {range:?}"
                );
                let mut reference = TorchGenerator::new(3);
                reference.randn(numel);
                assert_eq!(g.randn(40), reference.randn(40), "{numel} {range:?}");
                assert_eq!(g.randn(3), reference.randn(3), "{numel} {range:?}");
            }
        }
    }

    #[test]
    fn normals_have_unit_moments() {
        let v = TorchGenerator::new(42).randn(200_003);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        // Standard errors at n = 2e5: 0.0022 for the mean, 0.0032 for the variance.
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var - 1.0).abs() < 0.015, "{var}");
    }
}
