//! Data-parallel training over Burn's `burn-collective`: every replica (rank) holds a copy of
//! the UNet on its own device, trains on its share of the data, and the ranks average their
//! gradients before each optimiser step (accelerate's DDP).
//!
//! A run has `num_nodes` processes of `devices` replicas each (see [`crate::ranks`]); a
//! process's replicas are threads that each register with burn-collective's in-process server
//! under their global rank. burn-collective does the transport: the local server sums the
//! process's replicas (a tree), and with several nodes the global orchestrator (see
//! [`crate::orchestrator`]) introduces them, after which each node's sum goes round a ring of
//! nodes peer to peer over WebSockets and the result comes back to every replica. A run in one
//! process needs no orchestrator. What ip2p adds on top:
//!
//! - Gradients are matched by parameter *path*, never by Burn's `ParamId` (random per
//!   process), and sent in buckets of about [`CollectiveSettings::bucket_bytes`] in path order,
//!   so every rank concatenates the same tensors in the same order.
//! - Every call has a deadline: burn-collective waits for a peer forever, so a call runs on a
//!   helper thread and a rank whose peers stop answering fails with [`TrainError::Collective`]
//!   instead of hanging. Replicas of one process share a [`LocalGroup`]: when one fails, the
//!   others stop waiting at once ([`TrainError::ReplicaStopped`]) rather than at the deadline.
//! - A start-up check that all ranks hold the same weights and settings ([`Collective::check_same`]),
//!   through an all-reduce (burn-collective 0.21 has no global broadcast).
//!
//! The averaged gradient is computed once per bucket slice and sent to every rank, so all ranks
//! apply bitwise the same update and stay identical. A process's replicas are added in peer-id
//! order (a patch to burn-collective, see `vendor/burn-collective/PATCHED.md`), so a run with
//! any number of devices is reproducible bit for bit.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_collective::{CollectiveConfig, CollectiveError, PeerId, ReduceOperation};

use crate::TrainError;
use crate::ranks::Ranks;

/// Where this process sits in a data-parallel run and how its replicas talk to the others.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectiveSettings {
    /// The other processes of a multi-node run; None: every replica is in this process (no
    /// orchestrator, no network).
    pub nodes: Option<NodeSettings>,
    /// Replicas (devices) in this process, each on its own thread.
    pub devices: usize,
    /// How long any collective call may wait for the other ranks.
    pub timeout: Duration,
    /// Gradient bucket size (torch DDP's `bucket_cap_mb` is 25 MB).
    pub bucket_bytes: usize,
}

/// A multi-node run: this process's place and the addresses of burn-collective's services.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSettings {
    /// Processes (nodes) in the run.
    pub num_nodes: usize,
    /// This process's place, `0..num_nodes`; node 0's first replica writes checkpoints,
    /// exports and validation.
    pub node_rank: usize,
    /// The global orchestrator, `host:port`.
    pub orchestrator: String,
    /// Where the other nodes reach this one's tensor service, `host:port`.
    pub node_address: String,
}

impl CollectiveSettings {
    /// Default gradient bucket: 25 MiB, as torch's DDP.
    pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

    /// The run's ranks (one node when [`Self::nodes`] is None).
    pub fn ranks(&self) -> Ranks {
        match &self.nodes {
            Some(n) => Ranks {
                num_nodes: n.num_nodes,
                node_rank: n.node_rank,
                devices: self.devices,
            },
            None => Ranks {
                devices: self.devices,
                ..Ranks::SINGLE
            },
        }
    }

    fn check(&self) -> Result<(), TrainError> {
        let bad = |reason: String| Err(TrainError::Input(reason));
        let ranks = self.ranks();
        ranks.check()?;
        if ranks.world() < 2 {
            return bad(format!(
                "{} node(s) × {} device(s): a data-parallel run needs at least 2 replicas",
                ranks.num_nodes, ranks.devices
            ));
        }
        if let Some(n) = &self.nodes {
            if n.num_nodes < 2 {
                return bad(format!(
                    "--num-nodes {}: an orchestrator joins at least 2 nodes (one process \
                     needs none)",
                    n.num_nodes
                ));
            }
            for (flag, addr) in [
                ("--orchestrator", &n.orchestrator),
                ("--node-address", &n.node_address),
            ] {
                host_port(addr).map_err(|e| TrainError::Input(format!("{flag} {addr}: {e}")))?;
            }
        }
        if self.timeout.is_zero() {
            return bad("the collective timeout must be more than 0 s".into());
        }
        if self.bucket_bytes < 4 {
            return bad(format!("gradient bucket of {} bytes", self.bucket_bytes));
        }
        Ok(())
    }
}

/// The replicas of one process. When one stops with an error, or panics, the others stop
/// waiting for it in their collective calls at once: they would otherwise wait out the whole
/// deadline (ten minutes by default) for a peer that is already gone.
#[derive(Debug, Default)]
pub struct LocalGroup {
    failed: AtomicBool,
}

impl LocalGroup {
    /// Mark the group failed: the other replicas' pending and later calls return
    /// [`TrainError::ReplicaStopped`].
    pub fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
    }

    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// A guard for a replica's thread: it fails the group if the thread unwinds (panics)
    /// while holding it.
    pub fn fail_on_panic(&self) -> FailOnPanic<'_> {
        FailOnPanic(self)
    }
}

/// See [`LocalGroup::fail_on_panic`].
pub struct FailOnPanic<'a>(&'a LocalGroup);

impl Drop for FailOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fail();
        }
    }
}

/// `host:port` split and checked (a port number; an IPv6 host in brackets).
pub fn host_port(addr: &str) -> Result<(String, u16), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| "expected host:port".to_string())?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("port `{port}` is not a number in 0..65536"))?;
    if host.is_empty() {
        return Err("no host before the port".into());
    }
    Ok((host.to_string(), port))
}

/// One replica's handle on the collective (burn-collective's peer, its id the global rank), for
/// the inner backend `B` where gradients live.
pub struct Collective<B: Backend> {
    peer: PeerId,
    rank: usize,
    world: usize,
    timeout: Duration,
    bucket_bytes: usize,
    group: Arc<LocalGroup>,
    _b: PhantomData<B>,
}

impl<B: Backend> std::fmt::Debug for Collective<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Collective(rank {} of {})", self.rank, self.world)
    }
}

/// What [`Collective::mean_gradients`] returns.
pub struct Averaged<B: Backend> {
    /// The gradients averaged over the ranks, by path.
    pub grads: BTreeMap<String, Tensor<B, 1>>,
    /// The extra scalars averaged.
    pub extra: Vec<f64>,
    /// Time spent in the all-reduce calls (and the bucket copies).
    pub seconds: f64,
}

/// How often a replica waiting in a collective call looks whether its group has failed.
const POLL: Duration = Duration::from_millis(50);

/// Run `f` on a helper thread and wait at most `timeout` for it, or until `group` fails.
fn with_deadline<T: Send + 'static>(
    rank: usize,
    what: &str,
    timeout: Duration,
    group: &LocalGroup,
    f: impl FnOnce() -> Result<T, CollectiveError> + Send + 'static,
) -> Result<T, TrainError> {
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name(format!("ip2p-collective-{rank}"))
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| TrainError::Collective {
            rank,
            what: what.to_string(),
            reason: format!("could not start a thread: {e}"),
        })?;
    let err = |reason: String| TrainError::Collective {
        rank,
        what: what.to_string(),
        reason,
    };
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(POLL)) {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => return Err(err(describe(&e))),
            Err(mpsc::RecvTimeoutError::Timeout) if group.has_failed() => {
                return Err(TrainError::ReplicaStopped {
                    rank,
                    what: what.to_string(),
                });
            }
            Err(mpsc::RecvTimeoutError::Timeout) if left.is_zero() => {
                return Err(err(format!(
                    "no answer from the other ranks within {} s: a rank has stopped or is \
                     unreachable (see its log), or is still busy (raise --collective-timeout)",
                    timeout.as_secs_f64()
                )));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // The helper thread ended without an answer: burn-collective panicked (it does when
            // a peer's connection drops mid-transfer).
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(err(
                    "the collective failed (a peer's connection dropped; see the messages above)"
                        .into(),
                ));
            }
        }
    }
}

fn describe(e: &CollectiveError) -> String {
    match e {
        CollectiveError::Global(g) => format!("between nodes: {g:?}"),
        CollectiveError::LocalServerMissing => {
            "burn-collective's local server stopped (a peer's connection dropped)".into()
        }
        other => format!("{other:?}"),
    }
}

fn to_prim<B: Backend>(t: Tensor<B, 1>) -> B::FloatTensorPrimitive {
    t.into_primitive().tensor()
}

fn from_prim<B: Backend>(p: B::FloatTensorPrimitive) -> Tensor<B, 1> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

impl<B: Backend> Collective<B> {
    /// Register this process's `local`-th replica (on `device`) and wait, at most the
    /// timeout, until every replica of the run has: all of the process's replicas call this
    /// together, each on its own thread, with the same `settings` and `group`.
    pub fn join(
        settings: &CollectiveSettings,
        local: usize,
        group: Arc<LocalGroup>,
        device: &B::Device,
    ) -> Result<Self, TrainError> {
        settings.check()?;
        let ranks = settings.ranks();
        if local >= settings.devices {
            return Err(TrainError::Input(format!(
                "replica {local} of a process with {} devices",
                settings.devices
            )));
        }
        let rank = ranks.global_rank(local);
        let mut config = CollectiveConfig::default().with_num_devices(settings.devices);
        let what = match &settings.nodes {
            Some(n) => {
                let (host, data_port) = host_port(&n.node_address).map_err(TrainError::Input)?;
                // The tensor service listens on the node address's interface when it is an IP
                // (loopback stays loopback), on every interface for a host name.
                let bind = host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse()
                    .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
                burn_communication::websocket::set_bind_host(bind);
                config = config
                    .with_num_nodes(n.num_nodes as u32)
                    .with_global_address(ws(&n.orchestrator)?)
                    .with_node_address(ws(&n.node_address)?)
                    .with_data_service_port(data_port);
                format!(
                    "joining {} nodes × {} devices through the orchestrator at {}",
                    n.num_nodes, settings.devices, n.orchestrator
                )
            }
            // burn-collective's in-process path: without global settings it never opens a
            // socket or looks for an orchestrator.
            None => format!("joining the {} devices of this process", settings.devices),
        };
        let peer = PeerId::from(rank);
        let device = device.clone();
        with_deadline(rank, &what, settings.timeout, &group, move || {
            burn_collective::register::<B>(peer, device, config)
        })?;
        Ok(Self {
            peer,
            rank,
            world: ranks.world(),
            timeout: settings.timeout,
            bucket_bytes: settings.bucket_bytes,
            group,
            _b: PhantomData,
        })
    }

    /// The global rank (node-major: `node_rank × devices + local`).
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// All replicas of the run (nodes × devices).
    pub fn world(&self) -> usize {
        self.world
    }

    fn all_reduce(
        &self,
        t: Tensor<B, 1>,
        op: ReduceOperation,
        what: &str,
    ) -> Result<Tensor<B, 1>, TrainError> {
        // The ring splits a tensor in one slice per node: pad short ones.
        let n = t.dims()[0];
        let t = if n < self.world {
            let pad = Tensor::zeros([self.world - n], &t.device());
            Tensor::cat(vec![t, pad], 0)
        } else {
            t
        };
        let peer = self.peer;
        let prim = to_prim(t);
        let out = with_deadline(self.rank, what, self.timeout, &self.group, move || {
            burn_collective::all_reduce::<B>(peer, prim, op)
        })?;
        Ok(from_prim::<B>(out).slice(0..n))
    }

    /// Sum of small non-negative integers (exact in f32 below 2^24) over the ranks.
    fn sum_counts(
        &self,
        values: &[u32],
        what: &str,
        device: &B::Device,
    ) -> Result<Vec<u32>, TrainError> {
        let data: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        let n = data.len();
        let t = Tensor::<B, 1>::from_data(TensorData::new(data, [n]), device);
        let out = self.all_reduce(t, ReduceOperation::Sum, what)?;
        let vals = out
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| TrainError::Input(format!("{what}: {e:?}")))?;
        Ok(vals.into_iter().map(|v| v as u32).collect())
    }

    /// Check that every rank has the same value of each named fingerprint; the error names the
    /// first that differs. Each 64-bit value is sent as 16 nibbles and their squares: the sums
    /// equal `world · x` and `world · x²` for every nibble only when all ranks agree.
    pub fn check_same(
        &self,
        fingerprints: &[(&str, u64)],
        device: &B::Device,
    ) -> Result<(), TrainError> {
        let mut values = Vec::new();
        for (_, h) in fingerprints {
            for k in 0..16 {
                let x = ((h >> (4 * k)) & 0xF) as u32;
                values.push(x);
                values.push(x * x);
            }
        }
        let sums = self.sum_counts(&values, "the start-up check that all ranks agree", device)?;
        let w = self.world as u32;
        for (i, (name, h)) in fingerprints.iter().enumerate() {
            let same = (0..32).all(|j| sums[i * 32 + j] == w * values[i * 32 + j]);
            if !same {
                return Err(TrainError::Collective {
                    rank: self.rank,
                    what: "the start-up check".into(),
                    reason: format!(
                        "the ranks do not hold the same {name} (this rank's fingerprint \
                         {h:016x}): start every rank with the same model, data, flags and checkpoint"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Every rank's `values` (each below 2^24), gathered by rank through a sum of slots.
    pub fn gather(
        &self,
        values: &[u32],
        what: &str,
        device: &B::Device,
    ) -> Result<Vec<Vec<u32>>, TrainError> {
        let k = values.len();
        let mut slots = vec![0u32; k * self.world];
        slots[self.rank * k..(self.rank + 1) * k].copy_from_slice(values);
        let sums = self.sum_counts(&slots, what, device)?;
        Ok(sums.chunks(k.max(1)).map(|c| c.to_vec()).collect())
    }

    /// Average `grads` (by path) and `extra` scalars over the ranks, in buckets ordered by path.
    pub fn mean_gradients(
        &self,
        step: usize,
        grads: BTreeMap<String, Tensor<B, 1>>,
        extra: &[f64],
    ) -> Result<Averaged<B>, TrainError> {
        let start = Instant::now();
        let device = match grads.values().next() {
            Some(t) => t.device(),
            None => Default::default(),
        };
        let (names, tensors): (Vec<String>, Vec<Tensor<B, 1>>) = grads.into_iter().unzip();
        let sizes: Vec<usize> = tensors.iter().map(|t| t.dims()[0]).collect();
        let plan = buckets(&sizes, self.bucket_bytes / 4);
        let mut tensors: Vec<Option<Tensor<B, 1>>> = tensors.into_iter().map(Some).collect();
        let mut out = BTreeMap::new();
        let mut extra_out = Vec::new();
        let count = plan.len().max(1);
        for b in 0..count {
            let range = plan.get(b).cloned().unwrap_or(0..0);
            let mut parts: Vec<Tensor<B, 1>> = range
                .clone()
                .filter_map(|i| tensors[i].take().map(|t| t.cast(DType::F32)))
                .collect();
            let last = b + 1 == count;
            if last {
                let e: Vec<f32> = extra.iter().map(|&v| v as f32).collect();
                let n = e.len();
                parts.push(Tensor::from_data(TensorData::new(e, [n]), &device));
            }
            let bucket = Tensor::cat(parts, 0);
            let what = format!(
                "the all-reduce of step {step}'s gradients (bucket {} of {count})",
                b + 1
            );
            let mut reduced = self.all_reduce(bucket, ReduceOperation::Mean, &what)?;
            let mut offset = 0;
            for i in range {
                let n = sizes[i];
                out.insert(names[i].clone(), reduced.clone().slice(offset..offset + n));
                offset += n;
            }
            if last {
                let total = reduced.dims()[0];
                reduced = reduced.slice(offset..total);
                extra_out = reduced
                    .into_data()
                    .convert::<f64>()
                    .to_vec::<f64>()
                    .map_err(|e| TrainError::Input(format!("{what}: {e:?}")))?;
            }
        }
        Ok(Averaged {
            grads: out,
            extra: extra_out,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Leave the collective (each rank once, at the end of a run).
    pub fn finish(self) -> Result<(), TrainError> {
        let peer = self.peer;
        with_deadline(
            self.rank,
            "leaving the collective",
            self.timeout,
            &self.group,
            move || burn_collective::finish_collective::<B>(peer),
        )
    }
}

/// burn-communication's `Address`, a WebSocket URL.
fn ws<A: std::str::FromStr<Err = String>>(addr: &str) -> Result<A, TrainError> {
    format!("ws://{addr}")
        .parse()
        .map_err(|e| TrainError::Input(format!("address {addr}: {e}")))
}

/// Consecutive ranges of `sizes` (in their order) of at most `cap` elements each; a tensor
/// larger than `cap` is a bucket of its own.
pub fn buckets(sizes: &[usize], cap: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut filled) = (0, 0);
    for (i, &n) in sizes.iter().enumerate() {
        if filled > 0 && filled + n > cap {
            out.push(start..i);
            start = i;
            filled = 0;
        }
        filled += n;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// A 64-bit fingerprint of byte strings (FNV-1a over 8-byte words), for the start-up check.
#[derive(Debug, Clone, Copy)]
pub struct Fingerprint(u64);

impl Default for Fingerprint {
    fn default() -> Self {
        Self(0xCBF2_9CE4_8422_2325)
    }
}

impl Fingerprint {
    pub fn add(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            self.0 = (self.0 ^ w).wrapping_mul(0x0000_0100_0000_01B3);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3);
        }
        // The length, so that concatenations differ.
        self.0 = (self.0 ^ bytes.len() as u64).wrapping_mul(0x0000_0100_0000_01B3);
    }

    pub fn value(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_keep_order_and_cap() {
        assert_eq!(buckets(&[3, 3, 3, 10, 1], 6), vec![0..2, 2..3, 3..4, 4..5]);
        assert_eq!(buckets(&[1, 1, 1], 100), vec![0..3]);
        assert!(buckets(&[], 5).is_empty());
    }

    #[test]
    fn addresses_are_checked() {
        assert_eq!(
            host_port("127.0.0.1:29400"),
            Ok(("127.0.0.1".into(), 29400))
        );
        assert!(host_port("127.0.0.1").is_err());
        assert!(host_port("host:99999").is_err());
        assert!(host_port(":80").is_err());
    }

    fn settings(nodes: Option<NodeSettings>, devices: usize) -> CollectiveSettings {
        CollectiveSettings {
            nodes,
            devices,
            timeout: Duration::from_secs(30),
            bucket_bytes: 16,
        }
    }

    fn nodes(num_nodes: usize, node_rank: usize, orchestrator: &str) -> Option<NodeSettings> {
        Some(NodeSettings {
            num_nodes,
            node_rank,
            orchestrator: orchestrator.into(),
            node_address: "127.0.0.1:29401".into(),
        })
    }

    #[test]
    fn settings_are_checked() {
        // One replica in all is no data-parallel run; one process needs no orchestrator.
        assert!(settings(None, 1).check().is_err());
        assert!(settings(None, 2).check().is_ok());
        assert!(settings(None, 0).check().is_err());
        assert!(settings(nodes(1, 0, "127.0.0.1:29400"), 2).check().is_err());
        assert!(settings(nodes(2, 1, "127.0.0.1:29400"), 2).check().is_ok());
        assert!(settings(nodes(2, 2, "127.0.0.1:29400"), 1).check().is_err());
        assert!(settings(nodes(2, 0, "127.0.0.1"), 1).check().is_err());
        let r = settings(nodes(3, 2, "127.0.0.1:29400"), 4).ranks();
        assert_eq!((r.world(), r.global_rank(1)), (12, 9));
    }

    type B = burn::backend::Flex;

    /// burn-collective's in-process server is one per backend and process: the tests that
    /// register with it take turns.
    static SERVER: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Three replicas whose sum depends on the order of addition ((1e8 + -1e8) + 1 = 1, but
    /// 1e8 + (-1e8 + 1) = 0 in f32): every run adds them in rank order.
    #[test]
    fn replicas_are_added_in_rank_order() {
        let _turn = SERVER.lock().unwrap_or_else(|e| e.into_inner());
        let device = Default::default();
        let values = [1e8f32, -1e8, 1.0];
        let want = ((values[0] + values[1]) + values[2]) / 3.0;
        let set = settings(None, 3);
        for _ in 0..4 {
            let group = Arc::new(LocalGroup::default());
            std::thread::scope(|s| {
                for (local, v) in values.into_iter().enumerate() {
                    let (group, set) = (group.clone(), &set);
                    s.spawn(move || {
                        let c = Collective::<B>::join(set, local, group, &device).unwrap();
                        let mut g = BTreeMap::new();
                        g.insert("w".to_string(), Tensor::<B, 1>::full([4], v, &device));
                        let avg = c.mean_gradients(1, g, &[]).unwrap();
                        c.finish().unwrap();
                        let got = avg.grads["w"].to_data().to_vec::<f32>().unwrap();
                        assert_eq!(got, vec![want; 4], "replica {local}");
                    });
                }
            });
        }
    }

    /// Two replicas of one process (threads on the CPU backend, whose device is a unit
    /// value: burn-collective tells them apart by peer id) average their gradients through
    /// burn-collective's in-process path, bitwise alike; gather and the agreement check work
    /// over them; and when one fails the other stops waiting at once.
    #[test]
    fn replicas_in_one_process_average_and_stop_together() {
        let _turn = SERVER.lock().unwrap_or_else(|e| e.into_inner());
        let device = Default::default();
        let grads = |local: usize| {
            let x = local as f32;
            let mut g = BTreeMap::new();
            g.insert(
                "a".to_string(),
                Tensor::<B, 1>::from_floats([1.0 + x, 3.0, 0.1 * x], &device),
            );
            let b: Vec<f32> = (0..7).map(|i| (i as f32 + 0.3) * (x + 1.0) / 3.0).collect();
            g.insert("b".to_string(), Tensor::from_floats(b.as_slice(), &device));
            g
        };
        let set = settings(None, 2);
        let group = Arc::new(LocalGroup::default());
        let out: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|local| {
                    let (group, set, grads) = (group.clone(), &set, &grads);
                    s.spawn(move || {
                        let c = Collective::<B>::join(set, local, group, &device).unwrap();
                        assert_eq!((c.rank(), c.world()), (local, 2));
                        let avg = c.mean_gradients(1, grads(local), &[local as f64]).unwrap();
                        let gathered = c.gather(&[10 + local as u32], "test", &device).unwrap();
                        c.check_same(&[("x", 0xABCD)], &device).unwrap();
                        let differ = c.check_same(&[("x", local as u64)], &device).is_err();
                        c.finish().unwrap();
                        (avg, gathered, differ)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let (g0, g1) = (grads(0), grads(1));
        for (avg, gathered, differ) in &out {
            assert_eq!(gathered, &vec![vec![10], vec![11]]);
            assert!(differ, "different fingerprints passed the check");
            assert_eq!(avg.extra, vec![0.5]);
            for (name, t) in &avg.grads {
                let got = t.to_data().to_vec::<f32>().unwrap();
                let (x, y) = (g0[name].to_data(), g1[name].to_data());
                let want: Vec<f32> = x
                    .to_vec::<f32>()
                    .unwrap()
                    .iter()
                    .zip(y.to_vec::<f32>().unwrap())
                    .map(|(a, b)| (a + b) / 2.0)
                    .collect();
                assert_eq!(got, want, "{name}");
            }
        }

        // Replica 1 fails before the first all-reduce: replica 0 stops long before its 30 s.
        let group = Arc::new(LocalGroup::default());
        let started = Instant::now();
        let err = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|local| {
                    let (group, set, grads) = (group.clone(), &set, &grads);
                    s.spawn(move || {
                        let c = Collective::<B>::join(set, local, group.clone(), &device)?;
                        if local == 1 {
                            let _guard = group.fail_on_panic();
                            group.fail();
                            return Ok(());
                        }
                        c.mean_gradients(1, grads(local), &[]).map(|_| ())
                    })
                })
                .collect();
            let mut r: Vec<Result<(), TrainError>> =
                handles.into_iter().map(|h| h.join().unwrap()).collect();
            r.remove(0)
        });
        assert!(
            matches!(err, Err(TrainError::ReplicaStopped { rank: 0, .. })),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        // Forget the abandoned all-reduce.
        burn_collective::reset_collective::<B>();
    }

    #[test]
    fn fingerprints_see_every_byte() {
        let f = |b: &[u8]| {
            let mut f = Fingerprint::default();
            f.add(b);
            f.value()
        };
        assert_ne!(f(&[0; 9]), f(&[0; 8]));
        assert_ne!(f(&[0, 0, 0, 0, 0, 0, 0, 0, 1]), f(&[0; 9]));
        assert_eq!(f(b"abc"), f(b"abc"));
    }
}
