//! CLIP's byte-level BPE tokenizer, built on the `tokenizers` crate so that its ids equal
//! transformers' `CLIPTokenizer` for the same folder.
//!
//! A diffusers `tokenizer/` folder holds either a `tokenizer.json` (the whole pipeline, as
//! transformers' `save_pretrained` writes it) or CLIP's `vocab.json` and `merges.txt`, from which
//! we build the pipeline `CLIPTokenizer` builds:
//!
//! - normalizer: NFC, every run of whitespace to one space, lowercase;
//! - pre-tokenizer: split on CLIP's regex (special tokens, `'s 't 're 've 'm 'll 'd`, letter runs,
//!   single digits, runs of other non-space characters; whitespace removed), then byte-level
//!   mapping (no prefix space);
//! - model: BPE with `</w>` marking word ends, `unk` = the folder's unk token;
//! - post-processor: `bos … eos`;
//! - truncation to `model_max_length` (bos and eos kept) and padding to it with the pad token.
//!
//! Special tokens and `model_max_length` come from `special_tokens_map.json` and
//! `tokenizer_config.json` when the folder has them (strings or `{"content": …}` objects).
//! When a file or a key is absent, CLIP's defaults apply: `model_max_length` 77, bos
//! `<|startoftext|>`, eos, pad and unk `<|endoftext|>`, their ids looked up in the vocabulary.
//! So a bare `vocab.json` + `merges.txt` folder (such as fixtures/clip-bpe) works too.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, Model, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior,
    Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::TextError;

/// CLIP's pre-tokenizer pattern (transformers' `CLIPTokenizer`, itself from OpenAI's CLIP).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// `model_max_length` when the folder does not say (CLIP's context length).
pub const DEFAULT_MAX_LENGTH: usize = 77;
const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";

/// transformers writes `model_max_length` = 1e30 when it was never set; treat anything this big
/// as unset.
const UNSET_MAX_LENGTH: f64 = 1e12;

/// One prompt's ids, as the text encoder takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// `bos, tokens…, eos, pad…`: exactly `max_length` ids.
    pub ids: Vec<u32>,
    /// The prompt had more tokens than fit and was cut (diffusers warns when this happens).
    pub truncated: bool,
}

/// CLIP's tokenizer with truncation and padding to `max_length` built in.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    vocab_size: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("max_length", &self.max_length)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("vocab_size", &self.vocab_size)
            .finish()
    }
}

/// A special token as the folder's JSON files give it.
#[derive(Debug, Clone)]
struct Special {
    content: String,
    /// Matched after normalisation (lowercasing); the old SD 1.5 files say `true`.
    normalized: bool,
}

/// What `special_tokens_map.json` and `tokenizer_config.json` say (or CLIP's defaults).
#[derive(Debug, Clone)]
struct FolderConfig {
    bos: Special,
    eos: Special,
    pad: Special,
    unk: Special,
    max_length: usize,
}

fn tok_err(path: &Path, reason: impl Into<String>) -> TextError {
    TextError::Tokenizer {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, TextError> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| tok_err(path, e.to_string()))?;
    let value =
        serde_json::from_str(&text).map_err(|e| tok_err(path, format!("not valid JSON: {e}")))?;
    Ok(Some(value))
}

/// A `tokenizer.json`: read as JSON first (so a truncated or malformed file is a plain error),
/// then given to the `tokenizers` crate, whose deserializer panics on some malformed parts (a
/// `decoder` of the wrong shape: `expect("Helper")` in tokenizers 0.22); such a panic is caught
/// and reported as this file's error.
fn read_tokenizer_json(path: &Path) -> Result<Tokenizer, TextError> {
    let value = read_json(path)?.ok_or_else(|| tok_err(path, "missing"))?;
    match std::panic::catch_unwind(move || serde_json::from_value::<Tokenizer>(value)) {
        Ok(Ok(tokenizer)) => Ok(tokenizer),
        Ok(Err(e)) => Err(tok_err(path, e.to_string())),
        Err(_) => Err(tok_err(
            path,
            "not a tokenizer the tokenizers crate can read",
        )),
    }
}

/// A special token entry: `"<|endoftext|>"` or `{"content": "<|endoftext|>", "normalized": …}`.
fn special_entry(value: &Value, key: &str, path: &Path) -> Result<Option<Special>, TextError> {
    match value.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(Special {
            content: s.clone(),
            normalized: false,
        })),
        Some(obj @ Value::Object(_)) => match obj.get("content").and_then(Value::as_str) {
            Some(s) => Ok(Some(Special {
                content: s.to_string(),
                normalized: obj
                    .get("normalized")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            })),
            None => Err(tok_err(path, format!("`{key}` has no string `content`"))),
        },
        Some(other) => Err(tok_err(
            path,
            format!("`{key}` is neither a string nor an object: {other}"),
        )),
    }
}

impl FolderConfig {
    fn read(dir: &Path) -> Result<Self, TextError> {
        let map_path = dir.join("special_tokens_map.json");
        let cfg_path = dir.join("tokenizer_config.json");
        let map = read_json(&map_path)?;
        let cfg = read_json(&cfg_path)?;
        // special_tokens_map.json wins over tokenizer_config.json, as in transformers.
        let find = |key: &str, default: &str| -> Result<Special, TextError> {
            if let Some(m) = &map
                && let Some(s) = special_entry(m, key, &map_path)?
            {
                return Ok(s);
            }
            if let Some(c) = &cfg
                && let Some(s) = special_entry(c, key, &cfg_path)?
            {
                return Ok(s);
            }
            Ok(Special {
                content: default.to_string(),
                normalized: false,
            })
        };
        let max_length = match cfg.as_ref().and_then(|c| c.get("model_max_length")) {
            None | Some(Value::Null) => DEFAULT_MAX_LENGTH,
            Some(v) => match v.as_f64() {
                Some(n) if n >= UNSET_MAX_LENGTH => DEFAULT_MAX_LENGTH,
                Some(n) if n >= 2.0 && n.fract() == 0.0 => n as usize,
                _ => {
                    return Err(tok_err(
                        &cfg_path,
                        format!("`model_max_length` must be an integer ≥ 2, got {v}"),
                    ));
                }
            },
        };
        Ok(Self {
            bos: find("bos_token", DEFAULT_BOS)?,
            eos: find("eos_token", DEFAULT_EOS)?,
            pad: find("pad_token", DEFAULT_EOS)?,
            unk: find("unk_token", DEFAULT_EOS)?,
            max_length,
        })
    }
}

/// Build transformers' CLIPTokenizer pipeline around CLIP's vocab.json and merges.txt.
fn build_clip(dir: &Path, cfg: &FolderConfig) -> Result<Tokenizer, TextError> {
    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    for p in [&vocab, &merges] {
        if !p.is_file() {
            return Err(tok_err(
                dir,
                format!(
                    "neither tokenizer.json nor {} found",
                    p.file_name().and_then(|n| n.to_str()).unwrap_or("?")
                ),
            ));
        }
    }
    let (vocab_s, merges_s) = (
        vocab.to_string_lossy().into_owned(),
        merges.to_string_lossy().into_owned(),
    );
    let bpe = BPE::from_file(&vocab_s, &merges_s);
    assemble_clip(bpe, dir, &vocab, cfg)
}

/// CLIP's vocabulary as shipped with ip2p (`fixtures/clip-bpe`: OpenAI CLIP's BPE, MIT
/// licence beside it), for models that come without a tokenizer folder (single-file
/// checkpoints).
pub const BUILTIN_VOCAB: &str = include_str!("../../../fixtures/clip-bpe/vocab.json");
/// The merges of [`BUILTIN_VOCAB`].
pub const BUILTIN_MERGES: &str = include_str!("../../../fixtures/clip-bpe/merges.txt");

/// The built-in CLIP BPE, from the embedded vocab.json and merges.txt (parsed as
/// `BPE::from_file` does: merges.txt's `#version` line skipped, one pair a line).
fn builtin_clip(cfg: &FolderConfig) -> Result<Tokenizer, TextError> {
    let source = Path::new("<built-in CLIP vocabulary>");
    let vocab: std::collections::HashMap<String, u32> = serde_json::from_str(BUILTIN_VOCAB)
        .map_err(|e| tok_err(source, format!("vocab.json: {e}")))?;
    let mut merges = Vec::new();
    for line in BUILTIN_MERGES.lines() {
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        let (a, b) = line
            .split_once(' ')
            .ok_or_else(|| tok_err(source, format!("merges.txt: bad line `{line}`")))?;
        merges.push((a.to_string(), b.to_string()));
    }
    let bpe = BPE::builder().vocab_and_merges(
        vocab
            .into_iter()
            .collect::<tokenizers::models::bpe::Vocab>(),
        merges,
    );
    assemble_clip(bpe, source, source, cfg)
}

/// transformers' CLIPTokenizer pipeline around a BPE model being built.
fn assemble_clip(
    bpe: tokenizers::models::bpe::BpeBuilder,
    dir: &Path,
    vocab: &Path,
    cfg: &FolderConfig,
) -> Result<Tokenizer, TextError> {
    let vocab = vocab.to_path_buf();
    let bpe = bpe
        .unk_token(cfg.unk.content.clone())
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".to_string())
        .fuse_unk(false)
        .build()
        .map_err(|e| tok_err(dir, format!("vocab.json/merges.txt: {e}")))?;

    // Unlike transformers, which would append a missing special token to the vocabulary (an id
    // the text encoder has no embedding for), a special token must be in vocab.json.
    for s in [&cfg.bos, &cfg.eos, &cfg.pad, &cfg.unk] {
        if bpe.token_to_id(&s.content).is_none() {
            return Err(tok_err(
                &vocab,
                format!("special token `{}` is not in the vocabulary", s.content),
            ));
        }
    }

    let replace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
        .map_err(|e| tok_err(dir, e.to_string()))?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_PATTERN.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| tok_err(dir, e.to_string()))?;

    let mut tk = Tokenizer::new(bpe);
    tk.with_normalizer(Some(NormalizerSequence::new(vec![
        NFC.into(),
        replace.into(),
        Lowercase.into(),
    ])));
    tk.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tk.with_decoder(Some(ByteLevelDecoder::new(true, true, true)));

    let mut specials: Vec<AddedToken> = Vec::new();
    for s in [&cfg.bos, &cfg.eos, &cfg.pad, &cfg.unk] {
        if !specials.iter().any(|t| t.content == s.content) {
            specials.push(AddedToken::from(s.content.clone(), true).normalized(s.normalized));
        }
    }
    tk.add_special_tokens(&specials);
    let id = |s: &Special| {
        tk.token_to_id(&s.content).ok_or_else(|| {
            tok_err(
                &vocab,
                format!("special token `{}` is not in the vocabulary", s.content),
            )
        })
    };
    let (bos, eos) = (id(&cfg.bos)?, id(&cfg.eos)?);
    tk.with_post_processor(Some(
        RobertaProcessing::new(
            (cfg.eos.content.clone(), eos),
            (cfg.bos.content.clone(), bos),
        )
        .trim_offsets(false)
        .add_prefix_space(false),
    ));
    Ok(tk)
}

impl ClipTokenizer {
    /// CLIP's tokenizer with the vocabulary built into ip2p (49408 tokens, `<|endoftext|>`
    /// as padding, 77 tokens): what SD 1.x's `tokenizer/` folder holds, for single-file
    /// checkpoints, which carry no tokenizer.
    pub fn builtin() -> Result<Self, TextError> {
        let cfg = FolderConfig::read(Path::new("<built-in CLIP vocabulary>"))?;
        let inner = builtin_clip(&cfg)?;
        Self::finish(inner, &cfg, PathBuf::from("<built-in CLIP vocabulary>"))
    }

    /// Load a tokenizer folder: `tokenizer.json` if present, else `vocab.json` + `merges.txt`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, TextError> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(tok_err(dir, "not a directory"));
        }
        let cfg = FolderConfig::read(dir)?;
        let json = dir.join("tokenizer.json");
        let (inner, source) = if json.is_file() {
            (read_tokenizer_json(&json)?, json)
        } else {
            (build_clip(dir, &cfg)?, dir.to_path_buf())
        };
        Self::finish(inner, &cfg, source)
    }

    /// Set truncation and padding, look up the special ids and check that the pipeline
    /// frames a prompt as `bos … eos`.
    fn finish(
        mut inner: Tokenizer,
        cfg: &FolderConfig,
        source: PathBuf,
    ) -> Result<Self, TextError> {
        let lookup = |s: &Special| {
            inner.token_to_id(&s.content).ok_or_else(|| {
                tok_err(
                    &source,
                    format!("special token `{}` is not in the vocabulary", s.content),
                )
            })
        };
        let (bos_id, eos_id, pad_id) = (lookup(&cfg.bos)?, lookup(&cfg.eos)?, lookup(&cfg.pad)?);
        let max_length = cfg.max_length;
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| tok_err(&source, format!("truncation to {max_length}: {e}")))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: cfg.pad.content.clone(),
        }));
        let vocab_size = inner.get_vocab_size(true);
        let tok = Self {
            inner,
            max_length,
            bos_id,
            eos_id,
            pad_id,
            vocab_size,
        };
        let empty = tok.tokenize("")?;
        if empty.ids.len() != max_length || empty.ids[0] != bos_id || empty.ids[1] != eos_id {
            return Err(tok_err(
                &source,
                format!(
                    "the pipeline does not frame prompts as bos ({bos_id}) … eos ({eos_id}): the empty prompt gave {:?}",
                    &empty.ids[..empty.ids.len().min(4)]
                ),
            ));
        }
        Ok(tok)
    }

    /// `bos, tokens…, eos, pad…` for one prompt, with whether it was cut to fit.
    pub fn tokenize(&self, prompt: &str) -> Result<Tokens, TextError> {
        let enc = self
            .inner
            .encode(prompt, true)
            .map_err(|e| TextError::Tokenize(e.to_string()))?;
        Ok(Tokens {
            ids: enc.get_ids().to_vec(),
            truncated: !enc.get_overflowing().is_empty(),
        })
    }

    /// The ids of one prompt (`max_length` of them).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>, TextError> {
        Ok(self.tokenize(prompt)?.ids)
    }

    /// The ids of each prompt; an error for an empty batch.
    pub fn encode_batch<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Vec<Vec<u32>>, TextError> {
        if prompts.is_empty() {
            return Err(TextError::EmptyBatch);
        }
        prompts.iter().map(|p| self.encode(p.as_ref())).collect()
    }

    /// The prompt back out of ids, for logging: special tokens dropped, `</w>` turned back into
    /// spaces, lowercased and with spaces around punctuation as CLIP sees it (transformers'
    /// `decode(ids, skip_special_tokens=True)`). Not meant to be tokenized again.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TextError> {
        if let Some((position, &id)) = ids
            .iter()
            .enumerate()
            .find(|(_, id)| **id as usize >= self.vocab_size)
        {
            return Err(TextError::IdOutOfRange {
                row: 0,
                position,
                id: id as i64,
                vocab_size: self.vocab_size,
            });
        }
        let text = self
            .inner
            .decode(ids, true)
            .map_err(|e| TextError::Tokenize(e.to_string()))?;
        Ok(text.replace("</w>", " ").trim().to_string())
    }

    /// Check ids a dataset holds (range and length) and convert them for [`Self::decode`] or the
    /// text encoder.
    pub fn check_ids(&self, rows: &[Vec<i64>]) -> Result<Vec<Vec<u32>>, TextError> {
        check_ids(rows, self.vocab_size, self.max_length)
    }

    /// The number of ids in every encoded prompt (`model_max_length`).
    pub fn max_length(&self) -> usize {
        self.max_length
    }
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
    /// Vocabulary size including special tokens.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    /// The underlying `tokenizers` pipeline (with truncation and padding set).
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// Check token ids from a dataset: a non-empty batch, every row exactly `length` long, every
/// id in `0..vocab_size`. Returns them as `u32`.
pub fn check_ids(
    rows: &[Vec<i64>],
    vocab_size: usize,
    length: usize,
) -> Result<Vec<Vec<u32>>, TextError> {
    if rows.is_empty() {
        return Err(TextError::EmptyBatch);
    }
    rows.iter()
        .enumerate()
        .map(|(row, ids)| {
            if ids.len() != length {
                return Err(TextError::WrongLength {
                    row,
                    len: ids.len(),
                    expected: length,
                });
            }
            ids.iter()
                .enumerate()
                .map(|(position, &id)| {
                    if id < 0 || id as u64 >= vocab_size as u64 {
                        Err(TextError::IdOutOfRange {
                            row,
                            position,
                            id,
                            vocab_size,
                        })
                    } else {
                        Ok(id as u32)
                    }
                })
                .collect()
        })
        .collect()
}
