//! The training data: a folder of (input image, edit instruction, edited image) triples.
//!
//! # Format
//!
//! ```text
//! <data>/metadata.jsonl   one JSON object per line, the InstructPix2Pix datasets' columns:
//!                         {"input_image": "in/0001.png", "edit_prompt": "make it snowy",
//!                          "edited_image": "out/0001.png"}
//!                         image paths relative to <data> (or absolute); PNG, JPEG or WebP
//! <data>/tokens.jsonl     written by `ip2p prepare-data`: one line per metadata row,
//!                         {"row": 1, "input_image": "...", "edited_image": "...",
//!                          "input_ids": [49406, ..., 49407, ...]}
//!                         `row` is the metadata line number (1-based); the ids are the CLIP
//!                         tokenizer's `model_max_length` ids (bos, tokens, eos, padding).
//! ```
//!
//! Training and validation read `tokens.jsonl` only: the ids go to the text encoder as they
//! are, never decoded to text and back. Blank lines are ignored.
//!
//! Preprocessing, as diffusers' `train_instruct_pix2pix.py`: both images resized to
//! `resolution × resolution` (PIL's default bicubic `resize`, bit-exact), the same random crop
//! (a no-op after the square resize, kept for non-square resolutions) and the same random
//! horizontal flip for both images of a pair, then scaled to [-1, 1].
//!
//! Bad rows (a missing or unreadable image, an input and an edited image of different sizes,
//! a malformed line) are reported with their row number; [`BadRows`] decides whether they are
//! skipped or stop the run.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use burn::tensor::DType;
use image::RgbImage;
use image::imageops;
use ip2p_nn::Backend;
use ip2p_text::ClipTokenizer;

use crate::TrainError;
use crate::rng::SplitMix;
use crate::step::TrainBatch;
use ip2p_vae::resample::{Filter, resize};

pub const METADATA: &str = "metadata.jsonl";
pub const TOKENS: &str = "tokens.jsonl";

/// One line of `metadata.jsonl`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MetadataRow {
    pub input_image: String,
    pub edit_prompt: String,
    pub edited_image: String,
}

/// One line of `tokens.jsonl`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenRow {
    /// The metadata line (1-based).
    pub row: usize,
    pub input_image: String,
    pub edited_image: String,
    pub input_ids: Vec<i64>,
}

/// What to do with a row that cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BadRows {
    /// Report it (with its row number) and go on without it.
    #[default]
    Skip,
    /// Stop with an error naming the row.
    Stop,
}

/// What `prepare-data` did.
#[derive(Debug, Clone, Default)]
pub struct PrepareReport {
    pub rows: usize,
    pub truncated: Vec<usize>,
    /// Rows left out (row number, reason) under [`BadRows::Skip`].
    pub skipped: Vec<(usize, String)>,
}

fn read_lines(path: &Path) -> Result<Vec<(usize, String)>, TrainError> {
    let file = std::fs::File::open(path).map_err(|e| TrainError::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| TrainError::io(path, e))?;
        if !line.trim().is_empty() {
            out.push((i + 1, line));
        }
    }
    Ok(out)
}

/// Tokenize `<data>/metadata.jsonl` once and write `<data>/tokens.jsonl` (atomically: a
/// temporary file renamed into place). Checks that both images of each row exist.
pub fn prepare_data(
    data: &Path,
    tokenizer: &ClipTokenizer,
    bad_rows: BadRows,
) -> Result<PrepareReport, TrainError> {
    let meta_path = data.join(METADATA);
    let mut report = PrepareReport::default();
    let mut out = Vec::new();
    for (line_no, line) in read_lines(&meta_path)? {
        let row_err = |reason: String| TrainError::Row {
            file: meta_path.clone(),
            row: line_no,
            reason,
        };
        let parsed = serde_json::from_str::<MetadataRow>(&line)
            .map_err(|e| row_err(format!("not a metadata row: {e}")))
            .and_then(|m| {
                for p in [&m.input_image, &m.edited_image] {
                    if !data.join(p).is_file() {
                        return Err(row_err(format!("image {p} not found")));
                    }
                }
                let tokens = tokenizer
                    .tokenize(&m.edit_prompt)
                    .map_err(|e| row_err(format!("edit_prompt: {e}")))?;
                Ok((m, tokens))
            });
        match parsed {
            Ok((m, tokens)) => {
                if tokens.truncated {
                    report.truncated.push(line_no);
                }
                out.push(TokenRow {
                    row: line_no,
                    input_image: m.input_image,
                    edited_image: m.edited_image,
                    input_ids: tokens.ids.iter().map(|&i| i as i64).collect(),
                });
            }
            Err(e) if bad_rows == BadRows::Skip => report.skipped.push((line_no, e.to_string())),
            Err(e) => return Err(e),
        }
    }
    if out.is_empty() {
        return Err(TrainError::Format {
            path: meta_path,
            reason: "no usable rows".into(),
        });
    }
    report.rows = out.len();
    let path = data.join(TOKENS);
    let tmp = data.join(format!("{TOKENS}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        for r in &out {
            serde_json::to_writer(&mut f, r)?;
            f.write_all(b"\n")?;
        }
        f.flush()?;
        drop(f);
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| TrainError::io(&path, e))?;
    Ok(report)
}

/// A prepared dataset: `tokens.jsonl` read, images loaded on demand.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub dir: PathBuf,
    pub rows: Vec<TokenRow>,
}

impl Dataset {
    /// Read `<dir>/tokens.jsonl` (run `ip2p prepare-data` first).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, TrainError> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join(TOKENS);
        if !path.is_file() {
            return Err(TrainError::Format {
                path,
                reason: "no token file: run `ip2p prepare-data` on this folder first".into(),
            });
        }
        let mut rows = Vec::new();
        for (line_no, line) in read_lines(&path)? {
            let row: TokenRow = serde_json::from_str(&line).map_err(|e| TrainError::Row {
                file: path.clone(),
                row: line_no,
                reason: format!("not a token row: {e}"),
            })?;
            rows.push(row);
        }
        if rows.is_empty() {
            return Err(TrainError::Format {
                path,
                reason: "no rows".into(),
            });
        }
        Ok(Self { dir, rows })
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn row_error(&self, row: &TokenRow, reason: String) -> TrainError {
        TrainError::Row {
            file: self.dir.join(METADATA),
            row: row.row,
            reason,
        }
    }

    /// Load a row's two images, checked to be the same size.
    pub fn load_pair(&self, index: usize) -> Result<(RgbImage, RgbImage), TrainError> {
        let row = self
            .rows
            .get(index)
            .ok_or_else(|| TrainError::Input(format!("no row {index}")))?;
        let load = |p: &str| {
            ip2p_vae::load_image(self.dir.join(p))
                .map_err(|e| self.row_error(row, format!("image {p}: {e}")))
        };
        let a = load(&row.input_image)?;
        let b = load(&row.edited_image)?;
        if a.dimensions() != b.dimensions() {
            return Err(self.row_error(
                row,
                format!(
                    "input image is {}×{}, edited image {}×{}",
                    a.width(),
                    a.height(),
                    b.width(),
                    b.height()
                ),
            ));
        }
        Ok((a, b))
    }
}

/// Resize both images to `resolution`², then the same random crop and flip for both.
pub fn preprocess_pair(
    input: &RgbImage,
    edited: &RgbImage,
    resolution: u32,
    random_flip: bool,
    rng: &mut SplitMix,
) -> (RgbImage, RgbImage) {
    let resize = |img: &RgbImage| {
        if img.dimensions() == (resolution, resolution) {
            img.clone()
        } else {
            resize(img, resolution, resolution, Filter::Bicubic)
        }
    };
    let (mut a, mut b) = (resize(input), resize(edited));
    // RandomCrop(resolution) on a resolution² image: offset 0 (kept for clarity).
    let (x, y) = (0, 0);
    a = imageops::crop_imm(&a, x, y, resolution, resolution).to_image();
    b = imageops::crop_imm(&b, x, y, resolution, resolution).to_image();
    if random_flip && rng.uniform() < 0.5 {
        a = imageops::flip_horizontal(&a);
        b = imageops::flip_horizontal(&b);
    }
    (a, b)
}

/// Walks the dataset in a seeded random order, epoch after epoch; its position is part of a
/// checkpoint, so a resumed run sees the same batches.
///
/// With several ranks it is torch's `DistributedSampler` (`drop_last=False`): every rank
/// draws the same permutation per epoch, padded to a multiple of the world size by repeating
/// its start, and rank r walks positions r, r + N, r + 2N, ...; `position` counts the rank's
/// own steps in that stream. One rank (N = 1) walks the permutation itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataOrder {
    pub seed: u64,
    pub epoch: usize,
    /// Index into this rank's share of the epoch's permutation.
    pub position: usize,
}

/// Which share of the data a process takes: rank `rank` of `world` (DistributedSampler's
/// `rank` and `num_replicas`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    /// The whole data set (one process).
    pub const SINGLE: Shard = Shard { rank: 0, world: 1 };

    /// The place in the global batch of this shard's `item`-th pair of a micro-batch: `item ·
    /// world + rank`, the sampler's stride, so the pair draws what it would in one process's
    /// batch of `world ·` the batch size.
    pub fn global_item(&self, item: usize) -> usize {
        item * self.world + self.rank
    }
}

impl DataOrder {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            epoch: 0,
            position: 0,
        }
    }

    /// The permutation of `n` rows for an epoch.
    pub fn permutation(&self, n: usize, epoch: usize) -> Vec<usize> {
        let mut rng = SplitMix::new(self.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            p.swap(i, j);
        }
        p
    }

    /// The next row index of `shard`'s stream, advancing the position (and the epoch at the
    /// end of the shard's `ceil(n / world)` rows).
    pub fn next(&mut self, n: usize, shard: Shard) -> usize {
        let world = shard.world.max(1);
        if self.position >= n.div_ceil(world) {
            self.epoch += 1;
            self.position = 0;
        }
        let padded = self.position * world + shard.rank;
        let i = self.permutation(n, self.epoch)[padded % n];
        self.position += 1;
        i
    }
}

/// Loads batches in the data order, handling bad rows as asked.
pub struct BatchLoader<'a> {
    pub data: &'a Dataset,
    pub resolution: u32,
    pub random_flip: bool,
    pub bad_rows: BadRows,
    /// This process's share of the data.
    pub shard: Shard,
    /// Rows skipped so far (row number, reason).
    pub skipped: Vec<(usize, String)>,
}

impl BatchLoader<'_> {
    /// The next `item_seeds.len()` usable pairs of this shard as pixels in [-1, 1] plus their
    /// ids; item k's flip is drawn from `item_seeds[k]`.
    pub fn next_batch<B: Backend>(
        &mut self,
        order: &mut DataOrder,
        item_seeds: &[u64],
        device: &B::Device,
    ) -> Result<TrainBatch<B>, TrainError> {
        let n = self.data.len();
        let (mut inputs, mut edited, mut ids) = (Vec::new(), Vec::new(), Vec::new());
        let mut misses = 0;
        while let Some(&seed) = item_seeds.get(inputs.len()) {
            let i = order.next(n, self.shard);
            match self.data.load_pair(i) {
                Ok((a, b)) => {
                    let mut rng = SplitMix::new(seed ^ FLIP_STREAM);
                    let (a, b) =
                        preprocess_pair(&a, &b, self.resolution, self.random_flip, &mut rng);
                    inputs.push(a);
                    edited.push(b);
                    ids.push(self.data.rows[i].input_ids.clone());
                }
                Err(e) if self.bad_rows == BadRows::Skip => {
                    let row = self.data.rows[i].row;
                    if !self.skipped.iter().any(|(r, _)| *r == row) {
                        self.skipped.push((row, e.to_string()));
                    }
                    misses += 1;
                    if misses > n {
                        return Err(TrainError::Format {
                            path: self.data.dir.join(TOKENS),
                            reason: "no row could be loaded".into(),
                        });
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(TrainBatch {
            original: ip2p_vae::images_to_tensor(&inputs, device, DType::F32)?,
            edited: ip2p_vae::images_to_tensor(&edited, device, DType::F32)?,
            input_ids: ids,
        })
    }
}

/// Mixed into an item's seed for its flip, apart from its noise draws.
const FLIP_STREAM: u64 = 0xF11F_F11F_0DD5_EED5;

/// The pairs of a list of rows, resized but not flipped (validation).
pub fn load_rows<B: Backend>(
    data: &Dataset,
    rows: &[usize],
    resolution: u32,
    device: &B::Device,
) -> Result<TrainBatch<B>, TrainError> {
    let mut rng = SplitMix::new(0);
    let (mut a, mut b, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    for &i in rows {
        let (x, y) = data.load_pair(i)?;
        let (x, y) = preprocess_pair(&x, &y, resolution, false, &mut rng);
        a.push(x);
        b.push(y);
        ids.push(data.rows[i].input_ids.clone());
    }
    Ok(TrainBatch {
        original: ip2p_vae::images_to_tensor(&a, device, DType::F32)?,
        edited: ip2p_vae::images_to_tensor(&b, device, DType::F32)?,
        input_ids: ids,
    })
}
