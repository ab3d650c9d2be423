//! Throughput of `attention` at the SD 1.5 UNet's and VAE's shapes, against a naive version that
//! materialises each head's whole score matrix with one multi-threaded GEMM, in a sequential
//! loop over batch × heads (what burn-flex 0.21's attention amounts to).
//!
//! `cargo run -p ip2p-kernels --release --example attention_speed [-- repeats]`; prints the best
//! of `repeats` (default 3) runs, GFLOP/s counting `4·batch·heads·q_len·kv_len·head_dim`.

use std::time::Instant;

use ip2p_kernels::attention::{AttentionLayout, AttentionShape, attention};
use ip2p_kernels::gemm::{MatMut, MatRef, Threads, matmul};
use rten_simd::SimdOp;
use rten_vecmath::Softmax;

/// One score matrix per head, GEMMs on all cores, softmax row by row on one.
fn naive(
    s: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (hd, inner) = (s.head_dim, s.inner());
    for b in 0..s.batch {
        for h in 0..s.heads {
            let qh = MatRef::strided(&q[b * s.q_len * inner + h * hd..], s.q_len, hd, inner, 1);
            let kh = MatRef::strided(&k[b * s.kv_len * inner + h * hd..], s.kv_len, hd, inner, 1);
            let vh = MatRef::strided(&v[b * s.kv_len * inner + h * hd..], s.kv_len, hd, inner, 1);
            let sm = MatMut::row_major(scores, s.q_len, s.kv_len);
            matmul(sm, qh, kh.t(), scale, false, Threads::All);
            for row in scores.chunks_exact_mut(s.kv_len) {
                Softmax::new_mut(row).dispatch();
            }
            let p = MatRef::row_major(scores, s.q_len, s.kv_len);
            let o = MatMut::strided(
                &mut out[b * s.q_len * inner + h * hd..],
                s.q_len,
                hd,
                inner,
                1,
            );
            matmul(o, p, vh, 1.0, false, Threads::All);
        }
    }
}

fn best_of(repeats: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up: page in buffers, grow per-thread scratch
    (0..repeats)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let repeats: usize = std::env::args()
        .nth(1)
        .map_or(3, |a| a.parse().expect("repeats"));
    let unet = |q_len, kv_len, head_dim| AttentionShape {
        batch: 3,
        heads: 8,
        q_len,
        kv_len,
        head_dim,
        causal: false,
    };
    let vae = |tokens| AttentionShape {
        batch: 1,
        heads: 1,
        q_len: tokens,
        kv_len: tokens,
        head_dim: 512,
        causal: false,
    };
    let cases = [
        ("UNet 256² self", unet(1024, 1024, 40)),
        ("UNet 256² self", unet(256, 256, 80)),
        ("UNet 256² self", unet(64, 64, 160)),
        ("UNet 256² cross", unet(1024, 77, 40)),
        ("UNet 256² cross", unet(256, 77, 80)),
        ("UNet 256² cross", unet(64, 77, 160)),
        ("UNet 512² self", unet(4096, 4096, 40)),
        ("UNet 512² self", unet(1024, 1024, 80)),
        ("UNet 512² self", unet(256, 256, 160)),
        ("UNet 512² cross", unet(4096, 77, 40)),
        ("UNet 512² cross", unet(1024, 77, 80)),
        ("UNet 512² cross", unet(256, 77, 160)),
        ("VAE 256² mid", vae(1024)),
        ("VAE 512² mid", vae(4096)),
    ];
    println!(
        "{} threads, best of {repeats}",
        rayon::current_num_threads()
    );
    println!(
        "{:<16} {:>5} {:>5} {:>5} {:>3} {:>4} | {:>9} {:>7} | {:>9} {:>7} | {:>6}",
        "case",
        "batch",
        "q",
        "kv",
        "h",
        "d",
        "tiled ms",
        "GFLOP/s",
        "naive ms",
        "GFLOP/s",
        "speed-up"
    );
    for (name, s) in cases {
        let inner = s.inner();
        let fill = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7919 + seed * 104729) % 1999) as f32 / 999.5 - 1.0)
                .collect()
        };
        let q = fill(s.batch * s.q_len * inner, 1);
        let k = fill(s.batch * s.kv_len * inner, 2);
        let v = fill(s.batch * s.kv_len * inner, 3);
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let layout = AttentionLayout::contiguous(&s);
        let mut out = vec![0.0; s.batch * s.q_len * inner];
        let mut out_naive = vec![0.0; out.len()];
        let mut scores = vec![0.0; s.q_len * s.kv_len];

        let tiled = best_of(repeats, || {
            attention(&s, &layout, &q, &k, &v, scale, &mut out)
        });
        let slow = best_of(repeats, || {
            naive(&s, &q, &k, &v, scale, &mut scores, &mut out_naive)
        });
        let diff = out
            .iter()
            .zip(&out_naive)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff < 1e-4,
            "{name} {s:?}: tiled and naive differ by {diff}"
        );
        let gf = |t: f64| s.flops() / t * 1e-9;
        println!(
            "{:<16} {:>5} {:>5} {:>5} {:>3} {:>4} | {:>9.2} {:>7.1} | {:>9.2} {:>7.1} | {:>5.2}×",
            name,
            s.batch,
            s.q_len,
            s.kv_len,
            s.heads,
            s.head_dim,
            tiled * 1e3,
            gf(tiled),
            slow * 1e3,
            gf(slow),
            slow / tiled
        );
    }
}
