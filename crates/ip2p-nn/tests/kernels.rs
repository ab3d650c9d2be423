//! The CPU backend's kernels (ip2p-kernels behind `ip2p_nn::Backend for Flex`) against the
//! generic Burn path every other backend runs, on random inputs of awkward sizes: channels
//! that are not a multiple of the SIMD width, 1×1 and 3×3 maps, batch 1 and 3, non-square.
//!
//! Tolerance: 1e-5 relative L2. Both sides are f32 and differ only in summation order (GEMM
//! blocking, SIMD lanes, f64 statistics) and in rten's erf (absolute error < 2e-7): measured
//! ~1e-7. A wrong index, epsilon or missing bias is ≥ 1e-2.

use burn::module::{Module, Param};
use burn::nn::conv::Conv2dConfig;
use burn::nn::{GroupNormConfig, LayerNormConfig, LinearConfig, PaddingConfig2d};
use burn::tensor::{Distribution, Tensor};
use ip2p_nn::AttentionImpl;
use ip2p_nn::backend::{Backend, generic};
use ip2p_nn::testing::assert_close;

type B = burn::backend::Flex;
const TOL: f64 = 1e-5;

fn seed(n: u64) {
    <B as burn::tensor::backend::Backend>::seed(&Default::default(), n);
}

fn rand<const D: usize>(dims: [usize; D]) -> Tensor<B, D> {
    Tensor::random(dims, Distribution::Normal(0.0, 1.0), &Default::default())
}

/// Random parameters everywhere (Burn initialises norms to 1/0 and biases small).
fn randomised<M: Module<B>>(m: M) -> M {
    struct R;
    impl burn::module::ModuleMapper<B> for R {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let dims = p.val().dims();
            p.map(|_| rand(dims))
        }
    }
    m.map(&mut R)
}

/// (batch, cin, cout, h, w, kernel, stride, padding [t, l, b, r], bias, residual)
type ConvCase = (
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    [usize; 4],
    bool,
    bool,
);

#[test]
fn conv2d_matches_burn() {
    seed(1);
    let cases: &[ConvCase] = &[
        (1, 3, 5, 1, 1, 3, 1, [1, 1, 1, 1], true, false),
        (3, 17, 9, 3, 3, 3, 1, [1, 1, 1, 1], true, true),
        (3, 8, 16, 13, 9, 3, 1, [1, 1, 1, 1], false, true),
        (1, 5, 7, 6, 10, 1, 1, [0; 4], true, true),
        (3, 33, 31, 4, 4, 1, 1, [0; 4], true, false),
        (3, 32, 64, 32, 32, 3, 1, [1, 1, 1, 1], true, true),
        (1, 12, 12, 9, 7, 3, 2, [1, 1, 1, 1], true, false),
        // The VAE's downsampler: stride 2, padded right and bottom only.
        (1, 16, 16, 8, 8, 3, 2, [0, 0, 1, 1], true, false),
        (2, 4, 6, 5, 5, 3, 1, [0; 4], true, false),
    ];
    for &(n, cin, cout, h, w, k, s, [t, l, b, r], bias, residual) in cases {
        let conv = Conv2dConfig::new([cin, cout], [k, k])
            .with_stride([s, s])
            .with_padding(PaddingConfig2d::Explicit(t, l, b, r))
            .with_bias(bias)
            .init::<B>(&Default::default());
        let conv = randomised(conv);
        let x = rand([n, cin, h, w]);
        let expected = conv.forward(x.clone());
        let res = residual.then(|| rand(expected.dims()));
        let want = generic::conv2d(&conv, x.clone(), res.clone());
        let got = <B as Backend>::fused_conv2d(&conv, x, res);
        let what = format!("conv2d n{n} {cin}→{cout} {h}×{w} k{k} s{s} pad {t},{l},{b},{r}");
        assert_close(&what, got, want, TOL);
    }
}

#[test]
fn group_norm_with_and_without_silu_matches_burn() {
    seed(2);
    for &(n, c, groups, h, w) in &[
        (1, 4, 2, 1, 1),
        (3, 20, 4, 3, 3),
        (3, 64, 32, 7, 5),
        (1, 6, 3, 16, 16),
    ] {
        let norm = randomised(
            GroupNormConfig::new(groups, c)
                .with_epsilon(1e-6)
                .init::<B>(&Default::default()),
        );
        // A large mean shows a cancelling variance formula.
        let x = rand([n, c, h, w]).add_scalar(30.0);
        for silu in [false, true] {
            let want = generic::group_norm(&norm, x.clone(), silu);
            let got = <B as Backend>::fused_group_norm(&norm, x.clone(), silu);
            assert_close(
                &format!("group_norm {n}×{c}×{h}×{w}/{groups} silu {silu}"),
                got,
                want,
                TOL,
            );
        }
        // The 3-D form (the VAE attention's tokens transposed).
        let x3 = x.clone().reshape([n, c, h * w]);
        let want = generic::group_norm(&norm, x3.clone(), false);
        let got = <B as Backend>::fused_group_norm(&norm, x3, false);
        assert_close("group_norm 3-D", got, want, TOL);
    }
}

#[test]
fn layer_norm_matches_burn() {
    seed(3);
    for &(rows, dim) in &[(1, 1), (5, 3), (77, 40), (3 * 64, 320)] {
        let norm = randomised(
            LayerNormConfig::new(dim)
                .with_epsilon(1e-5)
                .init::<B>(&Default::default()),
        );
        // A small offset only: with 3 features and a mean far from 0, Burn's f32 variance
        // (the reference here) cancels to ~1e-5 relative while ours (f64) does not.
        let x = rand([1, rows, dim]).add_scalar(0.5);
        let want = generic::layer_norm(&norm, x.clone(), 1e-5);
        let got = <B as Backend>::fused_layer_norm(&norm, x, 1e-5);
        assert_close(&format!("layer_norm {rows}×{dim}"), got, want, TOL);
    }
}

#[test]
fn linear_and_geglu_match_burn() {
    seed(4);
    for &(b, l, fin, fout, bias, residual) in &[
        (1, 1, 1, 1, true, false),
        (3, 7, 17, 9, true, true),
        (3, 64, 40, 80, false, true),
        (2, 77, 32, 6, true, false),
    ] {
        let lin = randomised(
            LinearConfig::new(fin, fout)
                .with_bias(bias)
                .init::<B>(&Default::default()),
        );
        let x = rand([b, l, fin]);
        let res = residual.then(|| rand([b, l, fout]));
        let want = generic::linear(&lin, x.clone(), res.clone());
        let got = <B as Backend>::fused_linear(&lin, x.clone(), res.clone());
        assert_close(
            &format!("linear {b}×{l}×{fin}→{fout}"),
            got,
            want.clone(),
            TOL,
        );
        // As the loader makes it: the checkpoint's `[out, in]` values, Burn's shape by a
        // transposed view, read by the kernel through strides.
        let out_in: Tensor<B, 2> =
            Tensor::from_data(lin.weight.val().transpose().to_data(), &Default::default());
        let mut lin_t = lin.clone();
        lin_t.weight = Param::from_tensor(out_in.transpose());
        let got = <B as Backend>::fused_linear(&lin_t, x.clone(), res);
        assert_close(
            &format!("linear [out, in] {b}×{l}×{fin}→{fout}"),
            got,
            want,
            TOL,
        );
        if fout % 2 == 0 {
            let want = generic::geglu(&lin, x.clone());
            let got = <B as Backend>::fused_geglu(&lin, x);
            assert_close(&format!("geglu {b}×{l}×{fin}→{fout}"), got, want, TOL);
        }
    }
}

#[test]
fn attention_matches_burn() {
    seed(5);
    // (batch, heads, head_dim, q_len, kv_len)
    for &(b, heads, d, lq, lk) in &[
        (1, 1, 1, 1, 1),
        (3, 8, 5, 17, 17),
        (3, 8, 40, 64, 77),
        (1, 1, 64, 300, 300),
        (2, 2, 3, 130, 7),
    ] {
        let q = rand([b, lq, heads * d]).mul_scalar(3.0);
        let k = rand([b, lk, heads * d]);
        let v = rand([b, lk, heads * d]);
        let causal = lq == lk && lq % 2 == 1;
        let want = generic::attention(
            q.clone(),
            k.clone(),
            v.clone(),
            heads,
            causal,
            AttentionImpl::Naive,
        );
        let got = <B as Backend>::fused_attention(q, k, v, heads, causal, AttentionImpl::Fused);
        assert_close(
            &format!("attention b{b} h{heads} d{d} {lq}×{lk} causal {causal}"),
            got,
            want,
            TOL,
        );
    }
}

/// A transformer's `proj_in`/`proj_out`: 1×1 convs into and out of token-major layout, the
/// kernel path (strided GEMM operands) against a conv and a transpose. Includes a non-square map,
/// one position, channels off the SIMD widths, no bias, and a 3×3 conv (not 1×1: the fallback).
#[test]
fn conv1x1_between_maps_and_tokens_matches_burn() {
    seed(7);
    for &(n, cin, cout, h, w, k, bias) in &[
        (1, 3, 5, 1, 1, 1, true),
        (3, 17, 9, 4, 6, 1, true),
        (2, 32, 40, 8, 8, 1, false),
        (3, 20, 12, 5, 3, 3, true),
    ] {
        let conv = randomised(
            Conv2dConfig::new([cin, cout], [k, k])
                .with_bias(bias)
                .with_padding(PaddingConfig2d::Explicit(k / 2, k / 2, k / 2, k / 2))
                .init::<B>(&Default::default()),
        );
        let x = rand([n, cin, h, w]);
        let want = generic::conv1x1_to_tokens(&conv, x.clone());
        let got = <B as Backend>::fused_conv1x1_to_tokens(&conv, x);
        assert_close(
            &format!("to tokens {n}×{cin}→{cout}@{h}×{w} k{k}"),
            got,
            want,
            TOL,
        );

        let tokens = rand([n, h * w, cin]);
        let residual = rand([n, cout, h, w]);
        for residual in [Some(residual), None] {
            let want =
                generic::conv1x1_from_tokens(&conv, tokens.clone(), [h, w], residual.clone());
            let got = <B as Backend>::fused_conv1x1_from_tokens(
                &conv,
                tokens.clone(),
                [h, w],
                residual.clone(),
            );
            assert_close(
                &format!(
                    "from tokens {n}×{cin}→{cout}@{h}×{w} k{k} residual {}",
                    residual.is_some()
                ),
                got,
                want,
                TOL,
            );
        }
    }
}
