//! Parity of the shared blocks with diffusers (fixtures/blocks, made by tools/fixtures/fx_blocks.py).
//!
//! Tolerance: 1e-5 relative L2. Each block is a handful of f32 convolutions/matmuls of at most
//! ~600 terms per output; f32 summation-order differences between PyTorch and Burn stay
//! around 1e-7 relative, so 1e-5 leaves room without hiding a wrong formula (a wrong
//! epsilon or scale moves the error to 1e-3 or more).

use burn::tensor::{DType, Tensor};
use ip2p_nn::testing::{Fixture, assert_close, assert_fixture};
use ip2p_nn::*;

type B = burn::backend::Flex;
const TOL: f64 = 1e-5;

fn load<M: burn::module::Module<B>>(module: M, case: &str) -> M {
    let path = ip2p_nn::testing::fixtures_dir().join(format!("blocks/{case}/weights.safetensors"));
    load_safetensors(module, path, &WeightSpec::new(), DType::F32).expect("load block weights")
}

#[test]
fn resnet_with_time_embedding() {
    let device = Default::default();
    let fx = Fixture::open("blocks/resnet_temb/io.safetensors");
    let block = ResnetBlock2DConfig::new(32)
        .with_out_channels(Some(64))
        .with_temb_channels(Some(128))
        .with_groups(8)
        .init::<B>(&device);
    let block = load(block, "resnet_temb");
    let out = block.forward(fx.tensor("x", &device), Some(fx.tensor("temb", &device)));
    assert_fixture(&fx, "output", out, TOL);
}

#[test]
fn resnet_without_time_embedding() {
    let device = Default::default();
    let fx = Fixture::open("blocks/resnet_plain/io.safetensors");
    let block = load(
        ResnetBlock2DConfig::new(64).init::<B>(&device),
        "resnet_plain",
    );
    assert_fixture(
        &fx,
        "output",
        block.forward(fx.tensor("x", &device), None),
        TOL,
    );
}

#[test]
fn spatial_attention_as_in_the_vae() {
    let device = Default::default();
    let fx = Fixture::open("blocks/attn_spatial/io.safetensors");
    let attn = AttentionConfig::new(64)
        .with_heads(1)
        .with_dim_head(64)
        .with_bias(true)
        .with_norm_num_groups(Some(32))
        .with_eps(1e-6)
        .with_residual_connection(true)
        .init::<B>(&device);
    let attn = load(attn, "attn_spatial");
    assert_fixture(
        &fx,
        "output",
        attn.forward_spatial(fx.tensor("x", &device)),
        TOL,
    );
}

#[test]
fn cross_attention_as_in_the_unet() {
    let device = Default::default();
    let fx = Fixture::open("blocks/attn_cross/io.safetensors");
    let attn = AttentionConfig::new(64)
        .with_cross_attention_dim(Some(32))
        .with_heads(4)
        .with_dim_head(16)
        .init::<B>(&device);
    let attn = load(attn, "attn_cross");
    let out = attn.forward(fx.tensor("x", &device), Some(fx.tensor("context", &device)));
    assert_fixture(&fx, "output", out, TOL);
}

/// Every attention implementation matches diffusers, and the chunked and fused ones match the
/// naive one to float rounding (1e-6: the same sums, in a different order).
#[test]
fn self_attention_every_implementation() {
    let device = Default::default();
    let fx = Fixture::open("blocks/attn_self/io.safetensors");
    let x: Tensor<B, 3> = fx.tensor("x", &device);
    let run = |imp| {
        let attn = AttentionConfig::new(64)
            .with_heads(2)
            .with_dim_head(32)
            .with_attention_impl(imp)
            .init::<B>(&device);
        load(attn, "attn_self").forward(x.clone(), None)
    };
    let naive = run(AttentionImpl::Naive);
    assert_fixture(&fx, "output", naive.clone(), TOL);
    for imp in [
        AttentionImpl::Fused,
        AttentionImpl::Chunked(64),
        AttentionImpl::Chunked(7),
    ] {
        assert_close(&format!("{imp:?} vs naive"), run(imp), naive.clone(), 1e-6);
    }
}

/// Causal masking is the same for every implementation, including chunk borders.
#[test]
fn causal_attention_every_implementation() {
    let device = Default::default();
    let fx = Fixture::open("blocks/attn_self/io.safetensors");
    let x: Tensor<B, 3> = fx.tensor("x", &device);
    let qkv = x
        .slice([0..2, 0..40, 0..64])
        .reshape([2, 40, 2, 32])
        .swap_dims(1, 2);
    let naive = scaled_dot_product(
        qkv.clone(),
        qkv.clone() * 0.5,
        qkv.clone(),
        true,
        AttentionImpl::Naive,
    );
    for imp in [
        AttentionImpl::Fused,
        AttentionImpl::Chunked(16),
        AttentionImpl::Chunked(3),
    ] {
        let out = scaled_dot_product(qkv.clone(), qkv.clone() * 0.5, qkv.clone(), true, imp);
        assert_close(
            &format!("causal {imp:?} vs naive"),
            out,
            naive.clone(),
            1e-6,
        );
    }
    // The first query sees only the first key, so its output is that key's value.
    let first = naive.slice([0..2, 0..2, 0..1, 0..32]);
    assert_close(
        "causal first row",
        first,
        qkv.slice([0..2, 0..2, 0..1, 0..32]),
        1e-6,
    );
}

#[test]
fn downsample_with_padding_as_in_the_unet() {
    let device = Default::default();
    let fx = Fixture::open("blocks/down_unet/io.safetensors");
    let down = load(
        Downsample2DConfig::new(32)
            .with_out_channels(Some(64))
            .init::<B>(&device),
        "down_unet",
    );
    assert_fixture(&fx, "output", down.forward(fx.tensor("x", &device)), TOL);
}

#[test]
fn downsample_without_padding_as_in_the_vae() {
    let device = Default::default();
    let fx = Fixture::open("blocks/down_vae/io.safetensors");
    let down = load(
        Downsample2DConfig::new(32)
            .with_padding(0)
            .init::<B>(&device),
        "down_vae",
    );
    assert_fixture(&fx, "output", down.forward(fx.tensor("x", &device)), TOL);
}

#[test]
fn upsample_double_and_to_a_size() {
    let device = Default::default();
    let fx = Fixture::open("blocks/up/io.safetensors");
    let up = load(Upsample2DConfig::new(32).init::<B>(&device), "up");
    let x: Tensor<B, 4> = fx.tensor("x", &device);
    assert_fixture(&fx, "output", up.forward(x.clone(), None), TOL);
    assert_fixture(&fx, "output_9x7", up.forward(x, Some([9, 7])), TOL);
}
