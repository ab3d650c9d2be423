//! The AVX-512, AVX2 and portable paths of the vectorised kernels agree, where this CPU can run
//! them. Its own test binary: `isa::force` is process-wide.
//!
//! Tolerance: 1e-6 relative L2 between instruction sets. They differ only in SIMD width (lane
//! partial sums, the order of f32 additions) on identical formulas: measured ≤ 1e-7.

use ip2p_kernels::{activation, isa, norm};

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
        })
        .collect()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        num += ((x - y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

/// Every kernel output of this module on one instruction set.
fn outputs() -> Vec<Vec<f32>> {
    // 3 × 20 channels × 7×5: channels and spatial sizes off the SIMD widths.
    let (b, c, hw, groups) = (3, 20, 35, 4);
    let x = data(b * c * hw, 1);
    let (gamma, beta) = (data(c, 2), data(c, 3));
    let mut gn = vec![0.0; x.len()];
    norm::group_norm(&x, b, c, hw, groups, &gamma, &beta, 1e-6, true, &mut gn);
    let (rows, dim) = (13, 37);
    let y = data(rows * dim, 4);
    let (g2, b2) = (data(dim, 5), data(dim, 6));
    let mut ln = vec![0.0; y.len()];
    norm::layer_norm(&y, rows, dim, &g2, &b2, 1e-5, &mut ln);
    let mut silu = data(1001, 7);
    activation::silu(&mut silu);
    let mut gelu = data(1001, 8);
    activation::gelu(&mut gelu);
    let z = data(9 * 2 * 19, 9);
    let mut geglu = vec![0.0; 9 * 19];
    activation::geglu(&z, 9, 19, None, &mut geglu);
    let mut geglu_bias = vec![0.0; 9 * 19];
    activation::geglu(&z, 9, 19, Some(&data(2 * 19, 10)), &mut geglu_bias);
    vec![gn, ln, silu, gelu, geglu, geglu_bias]
}

#[test]
fn instruction_sets_agree() {
    let names = [
        "group_norm+silu",
        "layer_norm",
        "silu",
        "gelu",
        "geglu",
        "geglu+bias",
    ];
    let mut results = Vec::new();
    for &set in isa::available() {
        assert!(isa::force(Some(set)));
        results.push((set, outputs()));
    }
    isa::force(None);
    println!("instruction sets on this CPU: {:?}", isa::available());
    let (base, reference) = &results[0];
    for (set, out) in &results[1..] {
        for ((name, a), b) in names.iter().zip(out).zip(reference) {
            let e = rel_l2(a, b);
            println!("{name}: {set:?} vs {base:?}: rel L2 {e:.2e}");
            assert!(
                e <= 1e-6,
                "{name}: {set:?} differs from {base:?} by {e:.2e}"
            );
        }
    }
}
