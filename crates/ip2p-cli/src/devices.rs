//! `ip2p train --devices`: the devices of this process, one UNet replica each.
//!
//! As torchrun's `--nproc-per-node N` and accelerate's `--gpu_ids`: a count (`2`: the first
//! two devices) or a list of GPU indices (`0,2`, or with the backend's name, `cuda:0,cuda:2`,
//! which also picks a single GPU: `cuda:1`). On the CPU backend there is one device and a count
//! is the number of replicas sharing its cores, each on its own thread (burn-collective tells
//! peers apart by id, not by device, so they may share one).

use std::fmt;
use std::str::FromStr;

use burn::tensor::backend::{Backend, Device, DeviceId};

use crate::backend::BackendKind;

/// The most devices (replicas) one process may run: the run's world limit (the start-up check's
/// exact f32 sums), which also keeps indices within device ids' 16 bits.
pub const MAX_DEVICES: usize = ip2p_train::ranks::MAX_WORLD;

/// What `--devices` asked for, before the backend is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The first `n` devices (on the CPU, `n` replicas).
    Count(usize),
    /// These GPU indices; `backend` when they were written `cuda:N` or `wgpu:N`.
    Indices {
        backend: Option<BackendKind>,
        indices: Vec<usize>,
    },
}

impl Default for DeviceSpec {
    fn default() -> Self {
        Self::Count(1)
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Count(n) => write!(f, "{n}"),
            Self::Indices { backend, indices } => {
                let prefix = match backend {
                    Some(b) => format!("{}:", name(*b)),
                    None => String::new(),
                };
                let items: Vec<String> = indices.iter().map(|i| format!("{prefix}{i}")).collect();
                // One bare index would read as a count.
                match (items.len(), backend) {
                    (1, None) => write!(f, "{},", items[0]),
                    _ => write!(f, "{}", items.join(",")),
                }
            }
        }
    }
}

/// Why `--devices` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceSpecError {
    #[error("--devices 0: at least one device")]
    Zero,
    #[error(
        "--devices {0:?}: `{1}` is not a device (a count such as 2, or indices such as 0,1 or cuda:0,cuda:1)"
    )]
    BadItem(String, String),
    #[error("--devices {spec}: more than {max} devices in a process")]
    TooMany { spec: String, max: usize },
    #[error("--devices {0}: device {1} is listed twice")]
    Duplicate(String, usize),
    #[error("--devices {0}: mixes backends")]
    MixedBackends(String),
    #[error(
        "--devices {spec}: the CPU backend has one device; give the number of replicas instead (e.g. --devices 2)"
    )]
    CpuIndices { spec: String },
    #[error("--devices {spec} names {named} devices, but the backend is {backend} (--backend)")]
    BackendMismatch {
        spec: String,
        named: &'static str,
        backend: &'static str,
    },
    #[error(
        "--devices {spec}: {backend} has {count} device(s) (indices 0..{count}), no device {index}"
    )]
    NoSuchDevice {
        spec: String,
        backend: &'static str,
        index: usize,
        count: usize,
    },
}

fn name(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Cpu => "cpu",
        BackendKind::Wgpu => "wgpu",
        BackendKind::Cuda => "cuda",
    }
}

impl FromStr for DeviceSpec {
    type Err = DeviceSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let spec = s.trim();
        let bad = |item: &str| DeviceSpecError::BadItem(s.to_string(), item.to_string());
        if !spec.contains([',', ':']) {
            let n: usize = spec.parse().map_err(|_| bad(spec))?;
            return match n {
                0 => Err(DeviceSpecError::Zero),
                n if n > MAX_DEVICES => Err(DeviceSpecError::TooMany {
                    spec: s.to_string(),
                    max: MAX_DEVICES,
                }),
                n => Ok(Self::Count(n)),
            };
        }
        let mut backend = None;
        let mut indices: Vec<usize> = Vec::new();
        // A trailing comma is allowed: `1,` is the one device 1, not a count.
        let items: Vec<&str> = spec
            .trim_end_matches(',')
            .split(',')
            .map(str::trim)
            .collect();
        for (k, item) in items.iter().enumerate() {
            let (kind, index) = match item.split_once(':') {
                Some((prefix, index)) => {
                    let kind = match prefix.trim().to_ascii_lowercase().as_str() {
                        "cuda" => BackendKind::Cuda,
                        "wgpu" => BackendKind::Wgpu,
                        "cpu" => BackendKind::Cpu,
                        _ => return Err(bad(item)),
                    };
                    (Some(kind), index.trim())
                }
                None => (None, *item),
            };
            if k > 0 && kind != backend {
                return Err(DeviceSpecError::MixedBackends(s.to_string()));
            }
            backend = kind;
            let index: usize = index.parse().map_err(|_| bad(item))?;
            // Device ids hold 16-bit indices; no backend has that many anyway.
            if index >= MAX_DEVICES {
                return Err(DeviceSpecError::TooMany {
                    spec: s.to_string(),
                    max: MAX_DEVICES,
                });
            }
            if indices.contains(&index) {
                return Err(DeviceSpecError::Duplicate(s.to_string(), index));
            }
            indices.push(index);
        }
        if backend == Some(BackendKind::Cpu) {
            return Err(DeviceSpecError::CpuIndices {
                spec: s.to_string(),
            });
        }
        Ok(Self::Indices { backend, indices })
    }
}

impl DeviceSpec {
    /// How many devices (replicas) this process runs.
    pub fn count(&self) -> usize {
        match self {
            Self::Count(n) => *n,
            Self::Indices { indices, .. } => indices.len(),
        }
    }

    /// The GPU indices, or None for the backend's default device (one device) or the CPU.
    fn indices(&self, kind: BackendKind) -> Result<Option<Vec<usize>>, DeviceSpecError> {
        let spec = self.to_string();
        match (self, kind) {
            (
                Self::Indices {
                    backend: Some(b), ..
                },
                _,
            ) if *b != kind => Err(DeviceSpecError::BackendMismatch {
                spec,
                named: name(*b),
                backend: name(kind),
            }),
            (Self::Count(_), BackendKind::Cpu) => Ok(None),
            (Self::Indices { .. }, BackendKind::Cpu) => Err(DeviceSpecError::CpuIndices { spec }),
            // One device: the backend's default, as without --devices.
            (Self::Count(1), _) => Ok(None),
            (Self::Count(n), _) => Ok(Some((0..*n).collect())),
            (Self::Indices { indices, .. }, _) => Ok(Some(indices.clone())),
        }
    }

    /// The devices of backend `B` (of kind `kind`), one per replica, checked against the
    /// devices the backend sees. `count` is the backend's device count, asked only for GPUs.
    pub fn resolve<B: Backend>(
        &self,
        kind: BackendKind,
        count: impl FnOnce() -> usize,
    ) -> Result<Vec<B::Device>, DeviceSpecError> {
        let Some(indices) = self.indices(kind)? else {
            return Ok(vec![B::Device::default(); self.count()]);
        };
        let available = count();
        if let Some(&index) = indices.iter().find(|&&i| i >= available) {
            return Err(DeviceSpecError::NoSuchDevice {
                spec: self.to_string(),
                backend: name(kind),
                index,
                count: available,
            });
        }
        Ok(indices
            .into_iter()
            .map(|i| B::Device::from_id(DeviceId::new(GPU_TYPE_ID, i as u16)))
            .collect())
    }
}

/// The device type of a GPU index: CUDA has one; for wgpu, type 0 is `DiscreteGpu(index)`.
pub const GPU_TYPE_ID: u16 = 0;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<DeviceSpec, DeviceSpecError> {
        s.parse()
    }

    #[test]
    fn counts_and_lists() {
        assert_eq!(parse("2"), Ok(DeviceSpec::Count(2)));
        assert_eq!(
            parse("0,2"),
            Ok(DeviceSpec::Indices {
                backend: None,
                indices: vec![0, 2]
            })
        );
        assert_eq!(
            parse("cuda:1"),
            Ok(DeviceSpec::Indices {
                backend: Some(BackendKind::Cuda),
                indices: vec![1]
            })
        );
        assert_eq!(parse("1,").map(|d| d.count()), Ok(1));
        assert_eq!(parse(" wgpu:0, wgpu:1 ").map(|d| d.count()), Ok(2));
        // What Display writes parses back to the same.
        for s in ["3", "1,", "0,2", "cuda:0,cuda:3"] {
            let d = parse(s).unwrap();
            assert_eq!(parse(&d.to_string()), Ok(d));
        }
    }

    #[test]
    fn bad_specs_are_typed_errors() {
        assert_eq!(parse("0"), Err(DeviceSpecError::Zero));
        assert!(matches!(parse(""), Err(DeviceSpecError::BadItem(..))));
        assert!(matches!(parse("-1"), Err(DeviceSpecError::BadItem(..))));
        assert!(matches!(parse("two"), Err(DeviceSpecError::BadItem(..))));
        assert!(matches!(parse("tpu:0"), Err(DeviceSpecError::BadItem(..))));
        assert!(matches!(parse("0,,1"), Err(DeviceSpecError::BadItem(..))));
        assert!(matches!(
            parse("0,1,0"),
            Err(DeviceSpecError::Duplicate(_, 0))
        ));
        assert!(matches!(
            parse("1000000000000"),
            Err(DeviceSpecError::TooMany { .. })
        ));
        assert!(matches!(
            parse("cuda:70000"),
            Err(DeviceSpecError::TooMany { .. })
        ));
        assert!(matches!(
            parse("cuda:0,1"),
            Err(DeviceSpecError::MixedBackends(_))
        ));
        assert!(matches!(
            parse("cuda:0,wgpu:1"),
            Err(DeviceSpecError::MixedBackends(_))
        ));
        assert!(matches!(
            parse("cpu:0"),
            Err(DeviceSpecError::CpuIndices { .. })
        ));
    }

    type Flex = burn::backend::Flex;

    #[test]
    fn backends_take_what_fits_them() {
        let cpu = |s: &str| parse(s).unwrap().resolve::<Flex>(BackendKind::Cpu, || 1);
        assert_eq!(cpu("3").map(|d| d.len()), Ok(3));
        assert!(matches!(
            cpu("0,1"),
            Err(DeviceSpecError::CpuIndices { .. })
        ));
        assert!(matches!(
            cpu("cuda:0"),
            Err(DeviceSpecError::BackendMismatch { .. })
        ));
        // GPU indices, checked against the device count (the CPU device type stands in).
        let gpu = |s: &str, kind| parse(s).unwrap().indices(kind);
        assert_eq!(gpu("2", BackendKind::Cuda), Ok(Some(vec![0, 1])));
        assert_eq!(gpu("1", BackendKind::Cuda), Ok(None));
        assert_eq!(gpu("cuda:3", BackendKind::Cuda), Ok(Some(vec![3])));
        assert!(matches!(
            gpu("wgpu:0", BackendKind::Cuda),
            Err(DeviceSpecError::BackendMismatch { .. })
        ));
        let err = parse("0,4")
            .unwrap()
            .resolve::<Flex>(BackendKind::Cuda, || 2);
        assert!(matches!(
            err,
            Err(DeviceSpecError::NoSuchDevice {
                index: 4,
                count: 2,
                ..
            })
        ));
    }
}
