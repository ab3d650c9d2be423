//! One weights file, opened once and read by one or several modules.
//!
//! A diffusers folder has a file per component; an original single-file checkpoint holds
//! every component under its own prefix. [`WeightFile`] lists a file's tensors (name, shape,
//! dtype) without reading them, so a caller can inspect it (which model is this?) and then
//! load each module from it through a key map ([`crate::load_mapped`]), all from one map of
//! the file. Two formats:
//!
//! - safetensors: memory-mapped; tensors stored as the model wants them are views of the map.
//! - PyTorch pickles (`.ckpt`, `.pt`, `.pth`, `.bin`: torch.save's zip format): burn-store's
//!   `PytorchReader`, under the top-level `state_dict` when there is one (Lightning). Like
//!   `torch.load(weights_only=True)`, nothing is unpickled but tensors and plain containers: a
//!   pickled object of any other class anywhere in the file is refused by name
//!   ([`LoadError::PickledObject`]), since unpickling it would run that class's code.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::DType;
use burn_store::TensorSnapshot;
use burn_store::pytorch::PytorchReader;
use burn_store::pytorch::lazy_data::LazyDataSource;
use burn_store::pytorch::pickle_reader::{Object, PickleError, read_pickle_with_data};
use safetensors::{Dtype, SafeTensors};

use crate::LoadError;

/// One tensor of a file: its name, shape and dtype as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: Dtype,
}

/// Where a tensor's values are.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    pub offset: u64,
    pub len: usize,
}

/// A map shared between [`Storage::Mapped`] and the tensors that are views of it.
struct SharedMap(Arc<memmap2::Mmap>);

impl AsRef<[u8]> for SharedMap {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

pub(crate) enum Storage {
    /// A safetensors file: each tensor's bytes lie at a span of the map.
    Mapped {
        file: File,
        /// The map itself, to prefault the spans used in place ([`SharedMap`]).
        map: Arc<memmap2::Mmap>,
        shared: bytes::Bytes,
        spans: Vec<Span>,
    },
    /// A PyTorch pickle: burn-store reads each tensor on demand.
    Pickle {
        snapshots: HashMap<String, TensorSnapshot>,
    },
}

/// A weights file, opened: see the module docs.
pub struct WeightFile {
    path: PathBuf,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    pub(crate) storage: Storage,
}

/// File extensions read as PyTorch pickles.
const PICKLE_EXTENSIONS: [&str; 4] = ["ckpt", "pt", "pth", "bin"];

/// Classes a state dict's pickle may name: tensor rebuilding, storages, containers (the same
/// set `torch.load(weights_only=True)` needs for plain checkpoints).
fn allowed_class(module: &str, name: &str) -> bool {
    matches!(
        (module, name),
        ("collections", "OrderedDict")
            | (
                "torch._utils",
                "_rebuild_tensor_v2" | "_rebuild_tensor" | "_rebuild_parameter"
            )
            | ("torch._tensor", "_rebuild_from_type_v2")
            | ("torch", "Tensor" | "Size" | "device")
    ) || (module == "torch" && name.ends_with("Storage"))
}

impl WeightFile {
    /// Open a safetensors file, or a PyTorch pickle when the extension says so
    /// (`.ckpt`, `.pt`, `.pth`, `.bin`) or the file starts as a zip archive does.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        let path = path.as_ref();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let pickle = match ext.as_deref() {
            Some("safetensors") => false,
            Some(e) if PICKLE_EXTENSIONS.contains(&e) => true,
            _ => starts_as_zip(path),
        };
        if pickle {
            Self::open_pickle(path)
        } else {
            Self::open_safetensors(path)
        }
    }

    /// Map a safetensors file and read its header.
    pub fn open_safetensors(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        let path = path.as_ref();
        let io = |source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: a read-only map of a file we do not modify. Tensors that are views of it keep
        // it mapped (`loader::read`); a file truncated by another process meanwhile would
        // fault, as with any memory-mapped weights (diffusers' safetensors loading included).
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?);
        let shared = bytes::Bytes::from_owner(SharedMap(map.clone()));
        let st = SafeTensors::deserialize(&shared).map_err(|e| LoadError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut tensors = Vec::new();
        let mut spans = Vec::new();
        for (name, view) in st.tensors() {
            // The view's bytes lie inside the map: their distance from its start is the offset.
            let offset = (view.data().as_ptr() as usize - shared.as_ptr() as usize) as u64;
            spans.push(Span {
                offset,
                len: view.data().len(),
            });
            tensors.push(TensorInfo {
                name,
                shape: view.shape().to_vec(),
                dtype: view.dtype(),
            });
        }
        drop(st);
        Ok(Self::new(
            path,
            tensors,
            Storage::Mapped {
                file,
                map,
                shared,
                spans,
            },
        ))
    }

    /// Read a PyTorch pickle's tensors (not their values), under `state_dict` if the file has
    /// one. Refuses a file that pickles any object but tensors and plain containers.
    pub fn open_pickle(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        let path = path.as_ref();
        check_pickle_classes(path)?;
        let bad = |e: burn_store::pytorch::PytorchError| pickle_error(path, e);
        let reader = match PytorchReader::with_top_level_key(path, "state_dict") {
            Ok(r) => r,
            Err(burn_store::pytorch::PytorchError::KeyNotFound(_)) => {
                PytorchReader::new(path).map_err(bad)?
            }
            Err(e) => return Err(bad(e)),
        };
        let snapshots = reader.into_tensors();
        let mut names: Vec<&String> = snapshots.keys().collect();
        names.sort();
        let mut tensors = Vec::with_capacity(names.len());
        for name in names {
            let s = &snapshots[name];
            tensors.push(TensorInfo {
                name: name.clone(),
                shape: s.shape.to_vec(),
                dtype: st_dtype(s.dtype).ok_or_else(|| LoadError::UnsupportedDType {
                    path: path.to_path_buf(),
                    tensor: name.clone(),
                    dtype: format!("{:?}", s.dtype),
                })?,
            });
        }
        Ok(Self::new(path, tensors, Storage::Pickle { snapshots }))
    }

    fn new(path: &Path, tensors: Vec<TensorInfo>, storage: Storage) -> Self {
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Self {
            path: path.to_path_buf(),
            tensors,
            index,
            storage,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor in the file, in file order (safetensors) or by name (pickles).
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// Whether this is a PyTorch pickle (values are read through burn-store, with a copy).
    pub fn is_pickle(&self) -> bool {
        matches!(self.storage, Storage::Pickle { .. })
    }

    /// The stored bytes of tensor `i` (little-endian, row-major), as the file holds them.
    pub fn bytes(&self, i: usize) -> Result<std::borrow::Cow<'_, [u8]>, LoadError> {
        let info = &self.tensors[i];
        match &self.storage {
            Storage::Mapped { shared, spans, .. } => {
                let s = spans[i];
                Ok(std::borrow::Cow::Borrowed(
                    &shared[s.offset as usize..s.offset as usize + s.len],
                ))
            }
            Storage::Pickle { snapshots } => {
                let data = snapshots[&info.name]
                    .to_data()
                    .map_err(|e| LoadError::Tensor {
                        path: self.path.clone(),
                        tensor: info.name.clone(),
                        reason: e.to_string(),
                    })?;
                Ok(std::borrow::Cow::Owned(data.as_bytes().to_vec()))
            }
        }
    }
}

fn starts_as_zip(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"PK\x03\x04"
}

/// safetensors' name for a dtype burn-store read from a pickle.
fn st_dtype(d: DType) -> Option<Dtype> {
    Some(match d {
        DType::F64 => Dtype::F64,
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::I64 => Dtype::I64,
        DType::I32 => Dtype::I32,
        DType::I16 => Dtype::I16,
        DType::I8 => Dtype::I8,
        DType::U64 => Dtype::U64,
        DType::U32 => Dtype::U32,
        DType::U16 => Dtype::U16,
        DType::U8 => Dtype::U8,
        DType::Bool(_) => Dtype::BOOL,
        _ => return None,
    })
}

fn pickle_error(path: &Path, e: burn_store::pytorch::PytorchError) -> LoadError {
    use burn_store::pytorch::PytorchError as E;
    match e {
        E::Pickle(PickleError::UnsupportedType(class)) => LoadError::PickledObject {
            path: path.to_path_buf(),
            class,
        },
        E::Io(source) => LoadError::Io {
            path: path.to_path_buf(),
            source,
        },
        other => LoadError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("not a readable PyTorch checkpoint: {other}"),
        },
    }
}

/// Parse the whole pickle (without tensor data) and refuse any class outside
/// [`allowed_class`]. burn-store's reader alone skips objects outside `state_dict` (and
/// accepts `NEWOBJ`/`BUILD` objects), so this is where a pickled callback or model object is
/// caught, before anything else is read.
fn check_pickle_classes(path: &Path) -> Result<(), LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let corrupt = |reason: String| LoadError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(io)?;
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| {
        corrupt(format!(
            "not a PyTorch zip checkpoint ({e}); only torch.save's zip format (PyTorch ≥ 1.6) is read"
        ))
    })?;
    let name = (0..archive.len())
        .filter_map(|i| archive.name_for_index(i).map(str::to_string))
        .find(|n| n == "data.pkl" || n.ends_with("/data.pkl"))
        .ok_or_else(|| corrupt("no data.pkl in the archive".into()))?;
    let mut pickle = Vec::new();
    archive
        .by_name(&name)
        .map_err(|e| corrupt(e.to_string()))?
        .read_to_end(&mut pickle)
        .map_err(io)?;
    // Tensors are rebuilt against the archive's storages without reading them (lazy).
    let source = LazyDataSource::from_zip(path).map_err(|e| corrupt(e.to_string()))?;
    let object = read_pickle_with_data(
        &mut std::io::Cursor::new(pickle),
        std::sync::Arc::new(source),
    )
    .map_err(|e| match e {
        PickleError::UnsupportedType(class) => LoadError::PickledObject {
            path: path.to_path_buf(),
            class,
        },
        other => corrupt(format!("unreadable pickle: {other}")),
    })?;
    match first_foreign_class(&object) {
        Some(class) => Err(LoadError::PickledObject {
            path: path.to_path_buf(),
            class,
        }),
        None => Ok(()),
    }
}

/// The first class named in the object tree that a state dict does not need.
fn first_foreign_class(o: &Object) -> Option<String> {
    match o {
        Object::Class { module_name, name } => {
            (!allowed_class(module_name, name)).then(|| format!("{module_name}.{name}"))
        }
        Object::Tuple(v) | Object::List(v) | Object::PersistentTuple(v) => {
            v.iter().find_map(first_foreign_class)
        }
        Object::Dict(d) => d.values().find_map(first_foreign_class),
        Object::Reduce { callable, args } | Object::Build { callable, args } => {
            first_foreign_class(callable).or_else(|| first_foreign_class(args))
        }
        _ => None,
    }
}
