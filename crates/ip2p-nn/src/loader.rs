//! The safetensors loader behind [`crate::load_safetensors`]: no copy, or one.
//!
//! burn-store's path reads a tensor into a buffer, transposes Linear weights into another,
//! and converts dtypes into a third; on the SD 1.5 UNet that was 4–7 s of page faults and
//! copies for 3.4 GB, and a process peak well above the weights. Here a module is walked twice
//! with Burn's visitor and mapper (same order): the first pass lists every float parameter
//! (path, shape, the layer it belongs to) and checks the file against it; the second gives
//! each parameter its values. A tensor in the dtype the model wants is a view of the
//! memory-mapped file (no copy); one that needs a cast is read once and converted into its
//! final buffer ([`read`]). A Linear weight (`[out, in]` in PyTorch, `[in, out]` in Burn) keeps
//! the file's order and becomes Burn's shape as a transposed view (strides, no copy): the CPU
//! kernels and the GPU matmuls read it through its strides. Buffers are made a chunk at a
//! time, in parallel, so a GPU backend holds at most one chunk on the host before uploading it.
//!
//! Naming follows burn-store's `PyTorchToBurnAdapter`, which the models were written against:
//! a parameter's path is its module path (enum variants included), a norm's `gamma`/`beta`
//! read the file's `weight`/`bias`, and [`WeightSpec`] remaps file keys and ignores non-weights.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{AllocationProperty, Bool, Bytes, DType, Int, Tensor, TensorData};
use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::Dtype;

use crate::LoadError;
use crate::weight_file::{Span, Storage, TensorInfo, WeightFile};
use crate::weights::{Precision, WeightSpec, check_dtype};

/// Host bytes read ahead of the mapper at most (one chunk of parameters).
const CHUNK_BYTES: usize = 256 << 20;

/// One float parameter of the module and where its values are in the file.
#[derive(Debug, Clone)]
struct Slot {
    path: String,
    shape: Vec<usize>,
    /// The file's name of the tensor the values come from.
    key: String,
    /// A Linear weight: the file holds it `[out, in]`.
    transpose: bool,
    /// The dtype it takes in memory: the model's, or f16 for a half weight kept as stored.
    dtype: DType,
    /// The tensor's index in the file, and its stored dtype.
    index: usize,
    file_dtype: Dtype,
}

/// The first pass: every float parameter, with the layer type it belongs to.
#[derive(Default)]
struct Collect {
    path: Vec<String>,
    containers: Vec<String>,
    params: Vec<(String, Vec<usize>, Option<String>)>,
}

impl Collect {
    fn module_type(&self) -> Option<String> {
        self.containers
            .iter()
            .rev()
            .find(|c| c.starts_with("Struct:") || c.starts_with("Enum:"))
            .cloned()
    }
}

impl<B: Backend> ModuleVisitor<B> for Collect {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push(name.to_string());
        self.containers.push(container_type.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
        self.containers.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let module_type = self.module_type();
        self.params.push((
            self.path.join("."),
            param.lazy_shape().to_vec(),
            module_type,
        ));
    }
}

/// The second pass: each float parameter takes its buffer, in the order the first pass saw.
struct Fill<'a, B: Backend> {
    slots: &'a [Slot],
    file: &'a WeightFile,
    next: usize,
    /// Values in file order (a Linear weight's transposed view is made when it is placed).
    ready: VecDeque<TensorData>,
    path: Vec<String>,
    error: Option<String>,
    _backend: std::marker::PhantomData<B>,
}

impl<B: Backend> Fill<'_, B> {
    /// Read the chunk of slots that starts at `self.next`, in parallel.
    fn read_ahead(&mut self) -> Result<(), String> {
        let mut end = self.next;
        let mut bytes = 0;
        while end < self.slots.len() && (end == self.next || bytes < CHUNK_BYTES) {
            bytes += self.slots[end].shape.iter().product::<usize>() * self.slots[end].dtype.size();
            end += 1;
        }
        let slots = &self.slots[self.next..end];
        let chunk: Vec<TensorData> = match &self.file.storage {
            Storage::Mapped {
                file,
                map,
                shared,
                spans,
            } => slots
                .par_iter()
                .map(|slot| read(file, map, shared, spans[slot.index], slot))
                .collect::<Result<_, _>>()?,
            // burn-store's pickle tensors are not thread-safe (`Rc`): one at a time.
            Storage::Pickle { .. } => slots
                .iter()
                .map(|slot| {
                    let bytes = self.file.bytes(slot.index).map_err(|e| e.to_string())?;
                    convert(&bytes, slot, file_shape(slot), slot.dtype)
                })
                .collect::<Result<_, _>>()?,
        };
        self.ready.extend(chunk);
        Ok(())
    }
}

impl<B: Backend> ModuleMapper<B> for Fill<'_, B> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if self.error.is_some() {
            return param;
        }
        let path = self.path.join(".");
        let Some(slot) = self.slots.get(self.next) else {
            self.error = Some(format!("parameter {path} was not seen by the first pass"));
            return param;
        };
        if slot.path != path {
            self.error = Some(format!(
                "the passes disagree: expected {}, found {path}",
                slot.path
            ));
            return param;
        }
        let dtype = slot.dtype;
        if self.ready.is_empty()
            && let Err(e) = self.read_ahead()
        {
            self.error = Some(e);
            return param;
        }
        let transpose = slot.transpose;
        let data = self.ready.pop_front().expect("read_ahead filled the queue");
        self.next += 1;
        let id = param.id;
        let device = param.lazy_device();
        let tensor = Tensor::from_data(data, (&device, dtype));
        let tensor = match (transpose, B::ad_enabled(&device)) {
            (false, _) => tensor,
            (true, false) => tensor.transpose(),
            // A model loaded to be trained gets Burn's contiguous layout, the one every
            // parameter has after an optimiser step: gemm rounds differently through strides,
            // and a resumed run must match an uninterrupted one bit for bit.
            (true, true) => Tensor::from_data(tensor.transpose().into_data(), (&device, dtype)),
        };
        param.transform_for_load(tensor, id)
    }

    fn map_int<const D: usize>(
        &mut self,
        param: Param<Tensor<B, D, Int>>,
    ) -> Param<Tensor<B, D, Int>> {
        param
    }

    fn map_bool<const D: usize>(
        &mut self,
        param: Param<Tensor<B, D, Bool>>,
    ) -> Param<Tensor<B, D, Bool>> {
        param
    }
}

/// One tensor's values in its slot's dtype, in the file's order and shape.
///
/// A tensor that needs no conversion (same dtype, aligned) is a view of
/// the memory-mapped file: no copy and no fresh memory, as diffusers' `from_pretrained` does
/// with safetensors. Burn's shared bytes copy it on first write (training), and the map lives
/// as long as the last such tensor. Others are read with `pread` into a buffer of their own
/// size and converted into their final buffer: the map's pages are then not
/// touched, so they never count in the process's resident set.
fn read(
    file: &File,
    map: &memmap2::Mmap,
    shared: &bytes::Bytes,
    span: Span,
    slot: &Slot,
) -> Result<TensorData, String> {
    let dtype = slot.dtype;
    let io = |e: std::io::Error| format!("{}: reading {} bytes: {e}", slot.key, span.len);
    let shape = file_shape(slot);
    let as_is = cfg!(target_endian = "little")
        && span.offset.is_multiple_of(dtype.size() as u64)
        && matches!(
            (dtype, slot.file_dtype),
            (DType::F32, Dtype::F32)
                | (DType::F16, Dtype::F16)
                | (DType::BF16, Dtype::BF16)
                | (DType::F64, Dtype::F64)
        );
    if as_is {
        let start = span.offset as usize;
        // Map the view's pages now, in bulk and on the loader's threads, rather than by one
        // page fault after another in the model's first step (3.3 GB of SD 1.5 UNet: ~0.3 s
        // here against ~0.9 s of first-step faults). diffusers copies its weights while
        // loading, so this is where it pays too. Best effort: kernels before Linux 5.14 refuse
        // the advice, and the pages then fault in on first use as before.
        #[cfg(target_os = "linux")]
        let _ = map.advise_range(memmap2::Advice::PopulateRead, start, span.len);
        #[cfg(not(target_os = "linux"))]
        let _ = map;
        let view = shared.slice(start..start + span.len);
        return Ok(TensorData::from_bytes(
            Bytes::from_shared(view, AllocationProperty::File),
            shape,
            dtype,
        ));
    }
    let mut bytes = vec![0u8; span.len];
    read_at(file, &mut bytes, span.offset).map_err(io)?;
    convert(&bytes, slot, shape, dtype)
}

/// The shape the file stores a slot's values in: a Linear weight's `[out, in]`, which the
/// parameter sees through a transposed view.
fn file_shape(slot: &Slot) -> Vec<usize> {
    let mut shape = slot.shape.clone();
    if slot.transpose {
        shape.reverse();
    }
    shape
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(not(unix))]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(buf)
}

/// The file's bytes of one tensor (of `shape`), converted to `dtype`.
fn convert(src: &[u8], slot: &Slot, shape: Vec<usize>, dtype: DType) -> Result<TensorData, String> {
    let n: usize = shape.iter().product();
    let width = match slot.file_dtype {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        Dtype::F64 => 8,
        other => return Err(format!("{}: unsupported dtype {other:?}", slot.key)),
    };
    if src.len() != n * width {
        return Err(format!(
            "{}: {} bytes for {n} values of {:?}",
            slot.key,
            src.len(),
            slot.file_dtype
        ));
    }
    let file = slot.file_dtype;
    Ok(match (dtype, file) {
        // Same dtype: the bits as they are (exact, NaN payloads included).
        (DType::F16, Dtype::F16) => {
            TensorData::new(values(src, 2, |b| f16::from_le_bytes([b[0], b[1]])), shape)
        }
        (DType::BF16, Dtype::BF16) => {
            TensorData::new(values(src, 2, |b| bf16::from_le_bytes([b[0], b[1]])), shape)
        }
        (DType::F64, Dtype::F64) => TensorData::new(
            values(src, 8, |b| {
                f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
            }),
            shape,
        ),
        // Otherwise through f32, as Burn's `convert_dtype` does (f16/bf16 → f32 is exact).
        (DType::F32, _) => TensorData::new(through_f32(src, file, |x| x), shape),
        (DType::F16, _) => TensorData::new(through_f32(src, file, f16::from_f32), shape),
        (DType::BF16, _) => TensorData::new(through_f32(src, file, bf16::from_f32), shape),
        (DType::F64, _) => TensorData::new(through_f32(src, file, |x| x as f64), shape),
        (other, _) => return Err(format!("{}: cannot load into {other:?}", slot.key)),
    })
}

/// `src` decoded to f32 from the file's dtype, then encoded by `encode`; every pair of dtypes
/// is its own loop (the f16 → f32 widening of an fp16 variant is the common one).
fn through_f32<T>(src: &[u8], file: Dtype, encode: impl Fn(f32) -> T) -> Vec<T> {
    match file {
        Dtype::F32 => values(src, 4, |b| {
            encode(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }),
        Dtype::F16 => values(src, 2, |b| {
            encode(f16::from_le_bytes([b[0], b[1]]).to_f32())
        }),
        Dtype::BF16 => values(src, 2, |b| {
            encode(bf16::from_le_bytes([b[0], b[1]]).to_f32())
        }),
        _ => values(src, 8, |b| {
            encode(f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
        }),
    }
}

/// The values of `src` (elements of `width` bytes) decoded, in file order.
fn values<T>(src: &[u8], width: usize, decode: impl Fn(&[u8]) -> T) -> Vec<T> {
    src.chunks_exact(width).map(decode).collect()
}

/// Renames a file's tensor for one module, or says it belongs to another (`None`): the key
/// the module's [`WeightSpec`] then sees, and the shape to read the stored values as (the same
/// number of elements, e.g. a 1×1 conv's `[o, i, 1, 1]` read as a Linear's `[o, i]`).
pub type KeyMap<'a> = dyn Fn(&TensorInfo) -> Option<(String, Vec<usize>)> + 'a;

pub(crate) fn load<B: Backend, M: Module<B>>(
    module: M,
    path: &Path,
    spec: &WeightSpec,
    precision: Precision,
) -> Result<M, LoadError> {
    let file = WeightFile::open_safetensors(path)?;
    load_from(
        module,
        &file,
        &|t| Some((t.name.clone(), t.shape.clone())),
        spec,
        precision,
    )
}

/// Load `module` from the tensors of `file` that `map` claims (see [`KeyMap`]), strictly:
/// every claimed tensor must find its parameter and every parameter its tensor.
pub fn load_from<B: Backend, M: Module<B>>(
    module: M,
    file: &WeightFile,
    map: &KeyMap<'_>,
    spec: &WeightSpec,
    precision: impl Into<Precision>,
) -> Result<M, LoadError> {
    let precision = precision.into();
    let dtype = precision.dtype;
    let path = file.path();
    let config_error = |reason: String| LoadError::Config {
        path: path.to_path_buf(),
        reason,
    };
    let ignored = spec.ignored().map_err(config_error)?;
    let remaps = spec.remaps().map_err(config_error)?;

    // The claimed tensors by module path (remapped key) → (index in the file, shape to read).
    let mut by_key: HashMap<String, (usize, Vec<usize>)> = HashMap::new();
    let mut original = HashMap::new();
    for (index, info) in file.tensors().iter().enumerate() {
        let Some((name, shape)) = map(info) else {
            continue;
        };
        if ignored.iter().any(|r| r.is_match(&name)) {
            continue;
        }
        check_dtype(path, &info.name, info.dtype)?;
        if shape.iter().product::<usize>() != info.shape.iter().product::<usize>() {
            return Err(LoadError::ShapeMismatch {
                path: path.to_path_buf(),
                tensor: info.name.clone(),
                expected: shape,
                found: info.shape.clone(),
            });
        }
        let mut key = name;
        for (from, to) in &remaps {
            key = from.replace_all(&key, to.as_str()).into_owned();
        }
        original.insert(key.clone(), info.name.clone());
        by_key.insert(key, (index, shape));
    }

    let mut collect = Collect::default();
    module.visit(&mut collect);
    let mut slots = Vec::with_capacity(collect.params.len());
    let mut missing = Vec::new();
    for (param_path, shape, module_type) in collect.params {
        let norm = matches!(
            module_type.as_deref(),
            Some("Struct:GroupNorm" | "Struct:LayerNorm" | "Struct:BatchNorm")
        );
        let linear = module_type.as_deref() == Some("Struct:Linear");
        let conv = matches!(
            module_type.as_deref(),
            Some("Struct:Conv2d" | "Struct:Conv1d")
        );
        let (stem, name) = param_path.rsplit_once('.').unwrap_or(("", &param_path));
        let alternative = match (norm, name) {
            (true, "gamma") => Some("weight"),
            (true, "beta") => Some("bias"),
            _ => None,
        }
        .map(|n| {
            if stem.is_empty() {
                n.to_string()
            } else {
                format!("{stem}.{n}")
            }
        });
        let key = if by_key.contains_key(&param_path) {
            param_path.clone()
        } else if let Some(alt) = alternative.filter(|a| by_key.contains_key(a)) {
            alt
        } else {
            missing.push(param_path);
            continue;
        };
        let transpose = linear && name == "weight" && shape.len() == 2;
        let (index, stored) = &by_key[&key];
        let mut found = stored.clone();
        if transpose {
            found.reverse();
        }
        if found != shape {
            return Err(LoadError::ShapeMismatch {
                path: path.to_path_buf(),
                tensor: param_path,
                expected: shape,
                found,
            });
        }
        // An fp16 file's Conv2d/Linear weight kept in f16 ([`Precision`]): a view of the file
        // (a Linear weight's through its transposed view, as in f32).
        let keep_half = precision.half_weights
            && (linear || conv)
            && name == "weight"
            && file.tensors()[*index].dtype == Dtype::F16;
        slots.push(Slot {
            path: param_path,
            shape,
            transpose,
            dtype: if keep_half { DType::F16 } else { dtype },
            index: *index,
            file_dtype: file.tensors()[*index].dtype,
            key: original[&key].clone(),
        });
    }
    if !missing.is_empty() {
        return Err(LoadError::MissingTensors {
            path: path.to_path_buf(),
            keys: missing,
        });
    }
    let used: HashSet<usize> = slots.iter().map(|s| s.index).collect();
    let mut unexpected: Vec<String> = by_key
        .values()
        .filter(|(i, _)| !used.contains(i))
        .map(|(i, _)| file.tensors()[*i].name.clone())
        .collect();
    if !unexpected.is_empty() {
        unexpected.sort();
        return Err(LoadError::UnexpectedTensors {
            path: path.to_path_buf(),
            keys: unexpected,
        });
    }

    let mut fill = Fill::<B> {
        slots: &slots,
        file,
        next: 0,
        ready: VecDeque::new(),
        path: Vec::new(),
        error: None,
        _backend: std::marker::PhantomData,
    };
    let module = module.map(&mut fill);
    if let Some(reason) = fill.error {
        return Err(LoadError::Corrupt {
            path: path.to_path_buf(),
            reason,
        });
    }
    if fill.next != slots.len() {
        return Err(LoadError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("{} of {} tensors were loaded", fill.next, slots.len()),
        });
    }
    Ok(module)
}
