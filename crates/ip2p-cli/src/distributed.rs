//! The data-parallel flags of `ip2p train` and `ip2p orchestrator`, with torchrun-style
//! environment variables (`WORLD_SIZE`, `RANK`, `MASTER_ADDR`, `MASTER_PORT`) as fallbacks.
//!
//! A run is `--num-nodes` processes of `--devices` replicas each; the world is their product
//! and a replica's global rank `node_rank × devices + local index` (torchrun's numbering).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use ip2p_train::collective::host_port;
use ip2p_train::{CollectiveSettings, NodeSettings, OrchestratorConfig};

use crate::devices::DeviceSpec;

/// Flags for a run over several devices, processes or machines.
#[derive(Debug, Args)]
pub struct DistributedArgs {
    /// Devices in this process, one UNet replica each on its own thread, gradients averaged
    /// in the process (no orchestrator needed for one node): a count (2: the first two GPUs;
    /// on the CPU backend, two replicas sharing the cores) or GPU indices (0,2 or
    /// cuda:0,cuda:2; cuda:1 for one). --batch-size is per device.
    #[arg(long, value_name = "N|LIST", default_value_t = DeviceSpec::Count(1))]
    pub devices: DeviceSpec,
    /// Processes (nodes) in a data-parallel run; default `WORLD_SIZE`, else 1 (no orchestrator).
    #[arg(long, value_name = "N")]
    pub num_nodes: Option<usize>,
    /// This process's rank in 0..N; node 0 (its first device) writes checkpoints, exports and
    /// validation. Default `RANK`.
    #[arg(long, value_name = "R")]
    pub node_rank: Option<usize>,
    /// The orchestrator (`ip2p orchestrator`), HOST:PORT; default `MASTER_ADDR:MASTER_PORT`.
    #[arg(long, value_name = "HOST:PORT")]
    pub orchestrator: Option<String>,
    /// Where the other nodes reach this one's tensor service, HOST:PORT; default
    /// `IP2P_NODE_ADDRESS`, or 127.0.0.1:(orchestrator port + 1 + rank) with a loopback
    /// orchestrator.
    #[arg(long, value_name = "HOST:PORT")]
    pub node_address: Option<String>,
    /// Seconds any collective call waits for the other ranks before failing (rank 0's
    /// checkpoints and validation run while the others wait).
    #[arg(long, default_value_t = 600.0, value_name = "SECS")]
    pub collective_timeout: f64,
    /// Gradient bucket size for the all-reduce, in MiB (torch DDP's default is 25).
    #[arg(long, default_value_t = 25.0, value_name = "MIB")]
    pub bucket_mib: f64,
}

/// burn-communication installs an INFO logger on stdout (a line per tensor transfer) unless a
/// logger exists: install ours first, on stderr at WARN (`RUST_LOG` overrides).
pub fn collective_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn env_usize(name: &str) -> Result<Option<usize>> {
    env(name)
        .map(|v| {
            v.trim()
                .parse()
                .with_context(|| format!("environment {name}={v}: not a whole number"))
        })
        .transpose()
}

impl DistributedArgs {
    /// The collective settings, or None for a run of one process on one device.
    pub fn settings(&self) -> Result<Option<CollectiveSettings>> {
        let num_nodes = match self.num_nodes {
            Some(n) => n,
            None => env_usize("WORLD_SIZE")?.unwrap_or(1),
        };
        if num_nodes == 0 {
            bail!("--num-nodes 0: at least one process");
        }
        let devices = self.devices.count();
        if !(self.collective_timeout.is_finite() && self.collective_timeout > 0.0) {
            bail!(
                "--collective-timeout {}: a positive number of seconds",
                self.collective_timeout
            );
        }
        if !(self.bucket_mib.is_finite() && self.bucket_mib > 0.0) {
            bail!("--bucket-mib {}: a positive size", self.bucket_mib);
        }
        let nodes = match num_nodes {
            1 => None,
            _ => Some(self.node_settings(num_nodes)?),
        };
        if nodes.is_none() && devices == 1 {
            return Ok(None);
        }
        let settings = CollectiveSettings {
            nodes,
            devices,
            timeout: Duration::from_secs_f64(self.collective_timeout),
            bucket_bytes: ((self.bucket_mib * (1 << 20) as f64) as usize).max(4),
        };
        settings.ranks().check()?;
        Ok(Some(settings))
    }

    /// This process's place among `num_nodes` (> 1) and the addresses, from the flags or
    /// torchrun's environment.
    fn node_settings(&self, num_nodes: usize) -> Result<NodeSettings> {
        let node_rank = match self.node_rank {
            Some(r) => r,
            None => env_usize("RANK")?
                .context("--num-nodes > 1 needs --node-rank (or RANK in the environment)")?,
        };
        let orchestrator = match &self.orchestrator {
            Some(a) => a.clone(),
            None => match (env("MASTER_ADDR"), env("MASTER_PORT")) {
                (Some(a), Some(p)) => format!("{a}:{p}"),
                _ => bail!(
                    "--num-nodes > 1 needs --orchestrator HOST:PORT (or MASTER_ADDR and MASTER_PORT)"
                ),
            },
        };
        let (orch_host, orch_port) = host_port(&orchestrator)
            .map_err(|e| anyhow::anyhow!("--orchestrator {orchestrator}: {e}"))?;
        let node_address = match self
            .node_address
            .clone()
            .or_else(|| env("IP2P_NODE_ADDRESS"))
        {
            Some(a) => a,
            None if is_loopback(&orch_host) => {
                let port = usize::from(orch_port) + 1 + node_rank;
                let port = u16::try_from(port).ok().context(
                    "the default --node-address port is past 65535: give --node-address",
                )?;
                format!("127.0.0.1:{port}")
            }
            None => bail!(
                "--node-address HOST:PORT (or IP2P_NODE_ADDRESS) is needed with a remote \
                 orchestrator: the address the other nodes reach this one at"
            ),
        };
        Ok(NodeSettings {
            num_nodes,
            node_rank,
            orchestrator,
            node_address,
        })
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `ip2p orchestrator`: burn-collective's global orchestrator for `ip2p train --num-nodes`.
#[derive(Debug, Args)]
pub struct OrchestratorArgs {
    /// Address to listen on. Loopback by default; the orchestrator has no authentication, so
    /// give another interface (e.g. 0.0.0.0:29400) only on a network you trust.
    #[arg(long, default_value = "127.0.0.1:29400")]
    pub addr: SocketAddr,
}

pub fn run_orchestrator(args: &OrchestratorArgs) -> Result<()> {
    collective_logging();
    if !args.addr.ip().is_loopback() {
        eprintln!(
            "warning: the orchestrator listens on {} without authentication: anyone who can reach \
             it can join the run",
            args.addr
        );
    }
    eprintln!("orchestrator listening on {} (Ctrl-C to stop)", args.addr);
    ip2p_train::run_orchestrator(OrchestratorConfig { addr: args.addr })?;
    Ok(())
}
