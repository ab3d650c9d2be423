//! The report: Markdown on stdout and in `report.md`, JSON, CSV and an SVG chart.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::cell::CellResult;

const MIB: f64 = 1024.0 * 1024.0;

fn mib(b: u64) -> String {
    format!("{:.0}", b as f64 / MIB)
}

fn opt_s(v: Option<f64>) -> String {
    v.map_or("–".into(), |x| format!("{x:.3}"))
}

fn opt_mib(v: Option<u64>) -> String {
    v.map_or("–".into(), mib)
}

/// Everything the run produced.
#[derive(Debug, Serialize)]
pub struct Report {
    pub command: String,
    pub started: String,
    pub wall_s: f64,
    pub host: Host,
    pub notes: Vec<String>,
    pub cells: Vec<CellResult>,
}

#[derive(Debug, Serialize)]
pub struct Host {
    pub cpus: usize,
    pub os: String,
    pub features: Vec<&'static str>,
}

impl Host {
    pub fn detect() -> Self {
        let mut features = Vec::new();
        if cfg!(feature = "flex") {
            features.push("flex");
        }
        if cfg!(feature = "wgpu") {
            features.push("wgpu");
        }
        if cfg!(feature = "cuda") {
            features.push("cuda");
        }
        if cfg!(feature = "autotune") {
            features.push("autotune");
        }
        Self {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            os: std::env::consts::OS.to_string(),
            features,
        }
    }
}

/// The backend, with the compute dtype when it is not f32.
fn backend(c: &CellResult) -> String {
    match c.shape.dtype {
        crate::parity::Precision::F32 => c.backend.clone(),
        d => format!("{} {}", c.backend, d.name()),
    }
}

fn shape(c: &CellResult) -> String {
    format!("{}×{}", c.shape.width, c.shape.height)
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# ip2p benchmark\n");
        let _ = writeln!(
            s,
            "`{}` — {} CPUs, features {:?}, run took {:.1} s.\n",
            self.command, self.host.cpus, self.host.features, self.wall_s
        );
        let _ = writeln!(
            s,
            "Times are medians over the repeats after warm-up (first run apart); built-in presets have random weights. Stages: text = tokenize + text encode; denoise = all steps (per step after the slash).\n"
        );
        let _ = writeln!(s, "## Time (s)\n");
        let _ = writeln!(
            s,
            "| backend | model | path | size | batch | steps | runs | total | first run | text | VAE enc | denoise (/step, it/s) | VAE dec | saves vs full-cycle |"
        );
        let _ = writeln!(
            s,
            "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"
        );
        for c in &self.cells {
            let head = format!(
                "| {} | {} | {} | {} | {} | {} | {}+{} |",
                backend(c),
                c.model,
                c.path.name(),
                shape(c),
                c.shape.batch,
                c.shape.steps,
                c.shape.warmup,
                c.shape.repeats
            );
            match (&c.timing, c.ok()) {
                (Some(t), true) => {
                    let per = if t.step_s.is_empty() {
                        0.0
                    } else {
                        t.denoise_s / t.step_s.len() as f64
                    };
                    let saves = c.saves.as_ref().map_or("–".into(), |v| {
                        format!("{:.3} s ({:.0}%)", v.time_s, v.time_pct)
                    });
                    let _ = writeln!(
                        s,
                        "{head} {:.3} | {} | {} | {} | {:.3} ({per:.3}, {:.2}) | {} | {saves} |",
                        t.total_s,
                        opt_s(c.first_run_s),
                        opt_s(t.text_s),
                        opt_s(t.vae_encode_s),
                        t.denoise_s,
                        if per > 0.0 { 1.0 / per } else { 0.0 },
                        opt_s(t.vae_decode_s),
                    );
                }
                _ => {
                    let _ = writeln!(
                        s,
                        "{head} **{}**: {} | | | | | | |",
                        c.status,
                        c.reason.as_deref().unwrap_or("").replace('|', "/")
                    );
                }
            }
        }
        let mut loads = Vec::new();
        for c in self.cells.iter().filter(|c| c.ok()) {
            let Some(l) = &c.load else { continue };
            let key = (backend(c), c.model.clone());
            if !loads.iter().any(|(k, _, _)| *k == key) {
                loads.push((key, *l, c.load_rss_peak_bytes));
            }
        }
        if !loads.is_empty() {
            let _ = writeln!(s, "\n## Model load\n");
            let _ = writeln!(
                s,
                "Seconds per part (random presets: drawing their weights), and the process's peak resident set while loading (mapped weight files count once touched, as for diffusers).\n"
            );
            let _ = writeln!(
                s,
                "| backend | model | total s | UNet s | VAE s | text encoder s | RSS peak while loading (MiB) |"
            );
            let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|");
            for ((b, m), l, rss) in &loads {
                let _ = writeln!(
                    s,
                    "| {b} | {m} | {:.2} | {:.2} | {} | {} | {} |",
                    l.total_s,
                    l.unet_s,
                    opt_s(l.vae_s),
                    opt_s(l.text_s),
                    opt_mib(*rss)
                );
            }
        }
        let _ = writeln!(s, "\n## Peak memory (MiB)\n");
        let _ = writeln!(
            s,
            "From the pipeline's probe ({}). `weights`: the parts the path uses (the VAE not for latent-only); `activations`: the run's peak above what was in use when it started; `path peak` = weights + activations, what a process loading only those parts needs (the savings compare these). Per-stage columns: the probe's peak in that stage, all resident weights included. RSS: the process's peak resident set over the measured runs.\n",
            self.cells
                .iter()
                .find_map(|c| c.memory.as_ref().map(|m| m.source.clone()))
                .unwrap_or_default()
        );
        let _ = writeln!(
            s,
            "| backend | model | path | size | batch | weights | activations | path peak | text | VAE enc | denoise | VAE dec | RSS peak | saves vs full-cycle |"
        );
        let _ = writeln!(
            s,
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for c in self.cells.iter().filter(|c| c.ok()) {
            let Some(m) = &c.memory else { continue };
            let saves = c.saves.as_ref().map_or("–".into(), |v| {
                format!("{} MiB ({:.0}%)", v.peak_bytes / (1 << 20), v.peak_pct)
            });
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {saves} |",
                backend(c),
                c.model,
                c.path.name(),
                shape(c),
                c.shape.batch,
                mib(m.weights_bytes),
                mib(m.activation_peak_bytes),
                mib(m.path_peak_bytes),
                opt_mib(m.text_peak_bytes),
                opt_mib(m.vae_encode_peak_bytes),
                mib(m.denoise_peak_bytes),
                opt_mib(m.vae_decode_peak_bytes),
                opt_mib(m.rss_peak_bytes),
            );
        }
        if self.cells.iter().any(|c| c.reference.is_some()) {
            let _ = writeln!(
                s,
                "\n## ip2p vs diffusers (same cells, same machine, one after the other)\n"
            );
            let _ = writeln!(
                s,
                "Ratios are ip2p / diffusers (below 1: ip2p is faster or smaller). Peak memory compares peak RSS of each process over the measured runs.\n"
            );
            let _ = writeln!(
                s,
                "| backend | model | path | size | batch | ip2p s | diffusers s | time ratio | ip2p RSS MiB | diffusers RSS MiB | RSS ratio | diffusers first run s |"
            );
            let _ = writeln!(
                s,
                "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            for c in &self.cells {
                let Some(r) = &c.reference else { continue };
                let t = c.timing.as_ref().map(|t| t.total_s);
                let rss = c.memory.as_ref().and_then(|m| m.rss_peak_bytes);
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    backend(c),
                    c.model,
                    c.path.name(),
                    shape(c),
                    c.shape.batch,
                    opt_s(t),
                    opt_s(r.total_s),
                    r.time_ratio.map_or("–".into(), |x| format!("{x:.2}")),
                    opt_mib(rss),
                    opt_mib(r.peak_rss_bytes),
                    r.rss_ratio.map_or("–".into(), |x| format!("{x:.2}")),
                    opt_s(r.first_run_s),
                );
                if let Some(e) = &r.error {
                    let _ = writeln!(
                        s,
                        "|  |  | {} | diffusers: {} | | | | | | | | |",
                        c.path.name(),
                        e.replace('|', "/")
                    );
                }
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(s, "\n## Notes\n");
            for n in &self.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        s
    }

    pub fn csv(&self) -> String {
        let mut s = String::from(
            "backend,dtype,device,model,path,width,height,batch,steps,warmup,repeats,status,reason,total_s,first_run_s,text_s,vae_encode_s,denoise_s,step_s,vae_decode_s,memory_source,baseline_bytes,weights_bytes,peak_bytes,activation_peak_bytes,path_peak_bytes,text_peak_bytes,vae_encode_peak_bytes,denoise_peak_bytes,vae_decode_peak_bytes,rss_peak_bytes,saves_time_s,saves_time_pct,saves_peak_bytes,saves_peak_pct,ref_total_s,ref_peak_rss_bytes,ref_time_ratio,ref_rss_ratio\n",
        );
        let f = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x:.6}"));
        let u = |v: Option<u64>| v.map_or(String::new(), |x| x.to_string());
        let q = |t: &str| format!("\"{}\"", t.replace('"', "'"));
        for c in &self.cells {
            let t = c.timing.as_ref();
            let m = c.memory.as_ref();
            let r = c.reference.as_ref();
            let row = [
                c.backend.clone(),
                c.shape.dtype.name().into(),
                q(&c.device),
                q(&c.model),
                c.path.name().into(),
                c.shape.width.to_string(),
                c.shape.height.to_string(),
                c.shape.batch.to_string(),
                c.shape.steps.to_string(),
                c.shape.warmup.to_string(),
                c.shape.repeats.to_string(),
                c.status.clone(),
                q(c.reason.as_deref().unwrap_or("")),
                f(t.map(|t| t.total_s)),
                f(c.first_run_s),
                f(t.and_then(|t| t.text_s)),
                f(t.and_then(|t| t.vae_encode_s)),
                f(t.map(|t| t.denoise_s)),
                t.map_or(String::new(), |t| {
                    t.step_s
                        .iter()
                        .map(|x| format!("{x:.6}"))
                        .collect::<Vec<_>>()
                        .join(";")
                }),
                f(t.and_then(|t| t.vae_decode_s)),
                q(m.map_or("", |m| m.source.as_str())),
                u(m.map(|m| m.baseline_bytes)),
                u(m.map(|m| m.weights_bytes)),
                u(m.map(|m| m.peak_bytes)),
                u(m.map(|m| m.activation_peak_bytes)),
                u(m.map(|m| m.path_peak_bytes)),
                u(m.and_then(|m| m.text_peak_bytes)),
                u(m.and_then(|m| m.vae_encode_peak_bytes)),
                u(m.map(|m| m.denoise_peak_bytes)),
                u(m.and_then(|m| m.vae_decode_peak_bytes)),
                u(m.and_then(|m| m.rss_peak_bytes)),
                f(c.saves.as_ref().map(|s| s.time_s)),
                f(c.saves.as_ref().map(|s| s.time_pct)),
                c.saves
                    .as_ref()
                    .map_or(String::new(), |s| s.peak_bytes.to_string()),
                f(c.saves.as_ref().map(|s| s.peak_pct)),
                f(r.and_then(|r| r.total_s)),
                u(r.and_then(|r| r.peak_rss_bytes)),
                f(r.and_then(|r| r.time_ratio)),
                f(r.and_then(|r| r.rss_ratio)),
            ];
            s += &row.join(",");
            s.push('\n');
        }
        s
    }

    /// A horizontal stacked-bar chart: one bar per cell, split into stages.
    pub fn svg(&self) -> String {
        let cells: Vec<&CellResult> = self.cells.iter().filter(|c| c.ok()).collect();
        let (left, right, top, row, bar) = (330.0, 160.0, 60.0, 26.0, 18.0);
        let plot_w = 600.0;
        let width = left + plot_w + right;
        let height = top + row * cells.len().max(1) as f64 + 70.0;
        let max_t = cells
            .iter()
            .filter_map(|c| c.timing.as_ref().map(|t| t.total_s))
            .fold(0.0f64, f64::max)
            .max(1e-9);
        let scale = plot_w / max_t;
        let colors = [
            ("text", "#8c6bb1"),
            ("VAE encode", "#41b6c4"),
            ("denoise", "#fd8d3c"),
            ("VAE decode", "#78c679"),
            ("other", "#bdbdbd"),
        ];
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="24" font-size="16" text-anchor="middle">ip2p: median wall time per cell, by stage (s)</text>"#,
            width / 2.0
        );
        for (i, (name, color)) in colors.iter().enumerate() {
            let x = left + i as f64 * 120.0;
            let _ = writeln!(
                s,
                r#"<rect x="{x}" y="36" width="12" height="12" fill="{color}"/><text x="{}" y="46">{name}</text>"#,
                x + 16.0
            );
        }
        for (i, c) in cells.iter().enumerate() {
            let Some(t) = &c.timing else { continue };
            let y = top + i as f64 * row;
            let label = format!(
                "{} {} {} {} b{}",
                backend(c),
                c.model,
                c.path.name(),
                shape(c),
                c.shape.batch
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                left - 8.0,
                y + bar - 4.0,
                xml(&label)
            );
            let parts = [
                t.text_s.unwrap_or(0.0),
                t.vae_encode_s.unwrap_or(0.0),
                t.denoise_s,
                t.vae_decode_s.unwrap_or(0.0),
            ];
            let other = (t.total_s - parts.iter().sum::<f64>()).max(0.0);
            let mut x = left;
            for (v, (_, color)) in parts.iter().chain([other].iter()).zip(colors.iter()) {
                let w = v * scale;
                if w > 0.0 {
                    let _ = writeln!(
                        s,
                        r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{bar}" fill="{color}"/>"#
                    );
                }
                x += w;
            }
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}">{:.3} s</text>"#,
                x + 6.0,
                y + bar - 4.0,
                t.total_s
            );
        }
        let axis_y = top + row * cells.len().max(1) as f64 + 10.0;
        let _ = writeln!(
            s,
            r#"<line x1="{left}" y1="{axis_y}" x2="{}" y2="{axis_y}" stroke="black"/>"#,
            left + plot_w
        );
        for k in 0..=4 {
            let v = max_t * k as f64 / 4.0;
            let x = left + v * scale;
            let _ = writeln!(
                s,
                r#"<line x1="{x:.1}" y1="{axis_y}" x2="{x:.1}" y2="{}" stroke="black"/><text x="{x:.1}" y="{}" text-anchor="middle">{v:.2}</text>"#,
                axis_y + 5.0,
                axis_y + 20.0
            );
        }
        s += "</svg>\n";
        s
    }

    /// Write report.md, report.json, report.csv and chart.svg into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let write = |name: &str, text: String| {
            let p = dir.join(name);
            // Atomic: an interrupted bench leaves the previous report, not half of one.
            ip2p_io::write(&p, text.as_bytes()).map_err(anyhow::Error::from)
        };
        write("report.md", self.markdown())?;
        write("report.json", serde_json::to_string_pretty(self)?)?;
        write("report.csv", self.csv())?;
        write("chart.svg", self.svg())?;
        Ok(())
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
