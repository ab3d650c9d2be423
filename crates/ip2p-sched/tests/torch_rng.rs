//! `TorchGenerator` against `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(S))`
//! (fixtures/rng/randn_<kernel>.safetensors, made by tools/fixtures/fx_rng.py), for both of
//! torch's f32 kernels: `avx2` (x86 with AVX2 or AVX-512) and `portable` (ARM, older x86).
//!
//! Tolerance: bit-exact (0 ulps), for every stored draw and for the bit-pattern checksums of a
//! 10⁶-element draw. Both sides run the same algorithm on the same engine outputs in the same
//! precision: the f64 path and the portable f32 path call the same C library functions
//! (`log1p`/`sin`/`cos`, `logf`/`sinf`/`cosf`), and the AVX2 path is the same Cephes polynomials
//! with the same fused multiply-adds. A different C library (musl, macOS) could move the
//! portable kernel's draws by an ulp; this test would then say so.

use ip2p_nn::testing::Fixture;
use ip2p_sched::{NormalKernel, TorchGenerator};

#[derive(serde::Deserialize)]
struct Meta {
    cases: Vec<Case>,
    big: Big,
}

#[derive(serde::Deserialize)]
struct Case {
    seed: u64,
    shapes: Vec<Vec<usize>>,
}

#[derive(serde::Deserialize)]
struct Big {
    seed: u64,
    numel: usize,
    /// Decimal strings: wrapping u64 sums of the f32 bit patterns, plain and weighted by index+1.
    bit_sums: [String; 2],
}

/// Distance in units in the last place (adjacent f32 values are 1 apart; +0 and -0 are 0).
fn ulps(a: f32, b: f32) -> u32 {
    let key = |x: f32| {
        let i = x.to_bits() as i32;
        if i < 0 { i32::MIN.wrapping_sub(i) } else { i }
    };
    (key(a) as i64 - key(b) as i64).unsigned_abs() as u32
}

fn bit_sums(values: &[f32]) -> [String; 2] {
    let (mut plain, mut weighted) = (0u64, 0u64);
    for (i, v) in values.iter().enumerate() {
        let bits = v.to_bits() as u64;
        plain = plain.wrapping_add(bits);
        weighted = weighted.wrapping_add(bits.wrapping_mul(i as u64 + 1));
    }
    [plain.to_string(), weighted.to_string()]
}

fn matches_torch(kernel: NormalKernel, file: &str) {
    let fx = Fixture::open(format!("rng/randn_{file}.safetensors"));
    let meta: Meta = fx.meta_json("randn");
    let mut draws = 0;
    for (i, case) in meta.cases.iter().enumerate() {
        let mut g = TorchGenerator::with_kernel(case.seed, kernel);
        for (j, shape) in case.shapes.iter().enumerate() {
            let name = format!("c{i}_d{j}");
            let (expected, stored_shape) = fx.values(&name);
            assert_eq!(&stored_shape, shape, "{name}");
            let ours = g.randn(shape.iter().product());
            let worst = ours
                .iter()
                .zip(&expected)
                .map(|(&a, &e)| ulps(a, e as f32))
                .max()
                .unwrap_or(0);
            assert_eq!(
                worst,
                0,
                "{file}: seed {} draw {j} {shape:?} is {worst} ulps from torch\n  ours  {:?}\n  torch {:?}",
                case.seed,
                &ours[..ours.len().min(8)],
                &expected[..expected.len().min(8)]
            );
            draws += 1;
        }
    }
    assert!(draws >= 15, "{file}: only {draws} draws in the fixture");
    let big = TorchGenerator::with_kernel(meta.big.seed, kernel).randn(meta.big.numel);
    assert_eq!(
        bit_sums(&big),
        meta.big.bit_sums,
        "{file}: a {}-element draw differs from torch's",
        meta.big.numel
    );
}

#[test]
fn randn_matches_torch_avx2() {
    matches_torch(NormalKernel::Avx2, "avx2");
}

#[test]
fn randn_matches_torch_portable() {
    matches_torch(NormalKernel::Portable, "portable");
}

#[test]
fn ulps_counts_representable_steps() {
    assert_eq!(ulps(1.0, 1.0), 0);
    assert_eq!(ulps(1.0, f32::from_bits(1.0f32.to_bits() + 1)), 1);
    assert_eq!(ulps(0.0, -0.0), 0);
    assert_eq!(ulps(f32::from_bits(1), -f32::from_bits(1)), 2);
}
