//! Reading parity fixtures and comparing tensors with a stated tolerance.
//!
//! For tests and benches: these helpers panic with a full report instead of returning errors.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

/// `fixtures/` at the workspace root, where tools/fixtures/make_fixtures.py writes;
/// `$IP2P_WORKSPACE/fixtures` when that is set (a binary carried to another machine).
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("IP2P_WORKSPACE") {
        Some(root) => PathBuf::from(root).join("fixtures"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"),
    }
}

/// One safetensors file of reference inputs and outputs.
pub struct Fixture {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl Fixture {
    /// Open `fixtures/<rel>`.
    pub fn open(rel: impl AsRef<Path>) -> Self {
        let path = fixtures_dir().join(rel);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "fixture {}: {e} (run tools/fixtures/make_fixtures.py)",
                path.display()
            )
        });
        let fixture = Self { path, bytes };
        fixture.parsed();
        fixture
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn parsed(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes)
            .unwrap_or_else(|e| panic!("fixture {}: {e}", self.path.display()))
    }

    /// Names of the tensors in the file, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .parsed()
            .names()
            .into_iter()
            .map(str::to_string)
            .collect();
        names.sort();
        names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.parsed().tensor(name).is_ok()
    }

    /// A string the script stored in the file's metadata (JSON for non-strings).
    pub fn meta(&self, key: &str) -> Option<String> {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes).ok()?;
        meta.metadata().as_ref()?.get(key).cloned()
    }

    /// A metadata entry parsed as JSON into `T`.
    pub fn meta_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> T {
        let raw = self
            .meta(key)
            .unwrap_or_else(|| panic!("fixture {}: no metadata `{key}`", self.path.display()));
        serde_json::from_str(&raw)
            .unwrap_or_else(|e| panic!("fixture {}: metadata `{key}`: {e}", self.path.display()))
    }

    /// A tensor's values as f64 (any float or int dtype) and its shape.
    pub fn values(&self, name: &str) -> (Vec<f64>, Vec<usize>) {
        let st = self.parsed();
        let view = st
            .tensor(name)
            .unwrap_or_else(|e| panic!("fixture {}: tensor `{name}`: {e}", self.path.display()));
        let b = view.data();
        let vals: Vec<f64> = match view.dtype() {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            Dtype::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            Dtype::I64 => b
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            Dtype::I32 => b
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            other => panic!(
                "fixture {}: tensor `{name}` has unsupported dtype {other:?}",
                self.path.display()
            ),
        };
        (vals, view.shape().to_vec())
    }

    /// A float tensor on `device`, in the backend's default float dtype.
    pub fn tensor<B: Backend, const D: usize>(
        &self,
        name: &str,
        device: &B::Device,
    ) -> Tensor<B, D> {
        let (vals, shape) = self.values(name);
        assert_eq!(
            shape.len(),
            D,
            "fixture {}: `{name}` has rank {}, asked for {D}",
            self.path.display(),
            shape.len()
        );
        let vals: Vec<f32> = vals.into_iter().map(|v| v as f32).collect();
        Tensor::from_data(TensorData::new(vals, shape), device)
    }

    /// An integer tensor's values (token ids, timesteps).
    pub fn ints(&self, name: &str) -> (Vec<i64>, Vec<usize>) {
        let (vals, shape) = self.values(name);
        (vals.into_iter().map(|v| v as i64).collect(), shape)
    }
}

/// How far `actual` is from `expected`.
#[derive(Debug, Clone, Copy)]
pub struct Diff {
    /// max |a - e|
    pub max_abs: f64,
    /// ||a - e||₂ / ||e||₂ (falls back to ||a - e||₂ when ||e|| is 0)
    pub rel_l2: f64,
}

/// Compare two equally shaped value lists.
pub fn diff(actual: &[f64], expected: &[f64]) -> Diff {
    assert_eq!(actual.len(), expected.len(), "length mismatch");
    let (mut max_abs, mut num, mut den) = (0f64, 0f64, 0f64);
    for (a, e) in actual.iter().zip(expected) {
        let d = a - e;
        if !d.is_finite() {
            return Diff {
                max_abs: f64::INFINITY,
                rel_l2: f64::INFINITY,
            };
        }
        max_abs = max_abs.max(d.abs());
        num += d * d;
        den += e * e;
    }
    let rel_l2 = if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    };
    Diff { max_abs, rel_l2 }
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .expect("tensor to host")
}

/// Assert `actual` matches `expected` in shape and to a relative L2 error of `rel_l2`.
///
/// The report gives both the relative L2 error and the largest absolute difference.
pub fn assert_close<B: Backend, const D: usize>(
    what: &str,
    actual: Tensor<B, D>,
    expected: Tensor<B, D>,
    rel_l2: f64,
) -> Diff {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
    let d = diff(&host(actual), &host(expected));
    eprintln!(
        "{what}: rel L2 {:.3e}, max |Δ| {:.3e} (tolerance {rel_l2:.1e})",
        d.rel_l2, d.max_abs
    );
    assert!(
        d.rel_l2 <= rel_l2,
        "{what}: relative L2 error {:.3e} exceeds {rel_l2:.1e} (max |Δ| {:.3e})",
        d.rel_l2,
        d.max_abs
    );
    d
}

/// [`assert_close`] against a fixture tensor.
pub fn assert_fixture<B: Backend, const D: usize>(
    fixture: &Fixture,
    name: &str,
    actual: Tensor<B, D>,
    rel_l2: f64,
) -> Diff {
    let expected = fixture.tensor::<B, D>(name, &actual.device());
    assert_close(
        &format!("{}:{name}", fixture.path().display()),
        actual,
        expected,
        rel_l2,
    )
}

/// Every float parameter of `module`: its path (`down_blocks.0.resnets.1.conv1.weight`) and its
/// values, in visiting order. Two loads of the same weights compare parameter by parameter.
pub fn float_params<B: Backend, M: burn::module::Module<B>>(
    module: &M,
) -> Vec<(String, TensorData)> {
    #[derive(Default)]
    struct Params {
        path: Vec<String>,
        all: Vec<(String, TensorData)>,
    }
    impl<B: Backend> burn::module::ModuleVisitor<B> for Params {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            self.all
                .push((self.path.join("."), param.val().into_data()));
        }
    }
    let mut p = Params::default();
    module.visit(&mut p);
    p.all
}
