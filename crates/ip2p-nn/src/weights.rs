//! Loading diffusers safetensors into Burn modules, strictly.
//!
//! burn-store does the work (memory-mapped reading, PyTorch→Burn layout, key remapping); this
//! module makes it strict and typed: a file that does not match the module exactly is an error
//! that names the file and the tensor, never a silently half-initialised model.

use std::fs::File;
use std::path::Path;
use std::rc::Rc;

use burn::module::Module;
use burn::tensor::DType;
use burn::tensor::backend::Backend;
use burn_store::{
    ApplyError, KeyRemapper, ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore,
    TensorSnapshot,
};
use safetensors::{Dtype, SafeTensors};

use crate::LoadError;

/// How a file's keys relate to a module's parameter paths.
///
/// Our modules name their fields after diffusers' keys, so most specs are empty; `remap`
/// covers the rest (`ff.net.2` → `ff.net_2`), `ignore` names file entries that are not
/// weights (transformers' `position_ids` buffer).
#[derive(Debug, Clone, Default)]
pub struct WeightSpec {
    remap: Vec<(String, String)>,
    ignore: Vec<String>,
}

impl WeightSpec {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rename file keys matching the regex `from` to `to` (`$1` refers to groups).
    pub fn remap(mut self, from: &str, to: &str) -> Self {
        self.remap.push((from.to_string(), to.to_string()));
        self
    }

    /// Skip file keys matching the regex `pattern`: neither loaded nor reported as unexpected.
    pub fn ignore(mut self, pattern: &str) -> Self {
        self.ignore.push(pattern.to_string());
        self
    }

    pub(crate) fn remaps(&self) -> Result<Vec<(regex::Regex, String)>, String> {
        self.remap
            .iter()
            .map(|(from, to)| {
                regex::Regex::new(from)
                    .map(|r| (r, to.clone()))
                    .map_err(|e| format!("bad remap pattern `{from}`: {e}"))
            })
            .collect()
    }

    pub(crate) fn ignored(&self) -> Result<Vec<regex::Regex>, String> {
        self.ignore
            .iter()
            .map(|p| regex::Regex::new(p).map_err(|e| format!("bad ignore pattern `{p}`: {e}")))
            .collect()
    }
}

/// The float dtype a backend creates parameters in by default.
pub fn default_float_dtype<B: Backend>() -> DType {
    use burn::tensor::Element;
    <B::FloatElem as Element>::dtype()
}

/// [`load_safetensors`] through burn-store's `SafetensorsStore` and `PyTorchToBurnAdapter`: the
/// loader ip2p used before [`crate::loader`], kept as the reference its tests compare with
/// (same tensors, bit for bit). It copies each tensor two or three times on the way.
pub fn load_safetensors_burn_store<B: Backend, M: Module<B>>(
    mut module: M,
    path: impl AsRef<Path>,
    spec: &WeightSpec,
    dtype: DType,
) -> Result<M, LoadError> {
    let path = path.as_ref();
    let ignored = spec.ignored().map_err(|reason| LoadError::Config {
        path: path.to_path_buf(),
        reason,
    })?;
    let is_ignored = |key: &str| ignored.iter().any(|r| r.is_match(key));
    check_file(path, &is_ignored)?;

    let remapper = KeyRemapper::from_patterns(
        spec.remap
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect(),
    )
    .map_err(|e| LoadError::Config {
        path: path.to_path_buf(),
        reason: format!("bad remap pattern: {e}"),
    })?;
    let mut store = SafetensorsStore::from_file(path)
        .remap(remapper)
        .with_from_adapter(PyTorchToBurnAdapter.chain(CastFloat(dtype)))
        // We check the result ourselves, so that every failure becomes a typed error.
        .allow_partial(true)
        .validate(false);
    let result = module
        .load_from(&mut store)
        .map_err(|e| LoadError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;

    if let Some(err) = result.errors.first() {
        return Err(apply_error(path, err));
    }
    if !result.missing.is_empty() {
        return Err(LoadError::MissingTensors {
            path: path.to_path_buf(),
            keys: result.missing.iter().map(|(k, _)| k.clone()).collect(),
        });
    }
    // burn-store lists a norm's `weight`/`bias` as unused even when it loaded them into
    // `gamma`/`beta` under their PyTorch names; those are not unexpected.
    let applied: std::collections::HashSet<&str> =
        result.applied.iter().map(String::as_str).collect();
    let loaded_as_norm = |k: &str| {
        [(".weight", ".gamma"), (".bias", ".beta")]
            .iter()
            .any(|(torch, burn)| {
                k.strip_suffix(torch)
                    .is_some_and(|stem| applied.contains(format!("{stem}{burn}").as_str()))
            })
    };
    let unexpected: Vec<String> = result
        .unused
        .iter()
        .filter(|k| !is_ignored(k) && !loaded_as_norm(k))
        .cloned()
        .collect();
    if !unexpected.is_empty() {
        return Err(LoadError::UnexpectedTensors {
            path: path.to_path_buf(),
            keys: unexpected,
        });
    }
    Ok(module)
}

/// The dtype a model is loaded in, and whether half weights stay half.
///
/// With `half_weights`, a Conv2d or Linear weight the file stores as f16 (an `fp16` variant)
/// stays f16 in memory, half the size, and each layer widens it to `dtype` when it runs: f16 →
/// f32 is exact, so the results are those of the f32-widened load. Everything else (biases,
/// norms, embeddings) loads in `dtype`. It is for a model computing in f32 from fp16 files on
/// a backend whose layers widen in their kernels (the CPU one: [`crate::Backend::WIDENS_HALF_WEIGHTS`]);
/// others widen per call with a cast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precision {
    pub dtype: DType,
    pub half_weights: bool,
}

impl Precision {
    /// Everything in `dtype`.
    pub fn new(dtype: DType) -> Self {
        Self {
            dtype,
            half_weights: false,
        }
    }

    pub fn with_half_weights(self, half_weights: bool) -> Self {
        Self {
            half_weights,
            ..self
        }
    }
}

impl From<DType> for Precision {
    fn from(dtype: DType) -> Self {
        Self::new(dtype)
    }
}

/// Load a safetensors file into `module`, casting every float tensor to `precision`'s dtype
/// (or keeping f16 weights as they are: [`Precision`]).
///
/// F32, F16, BF16 and F64 files load into a model of any float dtype. The file is
/// memory-mapped: a tensor stored as the model wants it is a view of the map, others are
/// copied once into their final buffer (converted), several at a time; a Linear weight keeps
/// the file's `[out, in]` order under a transposed view; no parameter is initialised first.
/// See [`crate::loader`].
///
/// Errors: the file is missing or unreadable, not safetensors, truncated, holds a tensor of
/// an unsupported dtype, lacks a tensor the module needs, holds one the module has no place
/// for, or holds one of the wrong shape.
pub fn load_safetensors<B: Backend, M: Module<B>>(
    module: M,
    path: impl AsRef<Path>,
    spec: &WeightSpec,
    precision: impl Into<Precision>,
) -> Result<M, LoadError> {
    crate::loader::load(module, path.as_ref(), spec, precision.into())
}

/// Validate the header, the data length and every dtype before burn-store touches the file,
/// so a corrupt file is reported as such and not as a failure deep inside a load.
fn check_file(path: &Path, is_ignored: &dyn Fn(&str) -> bool) -> Result<(), LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    // SAFETY: read-only map of a file we do not modify; dropped before this function returns.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    let tensors = SafeTensors::deserialize(&map).map_err(|e| LoadError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    for (name, view) in tensors.tensors() {
        if is_ignored(&name) {
            continue;
        }
        check_dtype(path, &name, view.dtype())?;
    }
    Ok(())
}

/// Weights load from float tensors only: F16, BF16, F32 and F64.
pub(crate) fn check_dtype(path: &Path, tensor: &str, dtype: Dtype) -> Result<(), LoadError> {
    if matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64) {
        return Ok(());
    }
    Err(LoadError::UnsupportedDType {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        dtype: format!("{dtype:?}"),
    })
}

fn apply_error(path: &Path, err: &ApplyError) -> LoadError {
    let path = path.to_path_buf();
    match err {
        ApplyError::ShapeMismatch {
            path: tensor,
            expected,
            found,
        } => LoadError::ShapeMismatch {
            path,
            tensor: tensor.clone(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        },
        ApplyError::DTypeMismatch { path: tensor, .. }
        | ApplyError::AdapterError { path: tensor, .. }
        | ApplyError::LoadError { path: tensor, .. } => LoadError::Tensor {
            path,
            tensor: tensor.clone(),
            reason: err.to_string(),
        },
    }
}

/// Casts float tensors to the model's dtype as they are read (f16 file → f32 model and back).
#[derive(Clone, Copy)]
struct CastFloat(DType);

impl ModuleAdapter for CastFloat {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        let to = self.0;
        if snapshot.dtype == to || !snapshot.dtype.is_float() {
            return snapshot.clone();
        }
        let data = snapshot.clone_data_fn();
        TensorSnapshot::from_closure(
            Rc::new(move || Ok(data()?.convert_dtype(to))),
            to,
            snapshot.shape.clone(),
            snapshot.path_stack.clone().unwrap_or_default(),
            snapshot.container_stack.clone().unwrap_or_default(),
            snapshot.tensor_id.unwrap_or_default(),
        )
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(*self)
    }
}

/// The weights file of one component folder, as diffusers names it: `<stem>.safetensors`, or
/// `<stem>.<variant>.safetensors` for a variant such as `fp16`. `stem` is
/// `diffusion_pytorch_model` for diffusers models and `model` for transformers' text encoder.
pub fn weights_file(
    dir: impl AsRef<Path>,
    stem: &str,
    variant: Option<&str>,
) -> Result<std::path::PathBuf, LoadError> {
    let name = match variant {
        Some(v) => format!("{stem}.{v}.safetensors"),
        None => format!("{stem}.safetensors"),
    };
    let path = dir.as_ref().join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(LoadError::Io {
            path,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "weights file not found"),
        })
    }
}
