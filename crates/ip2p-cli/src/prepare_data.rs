//! `ip2p prepare-data --data DIR --model DIR`: tokenize a dataset's edit prompts once.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use ip2p_text::ClipTokenizer;
use ip2p_train::data::{BadRows, prepare_data};

/// The dataset folder format (also in `ip2p_train::data`):
///
///   <data>/metadata.jsonl  one JSON object per line:
///       {"input_image": "in/0001.png", "edit_prompt": "make it snowy", "edited_image": "out/0001.png"}
///       (the InstructPix2Pix datasets' columns; image paths relative to <data>)
///   <data>/tokens.jsonl    written here: {"row", "input_image", "edited_image", "input_ids"} per
///       usable row; `ip2p train` reads only this file and the images.
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct PrepareDataArgs {
    /// The dataset folder: `metadata.jsonl` with rows {"input_image", "edit_prompt",
    /// "edited_image"} (image paths relative to the folder). Writes `tokens.jsonl` there.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// A diffusers model folder (its `tokenizer/` is used) or a tokenizer folder.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Stop at the first bad row instead of reporting and skipping it.
    #[arg(long)]
    pub strict: bool,
}

pub fn run(args: &PrepareDataArgs) -> anyhow::Result<()> {
    let tok_dir = if args.model.join("tokenizer").is_dir() {
        args.model.join("tokenizer")
    } else {
        args.model.clone()
    };
    let tokenizer = ClipTokenizer::from_dir(&tok_dir)
        .with_context(|| format!("loading the tokenizer from {}", tok_dir.display()))?;
    let bad = if args.strict {
        BadRows::Stop
    } else {
        BadRows::Skip
    };
    let report = prepare_data(&args.data, &tokenizer, bad)?;
    for (row, reason) in &report.skipped {
        eprintln!("warning: skipped row {row}: {reason}");
    }
    if !report.truncated.is_empty() {
        eprintln!(
            "warning: {} prompt(s) truncated to {} tokens (rows {:?})",
            report.truncated.len(),
            tokenizer.max_length(),
            report.truncated
        );
    }
    eprintln!(
        "wrote {} rows to {}",
        report.rows,
        args.data.join(ip2p_train::data::TOKENS).display()
    );
    Ok(())
}
