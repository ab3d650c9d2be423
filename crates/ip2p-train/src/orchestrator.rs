//! The global orchestrator of a multi-node run: burn-collective's, which introduces the nodes
//! to each other (they then exchange tensors directly). One per run, on any machine the nodes
//! reach; it runs until interrupted (Ctrl-C or SIGTERM).

use std::net::{SocketAddr, TcpListener};

use crate::TrainError;

/// Where the orchestrator listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrchestratorConfig {
    /// Loopback by default: the orchestrator has no authentication, so another interface is
    /// for a trusted network only.
    pub addr: SocketAddr,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 29400)),
        }
    }
}

/// Run the orchestrator until the process is interrupted.
pub fn run_orchestrator(config: OrchestratorConfig) -> Result<(), TrainError> {
    let addr = config.addr;
    // burn-collective logs a failed bind and returns; binding first gives a clear error.
    drop(
        TcpListener::bind(addr)
            .map_err(|e| TrainError::io(format!("orchestrator address {addr}"), e))?,
    );
    burn_communication::websocket::set_bind_host(addr.ip());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| TrainError::io("the orchestrator's runtime", e))?;
    runtime.block_on(burn_collective::start_global_orchestrator(addr.port()));
    Ok(())
}
