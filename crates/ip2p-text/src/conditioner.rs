//! Prompts (or dataset token ids) to text conditioning, with the encoder run as little as
//! possible: the unconditional (empty prompt) embedding is computed once per loaded model, and
//! a row repeated within a batch is encoded once.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::{Int, Tensor, TensorData};
use ip2p_nn::Backend;

use crate::encoder::ids_tensor;
use crate::{ClipTextModel, ClipTokenizer, TextError, check_ids};

/// How often the text encoder actually ran (for tests and logging).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EncodeStats {
    /// Forward passes of the encoder.
    pub calls: usize,
    /// Rows encoded over all passes.
    pub rows: usize,
}

/// A tokenizer and a text encoder that belong together, with the unconditional embedding
/// cached.
///
/// Rows are deduplicated by their token ids, so two spellings that tokenize alike
/// (`"a  cat"`, `"A cat"`) are encoded once too; a row whose ids are the empty prompt's uses the
/// cached unconditional embedding.
#[derive(Debug)]
pub struct PromptEncoder<B: Backend> {
    tokenizer: ClipTokenizer,
    encoder: ClipTextModel<B>,
    device: B::Device,
    uncond_ids: Vec<u32>,
    uncond: OnceLock<Tensor<B, 3>>,
    calls: AtomicUsize,
    rows: AtomicUsize,
}

impl<B: Backend> PromptEncoder<B> {
    /// Pair a tokenizer with an encoder; an error if the tokenizer's ids could not be fed to it.
    pub fn new(
        tokenizer: ClipTokenizer,
        encoder: ClipTextModel<B>,
        device: &B::Device,
    ) -> Result<Self, TextError> {
        let cfg = encoder.config();
        if tokenizer.max_length() > cfg.max_position_embeddings {
            return Err(TextError::Mismatch(format!(
                "the tokenizer pads to {} tokens, the text encoder has {} positions",
                tokenizer.max_length(),
                cfg.max_position_embeddings
            )));
        }
        if tokenizer.vocab_size() > cfg.vocab_size {
            return Err(TextError::Mismatch(format!(
                "the tokenizer has {} tokens, the text encoder's vocabulary {}",
                tokenizer.vocab_size(),
                cfg.vocab_size
            )));
        }
        let uncond_ids = tokenizer.encode("")?;
        Ok(Self {
            tokenizer,
            encoder,
            device: device.clone(),
            uncond_ids,
            uncond: OnceLock::new(),
            calls: AtomicUsize::new(0),
            rows: AtomicUsize::new(0),
        })
    }

    /// Load `<model>/tokenizer` and `<model>/text_encoder` of a diffusers pipeline folder.
    pub fn load(
        model_dir: impl AsRef<Path>,
        variant: Option<&str>,
        device: &B::Device,
    ) -> Result<Self, TextError> {
        let dir = model_dir.as_ref();
        let tokenizer = ClipTokenizer::from_dir(dir.join("tokenizer"))?;
        let encoder = ClipTextModel::load(dir.join("text_encoder"), variant, device)?;
        Self::new(tokenizer, encoder, device)
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }
    pub fn encoder(&self) -> &ClipTextModel<B> {
        &self.encoder
    }
    pub fn stats(&self) -> EncodeStats {
        EncodeStats {
            calls: self.calls.load(Ordering::Relaxed),
            rows: self.rows.load(Ordering::Relaxed),
        }
    }

    /// `last_hidden_state` `[prompts, max_length, hidden]` for prompts.
    pub fn encode<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Tensor<B, 3>, TextError> {
        let rows = self.tokenizer.encode_batch(prompts)?;
        self.encode_rows(&rows)
    }

    /// `last_hidden_state` for token ids a dataset holds (tokenization skipped). Every row must
    /// be `max_length` long with ids inside the encoder's vocabulary.
    pub fn encode_ids(&self, rows: &[Vec<i64>]) -> Result<Tensor<B, 3>, TextError> {
        let checked = check_ids(
            rows,
            self.encoder.config().vocab_size,
            self.tokenizer.max_length(),
        )?;
        self.encode_rows(&checked)
    }

    /// The prompt a row of ids stands for, for logging (see [`ClipTokenizer::decode`]).
    pub fn decode(&self, ids: &[i64]) -> Result<String, TextError> {
        let vocab_size = self.tokenizer.vocab_size();
        let checked = check_ids(&[ids.to_vec()], vocab_size, ids.len())?;
        self.tokenizer.decode(&checked[0])
    }

    /// The empty prompt's `last_hidden_state` `[1, max_length, hidden]`, computed on first use.
    pub fn uncond(&self) -> Tensor<B, 3> {
        if let Some(t) = self.uncond.get() {
            return t.clone();
        }
        let t = self.run(std::slice::from_ref(&self.uncond_ids));
        // Another thread may have won the race; either value is the same.
        self.uncond.get_or_init(|| t).clone()
    }

    /// The unconditional embedding repeated for a batch: `[batch, max_length, hidden]`.
    pub fn uncond_batch(&self, batch: usize) -> Result<Tensor<B, 3>, TextError> {
        if batch == 0 {
            return Err(TextError::EmptyBatch);
        }
        Ok(self.uncond().repeat_dim(0, batch))
    }

    /// Encode checked rows: each distinct row once, the empty prompt from the cache.
    fn encode_rows(&self, rows: &[Vec<u32>]) -> Result<Tensor<B, 3>, TextError> {
        if rows.is_empty() {
            return Err(TextError::EmptyBatch);
        }
        // `slot[i]`: which part row i comes from; unique rows first, the uncond embedding last.
        let mut unique: Vec<Vec<u32>> = Vec::new();
        let mut seen: HashMap<&[u32], usize> = HashMap::new();
        let mut uses_uncond = false;
        let mut slot: Vec<Option<usize>> = Vec::with_capacity(rows.len());
        for row in rows {
            if *row == self.uncond_ids {
                uses_uncond = true;
                slot.push(None);
            } else {
                let next = seen.len();
                let i = *seen.entry(row.as_slice()).or_insert_with(|| {
                    unique.push(row.clone());
                    next
                });
                slot.push(Some(i));
            }
        }
        let n_unique = unique.len();
        let mut parts = Vec::new();
        if n_unique > 0 {
            parts.push(self.run(&unique));
        }
        if uses_uncond {
            parts.push(self.uncond());
        }
        let all = Tensor::cat(parts, 0);
        if n_unique == rows.len() {
            return Ok(all); // nothing repeated, order already right
        }
        let index: Vec<i64> = slot.iter().map(|s| s.unwrap_or(n_unique) as i64).collect();
        let index =
            Tensor::<B, 1, Int>::from_data(TensorData::new(index, [rows.len()]), &self.device);
        Ok(all.select(0, index))
    }

    fn run(&self, rows: &[Vec<u32>]) -> Tensor<B, 3> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.rows.fetch_add(rows.len(), Ordering::Relaxed);
        self.encoder.forward(ids_tensor(rows, &self.device))
    }
}
