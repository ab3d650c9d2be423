//! Configs: the fixture and SD 1.5 configs build; broken and unsupported ones are typed errors;
//! inputs are checked.

use burn::tensor::{DType, Tensor};
use ip2p_nn::LoadError;
use ip2p_nn::testing::fixtures_dir;
use ip2p_unet::{UNet2DConditionConfig, UNet2DConditionModel, UnetError};

type B = burn::backend::Flex;

fn tiny_json() -> serde_json::Value {
    let text =
        std::fs::read_to_string(fixtures_dir().join("models/tiny/unet/config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn with(field: &str, value: serde_json::Value) -> Result<ip2p_unet::UnetPlan, UnetError> {
    let mut cfg = tiny_json();
    cfg[field] = value;
    UNet2DConditionConfig::from_json(&cfg.to_string())?.resolve()
}

#[test]
fn sd15_ip2p_config_resolves() {
    let plan = UNet2DConditionConfig::sd15_ip2p().resolve().unwrap();
    assert_eq!(plan.in_channels, 8);
    assert_eq!(plan.out_channels, 4);
    assert_eq!(plan.block_out_channels, [320, 640, 1280, 1280]);
    assert_eq!(plan.time_embed_dim(), 1280);
    assert_eq!(plan.cross_attention_dim, 768);
    // attention_head_dim 8 with num_attention_heads null means 8 heads everywhere.
    assert!(plan.down.iter().chain(&plan.up).all(|l| l.heads == 8));
    assert_eq!(plan.mid_heads, 8);
    let cross: Vec<bool> = plan.down.iter().map(|l| l.cross_attention).collect();
    assert_eq!(cross, [true, true, true, false]);
    let cross: Vec<bool> = plan.up.iter().map(|l| l.cross_attention).collect();
    assert_eq!(cross, [false, true, true, true]);
    assert!(plan.down.iter().all(|l| l.layers == 2) && plan.up.iter().all(|l| l.layers == 3));
    assert!(plan.flip_sin_to_cos && plan.freq_shift == 0.0 && !plan.use_linear_projection);
}

#[test]
fn fixture_configs_build_with_legacy_head_counts() {
    let device = Default::default();
    for (name, heads, mid) in [
        ("tiny", vec![8usize, 8], 8usize),
        ("wide", vec![2, 4, 4], 4),
    ] {
        let cfg = UNet2DConditionConfig::from_file(
            fixtures_dir().join(format!("models/{name}/unet/config.json")),
        )
        .unwrap();
        let unet = UNet2DConditionModel::<B>::from_config(&cfg, &device).unwrap();
        for (i, block) in unet.down_blocks.iter().enumerate() {
            for attn in &block.attentions {
                assert_eq!(
                    attn.transformer_blocks[0].attn1.heads, heads[i],
                    "{name} down {i}"
                );
            }
        }
        let n = heads.len();
        for (i, block) in unet.up_blocks.iter().enumerate() {
            for attn in &block.attentions {
                assert_eq!(
                    attn.transformer_blocks[0].attn2.heads,
                    heads[n - 1 - i],
                    "{name} up {i}"
                );
            }
        }
        assert_eq!(
            unet.mid_block.attentions[0].transformer_blocks[0]
                .attn1
                .heads,
            mid
        );
    }
}

#[test]
fn num_attention_heads_takes_precedence() {
    let mut cfg = tiny_json();
    cfg["num_attention_heads"] = serde_json::json!([2, 4]);
    let plan = UNet2DConditionConfig::from_json(&cfg.to_string())
        .unwrap()
        .resolve()
        .unwrap();
    assert_eq!(
        plan.down.iter().map(|l| l.heads).collect::<Vec<_>>(),
        [2, 4]
    );
    assert_eq!(plan.up.iter().map(|l| l.heads).collect::<Vec<_>>(), [4, 2]);
    assert_eq!(plan.mid_heads, 4);
}

#[test]
fn missing_field_is_a_typed_error() {
    let path = fixtures_dir().join("broken/unet_missing_field.json");
    match UNet2DConditionConfig::from_file(&path) {
        Err(UnetError::Load(LoadError::Config { path: p, reason })) => {
            assert_eq!(p, path);
            assert!(reason.contains("block_out_channels"), "{reason}");
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    let err = UNet2DConditionModel::<B>::load(
        fixtures_dir().join("broken"),
        None,
        DType::F32,
        &Default::default(),
    );
    assert!(
        matches!(err, Err(UnetError::Load(LoadError::Io { .. }))),
        "{err:?}"
    );
}

#[test]
fn unsupported_features_are_rejected() {
    use serde_json::json;
    let cases = [
        ("class_embed_type", json!("timestep")),
        ("addition_embed_type", json!("text_time")),
        ("encoder_hid_dim", json!(768)),
        ("resnet_time_scale_shift", json!("scale_shift")),
        ("time_embedding_type", json!("fourier")),
        ("dual_cross_attention", json!(true)),
        ("only_cross_attention", json!([false, true])),
        ("attention_type", json!("gated")),
        ("act_fn", json!("gelu")),
        ("mid_block_type", json!("UNetMidBlock2DSimpleCrossAttn")),
        (
            "down_block_types",
            json!(["DownBlock2D", "AttnDownBlock2D"]),
        ),
        (
            "up_block_types",
            json!(["SimpleCrossAttnUpBlock2D", "UpBlock2D"]),
        ),
        ("reverse_transformer_layers_per_block", json!([[1], [1]])),
    ];
    for (field, value) in cases {
        match with(field, value.clone()) {
            Err(UnetError::Unsupported { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field} = {value}: expected Unsupported, got {other:?}"),
        }
    }
    // Values equal to the defaults are fine.
    with("only_cross_attention", json!([false, false])).unwrap();
    with("time_embedding_type", json!("positional")).unwrap();
}

#[test]
fn inconsistent_configs_are_rejected() {
    use serde_json::json;
    for (field, value) in [
        ("attention_head_dim", json!([8, 8, 8])),
        ("block_out_channels", json!([32, 48])),
        ("down_block_types", json!(["DownBlock2D"])),
        ("attention_head_dim", json!(5)),
    ] {
        let r = with(field, value.clone());
        assert!(
            matches!(r, Err(UnetError::InvalidConfig(_))),
            "{field} = {value}: {r:?}"
        );
    }
    let r = with("block_out_channels", json!("many"));
    assert!(matches!(r, Err(UnetError::InvalidConfig(_))), "{r:?}");
}

#[test]
fn several_transformer_layers_per_block() {
    let mut cfg = tiny_json();
    cfg["transformer_layers_per_block"] = serde_json::json!([1, 2]);
    let cfg = UNet2DConditionConfig::from_json(&cfg.to_string()).unwrap();
    let unet = UNet2DConditionModel::<B>::from_config(&cfg, &Default::default()).unwrap();
    assert_eq!(
        unet.down_blocks[1].attentions[0].transformer_blocks.len(),
        2
    );
    assert_eq!(unet.up_blocks[0].attentions[0].transformer_blocks.len(), 2);
    assert_eq!(unet.mid_block.attentions[0].transformer_blocks.len(), 2);
}

fn tiny() -> UNet2DConditionModel<B> {
    let cfg = UNet2DConditionConfig::from_file(fixtures_dir().join("models/tiny/unet/config.json"))
        .unwrap();
    UNet2DConditionModel::from_config(&cfg, &Default::default()).unwrap()
}

fn zeros<const D: usize>(shape: [usize; D]) -> Tensor<B, D> {
    Tensor::zeros(shape, &Default::default())
}

#[test]
fn bad_inputs_are_typed_errors() {
    let unet = tiny();
    let ok_sample = || zeros([2, 8, 4, 4]);
    let ok_ctx = || zeros([2, 5, 32]);

    let r = unet.forward(zeros([2, 4, 4, 4]), 10.0, ok_ctx());
    assert!(
        matches!(
            r,
            Err(UnetError::InputChannels {
                expected: 8,
                found: 4
            })
        ),
        "{r:?}"
    );

    let r = unet.forward(ok_sample(), 10.0, zeros([3, 5, 32]));
    assert!(
        matches!(
            r,
            Err(UnetError::BatchMismatch {
                what: "encoder_hidden_states",
                sample: 2,
                found: 3
            })
        ),
        "{r:?}"
    );

    let r = unet.forward(ok_sample(), zeros::<1>([3]), ok_ctx());
    assert!(
        matches!(
            r,
            Err(UnetError::BatchMismatch {
                what: "timesteps",
                ..
            })
        ),
        "{r:?}"
    );

    let r = unet.forward(ok_sample(), 10.0, zeros([2, 5, 48]));
    assert!(
        matches!(
            r,
            Err(UnetError::ContextWidth {
                expected: 32,
                found: 48
            })
        ),
        "{r:?}"
    );

    let r = unet.forward(zeros([0, 8, 4, 4]), 10.0, zeros([0, 5, 32]));
    assert!(
        matches!(r, Err(UnetError::Empty { what: "sample", .. })),
        "{r:?}"
    );

    let r = unet.forward(ok_sample(), 10.0, zeros([2, 0, 32]));
    assert!(
        matches!(
            r,
            Err(UnetError::Empty {
                what: "encoder_hidden_states",
                ..
            })
        ),
        "{r:?}"
    );

    let nan_sample = ok_sample().slice_assign(
        [0..1, 0..1, 0..1, 0..1],
        zeros([1, 1, 1, 1]).add_scalar(f32::NAN),
    );
    let r = unet.forward(nan_sample, 10.0, ok_ctx());
    assert!(
        matches!(r, Err(UnetError::NonFinite { what: "sample" })),
        "{r:?}"
    );

    let inf_ctx = ok_ctx().slice_assign(
        [1..2, 2..3, 0..1],
        zeros([1, 1, 1]).add_scalar(f32::INFINITY),
    );
    let r = unet.forward(ok_sample(), 10.0, inf_ctx);
    assert!(
        matches!(
            r,
            Err(UnetError::NonFinite {
                what: "encoder_hidden_states"
            })
        ),
        "{r:?}"
    );

    let r = unet.forward(ok_sample(), f64::NAN, ok_ctx());
    assert!(
        matches!(r, Err(UnetError::NonFinite { what: "timesteps" })),
        "{r:?}"
    );

    // A one-element timestep tensor broadcasts, like a number.
    let a = unet
        .forward(ok_sample(), zeros::<1>([1]).add_scalar(7.5), ok_ctx())
        .unwrap();
    let b = unet.forward(ok_sample(), 7.5f32, ok_ctx()).unwrap();
    ip2p_nn::testing::assert_close("[1] timestep vs scalar", a, b, 0.0);
}
