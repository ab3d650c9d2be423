//! `cargo xtask bench --ops`: each CPU kernel timed alone at the SD 1.5 UNet's and VAE's real
//! layer shapes, three implementations side by side:
//!
//! - `burn`: `ip2p_nn::backend::generic` on burn-flex, the plain Burn code the CPU backend ran
//!   before ip2p-kernels;
//! - `ip2p`: `<Flex as ip2p_nn::Backend>::fused_*`, our kernels through the seam, tensor
//!   wrapping included;
//! - `torch`: the same ops in PyTorch (tools/bench/ops_bench.py), with `--reference`, on as many
//!   threads as rayon has.
//!
//! The shapes are defined here only ([`cases`]); the Python side reads them as JSON.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// One layer op with its sizes. Serialised (tagged by `op`) for tools/bench/ops_bench.py.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Square kernel, stride 1, zero padding on every side; with bias; `+ residual` (the output's
    /// shape) when `residual`.
    Conv2d {
        batch: usize,
        in_channels: usize,
        out_channels: usize,
        height: usize,
        width: usize,
        kernel: usize,
        padding: usize,
        residual: bool,
    },
    /// Affine GroupNorm on `[batch, channels, height, width]`, then SiLU when `silu`.
    GroupNorm {
        batch: usize,
        channels: usize,
        height: usize,
        width: usize,
        groups: usize,
        eps: f64,
        silu: bool,
    },
    /// Affine LayerNorm over the last dimension of `[batch, tokens, dim]`.
    LayerNorm {
        batch: usize,
        tokens: usize,
        dim: usize,
        eps: f64,
    },
    /// `[batch, tokens, in] → [batch, tokens, out]`, `+ residual` when `residual`.
    Linear {
        batch: usize,
        tokens: usize,
        in_features: usize,
        out_features: usize,
        bias: bool,
        residual: bool,
    },
    /// diffusers' GEGLU: a linear (with bias) to `2 · inner`, then `hidden · gelu(gate)`.
    Geglu {
        batch: usize,
        tokens: usize,
        in_features: usize,
        inner: usize,
    },
    /// Multi-head attention on token-major `[batch, len, heads · head_dim]` projections.
    Attention {
        batch: usize,
        heads: usize,
        q_len: usize,
        kv_len: usize,
        head_dim: usize,
    },
}

/// What a rate counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Unit {
    /// Floating-point operations of the op's GEMMs (2 × multiply-adds).
    #[serde(rename = "GFLOP/s")]
    Gflops,
    /// Bytes of one read of the input and one write of the output (f32).
    #[serde(rename = "GB/s")]
    Gbytes,
}

impl Unit {
    pub fn name(self) -> &'static str {
        match self {
            Unit::Gflops => "GFLOP/s",
            Unit::Gbytes => "GB/s",
        }
    }
}

fn side(h: usize, w: usize) -> String {
    if h == w {
        format!("{h}²")
    } else {
        format!("{h}×{w}")
    }
}

impl Op {
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Conv2d { .. } => "conv2d",
            Op::GroupNorm { .. } => "group_norm",
            Op::LayerNorm { .. } => "layer_norm",
            Op::Linear { .. } => "linear",
            Op::Geglu { .. } => "geglu",
            Op::Attention { .. } => "attention",
        }
    }

    /// The amount of work a rate divides by time, and its unit: FLOPs of the GEMMs (bias,
    /// residual, activations, softmax and scaling not counted) for the compute-bound ops, bytes
    /// moved (input read once, output written once) for the memory-bound norms.
    pub fn work(&self) -> (f64, Unit) {
        const F32: f64 = 4.0;
        match *self {
            Op::Conv2d {
                batch,
                in_channels,
                out_channels,
                height,
                width,
                kernel,
                padding,
                ..
            } => {
                let (oh, ow) = (
                    height + 2 * padding + 1 - kernel,
                    width + 2 * padding + 1 - kernel,
                );
                let macs = (batch * out_channels * oh * ow) as f64
                    * (in_channels * kernel * kernel) as f64;
                (2.0 * macs, Unit::Gflops)
            }
            Op::GroupNorm {
                batch,
                channels,
                height,
                width,
                ..
            } => (
                2.0 * F32 * (batch * channels * height * width) as f64,
                Unit::Gbytes,
            ),
            Op::LayerNorm {
                batch, tokens, dim, ..
            } => (2.0 * F32 * (batch * tokens * dim) as f64, Unit::Gbytes),
            Op::Linear {
                batch,
                tokens,
                in_features,
                out_features,
                ..
            } => (
                2.0 * (batch * tokens) as f64 * (in_features * out_features) as f64,
                Unit::Gflops,
            ),
            Op::Geglu {
                batch,
                tokens,
                in_features,
                inner,
            } => (
                2.0 * (batch * tokens) as f64 * (in_features * 2 * inner) as f64,
                Unit::Gflops,
            ),
            Op::Attention {
                batch,
                heads,
                q_len,
                kv_len,
                head_dim,
            } => (
                4.0 * (batch * heads * q_len) as f64 * (kv_len * head_dim) as f64,
                Unit::Gflops,
            ),
        }
    }

    /// The sizes in words, for the report.
    pub fn describe(&self) -> String {
        match *self {
            Op::Conv2d {
                batch,
                in_channels,
                out_channels,
                height,
                width,
                kernel,
                residual,
                ..
            } => format!(
                "{kernel}×{kernel} {in_channels}→{out_channels} @{} b{batch}{}",
                side(height, width),
                if residual { " +res" } else { "" }
            ),
            Op::GroupNorm {
                batch,
                channels,
                height,
                width,
                groups,
                silu,
                ..
            } => format!(
                "[{batch},{channels},{height},{width}] g{groups}{}",
                if silu { " +SiLU" } else { "" }
            ),
            Op::LayerNorm {
                batch, tokens, dim, ..
            } => format!("[{batch},{tokens},{dim}]"),
            Op::Linear {
                batch,
                tokens,
                in_features,
                out_features,
                bias,
                residual,
            } => format!(
                "[{batch},{tokens},{in_features}]→{out_features}{}{}",
                if bias { " +bias" } else { "" },
                if residual { " +res" } else { "" }
            ),
            Op::Geglu {
                batch,
                tokens,
                in_features,
                inner,
            } => format!("[{batch},{tokens},{in_features}]→2×{inner}"),
            Op::Attention {
                batch,
                heads,
                q_len,
                kv_len,
                head_dim,
            } => format!("b{batch} h{heads} {q_len}×{kv_len} d{head_dim}"),
        }
    }
}

/// One row of the bench: an op at one image size.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpCase {
    /// Index in the full list at this resolution (stable under `--ops-filter`).
    pub id: usize,
    /// Image size `[height, width]` the shapes derive from.
    pub image: [usize; 2],
    /// `unet` or `vae`.
    pub model: &'static str,
    /// Which layer of the model has this shape.
    pub layer: &'static str,
    #[serde(flatten)]
    pub op: Op,
}

impl OpCase {
    /// What `--ops-filter` and `--ops-skip-burn` match against (lower case).
    pub fn label(&self) -> String {
        format!(
            "{} {} {} {}",
            self.model,
            self.layer,
            self.op.kind(),
            self.op.describe()
        )
        .to_lowercase()
    }
}

/// The SD 1.5 shapes at an image of `height × width` (each a multiple of 64): the UNet at batch
/// 3 (classifier-free guidance: text, image and unconditional branches), the VAE at batch 1.
pub fn cases(height: usize, width: usize) -> Result<Vec<OpCase>> {
    if height == 0 || width == 0 || !height.is_multiple_of(64) || !width.is_multiple_of(64) {
        bail!("--ops: resolution {height}×{width}: each side must be a positive multiple of 64");
    }
    let image = [height, width];
    // Latent sides at UNet level 0..3 (the VAE's bottom level is level 0).
    let lat = |level: usize| ((height / 8) >> level, (width / 8) >> level);
    let tokens = |level: usize| {
        let (h, w) = lat(level);
        h * w
    };
    let mut v = Vec::new();
    let mut push = |model, layer, op| {
        v.push(OpCase {
            id: v.len(),
            image,
            model,
            layer,
            op,
        })
    };
    let b = 3;
    let conv = |batch, cin, cout, (height, width): (usize, usize), kernel, residual| Op::Conv2d {
        batch,
        in_channels: cin,
        out_channels: cout,
        height,
        width,
        kernel,
        padding: kernel / 2,
        residual,
    };
    // UNet. ResNet blocks' second conv adds the shortcut (fused as the residual).
    push(
        "unet",
        "resnet conv2, level 0",
        conv(b, 320, 320, lat(0), 3, true),
    );
    push(
        "unet",
        "resnet conv2, level 1",
        conv(b, 640, 640, lat(1), 3, true),
    );
    push(
        "unet",
        "resnet conv2, level 2",
        conv(b, 1280, 1280, lat(2), 3, true),
    );
    push(
        "unet",
        "resnet conv2, level 3",
        conv(b, 1280, 1280, lat(3), 3, true),
    );
    push("unet", "conv_in", conv(b, 8, 320, lat(0), 3, false));
    push(
        "unet",
        "transformer proj_in",
        conv(b, 320, 320, lat(0), 1, false),
    );
    let gn = |batch, channels, (height, width): (usize, usize), eps| Op::GroupNorm {
        batch,
        channels,
        height,
        width,
        groups: 32,
        eps,
        silu: true,
    };
    push("unet", "resnet norm1, level 0", gn(b, 320, lat(0), 1e-5));
    push("unet", "resnet norm1, level 2", gn(b, 1280, lat(2), 1e-5));
    let t0 = tokens(0);
    push(
        "unet",
        "transformer norm1, level 0",
        Op::LayerNorm {
            batch: b,
            tokens: t0,
            dim: 320,
            eps: 1e-5,
        },
    );
    push(
        "unet",
        "attn1 to_q, level 0",
        Op::Linear {
            batch: b,
            tokens: t0,
            in_features: 320,
            out_features: 320,
            bias: false,
            residual: false,
        },
    );
    push(
        "unet",
        "ff net.2, level 0",
        Op::Linear {
            batch: b,
            tokens: t0,
            in_features: 1280,
            out_features: 320,
            bias: true,
            residual: true,
        },
    );
    push(
        "unet",
        "ff GEGLU proj, level 0",
        Op::Geglu {
            batch: b,
            tokens: t0,
            in_features: 320,
            inner: 1280,
        },
    );
    let attn = |batch, heads, q_len, kv_len, head_dim| Op::Attention {
        batch,
        heads,
        q_len,
        kv_len,
        head_dim,
    };
    push("unet", "attn1 (self), level 0", attn(b, 8, t0, t0, 40));
    push(
        "unet",
        "attn1 (self), level 1",
        attn(b, 8, tokens(1), tokens(1), 80),
    );
    push(
        "unet",
        "attn1 (self), level 2",
        attn(b, 8, tokens(2), tokens(2), 160),
    );
    push("unet", "attn2 (cross), level 0", attn(b, 8, t0, 77, 40));
    // VAE decoder (the encoder has the same shapes). Levels: the image, /2, /4, /8 (the latent).
    let img = |level: usize| (height >> level, width >> level);
    push(
        "vae",
        "resnet conv2, 128 ch",
        conv(1, 128, 128, img(0), 3, true),
    );
    push(
        "vae",
        "resnet conv2, 256 ch",
        conv(1, 256, 256, img(1), 3, true),
    );
    push(
        "vae",
        "resnet conv2, 512 ch",
        conv(1, 512, 512, img(2), 3, true),
    );
    push(
        "vae",
        "resnet conv2, mid",
        conv(1, 512, 512, img(3), 3, true),
    );
    push("vae", "resnet norm1, 128 ch", gn(1, 128, img(0), 1e-6));
    push("vae", "resnet norm1, 512 ch", gn(1, 512, img(2), 1e-6));
    let (mh, mw) = img(3);
    push("vae", "mid attention", attn(1, 1, mh * mw, mh * mw, 512));
    Ok(v)
}

/// Median and all measured times of one implementation on one row, or why it has none.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timing {
    pub median_s: Option<f64>,
    #[serde(default)]
    pub times_s: Vec<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Timing {
    fn from_times(times: Vec<f64>) -> Self {
        Self {
            median_s: median(&times),
            times_s: times,
            error: None,
        }
    }

    fn failed(e: impl Into<String>) -> Self {
        Self {
            error: Some(e.into()),
            ..Self::default()
        }
    }
}

pub fn median(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
pub struct OpRow {
    #[serde(flatten)]
    pub case: OpCase,
    pub unit: Unit,
    /// FLOPs or bytes (see `unit`).
    pub work: f64,
    pub burn: Option<Timing>,
    pub ip2p: Option<Timing>,
    pub torch: Option<Timing>,
}

impl OpRow {
    fn median(t: &Option<Timing>) -> Option<f64> {
        t.as_ref().and_then(|t| t.median_s)
    }

    /// Work per second in the row's unit (10⁹ FLOP or bytes per second).
    pub fn rate(&self, t: &Option<Timing>) -> Option<f64> {
        Self::median(t).map(|s| self.work / s / 1e9)
    }

    /// ip2p time / torch time: below 1, ip2p is faster.
    pub fn ip2p_vs_torch(&self) -> Option<f64> {
        Self::median(&self.ip2p)
            .zip(Self::median(&self.torch))
            .map(|(a, b)| a / b)
    }

    /// burn time / ip2p time: how many times faster the kernels made the op.
    pub fn burn_to_ip2p(&self) -> Option<f64> {
        Self::median(&self.burn)
            .zip(Self::median(&self.ip2p))
            .map(|(a, b)| a / b)
    }
}

/// The machine the numbers come from.
#[derive(Debug, Clone, Serialize)]
pub struct OpsHost {
    pub cpu_model: String,
    /// e.g. "AVX-512 (F, DQ, BW, VL, VNNI, BF16), AVX2, FMA".
    pub simd: String,
    /// rayon's threads (burn-flex and ip2p-kernels); torch is given the same number.
    pub threads: usize,
    /// The instruction set ip2p-kernels dispatch to.
    pub kernels_isa: String,
    pub torch: Option<String>,
    pub python: Option<String>,
    /// The share of the machine's CPU time that other processes used during the run (Linux):
    /// the cores are shared, and what others take the columns lose.
    pub others_cpu_share: Option<f64>,
}

/// CPU clock ticks since boot: `(all processes busy, all processes total, this process and its
/// waited-for children)` (Linux /proc/stat and /proc/self/stat).
pub fn cpu_ticks() -> Option<(u64, u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let total: u64 = cpu.iter().sum();
    let busy = total - cpu.get(3)? - cpu.get(4)?;
    let me = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<u64> = me
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    Some((busy, total, fields.iter().sum()))
}

/// Others' share of all CPU time between two [`cpu_ticks`] readings.
pub fn others_share(start: (u64, u64, u64), end: (u64, u64, u64)) -> Option<f64> {
    let total = end.1.checked_sub(start.1)?;
    let others = (end.0.checked_sub(start.0)?).saturating_sub(end.2.checked_sub(start.2)?);
    (total > 0).then(|| others as f64 / total as f64)
}

/// `model name` and a summary of the SIMD flags from /proc/cpuinfo's first processor.
pub fn cpu_info() -> (String, String) {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpu_info_from(&text)
}

fn cpu_info_from(text: &str) -> (String, String) {
    let field = |name: &str| {
        text.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let model = field("model name")
        .or_else(|| field("Model"))
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let flags = field("flags")
        .or_else(|| field("Features"))
        .unwrap_or_default();
    let has: Vec<&str> = flags.split_whitespace().collect();
    let mut parts = Vec::new();
    if has.contains(&"avx512f") {
        let subsets = [
            ("avx512f", "F"),
            ("avx512dq", "DQ"),
            ("avx512bw", "BW"),
            ("avx512vl", "VL"),
            ("avx512_vnni", "VNNI"),
            ("avx512_bf16", "BF16"),
            ("avx512_fp16", "FP16"),
        ];
        let names: Vec<&str> = subsets
            .iter()
            .filter(|(f, _)| has.contains(f))
            .map(|(_, n)| *n)
            .collect();
        parts.push(format!("AVX-512 ({})", names.join(", ")));
    }
    for (f, n) in [
        ("avx2", "AVX2"),
        ("fma", "FMA"),
        ("amx_tile", "AMX"),
        ("asimd", "NEON"),
        ("sve", "SVE"),
    ] {
        if has.contains(&f) {
            parts.push(n.to_string());
        }
    }
    let simd = if parts.is_empty() {
        "no AVX2/AVX-512/NEON flags".to_string()
    } else {
        parts.join(", ")
    };
    (model, simd)
}

/// Everything `--ops` produced: ops.md (also printed) and ops.json.
#[derive(Debug, Serialize)]
pub struct OpsReport {
    pub command: String,
    pub started: String,
    pub wall_s: f64,
    pub host: OpsHost,
    pub warmup: usize,
    pub repeats: usize,
    pub notes: Vec<String>,
    pub rows: Vec<OpRow>,
}

fn ms(t: Option<f64>) -> String {
    match t {
        None => "–".into(),
        Some(s) => {
            let ms = s * 1e3;
            if ms >= 100.0 {
                format!("{ms:.0}")
            } else if ms >= 10.0 {
                format!("{ms:.1}")
            } else {
                format!("{ms:.2}")
            }
        }
    }
}

fn num(v: Option<f64>, unit: &str) -> String {
    v.map_or("–".into(), |x| {
        if x >= 100.0 {
            format!("{x:.0}{unit}")
        } else {
            format!("{x:.1}{unit}")
        }
    })
}

fn ratio(v: Option<f64>, unit: &str) -> String {
    v.map_or("–".into(), |x| format!("{x:.2}{unit}"))
}

impl OpsReport {
    pub fn markdown(&self) -> String {
        let h = &self.host;
        let mut s = String::new();
        let _ = writeln!(s, "# ip2p op bench\n");
        let _ = writeln!(
            s,
            "`{}` — CPU **{}**: {}; **{} threads** (rayon{}); ip2p-kernels ISA {}{}. Warm-up {}, median of {}; run took {:.1} s, during which other processes used {} of the CPU time.\n",
            self.command,
            h.cpu_model,
            h.simd,
            h.threads,
            if h.torch.is_some() {
                ", torch.set_num_threads the same"
            } else {
                ""
            },
            h.kernels_isa,
            h.torch
                .as_ref()
                .map_or(String::new(), |v| format!("; torch {v}")),
            self.warmup,
            self.repeats,
            self.wall_s,
            h.others_cpu_share
                .map_or("an unknown share".into(), |x| format!("{:.0}%", x * 100.0)),
        );
        let _ = writeln!(
            s,
            "Columns: **burn** = `ip2p_nn::backend::generic` on burn-flex (the plain Burn ops the CPU backend ran before ip2p-kernels); **ip2p** = `<Flex as ip2p_nn::Backend>::fused_*` (ip2p-kernels through the seam, tensor wrapping included); **torch** = the same ops in PyTorch (tools/bench/ops_bench.py). Times in ms (median). Rates: **GFLOP/s** for conv, linear, GEGLU and attention = 2 × the multiply-adds of their GEMMs (bias, residual, activation, softmax not counted) / time — for convs the direct convolution's count, so a Winograd conv's rate is an effective one; **GB/s** for the memory-bound norms = (one f32 read of the input + one write of the output) / time. **ip2p/torch** = ip2p time / torch time (below 1: ip2p faster); **burn→ip2p** = burn time / ip2p time (the kernels' speed-up).\n"
        );
        let mut images: Vec<[usize; 2]> = self.rows.iter().map(|r| r.case.image).collect();
        images.dedup();
        for image in images {
            let rows: Vec<&OpRow> = self.rows.iter().filter(|r| r.case.image == image).collect();
            let _ = writeln!(
                s,
                "## {}×{} image (latent {}×{})\n",
                image[1],
                image[0],
                image[1] / 8,
                image[0] / 8
            );
            let _ = writeln!(
                s,
                "| model | layer | op | shape | burn ms | ip2p ms | torch ms | unit | burn | ip2p | torch | ip2p/torch | burn→ip2p |"
            );
            let _ = writeln!(
                s,
                "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"
            );
            for r in &rows {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    r.case.model,
                    r.case.layer,
                    r.case.op.kind(),
                    r.case.op.describe(),
                    ms(OpRow::median(&r.burn)),
                    ms(OpRow::median(&r.ip2p)),
                    ms(OpRow::median(&r.torch)),
                    r.unit.name(),
                    num(r.rate(&r.burn), ""),
                    num(r.rate(&r.ip2p), ""),
                    num(r.rate(&r.torch), ""),
                    ratio(r.ip2p_vs_torch(), ""),
                    ratio(r.burn_to_ip2p(), "×"),
                );
            }
            // Totals over the rows every column that ran has a time for.
            let cols = [
                rows.iter().any(|r| r.burn.is_some()),
                rows.iter().any(|r| r.ip2p.is_some()),
                rows.iter().any(|r| r.torch.is_some()),
            ];
            let complete: Vec<&&OpRow> = rows
                .iter()
                .filter(|r| {
                    [&r.burn, &r.ip2p, &r.torch]
                        .iter()
                        .zip(cols)
                        .all(|(t, c)| !c || OpRow::median(t).is_some())
                })
                .collect();
            if complete.len() > 1 {
                let sum = |f: fn(&OpRow) -> &Option<Timing>, on: bool| {
                    on.then(|| {
                        complete
                            .iter()
                            .filter_map(|r| OpRow::median(f(r)))
                            .sum::<f64>()
                    })
                };
                let (b, i, t) = (
                    sum(|r| &r.burn, cols[0]),
                    sum(|r| &r.ip2p, cols[1]),
                    sum(|r| &r.torch, cols[2]),
                );
                let _ = writeln!(
                    s,
                    "| **total** | {} of {} rows | | | {} | {} | {} | | | | | {} | {} |",
                    complete.len(),
                    rows.len(),
                    ms(b),
                    ms(i),
                    ms(t),
                    ratio(i.zip(t).map(|(a, b)| a / b), ""),
                    ratio(b.zip(i).map(|(a, b)| a / b), "×"),
                );
            }
            let errors: Vec<String> = rows
                .iter()
                .flat_map(|r| {
                    [("burn", &r.burn), ("ip2p", &r.ip2p), ("torch", &r.torch)]
                        .into_iter()
                        .filter_map(move |(name, t)| {
                            t.as_ref().and_then(|t| t.error.as_ref()).map(|e| {
                                format!(
                                    "{} {} ({}): {name} failed: {e}",
                                    r.case.model,
                                    r.case.layer,
                                    r.case.op.describe()
                                )
                            })
                        })
                })
                .collect();
            for e in errors {
                let _ = writeln!(s, "\n- {}", e.replace('\n', " "));
            }
            let _ = writeln!(s);
        }
        if !self.notes.is_empty() {
            let _ = writeln!(s, "## Notes\n");
            for n in &self.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        s
    }

    /// Write ops.md and ops.json into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let write = |name: &str, text: String| {
            let p = dir.join(name);
            // Atomic: an interrupted bench leaves the previous report, not half of one.
            ip2p_io::write(&p, text.as_bytes()).map_err(anyhow::Error::from)
        };
        write("ops.md", self.markdown())?;
        write("ops.json", serde_json::to_string_pretty(self)?)?;
        Ok(())
    }
}

/// What `cargo xtask bench --ops` was asked for.
#[derive(Debug, Clone)]
pub struct OpsPlan {
    /// Image sizes `(height, width)`.
    pub resolutions: Vec<(usize, usize)>,
    pub warmup: usize,
    pub repeats: usize,
    /// Rows whose label contains any of these (all rows when empty).
    pub filter: Vec<String>,
    /// Skip the burn column on rows whose label contains any of these ("" matches all).
    pub skip_burn: Vec<String>,
    /// Run the torch column with this Python.
    pub python: Option<PathBuf>,
    pub quiet: bool,
    /// Notes for the report from choosing the plan (e.g. why there is no torch column).
    pub notes: Vec<String>,
}

fn matches(label: &str, patterns: &[String]) -> bool {
    patterns
        .iter()
        .any(|p| label.contains(&p.trim().to_lowercase()))
}

/// The rows of `plan`, in order.
pub fn selected(plan: &OpsPlan) -> Result<Vec<OpCase>> {
    let mut out = Vec::new();
    for &(h, w) in &plan.resolutions {
        out.extend(
            cases(h, w)?
                .into_iter()
                .filter(|c| plan.filter.is_empty() || matches(&c.label(), &plan.filter)),
        );
    }
    if out.is_empty() {
        bail!(
            "--ops-filter {:?} selects no row (rows are matched on 'model layer op shape', e.g. unet, vae, conv2d, attention, 'level 0', 3×3)",
            plan.filter
        );
    }
    Ok(out)
}

/// The request tools/bench/ops_bench.py reads.
#[derive(Debug, Serialize)]
pub struct TorchRequest<'a> {
    pub threads: usize,
    pub warmup: usize,
    pub repeats: usize,
    pub seed: u64,
    pub ops: &'a [OpCase],
}

#[derive(Debug, Deserialize)]
struct TorchOut {
    torch: String,
    threads: usize,
    results: Vec<TorchResult>,
}

#[derive(Debug, Deserialize)]
struct TorchResult {
    id: usize,
    #[serde(flatten)]
    timing: Timing,
}

/// Check that `python` imports torch; its version.
pub fn check_torch(python: &Path) -> Result<String> {
    crate::reference::probe_python(python, "import torch; print(torch.__version__)", "torch")
}

/// Run the torch column: write the request to `request_path`, run the script on it, and attach
/// its timings to `rows` (by image and id). Returns the torch version the script reported.
pub fn run_torch(
    python: &Path,
    rows: &mut [OpRow],
    plan: &OpsPlan,
    threads: usize,
    request_path: &Path,
) -> Result<String> {
    let cases: Vec<OpCase> = rows.iter().map(|r| r.case.clone()).collect();
    // Ids are per resolution; the request numbers rows across all of them.
    let renumbered: Vec<OpCase> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| OpCase { id: i, ..c.clone() })
        .collect();
    let request = TorchRequest {
        threads,
        warmup: plan.warmup,
        repeats: plan.repeats,
        seed: 0,
        ops: &renumbered,
    };
    if let Some(dir) = request_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(request_path, serde_json::to_string_pretty(&request)?)
        .with_context(|| format!("writing {}", request_path.display()))?;
    let script = crate::workspace_root().join("tools/bench/ops_bench.py");
    let out = Command::new(python)
        .arg(&script)
        .arg("--shapes")
        .arg(request_path)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} exited with {}: {}",
            script.display(),
            out.status,
            crate::reference::last_error_line(&out)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let json = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("");
    let parsed: TorchOut = serde_json::from_str(json).context("reading ops_bench.py's JSON")?;
    if parsed.threads != threads {
        bail!(
            "torch ran on {} threads, rayon on {threads}",
            parsed.threads
        );
    }
    for r in parsed.results {
        if let Some(row) = rows.get_mut(r.id) {
            let mut t = r.timing;
            if t.median_s.is_none() {
                t.median_s = median(&t.times_s);
            }
            row.torch = Some(t);
        }
    }
    Ok(parsed.torch)
}

/// Time `f`: `warmup` unmeasured runs, then `repeats` measured ones (seconds each). A panic
/// becomes the row's error instead of ending the bench.
pub fn time_runs(warmup: usize, repeats: usize, mut f: impl FnMut()) -> Timing {
    let run = std::panic::AssertUnwindSafe(|| {
        for _ in 0..warmup {
            f();
        }
        (0..repeats.max(1))
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect::<Vec<_>>()
    });
    match std::panic::catch_unwind(run) {
        Ok(times) => Timing::from_times(times),
        Err(p) => Timing::failed(
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panicked".into()),
        ),
    }
}

#[cfg(feature = "flex")]
mod flex {
    //! The burn and ip2p columns: one op's module and inputs on burn-flex, run either way.

    use burn::backend::Flex;
    use burn::module::Param;
    use burn::nn::conv::{Conv2d, Conv2dConfig};
    use burn::nn::{
        GroupNorm, GroupNormConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig,
        PaddingConfig2d,
    };
    use burn::tensor::backend::Backend as _;
    use burn::tensor::{Distribution, Tensor};
    use ip2p_nn::AttentionImpl;
    use ip2p_nn::backend::{Backend, generic};

    use super::Op;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Imp {
        Burn,
        Ip2p,
    }

    /// Weights and inputs of one op, drawn once; both columns run on them.
    pub enum Prepared {
        Conv {
            conv: Conv2d<Flex>,
            x: Tensor<Flex, 4>,
            r: Option<Tensor<Flex, 4>>,
        },
        GroupNorm {
            norm: GroupNorm<Flex>,
            x: Tensor<Flex, 4>,
            silu: bool,
        },
        LayerNorm {
            norm: LayerNorm<Flex>,
            x: Tensor<Flex, 3>,
            eps: f64,
        },
        Linear {
            linear: Linear<Flex>,
            x: Tensor<Flex, 3>,
            r: Option<Tensor<Flex, 3>>,
        },
        Geglu {
            proj: Linear<Flex>,
            x: Tensor<Flex, 3>,
        },
        Attention {
            q: Tensor<Flex, 3>,
            k: Tensor<Flex, 3>,
            v: Tensor<Flex, 3>,
            heads: usize,
        },
    }

    fn randn<const D: usize>(dims: [usize; D]) -> Tensor<Flex, D> {
        Tensor::random(dims, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    /// A Linear as `ip2p_nn::load_safetensors` leaves it: the checkpoint's `[out, in]` values,
    /// Burn's `[in, out]` shape by a transposed view (what the models run on).
    fn as_loaded(mut linear: Linear<Flex>) -> Linear<Flex> {
        let out_in: Tensor<Flex, 2> = Tensor::from_data(
            linear.weight.val().transpose().to_data(),
            &Default::default(),
        );
        linear.weight = Param::from_tensor(out_in.transpose());
        linear
    }

    impl Prepared {
        pub fn new(op: &Op, seed: u64) -> Self {
            let device = Default::default();
            Flex::seed(&device, seed);
            match *op {
                Op::Conv2d {
                    batch,
                    in_channels,
                    out_channels,
                    height,
                    width,
                    kernel,
                    padding,
                    residual,
                } => {
                    let p = padding;
                    let conv = Conv2dConfig::new([in_channels, out_channels], [kernel, kernel])
                        .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
                        .with_bias(true)
                        .init(&device);
                    let (oh, ow) = (height + 2 * p + 1 - kernel, width + 2 * p + 1 - kernel);
                    Prepared::Conv {
                        conv,
                        x: randn([batch, in_channels, height, width]),
                        r: residual.then(|| randn([batch, out_channels, oh, ow])),
                    }
                }
                Op::GroupNorm {
                    batch,
                    channels,
                    height,
                    width,
                    groups,
                    eps,
                    silu,
                } => Prepared::GroupNorm {
                    norm: GroupNormConfig::new(groups, channels)
                        .with_epsilon(eps)
                        .init(&device),
                    x: randn([batch, channels, height, width]),
                    silu,
                },
                Op::LayerNorm {
                    batch,
                    tokens,
                    dim,
                    eps,
                } => Prepared::LayerNorm {
                    norm: LayerNormConfig::new(dim).with_epsilon(eps).init(&device),
                    x: randn([batch, tokens, dim]),
                    eps,
                },
                Op::Linear {
                    batch,
                    tokens,
                    in_features,
                    out_features,
                    bias,
                    residual,
                } => Prepared::Linear {
                    linear: as_loaded(
                        LinearConfig::new(in_features, out_features)
                            .with_bias(bias)
                            .init(&device),
                    ),
                    x: randn([batch, tokens, in_features]),
                    r: residual.then(|| randn([batch, tokens, out_features])),
                },
                Op::Geglu {
                    batch,
                    tokens,
                    in_features,
                    inner,
                } => Prepared::Geglu {
                    proj: as_loaded(LinearConfig::new(in_features, 2 * inner).init(&device)),
                    x: randn([batch, tokens, in_features]),
                },
                Op::Attention {
                    batch,
                    heads,
                    q_len,
                    kv_len,
                    head_dim,
                } => Prepared::Attention {
                    q: randn([batch, q_len, heads * head_dim]),
                    k: randn([batch, kv_len, heads * head_dim]),
                    v: randn([batch, kv_len, heads * head_dim]),
                    heads,
                },
            }
        }

        /// Run the op once (burn-flex is eager: the result is computed when this returns).
        pub fn run(&self, imp: Imp) {
            let burn = imp == Imp::Burn;
            match self {
                Prepared::Conv { conv, x, r } => {
                    let y = if burn {
                        generic::conv2d(conv, x.clone(), r.clone())
                    } else {
                        Flex::fused_conv2d(conv, x.clone(), r.clone())
                    };
                    std::hint::black_box(y);
                }
                Prepared::GroupNorm { norm, x, silu } => {
                    let y = if burn {
                        generic::group_norm(norm, x.clone(), *silu)
                    } else {
                        Flex::fused_group_norm(norm, x.clone(), *silu)
                    };
                    std::hint::black_box(y);
                }
                Prepared::LayerNorm { norm, x, eps } => {
                    let y = if burn {
                        generic::layer_norm(norm, x.clone(), *eps)
                    } else {
                        Flex::fused_layer_norm(norm, x.clone(), *eps)
                    };
                    std::hint::black_box(y);
                }
                Prepared::Linear { linear, x, r } => {
                    let y = if burn {
                        generic::linear(linear, x.clone(), r.clone())
                    } else {
                        Flex::fused_linear(linear, x.clone(), r.clone())
                    };
                    std::hint::black_box(y);
                }
                Prepared::Geglu { proj, x } => {
                    let y = if burn {
                        generic::geglu(proj, x.clone())
                    } else {
                        Flex::fused_geglu(proj, x.clone())
                    };
                    std::hint::black_box(y);
                }
                Prepared::Attention { q, k, v, heads } => {
                    // The model's choice (Burn's fused attention op) for the generic path.
                    let imp = AttentionImpl::default();
                    let (q, k, v) = (q.clone(), k.clone(), v.clone());
                    let y = if burn {
                        generic::attention(q, k, v, *heads, false, imp)
                    } else {
                        Flex::fused_attention(q, k, v, *heads, false, imp)
                    };
                    std::hint::black_box(y);
                }
            }
        }
    }

    pub fn kernels_isa() -> String {
        format!("{:?}", ip2p_kernels::isa::current())
    }
}

/// Run the op bench: the burn and ip2p columns here, then the torch column when `plan.python`
/// is set. `command` is recorded in the report.
#[cfg(feature = "flex")]
pub fn run(plan: &OpsPlan, command: String, out_dir: &Path) -> Result<OpsReport> {
    use indicatif::{ProgressBar, ProgressStyle};

    let started = std::time::Instant::now();
    let ticks_start = cpu_ticks();
    let started_at = format!("{:?}", std::time::SystemTime::now());
    let cases = selected(plan)?;
    let threads = rayon::current_num_threads();
    let (cpu_model, simd) = cpu_info();
    let mut notes = plan.notes.clone();

    let mut torch_version = None;
    let python = match &plan.python {
        None => None,
        Some(p) => match check_torch(p) {
            Ok(v) => {
                torch_version = Some(v);
                Some(p.clone())
            }
            Err(e) => {
                notes.push(format!("torch column skipped: {e:#}"));
                None
            }
        },
    };

    let skip_burn = |c: &OpCase| matches(&c.label(), &plan.skip_burn);
    let runs = cases.iter().map(|c| 2 - skip_burn(c) as u64).sum::<u64>() + python.is_some() as u64;
    let pb = if plan.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(runs)
    };
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len}  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.enable_steady_tick(std::time::Duration::from_millis(250));

    let mut rows = Vec::new();
    for case in cases {
        let (work, unit) = case.op.work();
        let prepared = flex::Prepared::new(&case.op, case.id as u64);
        let time = |imp: flex::Imp, name: &str| {
            pb.set_message(format!(
                "{name}: {} {} {}",
                case.model,
                case.layer,
                case.op.describe()
            ));
            let t = time_runs(plan.warmup, plan.repeats, || prepared.run(imp));
            pb.inc(1);
            t
        };
        let burn = (!skip_burn(&case)).then(|| time(flex::Imp::Burn, "burn"));
        let ip2p = Some(time(flex::Imp::Ip2p, "ip2p"));
        drop(prepared);
        rows.push(OpRow {
            case,
            unit,
            work,
            burn,
            ip2p,
            torch: None,
        });
    }

    if let Some(python) = &python {
        pb.set_message(format!(
            "torch: {} rows in {}",
            rows.len(),
            python.display()
        ));
        match run_torch(
            python,
            &mut rows,
            plan,
            threads,
            &out_dir.join("ops_shapes.json"),
        ) {
            Ok(v) => {
                torch_version = Some(v);
                notes.push(format!(
                    "torch: {} running tools/bench/ops_bench.py on {} (written by this run; rerun it alone with `--shapes`), float32, torch.inference_mode(), torch.set_num_threads({threads}).",
                    python.display(),
                    out_dir.join("ops_shapes.json").display()
                ));
            }
            Err(e) => notes.push(format!("torch column failed: {e:#}")),
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    if !plan.skip_burn.is_empty() {
        notes.push(if plan.skip_burn.iter().any(|p| p.trim().is_empty()) {
            "burn column skipped (--ops-skip-burn).".to_string()
        } else {
            format!(
                "burn column skipped on rows matching {:?} (--ops-skip-burn).",
                plan.skip_burn
            )
        });
    }
    notes.push(
        "Inputs and weights are random (Burn seeded per row; torch seed 0); the ops' speed does not depend on the values. The UNet runs at batch 3 (classifier-free guidance), the VAE at batch 1; resnet conv2 rows add the shortcut as the residual, as the model does. Processes run one after another (torch after the Rust columns), never at the same time."
            .to_string(),
    );
    Ok(OpsReport {
        command,
        started: started_at,
        wall_s: started.elapsed().as_secs_f64(),
        host: OpsHost {
            cpu_model,
            simd,
            threads,
            kernels_isa: flex::kernels_isa(),
            torch: torch_version,
            python: python.map(|p| p.display().to_string()),
            others_cpu_share: ticks_start
                .zip(cpu_ticks())
                .and_then(|(a, b)| others_share(a, b)),
        },
        warmup: plan.warmup,
        repeats: plan.repeats,
        notes,
        rows,
    })
}

/// Without the `flex` feature there is no CPU backend to time.
#[cfg(not(feature = "flex"))]
pub fn run(_plan: &OpsPlan, _command: String, _out_dir: &Path) -> Result<OpsReport> {
    bail!("--ops needs the flex feature (the CPU backend): run `cargo xtask bench --ops`")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(cases: &'a [OpCase], layer: &str, model: &str) -> &'a OpCase {
        cases
            .iter()
            .find(|c| c.layer == layer && c.model == model)
            .unwrap_or_else(|| panic!("no {model} {layer}"))
    }

    #[test]
    fn shapes_at_256() {
        let cases = cases(256, 256).unwrap();
        assert_eq!(cases.len(), 23);
        for (i, c) in cases.iter().enumerate() {
            assert_eq!(c.id, i);
        }
        let labels: std::collections::HashSet<String> = cases.iter().map(|c| c.label()).collect();
        assert_eq!(labels.len(), cases.len(), "labels are unique");
        let c = find(&cases, "resnet conv2, level 0", "unet");
        assert_eq!(c.op.describe(), "3×3 320→320 @32² b3 +res");
        // 2 · (3 · 320 · 32 · 32) outputs · (320 · 9) multiply-adds each.
        assert_eq!(c.op.work(), (5_662_310_400.0, Unit::Gflops));
        let c = find(&cases, "resnet conv2, level 3", "unet");
        assert_eq!(c.op.describe(), "3×3 1280→1280 @4² b3 +res");
        let c = find(&cases, "transformer proj_in", "unet");
        assert_eq!(c.op.work().0, 2.0 * 3.0 * 320.0 * 1024.0 * 320.0);
        let c = find(&cases, "attn1 (self), level 0", "unet");
        assert_eq!(c.op.describe(), "b3 h8 1024×1024 d40");
        assert_eq!(c.op.work().0, 4.0 * 24.0 * 1024.0 * 1024.0 * 40.0);
        let c = find(&cases, "attn2 (cross), level 0", "unet");
        assert_eq!(c.op.describe(), "b3 h8 1024×77 d40");
        let c = find(&cases, "ff GEGLU proj, level 0", "unet");
        assert_eq!(c.op.work().0, 2.0 * 3072.0 * 320.0 * 2560.0);
        let c = find(&cases, "resnet norm1, 128 ch", "vae");
        assert_eq!(c.op.describe(), "[1,128,256,256] g32 +SiLU");
        // Read once, written once, f32.
        assert_eq!(c.op.work(), (8.0 * 128.0 * 65536.0, Unit::Gbytes));
        let c = find(&cases, "mid attention", "vae");
        assert_eq!(c.op.describe(), "b1 h1 1024×1024 d512");
    }

    #[test]
    fn shapes_at_512_double_every_side() {
        let small = cases(256, 256).unwrap();
        let big = cases(512, 512).unwrap();
        assert_eq!(small.len(), big.len());
        for (s, b) in small.iter().zip(&big) {
            let (ws, u) = s.op.work();
            let (wb, _) = b.op.work();
            // 4× the pixels; attention over 4× the queries and (self) 4× the keys.
            let expected = match b.op {
                Op::Attention { kv_len: 77, .. } => 4.0,
                Op::Attention { .. } => 16.0,
                _ => 4.0,
            };
            assert_eq!(wb / ws, expected, "{} {}", b.layer, b.op.describe());
            assert_eq!(s.op.work().1, u);
        }
        assert_eq!(
            find(&big, "resnet conv2, 128 ch", "vae").op.describe(),
            "3×3 128→128 @512² b1 +res"
        );
        assert!(cases(300, 256).is_err());
        assert_eq!(
            find(&cases(384, 256).unwrap(), "resnet conv2, level 1", "unet")
                .op
                .describe(),
            "3×3 640→640 @24×16 b3 +res"
        );
    }

    #[test]
    fn request_json_has_the_fields_the_script_reads() {
        let cases = cases(256, 256).unwrap();
        let req = TorchRequest {
            threads: 2,
            warmup: 1,
            repeats: 5,
            seed: 0,
            ops: &cases[..1],
        };
        let v: serde_json::Value = serde_json::to_value(&req).unwrap();
        let op = &v["ops"][0];
        assert_eq!(op["op"], "conv2d");
        for k in [
            "id",
            "batch",
            "in_channels",
            "out_channels",
            "height",
            "width",
            "kernel",
            "padding",
            "residual",
        ] {
            assert!(!op[k].is_null(), "{k}");
        }
        assert_eq!(v["threads"], 2);
    }

    #[test]
    fn filter_and_cpu_flags() {
        let plan = OpsPlan {
            resolutions: vec![(256, 256)],
            warmup: 1,
            repeats: 5,
            filter: vec!["Attention".into()],
            skip_burn: vec![],
            python: None,
            quiet: true,
            notes: vec![],
        };
        let rows = selected(&plan).unwrap();
        assert_eq!(rows.len(), 5);
        assert!(rows.iter().all(|r| r.op.kind() == "attention"));
        let none = OpsPlan {
            filter: vec!["nothing like this".into()],
            ..plan
        };
        assert!(selected(&none).is_err());
        let (model, simd) = cpu_info_from(
            "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx avx2 fma avx512f avx512bw avx512_vnni\n",
        );
        assert_eq!(model, "Some CPU");
        assert_eq!(simd, "AVX-512 (F, BW, VNNI), AVX2, FMA");
    }

    #[test]
    fn others_cpu_share() {
        // 200 busy ticks of 400, 100 of them ours.
        assert_eq!(others_share((100, 1000, 10), (300, 1400, 110)), Some(0.25));
        assert_eq!(others_share((100, 1000, 10), (100, 1000, 10)), None);
        if cfg!(target_os = "linux") {
            let (busy, total, _) = cpu_ticks().expect("/proc/stat");
            assert!(busy <= total);
        }
    }

    #[test]
    fn report_renders_ratios() {
        let case = cases(256, 256).unwrap().remove(0);
        let (work, unit) = case.op.work();
        let t = |s: f64| Some(Timing::from_times(vec![s, s * 2.0, s / 2.0]));
        let row = OpRow {
            case,
            unit,
            work,
            burn: t(0.4),
            ip2p: t(0.1),
            torch: t(0.2),
        };
        assert_eq!(row.burn_to_ip2p(), Some(4.0));
        assert_eq!(row.ip2p_vs_torch(), Some(0.5));
        let report = OpsReport {
            command: "bench --ops".into(),
            started: String::new(),
            wall_s: 1.0,
            host: OpsHost {
                cpu_model: "cpu".into(),
                simd: "AVX2".into(),
                threads: 2,
                kernels_isa: "Avx2".into(),
                torch: Some("2".into()),
                python: None,
                others_cpu_share: Some(0.0),
            },
            warmup: 1,
            repeats: 3,
            notes: vec![],
            rows: vec![row],
        };
        let md = report.markdown();
        assert!(md.contains("| 400 | 100 | 200 | GFLOP/s |"), "{md}");
        assert!(md.contains("| 0.50 | 4.00× |"), "{md}");
    }
}
