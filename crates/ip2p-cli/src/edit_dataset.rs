//! `ip2p edit-dataset`: edit every item of a manifest, as one shard of many.
//!
//! The manifest, shard choice, seeds, atomic outputs and results live in `ip2p-dataset`; this
//! module runs the model. Three threads: one reads and resizes the next groups' images, the main
//! one runs the model (loaded once), one encodes, hashes and writes the outputs and results.
//! Items are edited in their batch group (`--batch` consecutive manifest items; within a group,
//! items that share size, steps and guidance run as one batch), whatever the shard, so the same
//! manifest and `--batch` give the same bytes however it is sharded or resumed.

use std::collections::{HashMap, HashSet};
use std::io::Cursor;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::{DType, Tensor};
use clap::Args;
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};
use ip2p_dataset::output::sha256_hex;
use ip2p_dataset::results::read_results;
use ip2p_dataset::{
    ItemResult, Manifest, OutputDir, PromptSource, ResultsFile, Shard, Status, groups, item_seed,
};
use ip2p_nn::Backend;
use ip2p_pipeline::{EditOptions, Generator, Ip2pModel, LoadOptions, MemoryProbe, Prompts};
use ip2p_pipeline::{RunSettings, StepInfo};
use ip2p_sched::SchedulerKind;
use ip2p_vae::image_io::{ResizeRule, default_max_pixels, load_image_limited, resize_for_vae};
use ip2p_vae::{VaeConfig, images_to_tensor, tensor_to_images};

use crate::edit::Resize;
use crate::interrupt::Interrupt;

#[derive(Debug, Args)]
pub struct EditDatasetArgs {
    /// A diffusers InstructPix2Pix folder.
    #[arg(long, required_unless_present = "merge")]
    pub model: Option<PathBuf>,
    /// JSON Lines (.jsonl) or Parquet (.parquet): id, image (relative to the manifest), prompt
    /// or prompt_ids; optional seed, steps, guidance, image_guidance; other columns are kept.
    #[arg(long)]
    pub manifest: PathBuf,
    /// Output folder: {id}.png per item and shard-{i}-of-{n}.jsonl per shard.
    #[arg(long, required_unless_present = "merge")]
    pub output: Option<PathBuf>,
    /// Check that every manifest item in DIR has an output and write DIR/results.jsonl.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["output", "model"])]
    pub merge: Option<PathBuf>,
    /// This process's shard (default: JOB_COMPLETION_INDEX, SLURM_ARRAY_TASK_ID or RANK).
    #[arg(long)]
    pub shard_index: Option<usize>,
    /// Number of shards (default: SLURM_ARRAY_TASK_COUNT or WORLD_SIZE; needed with
    /// JOB_COMPLETION_INDEX).
    #[arg(long)]
    pub num_shards: Option<usize>,
    /// Items per batch group: consecutive manifest items edited together. On the CPU an item's
    /// result does not depend on its group; on GPU backends keep it fixed across one run.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Steps, unless the item's `steps` column says otherwise.
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Text guidance, unless the item's `guidance` column says otherwise.
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// Image guidance, unless the item's `image_guidance` column says otherwise.
    #[arg(long, default_value_t = 1.5)]
    pub image_guidance: f64,
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// euler-ancestral (the model's own), euler, ddim, ddpm, dpm-solver++.
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Global seed: an item without a `seed` column gets one derived from this and its id.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub runtime: crate::model_args::RuntimeArgs,
    #[arg(long, value_enum, default_value_t = Resize::Diffusers)]
    pub resize: Resize,
    /// Items whose image has more pixels than this fail (read from the file's header, before
    /// decoding). Default: as `ip2p edit --max-pixels`.
    #[arg(long)]
    pub max_pixels: Option<u64>,
    /// Activation memory budget in MiB: a batch runs in chunks sized by resolution.
    #[arg(long)]
    pub memory_budget_mib: Option<u64>,
    /// Also write each item's final latents, {id}.safetensors (tensor `latents`).
    #[arg(long)]
    pub save_latents: bool,
    /// Stop at the first bad item (missing or corrupt image, empty prompt, bad token ids)
    /// instead of reporting it in the results and going on.
    #[arg(long)]
    pub strict: bool,
    /// Edit again items a previous run reported as failed.
    #[arg(long)]
    pub retry_failed: bool,
    #[arg(long)]
    pub quiet: bool,
    /// Test hook: after this many outputs, leave a half-written temporary file and exit with
    /// status 3, as a killed process would.
    #[arg(long, hide = true)]
    pub test_stop_after: Option<usize>,
}

pub fn run(args: &EditDatasetArgs) -> Result<()> {
    if let Some(dir) = &args.merge {
        return merge(args, dir);
    }
    crate::backend::dispatch!(args.runtime.backend, args.runtime.dtype, |device, probe| {
        run_shard::<B>(args, device, probe)
    })
}

fn merge(args: &EditDatasetArgs, dir: &std::path::Path) -> Result<()> {
    let manifest = Manifest::read(&args.manifest)?;
    let out = OutputDir::open(dir)?;
    let s = ip2p_dataset::merge(&manifest, &out)?;
    println!(
        "{} items: {} edited, {} failed; {} results file(s) merged into {}{}",
        s.total,
        s.ok,
        s.failed,
        s.shard_files.len(),
        s.path.display(),
        if s.stray > 0 {
            format!(" ({} lines for ids not in the manifest ignored)", s.stray)
        } else {
            String::new()
        }
    );
    Ok(())
}

/// An item's image, read and resized on the loader thread, or why it could not be.
type Loaded = std::result::Result<RgbImage, String>;

/// What the writer thread does with one item.
enum Job {
    Edited {
        result: Box<ItemResult>,
        image: RgbImage,
        latents: Option<(Vec<f32>, Vec<usize>)>,
    },
    Failed(Box<ItemResult>),
}

fn run_shard<B: Backend>(
    args: &EditDatasetArgs,
    device: B::Device,
    probe: &dyn MemoryProbe,
) -> Result<()> {
    let (Some(model_dir), Some(output)) = (&args.model, &args.output) else {
        bail!("give --model and --output (or --merge DIR)");
    };
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    // Ctrl-C: the running batch stops at its next step; items already edited are written.
    let interrupt = Interrupt::install();
    let manifest = Manifest::read(&args.manifest)?;
    let shard = Shard::resolve(args.shard_index, args.num_shards, |k| std::env::var(k).ok())?;
    let out = OutputDir::create(output)?;
    let range = shard.items(manifest.items.len(), args.batch);
    let shard_groups = groups(range.clone(), args.batch);

    // What earlier runs did: outputs present, failures recorded (in any shard's file, in case
    // the shard count changed), and outputs a killed run wrote without their results line.
    let (mut results, _) = ResultsFile::open(out.results_path(&shard))?;
    let mut recorded: HashMap<String, Status> = HashMap::new();
    for entry in std::fs::read_dir(out.root())? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("shard-") && name.ends_with(".jsonl") {
            for r in read_results(&path)? {
                let keep = recorded.get(&r.id) == Some(&Status::Ok);
                if !keep {
                    recorded.insert(r.id, r.status);
                }
            }
        }
    }
    let items = &manifest.items;
    let done = |i: usize| out.is_done(&items[i].id, args.save_latents);
    let finished = |i: usize| {
        done(i) || (!args.retry_failed && recorded.get(&items[i].id) == Some(&Status::Failed))
    };
    let pending: Vec<Range<usize>> = shard_groups
        .iter()
        .filter(|g| (*g).clone().any(|i| !finished(i)))
        .cloned()
        .collect();
    let ids: HashSet<&str> = range.clone().map(|i| items[i].id.as_str()).collect();
    let removed = out.remove_partials(&ids)?;
    let recovered = recover_lines(
        args,
        &manifest,
        &out,
        range.clone(),
        &recorded,
        &mut results,
    )?;
    let to_do: usize = pending
        .iter()
        .flat_map(|g| g.clone())
        .filter(|&i| !finished(i))
        .count();
    eprintln!("{shard}");
    eprintln!(
        "items {}..{} of {} in {} group(s) of up to {}: {} to edit, {} already done{}{}",
        range.start,
        range.end,
        items.len(),
        shard_groups.len(),
        args.batch,
        to_do,
        range.len() - to_do,
        if removed > 0 {
            format!(", {removed} partial file(s) of a stopped run removed")
        } else {
            String::new()
        },
        if recovered > 0 {
            format!(", {recovered} results line(s) recovered")
        } else {
            String::new()
        },
    );
    if pending.is_empty() {
        return Ok(());
    }

    let vae_config = VaeConfig::load(model_dir.join("vae").join("config.json"))
        .with_context(|| format!("loading {}", model_dir.display()))?;
    let factor = vae_config.downscale_factor() as u32;
    let rule = match args.resize {
        Resize::Diffusers => ResizeRule::Diffusers,
        Resize::Original => ResizeRule::Ip2p { resolution: 512 },
    };
    let kind = args
        .scheduler
        .as_deref()
        .map(SchedulerKind::from_name)
        .transpose()?;
    let options = args.runtime.apply(LoadOptions::default());
    let t = Instant::now();
    let model = Ip2pModel::<B>::load(model_dir, &device, &options)
        .with_context(|| format!("loading {}", model_dir.display()))?;
    if !args.quiet {
        eprintln!("model loaded in {:.1} s", t.elapsed().as_secs_f64());
    }

    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(to_do as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "[{bar:30}] {pos}/{len} items, {per_sec}, {elapsed} (eta {eta})",
        )?
        .progress_chars("=> "),
    );

    let started = Instant::now();
    let stats = std::thread::scope(|scope| -> Result<Stats> {
        // Loader: the next groups' images, two groups ahead of the model.
        let (load_tx, load_rx) = mpsc::sync_channel::<(Range<usize>, Vec<Loaded>)>(2);
        let pending_ref = &pending;
        let max_pixels = args.max_pixels.unwrap_or_else(default_max_pixels);
        scope.spawn(move || {
            for g in pending_ref {
                let images = g
                    .clone()
                    .map(|i| {
                        load_image_limited(&items[i].image_path, max_pixels)
                            .and_then(|img| resize_for_vae(&img, rule, factor))
                            .map_err(|e| e.to_string())
                    })
                    .collect();
                if load_tx.send((g.clone(), images)).is_err() {
                    return;
                }
            }
        });
        // Writer: encode, hash, write atomically, append the results line.
        let (write_tx, write_rx) = mpsc::sync_channel::<Job>(2 * args.batch);
        let out_ref = &out;
        let results_ref = &mut results;
        let bar_ref = &bar;
        let stop_after = args.test_stop_after;
        let writer =
            scope.spawn(move || write_all(write_rx, out_ref, results_ref, bar_ref, stop_after));

        let mut edited = 0;
        let mut failed = 0;
        'groups: for (group, images) in load_rx {
            if interrupt.requested() {
                break;
            }
            let t = Instant::now();
            let mut ok = Vec::new();
            for (i, image) in group.clone().zip(images) {
                // Whether an item joins its batch depends on the item alone (never on whether
                // it is already done), so a group's batches are the same in every run.
                match image.and_then(|img| check_prompt(&model, &items[i].prompt).map(|()| img)) {
                    Ok(img) => ok.push((i, img)),
                    Err(_) if finished(i) => {}
                    Err(reason) => {
                        if args.strict {
                            bail!(
                                "{}:{}: item {:?}: {reason}",
                                manifest.path.display(),
                                items[i].line,
                                items[i].id
                            );
                        }
                        failed += 1;
                        let r = record(args, &items[i], i, Status::Failed, Some(reason));
                        if write_tx.send(Job::Failed(Box::new(r))).is_err() {
                            break 'groups;
                        }
                    }
                }
            }
            // Batches: items of the group that share size, steps and guidance, in order.
            let mut batches: Vec<(BatchKey, Vec<(usize, RgbImage)>)> = Vec::new();
            for (i, img) in ok {
                let key = key(args, &items[i], &img);
                match batches.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, members)) => members.push((i, img)),
                    None => batches.push((key, vec![(i, img)])),
                }
            }
            let n_items: usize = batches.iter().map(|(_, m)| m.len()).sum();
            for (key, members) in batches {
                let outcome =
                    edit_batch(args, &model, kind, probe, &key, items, &members, &interrupt);
                let (images, latents) = match outcome {
                    Ok(v) => v,
                    Err(_) if interrupt.requested() => break 'groups,
                    Err(reason) => {
                        // A batch the model refuses (e.g. token ids out of range): each item
                        // is reported; the shard goes on.
                        for (i, _) in &members {
                            if finished(*i) {
                                continue;
                            }
                            if args.strict {
                                bail!(
                                    "{}:{}: item {:?}: {reason:#}",
                                    manifest.path.display(),
                                    items[*i].line,
                                    items[*i].id
                                );
                            }
                            failed += 1;
                            let r = record(
                                args,
                                &items[*i],
                                *i,
                                Status::Failed,
                                Some(format!("{reason:#}")),
                            );
                            if write_tx.send(Job::Failed(Box::new(r))).is_err() {
                                break 'groups;
                            }
                        }
                        continue;
                    }
                };
                let seconds = t.elapsed().as_secs_f64() / n_items.max(1) as f64;
                for (k, ((i, _), image)) in members.iter().zip(images).enumerate() {
                    if finished(*i) {
                        continue;
                    }
                    let mut r = record(args, &items[*i], *i, Status::Ok, None);
                    r.seconds = Some(seconds);
                    let latents = latents.as_ref().map(|(values, shape)| {
                        let per = values.len() / members.len();
                        let mut s = shape.clone();
                        s[0] = 1;
                        (values[k * per..(k + 1) * per].to_vec(), s)
                    });
                    edited += 1;
                    if write_tx
                        .send(Job::Edited {
                            result: Box::new(r),
                            image,
                            latents,
                        })
                        .is_err()
                    {
                        // The writer stopped on an error: it is returned below.
                        break 'groups;
                    }
                }
            }
        }
        drop(write_tx);
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("the writer thread panicked"))??;
        Ok(Stats { edited, failed })
    })?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{shard}: {} edited, {} failed in {:.1} s ({:.3} items/s); results in {}",
        stats.edited,
        stats.failed,
        secs,
        stats.edited as f64 / secs.max(1e-9),
        results.path().display()
    );
    interrupt.check()
}

struct Stats {
    edited: usize,
    failed: usize,
}

/// What items must share to run as one batch: size, steps and guidance (bit patterns).
#[derive(Debug, Clone, PartialEq)]
struct BatchKey {
    width: u32,
    height: u32,
    steps: usize,
    guidance: f64,
    image_guidance: f64,
}

fn key(args: &EditDatasetArgs, item: &ip2p_dataset::Item, img: &RgbImage) -> BatchKey {
    BatchKey {
        width: img.width(),
        height: img.height(),
        steps: item.steps.unwrap_or(args.steps),
        guidance: item.guidance.unwrap_or(args.guidance),
        image_guidance: item.image_guidance.unwrap_or(args.image_guidance),
    }
}

/// Why an item's prompt cannot be edited with: empty text, or token ids the tokenizer refuses
/// (wrong length, out of the vocabulary).
fn check_prompt<B: Backend>(
    model: &Ip2pModel<B>,
    prompt: &PromptSource,
) -> std::result::Result<(), String> {
    match prompt {
        PromptSource::Text(t) if t.trim().is_empty() => Err("empty prompt".into()),
        PromptSource::Ids(ids) => match &model.text {
            Some(text) => text
                .tokenizer()
                .check_ids(std::slice::from_ref(ids))
                .map(|_| ())
                .map_err(|e| format!("prompt_ids: {e}")),
            None => Ok(()),
        },
        PromptSource::Text(_) => Ok(()),
    }
}

/// An item's results line, without its output fields.
fn record(
    args: &EditDatasetArgs,
    item: &ip2p_dataset::Item,
    position: usize,
    status: Status,
    reason: Option<String>,
) -> ItemResult {
    let (prompt, prompt_ids) = match &item.prompt {
        PromptSource::Text(t) => (Some(t.clone()), None),
        PromptSource::Ids(ids) => (None, Some(ids.clone())),
    };
    ItemResult {
        id: item.id.clone(),
        status,
        reason,
        line: item.line,
        image: item.image.clone(),
        prompt,
        prompt_ids,
        seed: item.seed.unwrap_or_else(|| item_seed(args.seed, &item.id)),
        steps: item.steps.unwrap_or(args.steps),
        guidance: item.guidance.unwrap_or(args.guidance),
        image_guidance: item.image_guidance.unwrap_or(args.image_guidance),
        group: position / args.batch,
        output: None,
        latents: None,
        sha256: None,
        width: None,
        height: None,
        seconds: None,
        extra: item.extra.clone(),
    }
}

type BatchOutput = (Vec<RgbImage>, Option<(Vec<f32>, Vec<usize>)>);

/// Edit one batch: each item with its own generator, seeded from the item.
#[allow(clippy::too_many_arguments)]
fn edit_batch<B: Backend>(
    args: &EditDatasetArgs,
    model: &Ip2pModel<B>,
    kind: Option<SchedulerKind>,
    probe: &dyn MemoryProbe,
    key: &BatchKey,
    all: &[ip2p_dataset::Item],
    members: &[(usize, RgbImage)],
    stop: &Interrupt,
) -> Result<BatchOutput> {
    let text = model
        .text
        .as_ref()
        .context("the model has no text encoder")?;
    let items: Vec<&ip2p_dataset::Item> = members.iter().map(|(i, _)| &all[*i]).collect();
    // Text prompts are tokenized here, so a batch can mix text and token ids.
    let mut rows = Vec::with_capacity(items.len());
    for item in &items {
        rows.push(match &item.prompt {
            PromptSource::Text(t) => text
                .tokenizer()
                .encode(t)?
                .into_iter()
                .map(i64::from)
                .collect(),
            PromptSource::Ids(ids) => ids.clone(),
        });
    }
    let images: Vec<RgbImage> = members.iter().map(|(_, img)| img.clone()).collect();
    let input: Tensor<B, 4> = images_to_tensor(&images, &model.device, DType::F32)?;
    let seeds: Vec<u64> = items
        .iter()
        .map(|item| item.seed.unwrap_or_else(|| item_seed(args.seed, &item.id)))
        .collect();
    let mut generator = Generator::per_item(seeds);
    let mut scheduler = model.scheduler(kind)?;
    let mut on_step = |_: &StepInfo<'_, B>| {
        if stop.requested() {
            ip2p_pipeline::Flow::Cancel
        } else {
            ip2p_pipeline::Flow::Continue
        }
    };
    let settings = RunSettings {
        options: EditOptions {
            steps: key.steps,
            guidance_scale: key.guidance,
            image_guidance_scale: key.image_guidance,
            negative_prompt: args.negative_prompt.clone(),
            num_images_per_prompt: 1,
            memory_budget: args.memory_budget_mib.map(|m| m << 20),
            ..EditOptions::default()
        },
        init_latents: None,
        probe,
        callback: Some(&mut on_step),
        activation_model: None,
    };
    let latents = model
        .edit_with_generator(
            scheduler.as_mut(),
            &mut generator,
            input,
            Prompts::Ids(rows),
            false,
            true,
            settings,
        )?
        .output;
    let vae = model.vae.as_ref().context("the model has no VAE")?;
    let decoded = vae.decode_scaled(latents.clone())?;
    let images = tensor_to_images(decoded)?;
    let latents = if args.save_latents {
        let shape = latents.dims().to_vec();
        let values = latents
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Some((values, shape))
    } else {
        None
    };
    Ok((images, latents))
}

/// The writer thread: each edited item's PNG (and latents) written atomically, then its
/// results line; each failed item's line. Returns the first error.
fn write_all(
    jobs: mpsc::Receiver<Job>,
    out: &OutputDir,
    results: &mut ResultsFile,
    bar: &ProgressBar,
    stop_after: Option<usize>,
) -> Result<()> {
    let mut written = 0;
    for job in jobs {
        match job {
            Job::Failed(r) => {
                results.append(&r)?;
                bar.inc(1);
            }
            Job::Edited {
                mut result,
                image,
                latents,
            } => {
                let png = encode_png(&image)?;
                let name = OutputDir::image_name(&result.id);
                if stop_after == Some(written) {
                    // The test hook: killed half-way through writing the next output.
                    std::fs::write(out.partial_path(&name), &png[..png.len() / 2])?;
                    eprintln!("stopped after {written} item(s) (--test-stop-after)");
                    std::process::exit(3);
                }
                if let Some((values, shape)) = latents {
                    let lname = OutputDir::latents_name(&result.id);
                    out.write_atomic(&lname, &latents_file(&values, shape)?)?;
                    result.latents = Some(lname);
                }
                out.write_atomic(&name, &png)?;
                result.sha256 = Some(sha256_hex(&png));
                result.width = Some(image.width());
                result.height = Some(image.height());
                result.output = Some(name);
                results.append(&result)?;
                written += 1;
                bar.inc(1);
            }
        }
    }
    Ok(())
}

/// PNG bytes, as `ip2p edit` writes them (the image crate's default PNG encoder).
fn encode_png(image: &RgbImage) -> Result<Vec<u8>> {
    let mut buf = Cursor::new(Vec::new());
    image.write_to(&mut buf, image::ImageFormat::Png)?;
    Ok(buf.into_inner())
}

/// A safetensors file with one f32 tensor `latents`.
fn latents_file(values: &[f32], shape: Vec<usize>) -> Result<Vec<u8>> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &bytes)?;
    Ok(safetensors::serialize([("latents", view)], None)?)
}

/// Results lines for this shard's outputs that exist without one (a run killed between
/// renaming an output and appending its line): rebuilt from the file, without a time.
fn recover_lines(
    args: &EditDatasetArgs,
    manifest: &Manifest,
    out: &OutputDir,
    range: Range<usize>,
    recorded: &HashMap<String, Status>,
    results: &mut ResultsFile,
) -> Result<usize> {
    let mut recovered = 0;
    for i in range {
        let item = &manifest.items[i];
        if recorded.get(&item.id) == Some(&Status::Ok) || !out.is_done(&item.id, args.save_latents)
        {
            continue;
        }
        let name = OutputDir::image_name(&item.id);
        let bytes = std::fs::read(out.path(&name))?;
        let (width, height) = image::load_from_memory(&bytes)
            .map(|img| (img.width(), img.height()))
            .with_context(|| format!("reading {}", out.path(&name).display()))?;
        let mut r = record(args, item, i, Status::Ok, None);
        r.sha256 = Some(sha256_hex(&bytes));
        r.width = Some(width);
        r.height = Some(height);
        r.output = Some(name);
        if args.save_latents {
            r.latents = Some(OutputDir::latents_name(&item.id));
        }
        results.append(&r)?;
        recovered += 1;
    }
    Ok(recovered)
}
