//! `ip2p`: InstructPix2Pix from the terminal.
//!
//! Each subcommand lives in its own module with a clap `Args` struct and a `run` function;
//! add a variant to [`Command`] to add one.

use clap::{Parser, Subcommand};

mod backend;
mod convert;
mod distributed;
mod edit;
mod edit_dataset;
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
        Err(e) => {
            // The whole chain of causes on one line, no backtrace: these are user errors.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
