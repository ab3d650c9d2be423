//! ip2p's CPU kernels, on plain `f32` slices with no Burn types, so they can be tested and
//! benched alone. Every kernel is parallel over the machine's cores (rayon) and picks its SIMD
//! instruction set at run time (AVX-512, AVX2+FMA, NEON or scalar): one binary runs everywhere.
//!
//! Layouts are PyTorch's: images `[batch, channels, height, width]`, conv weights
//! `[out, in, kh, kw]`, token matrices row-major `[rows, features]`.

pub mod activation;
pub mod attention;
pub mod conv;
pub mod gemm;
pub mod isa;
pub mod linear;
pub mod norm;
pub mod pointwise;
pub mod winograd;

/// Deterministic values in [-0.5, 0.5), a different sequence per seed: the unit tests' inputs.
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 1999) as f32 / 1999.0 - 0.5)
        .collect()
}
