//! `ip2p tokenize --tokenizer DIR PROMPT...`: the ids the text encoder would see.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use ip2p_text::ClipTokenizer;

#[derive(Debug, Args)]
pub struct TokenizeArgs {
    /// A tokenizer folder: `tokenizer.json`, or CLIP's `vocab.json` + `merges.txt` (with
    /// `special_tokens_map.json` / `tokenizer_config.json` if present; otherwise CLIP's
    /// defaults: 77 tokens, `<|startoftext|>` / `<|endoftext|>`).
    #[arg(long, value_name = "DIR")]
    pub tokenizer: PathBuf,

    /// Prompts to tokenize; each gives one line: a JSON array of `model_max_length` ids
    /// (bos, tokens, eos, padding), truncated if too long.
    #[arg(required = true, value_name = "PROMPT")]
    pub prompts: Vec<String>,
}

pub fn run(args: &TokenizeArgs) -> anyhow::Result<()> {
    let tokenizer = ClipTokenizer::from_dir(&args.tokenizer)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for prompt in &args.prompts {
        let tokens = tokenizer.tokenize(prompt)?;
        if tokens.truncated {
            eprintln!(
                "warning: prompt truncated to {} tokens: {prompt:?}",
                tokenizer.max_length()
            );
        }
        writeln!(out, "{}", serde_json::to_string(&tokens.ids)?).context("writing to stdout")?;
    }
    Ok(())
}
