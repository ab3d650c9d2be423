//! Weight loading: good files in every float dtype, and each kind of broken file
//! (fixtures/broken, made by tools/fixtures/fx_broken.py) giving its own typed error.

use std::path::PathBuf;

use burn::tensor::{DType, Tensor};
use ip2p_nn::testing::{Fixture, assert_close, fixtures_dir};
use ip2p_nn::*;

type B = burn::backend::Flex;

fn block() -> ResnetBlock2D<B> {
    ResnetBlock2DConfig::new(32)
        .with_out_channels(Some(64))
        .with_temb_channels(Some(128))
        .with_groups(8)
        .init(&Default::default())
}

fn good(tag: &str) -> PathBuf {
    fixtures_dir().join(format!("blocks/resnet_temb/weights{tag}.safetensors"))
}

fn broken(name: &str) -> PathBuf {
    fixtures_dir().join("broken").join(name)
}

fn load(path: PathBuf, dtype: DType) -> Result<ResnetBlock2D<B>, LoadError> {
    load_safetensors(block(), path, &WeightSpec::new(), dtype)
}

fn forward(block: &ResnetBlock2D<B>, dtype: DType) -> Tensor<B, 4> {
    let device = Default::default();
    let fx = Fixture::open("blocks/resnet_temb/io.safetensors");
    let x: Tensor<B, 4> = fx.tensor("x", &device);
    let t: Tensor<B, 2> = fx.tensor("temb", &device);
    block
        .forward(x.cast(dtype), Some(t.cast(dtype)))
        .cast(DType::F32)
}

#[test]
fn f32_file_loads_exact_values() {
    let block = load(good(""), DType::F32).unwrap();
    let fx = Fixture::open("blocks/resnet_temb/weights.safetensors");
    let bias = block.conv1.bias.as_ref().unwrap().val();
    assert_eq!(bias.dtype(), DType::F32);
    assert_close(
        "conv1.bias",
        bias,
        fx.tensor("conv1.bias", &Default::default()),
        0.0,
    );
    // Linear weights are transposed from PyTorch's [out, in] to Burn's [in, out].
    let w = block.time_emb_proj.as_ref().unwrap().weight.val();
    assert_eq!(w.dims(), [128, 64]);
    let expected: Tensor<B, 2> = fx.tensor("time_emb_proj.weight", &Default::default());
    assert_close("time_emb_proj.weight", w, expected.transpose(), 0.0);
    // GroupNorm weight/bias become gamma/beta.
    let gamma = block.norm1.gamma.as_ref().unwrap().val();
    assert_close(
        "norm1.weight",
        gamma,
        fx.tensor("norm1.weight", &Default::default()),
        0.0,
    );
}

/// Half-precision files load into an f32 model. The output differs from the f32 file's only
/// by the weights' rounding: f16 keeps 11 significant bits (~5e-4 relative per weight),
/// bf16 8 bits (~4e-3); through two convs that is ~1e-3 and ~1e-2.
#[test]
fn half_precision_files_load_into_f32() {
    let reference = forward(&load(good(""), DType::F32).unwrap(), DType::F32);
    for (tag, tol) in [(".fp16", 2e-3), (".bf16", 2e-2)] {
        let block = load(good(tag), DType::F32).unwrap();
        assert_eq!(block.conv1.weight.val().dtype(), DType::F32, "{tag}");
        assert_close(tag, forward(&block, DType::F32), reference.clone(), tol);
    }
}

/// An f32 file loads into an f16 model, which runs with GroupNorm statistics in f32.
/// f16 activations (11 bits) through two convs and two norms: 5e-3 relative.
#[test]
fn f32_file_loads_into_f16_model() {
    let reference = forward(&load(good(""), DType::F32).unwrap(), DType::F32);
    let block = load(good(""), DType::F16).unwrap();
    assert_eq!(block.conv1.weight.val().dtype(), DType::F16);
    assert_eq!(
        block.norm1.gamma.as_ref().unwrap().val().dtype(),
        DType::F16
    );
    assert_close("f16 model", forward(&block, DType::F16), reference, 5e-3);
}

#[test]
fn missing_tensor_is_named() {
    match load(broken("missing_tensor.safetensors"), DType::F32) {
        Err(LoadError::MissingTensors { path, keys }) => {
            assert!(path.ends_with("missing_tensor.safetensors"));
            assert_eq!(keys, vec!["conv2.bias".to_string()]);
        }
        other => panic!("expected MissingTensors, got {other:?}"),
    }
}

#[test]
fn unexpected_tensor_is_named() {
    match load(broken("unexpected_tensor.safetensors"), DType::F32) {
        Err(LoadError::UnexpectedTensors { keys, .. }) => {
            assert_eq!(keys, vec!["conv3.weight".to_string()])
        }
        other => panic!("expected UnexpectedTensors, got {other:?}"),
    }
}

#[test]
fn ignored_entries_are_not_unexpected() {
    let spec = WeightSpec::new().ignore(r"^conv3\.");
    assert!(
        load_safetensors(
            block(),
            broken("unexpected_tensor.safetensors"),
            &spec,
            DType::F32
        )
        .is_ok()
    );
}

#[test]
fn remapped_keys_load() {
    // The file says conv3 for nothing real; remapping a real key away makes it missing.
    let spec = WeightSpec::new().remap(r"^conv2\.", "conv_two.");
    match load_safetensors(block(), good(""), &spec, DType::F32) {
        Err(LoadError::MissingTensors { keys, .. }) => {
            assert!(keys.contains(&"conv2.weight".to_string()), "{keys:?}")
        }
        other => panic!("expected MissingTensors, got {other:?}"),
    }
}

#[test]
fn shape_mismatch_gives_both_shapes() {
    match load(broken("shape_mismatch.safetensors"), DType::F32) {
        Err(LoadError::ShapeMismatch {
            tensor,
            expected,
            found,
            ..
        }) => {
            assert_eq!(tensor, "conv1.weight");
            assert_eq!(expected, vec![64, 32, 3, 3]);
            assert_eq!(found, vec![64, 32, 5, 5]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

#[test]
fn integer_tensor_is_an_unsupported_dtype() {
    match load(broken("int_dtype.safetensors"), DType::F32) {
        Err(LoadError::UnsupportedDType { tensor, dtype, .. }) => {
            assert_eq!(tensor, "conv1.bias");
            assert_eq!(dtype, "I32");
        }
        other => panic!("expected UnsupportedDType, got {other:?}"),
    }
}

#[test]
fn damaged_files_are_corrupt() {
    for name in [
        "truncated.safetensors",
        "corrupt_header.safetensors",
        "header_too_long.safetensors",
        "empty.safetensors",
    ] {
        match load(broken(name), DType::F32) {
            Err(e @ LoadError::Corrupt { .. }) => assert!(e.to_string().contains(name), "{e}"),
            other => panic!("{name}: expected Corrupt, got {other:?}"),
        }
    }
}

#[test]
fn absent_file_is_an_io_error() {
    let err = load(broken("no_such_file.safetensors"), DType::F32).unwrap_err();
    assert!(matches!(err, LoadError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("no_such_file.safetensors"));
}

#[test]
fn weights_file_finds_variants() {
    let dir = fixtures_dir().join("models/tiny/unet");
    assert!(
        weights_file(&dir, "diffusion_pytorch_model", None)
            .unwrap()
            .ends_with("diffusion_pytorch_model.safetensors")
    );
    assert!(
        weights_file(&dir, "diffusion_pytorch_model", Some("fp16"))
            .unwrap()
            .ends_with("diffusion_pytorch_model.fp16.safetensors")
    );
    let wide = fixtures_dir().join("models/wide/unet");
    let err = weights_file(&wide, "diffusion_pytorch_model", Some("fp16")).unwrap_err();
    assert!(
        err.to_string()
            .contains("diffusion_pytorch_model.fp16.safetensors"),
        "{err}"
    );
}

#[derive(Debug, serde::Deserialize)]
#[allow(dead_code)]
struct Partial {
    block_out_channels: Vec<usize>,
    latent_channels: usize,
}

#[test]
fn config_errors_name_file_and_field() {
    let ok: Partial = read_config(fixtures_dir().join("models/tiny/vae/config.json")).unwrap();
    assert_eq!(ok.block_out_channels, vec![32, 64]);

    let err = read_config::<Partial>(broken("vae_wrong_value.json")).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, LoadError::Config { .. }));
    assert!(
        msg.contains("vae_wrong_value.json") && msg.contains("four"),
        "{msg}"
    );

    let err = read_config::<Partial>(broken("not_json.json")).unwrap_err();
    assert!(matches!(err, LoadError::Config { .. }), "{err:?}");

    let err = read_config::<Partial>(broken("unet_missing_field.json")).unwrap_err();
    assert!(err.to_string().contains("block_out_channels"), "{err}");
}

#[test]
fn per_block_values_expand() {
    assert_eq!(PerBlock::One(8).expand(3, "heads").unwrap(), vec![8, 8, 8]);
    assert_eq!(
        PerBlock::Each(vec![2, 4]).expand(2, "heads").unwrap(),
        vec![2, 4]
    );
    assert!(
        PerBlock::Each(vec![2, 4])
            .expand(3, "heads")
            .unwrap_err()
            .contains("heads")
    );
}
