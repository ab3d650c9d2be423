//! The optimiser side of a step, as torch does it: global-norm gradient clipping
//! (`clip_grad_norm_`), AdamW (`torch.optim.AdamW`), the learning-rate warm-up of diffusers'
//! `constant_with_warmup`, and the EMA of diffusers' `EMAModel`.
//!
//! Burn's own `GradientClipping::Norm` clips each parameter's gradient by its own norm, not by
//! the norm of all gradients together as torch's `clip_grad_norm_`; and Burn's optimiser state
//! is keyed by `ParamId`s, which do not survive a reload from safetensors. So the state here is
//! keyed by parameter path, and the clipping is global.

use std::collections::BTreeMap;

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor};

/// Dotted parameter paths (Burn's, e.g. `down_blocks.0.resnets.1.norm1.gamma`) as a visitor walks.
#[derive(Default)]
struct PathStack(Vec<String>);

impl PathStack {
    fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    fn exit(&mut self) {
        self.0.pop();
    }
    fn path(&self) -> String {
        self.0.join(".")
    }
}

/// Every float parameter of a module, flattened, by path (a copy of the values).
pub fn named_params<B: Backend, M: Module<B>>(module: &M) -> BTreeMap<String, Tensor<B, 1>> {
    struct V<B: Backend> {
        paths: PathStack,
        out: BTreeMap<String, Tensor<B, 1>>,
    }
    impl<B: Backend> ModuleVisitor<B> for V<B> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.paths.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.paths.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let t = param.val();
            let n = t.shape().num_elements();
            self.out.insert(self.paths.path(), t.reshape([n]));
        }
    }
    let mut v = V {
        paths: PathStack::default(),
        out: BTreeMap::new(),
    };
    module.visit(&mut v);
    v.out
}

/// The gradients of an autodiff module's parameters, flattened, by path.
pub fn named_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
) -> BTreeMap<String, Tensor<B::InnerBackend, 1>> {
    struct V<'a, B: AutodiffBackend> {
        paths: PathStack,
        grads: &'a GradientsParams,
        out: BTreeMap<String, Tensor<B::InnerBackend, 1>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for V<'_, B> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.paths.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.paths.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                let n = g.shape().num_elements();
                self.out.insert(self.paths.path(), g.reshape([n]));
            }
        }
    }
    let mut v = V::<B> {
        paths: PathStack::default(),
        grads,
        out: BTreeMap::new(),
    };
    module.visit(&mut v);
    v.out
}

/// The L2 norm of all gradients together (torch's `clip_grad_norm_` total norm), in f32 sums.
pub fn global_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
) -> f64 {
    norm_of(named_grads::<B, M>(module, grads).values())
}

/// The L2 norm of flattened tensors together, in f32 sums, in the iterator's order.
fn norm_of<'a, B: Backend>(tensors: impl Iterator<Item = &'a Tensor<B, 1>>) -> f64 {
    let mut total: Option<Tensor<B, 1>> = None;
    for g in tensors {
        let s = g.clone().cast(DType::F32).square().sum();
        total = Some(match total {
            Some(t) => t + s,
            None => s,
        });
    }
    total.map_or(0.0, |t| f64::from(t.into_scalar().elem::<f32>()).sqrt())
}

use burn::tensor::ElementConversion;

/// AdamW hyper-parameters; the defaults are diffusers' script's (and torch's but for eps).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWSettings {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (diffusers' `--max_grad_norm`, default 1); None: no clipping.
    pub max_grad_norm: Option<f64>,
    /// Linear warm-up over this many optimiser steps (diffusers' `constant_with_warmup`): the
    /// rate at optimiser step k (from 0) is `lr · min(1, k / warmup)`; 0: constant.
    pub warmup_steps: usize,
}

impl Default for AdamWSettings {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            max_grad_norm: Some(1.0),
            warmup_steps: 0,
        }
    }
}

impl AdamWSettings {
    /// The learning rate of optimiser step `k` (0-based), as torch's `LambdaLR` gives it.
    pub fn lr_at(&self, k: usize) -> f64 {
        if self.warmup_steps == 0 || k >= self.warmup_steps {
            self.lr
        } else {
            self.lr * k as f64 / self.warmup_steps as f64
        }
    }
}

/// AdamW's moments, by parameter path, and the number of steps taken.
#[derive(Debug, Clone)]
pub struct AdamW<B: Backend> {
    pub settings: AdamWSettings,
    /// Optimiser steps taken (torch's per-parameter `step`; the same for all parameters here).
    pub steps: usize,
    pub exp_avg: BTreeMap<String, Tensor<B, 1>>,
    pub exp_avg_sq: BTreeMap<String, Tensor<B, 1>>,
}

/// What one optimiser step did.
#[derive(Debug, Clone, Copy)]
pub struct UpdateInfo {
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
}

impl<B: Backend> AdamW<B> {
    pub fn new(settings: AdamWSettings) -> Self {
        Self {
            settings,
            steps: 0,
            exp_avg: BTreeMap::new(),
            exp_avg_sq: BTreeMap::new(),
        }
    }

    /// Clip the gradients by their global norm, then one AdamW step on every parameter that
    /// has a gradient. Computes in f32 (the moments are f32).
    pub fn step<A, M>(&mut self, module: M, grads: GradientsParams) -> (M, UpdateInfo)
    where
        A: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<A>,
    {
        let named = named_grads::<A, M>(&module, &grads);
        self.step_named::<A, M>(module, named)
    }

    /// [`Self::step`] with the gradients by parameter path (as a data-parallel run has them
    /// after the all-reduce).
    pub fn step_named<A, M>(
        &mut self,
        module: M,
        grads: BTreeMap<String, Tensor<B, 1>>,
    ) -> (M, UpdateInfo)
    where
        A: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<A>,
    {
        let grad_norm = norm_of(grads.values());
        let coef = match self.settings.max_grad_norm {
            Some(max) => (max / (grad_norm + 1e-6)).min(1.0),
            None => 1.0,
        };
        let lr = self.settings.lr_at(self.steps);
        self.steps += 1;
        let mut mapper = AdamWMapper::<A> {
            paths: PathStack::default(),
            grads,
            opt: self,
            coef,
            lr,
        };
        let module = module.map(&mut mapper);
        (module, UpdateInfo { grad_norm, lr })
    }
}

struct AdamWMapper<'a, A: AutodiffBackend> {
    paths: PathStack,
    grads: BTreeMap<String, Tensor<A::InnerBackend, 1>>,
    opt: &'a mut AdamW<A::InnerBackend>,
    coef: f64,
    lr: f64,
}

impl<A: AutodiffBackend> ModuleMapper<A> for AdamWMapper<'_, A> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.paths.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.paths.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<A, D>>) -> Param<Tensor<A, D>> {
        let (id, tensor, mapper) = param.consume();
        let path = self.paths.path();
        let Some(grad) = self.grads.remove(&path) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let s = self.opt.settings;
        let require_grad = tensor.is_require_grad();
        let p = tensor.inner();
        let (dtype, shape) = (p.dtype(), p.shape());
        let n = shape.num_elements();
        let g = grad.cast(DType::F32).reshape([n]).mul_scalar(self.coef);
        let m = match self.opt.exp_avg.remove(&path) {
            Some(m) => m.mul_scalar(s.beta1) + g.clone().mul_scalar(1.0 - s.beta1),
            None => g.clone().mul_scalar(1.0 - s.beta1),
        };
        let v = match self.opt.exp_avg_sq.remove(&path) {
            Some(v) => v.mul_scalar(s.beta2) + g.square().mul_scalar(1.0 - s.beta2),
            None => g.square().mul_scalar(1.0 - s.beta2),
        };
        let t = self.opt.steps as i32;
        let bc1 = 1.0 - s.beta1.powi(t);
        let bc2 = 1.0 - s.beta2.powi(t);
        // torch: p ← p·(1 − lr·wd); p ← p − (lr/bc1)·m / (√v/√bc2 + eps).
        let denom = v.clone().sqrt().div_scalar(bc2.sqrt()).add_scalar(s.eps);
        let pf = p.cast(DType::F32).reshape([n]);
        let updated = pf.mul_scalar(1.0 - self.lr * s.weight_decay)
            - (m.clone() / denom).mul_scalar(self.lr / bc1);
        self.opt.exp_avg.insert(path.clone(), m);
        self.opt.exp_avg_sq.insert(path, v);
        let updated: Tensor<A::InnerBackend, D> = updated.reshape(shape).cast(dtype);
        let mut tensor = Tensor::from_inner(updated);
        if require_grad {
            tensor = tensor.require_grad();
        }
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// diffusers' `EMAModel` (defaults: decay 0.9999, no warm-up, update after step 0): after
/// optimiser step k (from 1) the decay is `min(decay, (1 + s)/(10 + s))` with `s = k − 1`
/// (0 at the first step, so the EMA starts as a copy), and `ema ← ema − (1 − d)(ema − θ)`.
#[derive(Debug, Clone)]
pub struct Ema<B: Backend, M: Module<B>> {
    pub model: M,
    pub decay: f64,
    /// Optimiser steps seen (diffusers' `optimization_step`).
    pub steps: usize,
    _b: std::marker::PhantomData<B>,
}

impl<B: Backend, M: Module<B>> Ema<B, M> {
    pub fn new(model: M, decay: f64) -> Self {
        Self {
            model,
            decay,
            steps: 0,
            _b: std::marker::PhantomData,
        }
    }

    /// The decay the next update uses.
    pub fn next_decay(&self) -> f64 {
        let s = self.steps as f64; // (steps + 1) - 1
        if s <= 0.0 {
            return 0.0;
        }
        ((1.0 + s) / (10.0 + s)).min(self.decay).max(0.0)
    }

    /// Move the average towards `current` (the trained model's parameters, by path).
    pub fn update(&mut self, current: &BTreeMap<String, Tensor<B, 1>>) {
        let d = self.next_decay();
        self.steps += 1;
        struct Mp<'a, B: Backend> {
            paths: PathStack,
            current: &'a BTreeMap<String, Tensor<B, 1>>,
            one_minus: f64,
        }
        impl<B: Backend> ModuleMapper<B> for Mp<'_, B> {
            fn enter_module(&mut self, name: &str, _: &str) {
                self.paths.enter(name);
            }
            fn exit_module(&mut self, _: &str, _: &str) {
                self.paths.exit();
            }
            fn map_float<const D: usize>(
                &mut self,
                param: Param<Tensor<B, D>>,
            ) -> Param<Tensor<B, D>> {
                let Some(cur) = self.current.get(&self.paths.path()) else {
                    return param;
                };
                let one_minus = self.one_minus;
                param.map(|e| {
                    let shape = e.shape();
                    let cur = cur.clone().reshape(shape).cast(e.dtype());
                    e.clone() - (e - cur).mul_scalar(one_minus)
                })
            }
        }
        let model = self.model.clone().map(&mut Mp {
            paths: PathStack::default(),
            current,
            one_minus: 1.0 - d,
        });
        self.model = model;
    }
}
