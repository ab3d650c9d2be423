//! `ip2p`: InstructPix2Pix from the terminal.
//!
//! Each subcommand lives in its own module with a clap `Args` struct and a `run` function;
//! add a variant to [`Command`] to add one.

use clap::{Parser, Subcommand};

mod backend;
mod convert;
mod devices;
mod distributed;
mod edit;
mod edit_dataset;
mod interrupt;
mod model_args;
mod prepare_data;
mod serve;
mod tokenize;
mod train;

#[derive(Debug, Parser)]
#[command(
    name = "ip2p",
    version,
    about = "InstructPix2Pix in Rust: edit images with instructions"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Edit images with instructions.
    Edit(Box<edit::EditArgs>),
    /// Edit every item of a manifest (JSON Lines or Parquet), as one shard of many.
    EditDataset(Box<edit_dataset::EditDatasetArgs>),
    /// Convert an original single-file checkpoint (.ckpt, .safetensors) to a diffusers folder.
    Convert(convert::ConvertArgs),
    /// Print the CLIP token ids of each prompt, one JSON array per line.
    Tokenize(tokenize::TokenizeArgs),
    /// Tokenize a dataset's edit prompts once (writes tokens.jsonl next to metadata.jsonl).
    PrepareData(prepare_data::PrepareDataArgs),
    /// Fine-tune InstructPix2Pix on a prepared dataset.
    Train(Box<train::TrainArgs>),
    /// Serve a web page and an HTTP API for edits (one model, a queue).
    Serve(Box<serve::ServeArgs>),
    /// The global orchestrator of a multi-node `ip2p train` run (burn-collective's).
    Orchestrator(distributed::OrchestratorArgs),
}

fn main() -> std::process::ExitCode {
    ip2p_pipeline::memory::keep_freed_memory();
    one_line_panics();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Edit(args) => edit::run(&args),
        Command::EditDataset(args) => edit_dataset::run(&args),
        Command::Convert(args) => convert::run(&args),
        Command::Tokenize(args) => tokenize::run(&args),
        Command::PrepareData(args) => prepare_data::run(&args),
        Command::Train(args) => train::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Orchestrator(args) => distributed::run_orchestrator(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.is::<interrupt::Interrupted>() => {
            eprintln!("{e}");
            std::process::ExitCode::from(interrupt::EXIT_INTERRUPTED)
        }
        Err(e) => {
            // The whole chain of causes on one line, no backtrace: these are user errors.
            eprintln!("error: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The chain of causes joined by `: `, leaving out a cause whose text the line already holds
/// (a typed error that wraps its source often prints it too).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A panic anywhere (a bug, or input a check missed) prints one line, `error: internal error:
/// MESSAGE at FILE:LINE`, not a backtrace; the process still exits non-zero (101) when the
/// panic reaches `main`. `IP2P_PANIC_BACKTRACE=1` brings Rust's default report back, for
/// debugging (`RUST_BACKTRACE` alone does not: CI machines often set it).
fn one_line_panics() {
    if std::env::var_os("IP2P_PANIC_BACKTRACE").is_some_and(|v| v != "0") {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = message.split_whitespace().collect::<Vec<_>>().join(" ");
        eprintln!("error: internal error: {message}{place}");
    }));
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[derive(Debug, thiserror::Error)]
    #[error("scheduler: {0}")]
    struct Wraps(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("2000 steps exceed\n  the 1000 training timesteps")]
    struct Inner;

    #[test]
    fn errors_print_as_one_line_without_repeats() {
        let e = anyhow::Error::new(Wraps(Inner)).context("editing with m");
        assert_eq!(
            one_line(&e),
            "editing with m: scheduler: 2000 steps exceed the 1000 training timesteps"
        );
    }
}
