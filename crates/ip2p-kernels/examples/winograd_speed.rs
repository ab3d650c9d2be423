//! Times im2col + GEMM (`conv::conv2d_im2col`) against Winograd (`winograd::conv3x3`) at SD 1.5's 3×3
//! conv shapes: the measurements `winograd::suitable` is based on. GFLOP/s count a direct
//! conv's FLOPs (2 · outputs · cin · 9) over the time taken, so the columns compare speed.
//!
//! `cargo run --release -p ip2p-kernels --example winograd_speed [rounds]`
//!
//! Each round runs both convs once per shape, alternating, and the best round counts: on a
//! shared machine the best is the least disturbed.

use std::time::Instant;

use ip2p_kernels::conv::{Conv2dShape, conv2d_im2col};
use ip2p_kernels::winograd::{conv3x3, suitable};

/// `(batch, in, out, side)`: the UNet's at batch 3 (classifier-free guidance on two
/// conditions), the VAE decoder's at batch 1, then the convs in and out of the latents.
const SHAPES: [(usize, usize, usize, usize); 15] = [
    (3, 320, 320, 32),
    (3, 640, 640, 16),
    (3, 1280, 1280, 8),
    (3, 1280, 1280, 4),
    (3, 320, 320, 64),
    (3, 640, 640, 32),
    (3, 1280, 1280, 16),
    (1, 128, 128, 256),
    (1, 256, 256, 128),
    (1, 512, 512, 64),
    (1, 512, 512, 32),
    (3, 8, 320, 64),
    (3, 320, 4, 64),
    (1, 4, 512, 32),
    (1, 128, 3, 256),
];

type Conv = fn(&Conv2dShape, &[f32], &[f32], Option<&[f32]>, Option<&[f32]>, &mut [f32]);

fn main() {
    let rounds = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    println!(
        "{:>5} {:>5} {:>5} {:>9} {:>8} {:>9} {:>8} {:>8}",
        "batch", "in", "out", "map", "direct", "winograd", "speedup", "suitable"
    );
    for &(batch, cin, cout, side) in &SHAPES {
        let shape = Conv2dShape {
            batch,
            in_channels: cin,
            height: side,
            width: side,
            out_channels: cout,
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1; 4],
        };
        let x: Vec<f32> = (0..shape.input_len())
            .map(|i| (i * 7919 % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let w: Vec<f32> = (0..shape.weight_len())
            .map(|i| (i * 104_729 % 997) as f32 * 1e-4 - 0.05)
            .collect();
        let b = vec![0.1; cout];
        let mut out = vec![0.0; shape.output_len()];
        let mut time = |conv: Conv| {
            let start = Instant::now();
            conv(&shape, &x, &w, Some(&b), None, &mut out);
            start.elapsed().as_secs_f64()
        };
        // One warm-up each, then the best of the rounds.
        let (mut direct, mut wino) = (time(conv2d_im2col), time(conv3x3));
        for _ in 0..rounds {
            direct = direct.min(time(conv2d_im2col));
            wino = wino.min(time(conv3x3));
        }
        let gflops = |t: f64| shape.flops() / t * 1e-9;
        println!(
            "{batch:>5} {cin:>5} {cout:>5} {:>9} {:>8.1} {:>9.1} {:>7.2}× {:>8}",
            format!("{side}×{side}"),
            gflops(direct),
            gflops(wino),
            direct / wino,
            suitable(&shape)
        );
    }
}
