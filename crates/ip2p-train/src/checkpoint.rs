//! Checkpoints (save and resume) and the diffusers-format UNet export.
//!
//! A checkpoint is a folder `<output>/checkpoint-<step>/`:
//!
//! ```text
//! unet/config.json, unet/diffusion_pytorch_model.safetensors       the trained UNet, diffusers keys
//! ema_unet/config.json, ema_unet/diffusion_pytorch_model.safetensors   its EMA (with --use-ema)
//! optimizer.safetensors   AdamW's moments, f32, `exp_avg.<path>` / `exp_avg_sq.<path>`
//! state.json              step, optimiser and EMA step counts, data order, settings
//! ```
//!
//! It is written to `checkpoint-<step>.tmp/` and renamed into place when complete, so a
//! failure while writing never leaves a half checkpoint under the final name and never touches
//! checkpoints already written.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{DType, Tensor, TensorData};
use burn_store::{BurnToPyTorchAdapter, ModuleSnapshot, SafetensorsStore};
use ip2p_nn::Backend;
use ip2p_unet::UNet2DConditionModel;

use crate::TrainError;
use crate::data::DataOrder;
use crate::optim::AdamWSettings;

/// The scalar part of a checkpoint.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainState {
    /// Optimiser steps done.
    pub step: usize,
    pub ema_steps: Option<usize>,
    pub ema_decay: Option<f64>,
    pub data_order: DataOrder,
    pub adamw: AdamWSettings,
    pub seed: u64,
    /// Processes of the run that wrote it (1 before data-parallel runs existed).
    #[serde(default = "one")]
    pub world_size: usize,
    /// Each rank's data order, by rank, in a data-parallel run (`data_order` is rank 0's);
    /// empty on one process.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rank_data_orders: Vec<DataOrder>,
}

fn one() -> usize {
    1
}

fn ck_err(path: &Path, reason: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Write `unet` as a diffusers `unet/` folder: `config.json` (the source config with
/// `in_channels` set to the model's) and `diffusion_pytorch_model.safetensors` in f32 with
/// diffusers' key names (Linear weights `[out, in]`, norms `weight`/`bias`, `ff.net.0`,
/// `proj_in`/`proj_out` without Burn's variant name). `from_pretrained` loads it.
pub fn export_unet_diffusers<B: Backend>(
    unet: &UNet2DConditionModel<B>,
    source_config: &Path,
    dir: &Path,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    let text =
        std::fs::read_to_string(source_config).map_err(|e| TrainError::io(source_config, e))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ck_err(source_config, e))?;
    if let Some(obj) = config.as_object_mut() {
        obj.insert("in_channels".into(), unet.in_channels.into());
    }
    let cfg_path = dir.join("config.json");
    let pretty = serde_json::to_string_pretty(&config).map_err(|e| ck_err(&cfg_path, e))?;
    std::fs::write(&cfg_path, pretty + "\n").map_err(|e| TrainError::io(&cfg_path, e))?;

    let file = dir.join("diffusion_pytorch_model.safetensors");
    let model = unet.clone().map(&mut CastF32);
    let mut store = SafetensorsStore::from_file(&file)
        .with_to_adapter(BurnToPyTorchAdapter)
        .skip_enum_variants(true)
        .with_key_remapping(r"\.ff\.net_([02])\.", ".ff.net.$1.")
        .overwrite(true)
        .metadata("format", "pt");
    model.save_into(&mut store).map_err(|e| ck_err(&file, e))?;
    Ok(())
}

/// Casts every float parameter to f32 (the export's dtype).
struct CastF32;
impl<B: Backend> burn::module::ModuleMapper<B> for CastF32 {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<Tensor<B, D>>,
    ) -> burn::module::Param<Tensor<B, D>> {
        param.map(|t| t.cast(DType::F32))
    }
}

/// Write named flat f32 tensors to a safetensors file.
pub fn save_flat<B: Backend>(
    tensors: &BTreeMap<String, Tensor<B, 1>>,
    path: &Path,
) -> Result<(), TrainError> {
    let mut bytes: Vec<(String, Vec<u8>, usize)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let vals: Vec<f32> = t
            .clone()
            .cast(DType::F32)
            .into_data()
            .to_vec::<f32>()
            .map_err(|e| ck_err(path, format!("{name}: {e:?}")))?;
        let n = vals.len();
        bytes.push((
            name.clone(),
            vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
            n,
        ));
    }
    let views = bytes
        .iter()
        .map(|(name, b, n)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*n], b)
                .map(|v| (name.clone(), v))
                .map_err(|e| ck_err(path, e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let out = safetensors::serialize(views, None::<HashMap<String, String>>)
        .map_err(|e| ck_err(path, e))?;
    std::fs::write(path, out).map_err(|e| TrainError::io(path, e))
}

/// Read a file written by [`save_flat`].
pub fn load_flat<B: Backend>(
    path: &Path,
    device: &B::Device,
) -> Result<BTreeMap<String, Tensor<B, 1>>, TrainError> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| ck_err(path, e))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(ck_err(path, format!("{name}: expected f32")));
        }
        let vals: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let n = vals.len();
        out.insert(name, Tensor::from_data(TensorData::new(vals, [n]), device));
    }
    Ok(out)
}

/// The folder of the checkpoint at `step`.
pub fn checkpoint_dir(output: &Path, step: usize) -> PathBuf {
    output.join(format!("checkpoint-{step}"))
}

/// The newest complete checkpoint under `output` (by step), if any.
pub fn latest_checkpoint(output: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(output).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step: usize = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path()
                .join("state.json")
                .is_file()
                .then_some((step, e.path()))
        })
        .max_by_key(|(s, _)| *s)
        .map(|(_, p)| p)
}

/// Everything a checkpoint holds, to write.
pub struct CheckpointParts<'a, B: Backend> {
    pub unet: &'a UNet2DConditionModel<B>,
    pub ema: Option<&'a UNet2DConditionModel<B>>,
    pub exp_avg: &'a BTreeMap<String, Tensor<B, 1>>,
    pub exp_avg_sq: &'a BTreeMap<String, Tensor<B, 1>>,
    pub state: &'a TrainState,
    /// The source model's `unet/config.json`.
    pub unet_config: &'a Path,
}

/// Write a checkpoint atomically (see the module docs). Returns its folder.
pub fn save_checkpoint<B: Backend>(
    output: &Path,
    parts: &CheckpointParts<'_, B>,
) -> Result<PathBuf, TrainError> {
    let dir = checkpoint_dir(output, parts.state.step);
    let tmp = output.join(format!("checkpoint-{}.tmp", parts.state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    export_unet_diffusers(parts.unet, parts.unet_config, &tmp.join("unet"))?;
    if let Some(ema) = parts.ema {
        export_unet_diffusers(ema, parts.unet_config, &tmp.join("ema_unet"))?;
    }
    let mut moments = BTreeMap::new();
    for (k, v) in parts.exp_avg {
        moments.insert(format!("exp_avg.{k}"), v.clone());
    }
    for (k, v) in parts.exp_avg_sq {
        moments.insert(format!("exp_avg_sq.{k}"), v.clone());
    }
    save_flat(&moments, &tmp.join("optimizer.safetensors"))?;
    let state_path = tmp.join("state.json");
    let json = serde_json::to_string_pretty(parts.state).map_err(|e| ck_err(&state_path, e))?;
    std::fs::write(&state_path, json + "\n").map_err(|e| TrainError::io(&state_path, e))?;
    if dir.exists() {
        // A checkpoint of the same step (a resumed run repeating it): replace it only now
        // that the new one is complete.
        std::fs::remove_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| TrainError::io(&dir, e))?;
    Ok(dir)
}

/// A checkpoint read back.
/// (The trained UNet is `dir/unet`: load it with `UNet2DConditionModel::load` on the
/// training backend.)
pub struct Loaded<B: Backend> {
    pub ema: Option<UNet2DConditionModel<B>>,
    pub exp_avg: BTreeMap<String, Tensor<B, 1>>,
    pub exp_avg_sq: BTreeMap<String, Tensor<B, 1>>,
    pub state: TrainState,
}

/// Read a checkpoint folder written by [`save_checkpoint`].
pub fn load_checkpoint<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<Loaded<B>, TrainError> {
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| TrainError::io(&state_path, e))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| ck_err(&state_path, e))?;
    let ema = if dir.join("ema_unet").is_dir() {
        Some(UNet2DConditionModel::load(
            dir.join("ema_unet"),
            None,
            DType::F32,
            device,
        )?)
    } else {
        None
    };
    let mut exp_avg = BTreeMap::new();
    let mut exp_avg_sq = BTreeMap::new();
    for (k, v) in load_flat::<B>(&dir.join("optimizer.safetensors"), device)? {
        if let Some(p) = k.strip_prefix("exp_avg_sq.") {
            exp_avg_sq.insert(p.to_string(), v);
        } else if let Some(p) = k.strip_prefix("exp_avg.") {
            exp_avg.insert(p.to_string(), v);
        }
    }
    Ok(Loaded {
        ema,
        exp_avg,
        exp_avg_sq,
        state,
    })
}
