//! `ip2p serve`: a web page and an HTTP API for InstructPix2Pix edits.
//!
//! One model on one worker thread ([`worker`]), a bounded queue in front of it ([`jobs`]), and
//! an axum server on tokio ([`routes`]): `POST /api/edits` queues an edit, its progress comes
//! as server-sent events with a latent preview per step ([`preview`]), and the result is a PNG
//! with its parameters in a text chunk ([`output`]). `GET /` serves one self-contained page.
//! Generic over the backend; the binary chooses it.

pub mod error;
pub mod input;
pub mod jobs;
pub mod output;
pub mod params;
pub mod preview;
pub mod routes;
pub mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use ip2p_nn::Backend;
use ip2p_pipeline::LoadOptions;
use tokio::sync::oneshot;

pub use error::{ApiError, ServeError};
pub use jobs::{DoneInfo, Event, Jobs, State};
pub use params::{EditParams, EditRequest};
pub use worker::ModelInfo;

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// A diffusers InstructPix2Pix folder.
    pub model: PathBuf,
    pub load: LoadOptions,
    /// Loopback by default: the server has no authentication.
    pub addr: SocketAddr,
    /// Edits that may wait behind the running one; more get 429.
    pub queue: usize,
    /// How long a finished edit's state and result stay.
    pub keep_results: Duration,
    /// Request bodies over this get 413.
    pub max_upload_bytes: usize,
    /// Images with more pixels get 413 (checked from the header, before decoding).
    pub max_image_pixels: u64,
    /// Stop on Ctrl-C (the command line); tests stop through [`Server::stop`].
    pub ctrl_c: bool,
}

impl ServeConfig {
    pub fn new(model: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            load: LoadOptions::default(),
            addr: SocketAddr::from(([127, 0, 0, 1], 7860)),
            queue: 8,
            keep_results: Duration::from_secs(15 * 60),
            max_upload_bytes: 32 << 20,
            max_image_pixels: 50_000_000,
            ctrl_c: false,
        }
    }
}

/// A running server: the model thread and the HTTP thread.
pub struct Server {
    addr: SocketAddr,
    info: ModelInfo,
    jobs: Arc<Jobs>,
    shutdown: Option<oneshot::Sender<()>>,
    http: Option<JoinHandle<Result<(), ServeError>>>,
    worker: Option<JoinHandle<()>>,
}

impl Server {
    /// Load the model, bind the address, start serving; returns once requests are accepted.
    pub fn start<B: Backend>(config: ServeConfig, device: B::Device) -> Result<Self, ServeError> {
        let jobs = Arc::new(Jobs::new(config.queue, config.keep_results));
        let (ready_tx, ready_rx) = mpsc::channel();
        let worker = worker::spawn::<B>(
            config.model.clone(),
            config.load.clone(),
            device,
            jobs.clone(),
            ready_tx,
        )?;
        let info = match ready_rx.recv() {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => {
                let _ = worker.join();
                return Err(e);
            }
            Err(_) => return Err(ServeError::Thread("model")),
        };

        let app = routes::App {
            jobs: jobs.clone(),
            info: Arc::new(info.clone()),
            max_upload_bytes: config.max_upload_bytes,
            max_image_pixels: config.max_image_pixels,
        };
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let (bound_tx, bound_rx) = mpsc::channel();
        let addr = config.addr;
        let ctrl_c = config.ctrl_c;
        let http_jobs = jobs.clone();
        let http = std::thread::Builder::new().name("ip2p-http".into()).spawn(
            move || -> Result<(), ServeError> {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::bind(addr).await {
                        Ok(l) => l,
                        Err(source) => {
                            let _ = bound_tx.send(Err(ServeError::Bind { addr, source }));
                            return Ok(());
                        }
                    };
                    let _ = bound_tx.send(listener.local_addr().map_err(ServeError::Io));
                    // Finished edits expire in the background.
                    let sweeper_jobs = http_jobs.clone();
                    let every = (sweeper_jobs.keep() / 4)
                        .clamp(Duration::from_millis(100), Duration::from_secs(30));
                    tokio::spawn(async move {
                        let mut tick = tokio::time::interval(every);
                        loop {
                            tick.tick().await;
                            sweeper_jobs.expire();
                        }
                    });
                    let stop = async move {
                        if ctrl_c {
                            tokio::select! {
                                _ = shutdown_rx => {}
                                _ = tokio::signal::ctrl_c() => {}
                            }
                        } else {
                            let _ = shutdown_rx.await;
                        }
                        // Ends every event stream, so that graceful shutdown does not wait on them.
                        http_jobs.stop();
                    };
                    axum::serve(listener, routes::router(app))
                        .with_graceful_shutdown(stop)
                        .await
                        .map_err(ServeError::Io)
                })
            },
        )?;
        let addr = match bound_rx.recv() {
            Ok(Ok(addr)) => addr,
            Ok(Err(e)) => {
                jobs.stop();
                let _ = worker.join();
                let _ = http.join();
                return Err(e);
            }
            Err(_) => {
                jobs.stop();
                let _ = worker.join();
                return Err(ServeError::Thread("HTTP"));
            }
        };
        Ok(Self {
            addr,
            info,
            jobs,
            shutdown: Some(shutdown_tx),
            http: Some(http),
            worker: Some(worker),
        })
    }

    /// The address it listens on (the real port when the config asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn jobs(&self) -> &Arc<Jobs> {
        &self.jobs
    }

    /// Serve until stopped (Ctrl-C when the config says so).
    pub fn wait(mut self) -> Result<(), ServeError> {
        let result = match self.http.take() {
            Some(h) => h.join().map_err(|_| ServeError::Thread("HTTP"))?,
            None => Ok(()),
        };
        self.jobs.stop();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        result
    }

    /// Stop: the running edit is cancelled, the threads end.
    pub fn stop(mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.jobs.stop();
        let result = match self.http.take() {
            Some(h) => h.join().map_err(|_| ServeError::Thread("HTTP"))?,
            None => Ok(()),
        };
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        result
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.jobs.stop();
        if let Some(h) = self.http.take() {
            let _ = h.join();
        }
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
