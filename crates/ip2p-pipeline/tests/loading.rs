//! The loader (ip2p_nn::loader: one copy per tensor, transposes and casts fused into it) gives
//! the same tensors, bit for bit, as burn-store's path it replaced, for every part of both
//! fixture models, from the f32 files and the fp16 variant, into f32, f16 and bf16 models.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{DType, TensorData};
use ip2p_nn::testing::fixtures_dir;
use ip2p_nn::{WeightSpec, load_safetensors, load_safetensors_burn_store, weights_file};
use ip2p_text::ClipTextConfig;
use ip2p_unet::{UNet2DConditionConfig, UNet2DConditionModel};
use ip2p_vae::{AutoencoderKLModule, VaeConfig};

type B = burn::backend::Flex;

fn params<M: Module<B>>(m: &M) -> Vec<(String, TensorData)> {
    ip2p_nn::testing::float_params::<B, M>(m)
}

fn assert_same<M: Module<B>>(what: &str, new: &M, old: &M) {
    let (new, old) = (params(new), params(old));
    assert_eq!(new.len(), old.len(), "{what}: parameter count");
    assert!(!new.is_empty(), "{what}: no parameters");
    for ((pn, dn), (po, d_o)) in new.iter().zip(&old) {
        assert_eq!(pn, po, "{what}: order");
        assert_eq!(dn.dtype, d_o.dtype, "{what}: {pn} dtype");
        assert_eq!(dn.shape, d_o.shape, "{what}: {pn} shape");
        assert!(dn.as_bytes() == d_o.as_bytes(), "{what}: {pn} differs");
    }
}

/// Load `file` into two fresh modules from `build`, each way, and compare.
fn compare<M: Module<B>>(
    what: &str,
    build: impl Fn() -> M,
    file: &Path,
    spec: &WeightSpec,
    dtype: DType,
) {
    let new = load_safetensors(build(), file, spec, dtype).unwrap();
    let old = load_safetensors_burn_store(build(), file, spec, dtype).unwrap();
    assert_same(&format!("{what} {dtype:?}"), &new, &old);
}

fn files(dir: &Path, stem: &str) -> Vec<PathBuf> {
    [None, Some("fp16")]
        .into_iter()
        .filter_map(|v| weights_file(dir, stem, v).ok())
        .collect()
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

#[test]
fn every_part_loads_as_burn_store_loaded_it() {
    let device = Default::default();
    for model in ["tiny", "wide"] {
        let root = fixtures_dir().join("models").join(model);

        let dir = root.join("unet");
        let config = UNet2DConditionConfig::from_file(dir.join("config.json")).unwrap();
        let spec = ip2p_unet::weight_spec(config.resolve().unwrap().use_linear_projection);
        for file in files(&dir, "diffusion_pytorch_model") {
            for dtype in DTYPES {
                let build = || UNet2DConditionModel::<B>::from_config(&config, &device).unwrap();
                compare(&format!("{}", file.display()), build, &file, &spec, dtype);
            }
        }

        let dir = root.join("vae");
        let config = VaeConfig::load(dir.join("config.json")).unwrap();
        for file in files(&dir, "diffusion_pytorch_model") {
            for dtype in DTYPES {
                let build = || AutoencoderKLModule::<B>::new(&config, &device);
                let spec = ip2p_vae::weight_spec();
                compare(&format!("{}", file.display()), build, &file, &spec, dtype);
            }
        }

        let dir = root.join("text_encoder");
        let config = ClipTextConfig::from_file(dir.join("config.json")).unwrap();
        for file in files(&dir, "model") {
            for dtype in DTYPES {
                let build = || config.init::<B>(&device);
                let spec = ip2p_text::weight_spec();
                compare(&format!("{}", file.display()), build, &file, &spec, dtype);
            }
        }
    }
}
