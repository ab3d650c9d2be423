//! Backend choice at run time, among the backends this binary was built with.

use burn::tensor::DType;
use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// The CPU backend (burn-flex: multi-threaded, SIMD).
    Cpu,
    /// wgpu (Vulkan, Metal, DX12; or lavapipe, slowly). Needs the `wgpu` feature.
    Wgpu,
    /// NVIDIA CUDA. Needs the `cuda` feature.
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    F32,
    F16,
    Bf16,
}

impl DTypeArg {
    pub fn dtype(self) -> DType {
        match self {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
        }
    }
}

/// The counting allocator behind the CPU backend's memory report.
#[global_allocator]
pub static ALLOC: ip2p_pipeline::CountingAllocator = ip2p_pipeline::CountingAllocator::new();

/// Run `$body` (a closure `|device, probe| -> Result<()>`) on the chosen backend, with its
/// memory probe: the heap counter on CPU, the backend's memory pool on cubecl backends.
macro_rules! dispatch {
    ($kind:expr, $dtype:expr, |$device:ident, $probe:ident| $body:expr) => {{
        #[allow(unused_imports)]
        use $crate::backend::BackendKind;
        let _ = $dtype;
        match $kind {
            #[cfg(feature = "flex")]
            BackendKind::Cpu => {
                type B = burn::backend::Flex;
                let $device = crate::backend::default_device::<B>();
                let $probe: &dyn ip2p_pipeline::MemoryProbe = &$crate::backend::ALLOC;
                $body
            }
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => {
                type B = burn::backend::Wgpu;
                let $device = crate::backend::default_device::<B>();
                let $probe = ip2p_pipeline::memory::cube_pool_probe::<
                    burn::cubecl::wgpu::WgpuRuntime,
                >("wgpu pool", &$device);
                let $probe: &dyn ip2p_pipeline::MemoryProbe = &$probe;
                $body
            }
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => {
                type B = burn::backend::Cuda;
                let $device = crate::backend::default_device::<B>();
                let $probe = ip2p_pipeline::memory::cube_pool_probe::<
                    burn::cubecl::cuda::CudaRuntime,
                >("cuda pool", &$device);
                let $probe: &dyn ip2p_pipeline::MemoryProbe = &$probe;
                $body
            }
            #[allow(unreachable_patterns)]
            other => anyhow::bail!(
                "this ip2p was built without the {:?} backend: rebuild with `--features {}`",
                other,
                format!("{other:?}").to_lowercase()
            ),
        }
    }};
}
pub(crate) use dispatch;

/// The backend's default device (the first GPU, or the CPU).
pub fn default_device<B: burn::tensor::backend::Backend>() -> B::Device {
    Default::default()
}
