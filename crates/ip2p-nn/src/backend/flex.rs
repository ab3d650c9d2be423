//! The CPU backend (burn-flex) on ip2p-kernels. Each method takes the kernel path for f32
//! tensors and falls back to [`super::generic`] for what the kernels do not cover.

use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, LayerNorm, Linear, PaddingConfig2d};
use burn::tensor::{Bytes, DType, Shape, Tensor, TensorPrimitive};
use burn_flex::Flex;
use burn_flex::{FlexTensor, Layout};
use half::slice::HalfFloatSliceExt;
use ip2p_kernels::attention::{AttentionLayout, AttentionShape};
use ip2p_kernels::conv::Conv2dShape;
use ip2p_kernels::linear::WeightLayout;
use rayon::prelude::*;

use super::{Backend, generic};
use crate::attention::AttentionImpl;

/// An f32 tensor's contiguous storage (copied only when it is a strided view).
struct F32 {
    tensor: FlexTensor,
}

impl F32 {
    fn new<const D: usize>(t: Tensor<Flex, D>) -> Self {
        let tensor = match t.into_primitive() {
            TensorPrimitive::Float(t) => t.to_contiguous(),
            TensorPrimitive::QFloat(_) => unreachable!("callers pass f32 tensors only"),
        };
        Self { tensor }
    }

    fn slice(&self) -> &[f32] {
        self.tensor
            .as_slice::<f32>()
            .expect("a contiguous f32 tensor has a slice")
    }
}

/// A Linear weight's f32 values as the kernel takes them: Burn's `[in, out]`, or the
/// transposed view of a checkpoint's `[out, in]` that the loader makes (no copy either way;
/// an f16 weight kept as stored is widened for this call, exactly).
struct LinearWeight {
    values: Weight,
    layout: WeightLayout,
}

impl LinearWeight {
    fn new(t: Tensor<Flex, 2>) -> Self {
        let TensorPrimitive::Float(tensor) = t.into_primitive() else {
            unreachable!("callers pass float tensors only")
        };
        let l = tensor.layout();
        let fan_in = l.shape()[0];
        let out_in = l.strides() == [1, fan_in as isize];
        let (tensor, layout) = if out_in {
            (tensor, WeightLayout::OutIn)
        } else {
            (tensor.to_contiguous(), WeightLayout::InOut)
        };
        Self {
            values: Weight::new(tensor),
            layout,
        }
    }

    fn slice(&self) -> &[f32] {
        self.values.slice()
    }
}

/// A weight's values in memory order, from its start: f32 as stored, or f16 widened.
enum Weight {
    F32(FlexTensor),
    Widened(Vec<f32>),
}

impl Weight {
    fn new(tensor: FlexTensor) -> Self {
        if tensor.dtype() != DType::F16 {
            return Self::F32(tensor);
        }
        let l = tensor.layout();
        let start = l.start_offset();
        let src = &tensor.storage::<half::f16>()[start..start + l.num_elements()];
        let mut dst = vec![0.0f32; src.len()];
        // Chunks big enough to amortise a task, small enough to share out.
        const CHUNK: usize = 1 << 16;
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| s.convert_to_f32_slice(d));
        Self::Widened(dst)
    }

    fn slice(&self) -> &[f32] {
        match self {
            Self::F32(t) => {
                let l = t.layout();
                let start = l.start_offset();
                &t.storage::<f32>()[start..start + l.num_elements()]
            }
            Self::Widened(v) => v,
        }
    }
}

/// f32, or f16 (a half weight kept as stored, widened when used).
fn is_f32_or_half<const D: usize>(t: &Tensor<Flex, D>) -> bool {
    matches!(t.dtype(), DType::F32 | DType::F16)
}

fn is_f32<const D: usize>(t: &Tensor<Flex, D>) -> bool {
    t.dtype() == DType::F32
}

fn tensor<const D: usize>(data: Vec<f32>, dims: [usize; D]) -> Tensor<Flex, D> {
    let t = FlexTensor::new(
        Bytes::from_elems(data),
        Layout::contiguous(Shape::from(dims.to_vec())),
        DType::F32,
    );
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn param<const D: usize>(p: &burn::module::Param<Tensor<Flex, D>>) -> F32 {
    F32::new(p.val())
}

/// `x · weight + bias + residual` by the Linear kernel: `x` `rows × in` (checked by the caller
/// against `weight`'s `[in, out]`), the result `rows × out`.
fn linear_rows(
    x: &F32,
    rows: usize,
    weight: Tensor<Flex, 2>,
    bias: Option<&F32>,
    residual: Option<&F32>,
) -> Vec<f32> {
    let [fan_in, fan_out] = weight.dims();
    let weight = LinearWeight::new(weight);
    let mut out = vec![0.0; rows * fan_out];
    ip2p_kernels::linear::linear(
        x.slice(),
        rows,
        fan_in,
        weight.slice(),
        weight.layout,
        fan_out,
        bias.map(F32::slice),
        residual.map(F32::slice),
        &mut out,
    );
    out
}

/// The output channels of `conv` when it is a plain 1×1 conv over `cin` channels (stride 1, no
/// padding, dilation or groups; f32 or f16 weights), which the pointwise kernels take.
fn plain_conv1x1(conv: &Conv2d<Flex>, cin: usize) -> Option<usize> {
    let weight = conv.weight.val();
    let [cout, cin_w, kh, kw] = weight.dims();
    let plain = [kh, kw] == [1, 1]
        && cin_w == cin
        && conv.stride == [1, 1]
        && conv.dilation == [1, 1]
        && conv.groups == 1
        && padding(&conv.padding) == Some([0; 4])
        && is_f32_or_half(&weight);
    plain.then_some(cout)
}

/// A 1×1 conv's `[out, in, 1, 1]` weight as the `[out, in]` values the kernels take.
fn conv1x1_weight(conv: &Conv2d<Flex>) -> Weight {
    match conv.weight.val().into_primitive() {
        TensorPrimitive::Float(t) => Weight::new(t.to_contiguous()),
        TensorPrimitive::QFloat(_) => unreachable!("checked: f32 or f16"),
    }
}

/// `[top, left, bottom, right]` of the padding configurations the kernels take.
fn padding(p: &PaddingConfig2d) -> Option<[usize; 4]> {
    match p {
        PaddingConfig2d::Valid => Some([0; 4]),
        PaddingConfig2d::Explicit(t, l, b, r) => Some([*t, *l, *b, *r]),
        PaddingConfig2d::Same => None,
    }
}

impl Backend for Flex {
    const WIDENS_HALF_WEIGHTS: bool = true;

    fn fused_conv2d(
        conv: &Conv2d<Flex>,
        x: Tensor<Flex, 4>,
        residual: Option<Tensor<Flex, 4>>,
    ) -> Tensor<Flex, 4> {
        let weight = conv.weight.val();
        let [cout, cin_g, kh, kw] = weight.dims();
        let [n, cin, h, w] = x.dims();
        let pad = padding(&conv.padding);
        let usable = is_f32(&x)
            && is_f32_or_half(&weight)
            && residual.as_ref().is_none_or(is_f32)
            && conv.groups == 1
            && conv.dilation == [1, 1]
            && cin_g == cin
            && pad.is_some();
        let shape = pad.map(|padding| Conv2dShape {
            batch: n,
            in_channels: cin,
            height: h,
            width: w,
            out_channels: cout,
            kernel: [kh, kw],
            stride: conv.stride,
            padding,
        });
        let shape = match shape {
            Some(s) if usable && s.check().is_ok() => s,
            _ => return generic::conv2d(conv, x, residual),
        };
        let [oh, ow] = shape.out_hw();
        if let Some(r) = &residual
            && r.dims() != [n, cout, oh, ow]
        {
            return generic::conv2d(conv, x, residual);
        }
        let x = F32::new(x);
        let weight = match weight.into_primitive() {
            TensorPrimitive::Float(t) => Weight::new(t.to_contiguous()),
            TensorPrimitive::QFloat(_) => unreachable!("checked: f32 or f16"),
        };
        let bias = conv.bias.as_ref().map(param);
        let residual = residual.map(F32::new);
        let mut out = vec![0.0; shape.output_len()];
        ip2p_kernels::conv::conv2d(
            &shape,
            x.slice(),
            weight.slice(),
            bias.as_ref().map(F32::slice),
            residual.as_ref().map(F32::slice),
            &mut out,
        );
        tensor(out, [n, cout, oh, ow])
    }

    fn fused_group_norm<const D: usize>(
        norm: &GroupNorm<Flex>,
        x: Tensor<Flex, D>,
        silu: bool,
    ) -> Tensor<Flex, D> {
        let dims = x.dims();
        if !is_f32(&x) || D < 2 || dims[1] != norm.num_channels {
            return generic::group_norm(norm, x, silu);
        }
        let (batch, channels) = (dims[0], dims[1]);
        let spatial = dims[2..].iter().product();
        let (gamma, beta) = match (&norm.gamma, &norm.beta) {
            (Some(g), Some(b)) if norm.affine => (param(g), param(b)),
            _ => (
                F32::new(Tensor::<Flex, 1>::ones([channels], &x.device())),
                F32::new(Tensor::<Flex, 1>::zeros([channels], &x.device())),
            ),
        };
        let x = F32::new(x);
        let mut out = vec![0.0; x.slice().len()];
        ip2p_kernels::norm::group_norm(
            x.slice(),
            batch,
            channels,
            spatial,
            norm.num_groups,
            gamma.slice(),
            beta.slice(),
            norm.epsilon as f32,
            silu,
            &mut out,
        );
        tensor(out, dims)
    }

    fn fused_layer_norm<const D: usize>(
        norm: &LayerNorm<Flex>,
        x: Tensor<Flex, D>,
        eps: f64,
    ) -> Tensor<Flex, D> {
        let dims = x.dims();
        let dim = dims[D - 1];
        if !is_f32(&x) || norm.gamma.dims() != [dim] {
            return generic::layer_norm(norm, x, eps);
        }
        let gamma = param(&norm.gamma);
        let beta = match &norm.beta {
            Some(b) => param(b),
            None => F32::new(Tensor::<Flex, 1>::zeros([dim], &x.device())),
        };
        let x = F32::new(x);
        let mut out = vec![0.0; x.slice().len()];
        let rows = x.slice().len() / dim.max(1);
        ip2p_kernels::norm::layer_norm(
            x.slice(),
            rows,
            dim,
            gamma.slice(),
            beta.slice(),
            eps as f32,
            &mut out,
        );
        tensor(out, dims)
    }

    fn fused_conv1x1_to_tokens(conv: &Conv2d<Flex>, x: Tensor<Flex, 4>) -> Tensor<Flex, 3> {
        let [b, cin, h, w] = x.dims();
        let Some(cout) = plain_conv1x1(conv, cin).filter(|_| is_f32(&x)) else {
            return generic::conv1x1_to_tokens(conv, x);
        };
        let positions = h * w;
        let x = F32::new(x);
        let weight = conv1x1_weight(conv);
        let bias = conv.bias.as_ref().map(param);
        let mut out = vec![0.0; b * positions * cout];
        ip2p_kernels::pointwise::map_to_tokens(
            x.slice(),
            b,
            cin,
            positions,
            weight.slice(),
            cout,
            bias.as_ref().map(F32::slice),
            &mut out,
        );
        tensor(out, [b, positions, cout])
    }

    fn fused_conv1x1_from_tokens(
        conv: &Conv2d<Flex>,
        tokens: Tensor<Flex, 3>,
        hw: [usize; 2],
        residual: Option<Tensor<Flex, 4>>,
    ) -> Tensor<Flex, 4> {
        let [b, positions, cin] = tokens.dims();
        let [h, w] = hw;
        let usable = plain_conv1x1(conv, cin).filter(|&cout| {
            is_f32(&tokens)
                && h * w == positions
                && residual
                    .as_ref()
                    .is_none_or(|r| is_f32(r) && r.dims() == [b, cout, h, w])
        });
        let Some(cout) = usable else {
            return generic::conv1x1_from_tokens(conv, tokens, hw, residual);
        };
        let tokens = F32::new(tokens);
        let weight = conv1x1_weight(conv);
        let bias = conv.bias.as_ref().map(param);
        let residual = residual.map(F32::new);
        let mut out = vec![0.0; b * cout * positions];
        ip2p_kernels::pointwise::tokens_to_map(
            tokens.slice(),
            b,
            positions,
            cin,
            weight.slice(),
            cout,
            bias.as_ref().map(F32::slice),
            residual.as_ref().map(F32::slice),
            &mut out,
        );
        tensor(out, [b, cout, h, w])
    }

    fn fused_linear<const D: usize>(
        linear: &Linear<Flex>,
        x: Tensor<Flex, D>,
        residual: Option<Tensor<Flex, D>>,
    ) -> Tensor<Flex, D> {
        let weight = linear.weight.val();
        let [fan_in, fan_out] = weight.dims();
        let dims = x.dims();
        let mut out_dims = dims;
        out_dims[D - 1] = fan_out;
        let usable = is_f32(&x)
            && is_f32_or_half(&weight)
            && dims[D - 1] == fan_in
            && residual
                .as_ref()
                .is_none_or(|r| is_f32(r) && r.dims() == out_dims);
        if !usable {
            return generic::linear(linear, x, residual);
        }
        let rows = dims[..D - 1].iter().product();
        let bias = linear.bias.as_ref().map(param);
        let residual = residual.map(F32::new);
        let out = linear_rows(&F32::new(x), rows, weight, bias.as_ref(), residual.as_ref());
        tensor(out, out_dims)
    }

    fn fused_geglu(proj: &Linear<Flex>, x: Tensor<Flex, 3>) -> Tensor<Flex, 3> {
        let weight = proj.weight.val();
        let [fan_in, two_inner] = weight.dims();
        let [b, l, features] = x.dims();
        if !is_f32(&x) || !is_f32_or_half(&weight) || two_inner % 2 != 0 || features != fan_in {
            return generic::geglu(proj, x);
        }
        // The projection without its bias: the gate adds it while reading the output once.
        let y = linear_rows(&F32::new(x), b * l, weight, None, None);
        let bias = proj.bias.as_ref().map(param);
        let inner = two_inner / 2;
        let mut out = vec![0.0; b * l * inner];
        ip2p_kernels::activation::geglu(&y, b * l, inner, bias.as_ref().map(F32::slice), &mut out);
        tensor(out, [b, l, inner])
    }

    fn fused_attention(
        q: Tensor<Flex, 3>,
        k: Tensor<Flex, 3>,
        v: Tensor<Flex, 3>,
        heads: usize,
        causal: bool,
        imp: AttentionImpl,
    ) -> Tensor<Flex, 3> {
        let [b, lq, inner] = q.dims();
        let [bk, lk, inner_k] = k.dims();
        let usable = [&q, &k, &v].into_iter().all(is_f32)
            && heads > 0
            && inner % heads == 0
            && bk == b
            && inner_k == inner
            && v.dims() == k.dims();
        if !usable {
            return generic::attention(q, k, v, heads, causal, imp);
        }
        let shape = AttentionShape {
            batch: b,
            heads,
            q_len: lq,
            kv_len: lk,
            head_dim: inner / heads,
            causal,
        };
        let (q, k, v) = (F32::new(q), F32::new(k), F32::new(v));
        let scale = (shape.head_dim as f32).powf(-0.5);
        let mut out = vec![0.0; b * lq * inner];
        ip2p_kernels::attention::attention(
            &shape,
            &AttentionLayout::contiguous(&shape),
            q.slice(),
            k.slice(),
            v.slice(),
            scale,
            &mut out,
        );
        tensor(out, [b, lq, inner])
    }
}
