//! `ip2p serve`: the web page and HTTP API (the server itself is the ip2p-serve crate).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use ip2p_nn::Backend;
use ip2p_pipeline::LoadOptions;
use ip2p_serve::{ServeConfig, Server};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A diffusers InstructPix2Pix folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Address to listen on. Loopback by default: the server has no authentication, so
    /// 0.0.0.0:PORT (every interface) lets anyone who can reach this machine use it.
    #[arg(long, default_value = "127.0.0.1:7860")]
    pub addr: SocketAddr,
    #[command(flatten)]
    pub runtime: crate::model_args::RuntimeArgs,
    /// Edits that may wait behind the running one; more are refused (429).
    #[arg(long, default_value_t = 8)]
    pub queue: usize,
    /// Seconds a finished edit's result is kept.
    #[arg(long, default_value_t = 900)]
    pub keep_results: u64,
    /// Largest request body in MiB (413 above).
    #[arg(long, default_value_t = 32)]
    pub max_upload_mib: usize,
    /// Largest input image in megapixels (413 above).
    #[arg(long, default_value_t = 50)]
    pub max_image_mpx: u64,
}

pub fn run(args: &ServeArgs) -> Result<()> {
    crate::backend::dispatch!(args.runtime.backend, args.runtime.dtype, |device, probe| {
        let _ = probe;
        serve::<B>(args, device)
    })
}

fn serve<B: Backend>(args: &ServeArgs, device: B::Device) -> Result<()> {
    let config = ServeConfig {
        load: args.runtime.apply(LoadOptions::default()),
        addr: args.addr,
        queue: args.queue,
        keep_results: Duration::from_secs(args.keep_results),
        max_upload_bytes: args.max_upload_mib << 20,
        max_image_pixels: args.max_image_mpx * 1_000_000,
        ctrl_c: true,
        ..ServeConfig::new(&args.model)
    };
    if !args.addr.ip().is_loopback() {
        eprintln!(
            "warning: listening on {}: anyone who can reach this address can run edits (there is no authentication)",
            args.addr
        );
    }
    eprintln!("loading {} ...", args.model.display());
    let server = Server::start::<B>(config, device)
        .with_context(|| format!("serving {}", args.model.display()))?;
    eprintln!(
        "serving {} on http://{} (Ctrl-C stops)",
        server.info().name,
        server.addr()
    );
    server.wait()?;
    Ok(())
}
