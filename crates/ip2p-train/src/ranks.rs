//! Global ranks of a data-parallel run: `num_nodes` processes with `devices` replicas each
//! (torch's `WORLD_SIZE = nnodes × nproc_per_node`, `RANK = node_rank × nproc_per_node +
//! local_rank`).
//!
//! Everything that splits the work (the data sampler, the item seeds) sees only the global
//! rank and the world size, so a replica's share is the same whether its peers are threads of
//! its process or other processes: 2 processes of 1 device and 1 process of 2 devices train on
//! the same samples with the same draws.

use crate::TrainError;
use crate::data::Shard;

/// The largest world: the start-up check sums squares of nibbles (≤ 225) over the world in
/// f32, exact only below 2^24, and burn-collective's peer ids are `u32`.
pub const MAX_WORLD: usize = 1 << 16;

/// Where one process's replicas sit among all of a run's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ranks {
    /// Processes (nodes) in the run.
    pub num_nodes: usize,
    /// This process's place among them, `0..num_nodes`.
    pub node_rank: usize,
    /// Replicas (devices) in each process; every process has the same number.
    pub devices: usize,
}

impl Ranks {
    /// One process, one device: no collective.
    pub const SINGLE: Ranks = Ranks {
        num_nodes: 1,
        node_rank: 0,
        devices: 1,
    };

    /// All replicas of the run.
    pub fn world(&self) -> usize {
        self.num_nodes * self.devices
    }

    /// The global rank of this process's `local`-th replica: node-major, as torchrun numbers
    /// ranks, so node 0's first device is rank 0 (the one that writes).
    pub fn global_rank(&self, local: usize) -> usize {
        self.node_rank * self.devices + local
    }

    /// The share of the data of this process's `local`-th replica.
    pub fn shard(&self, local: usize) -> Shard {
        Shard {
            rank: self.global_rank(local),
            world: self.world(),
        }
    }

    /// Counts that make a run: at least one node and device, the rank among the nodes, a world
    /// the collective can hold.
    pub fn check(&self) -> Result<(), TrainError> {
        let bad = |reason: String| Err(TrainError::Input(reason));
        if self.num_nodes == 0 {
            return bad("--num-nodes 0: a run needs at least one process".into());
        }
        if self.devices == 0 {
            return bad("--devices 0: a process needs at least one device".into());
        }
        if self.node_rank >= self.num_nodes {
            return bad(format!(
                "--node-rank {} is outside 0..{} (--num-nodes {})",
                self.node_rank, self.num_nodes, self.num_nodes
            ));
        }
        match self.num_nodes.checked_mul(self.devices) {
            Some(w) if w <= MAX_WORLD => Ok(()),
            _ => bad(format!(
                "{} nodes × {} devices: more than {MAX_WORLD} replicas",
                self.num_nodes, self.devices
            )),
        }
    }

    /// The replica of a global rank: (node rank, local index).
    pub fn place(&self, global_rank: usize) -> (usize, usize) {
        (global_rank / self.devices, global_rank % self.devices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::DataOrder;

    #[test]
    fn global_ranks_are_node_major_and_cover_the_world_once() {
        let mut seen = Vec::new();
        for node_rank in 0..3 {
            let r = Ranks {
                num_nodes: 3,
                node_rank,
                devices: 2,
            };
            r.check().unwrap();
            assert_eq!(r.world(), 6);
            for local in 0..2 {
                let g = r.global_rank(local);
                assert_eq!(r.place(g), (node_rank, local));
                seen.push(g);
            }
        }
        assert_eq!(seen, (0..6).collect::<Vec<_>>());
        assert_eq!(Ranks::SINGLE.shard(0), Shard::SINGLE);
    }

    #[test]
    fn bad_counts_are_errors() {
        let r = |num_nodes, node_rank, devices| {
            Ranks {
                num_nodes,
                node_rank,
                devices,
            }
            .check()
        };
        assert!(r(1, 0, 0).is_err());
        assert!(r(0, 0, 1).is_err());
        assert!(r(2, 2, 1).is_err());
        assert!(r(2, 1, MAX_WORLD).is_err());
        assert!(r(usize::MAX, 0, 2).is_err());
        assert!(r(1, 0, 2).is_ok());
    }

    /// The replicas of 2 nodes × 2 devices, batch `b` each, together take one process's
    /// batch of 4·b, item for item: replica g's item k is the global batch's item `k·4 + g`
    /// (DistributedSampler's stride), both for the rows and for the draws' seed index.
    #[test]
    fn replicas_together_take_one_process_global_batch() {
        let (n, b) = (23, 2);
        let nodes = |node_rank| Ranks {
            num_nodes: 2,
            node_rank,
            devices: 2,
        };
        let world = 4;
        let mut single = DataOrder::new(7);
        let mut replicas: Vec<(Shard, DataOrder)> = (0..2)
            .flat_map(|node| (0..2).map(move |local| (nodes(node).shard(local), DataOrder::new(7))))
            .collect();
        // Whole global batches in the first epoch (after it, DistributedSampler pads the
        // replicas' shares by repeating the epoch's start where one process moves on).
        for _step in 0..n / (world * b) {
            let global: Vec<usize> = (0..world * b)
                .map(|_| single.next(n, Shard::SINGLE))
                .collect();
            let mut from_replicas = vec![usize::MAX; world * b];
            let mut items = Vec::new();
            for (shard, order) in &mut replicas {
                for k in 0..b {
                    let item = shard.global_item(k);
                    from_replicas[item] = order.next(n, *shard);
                    items.push(item);
                }
            }
            assert_eq!(from_replicas, global);
            items.sort();
            assert_eq!(items, (0..world * b).collect::<Vec<_>>());
        }
        // Over an epoch every row is someone's, each replica ⌈n/4⌉ of them.
        let mut rows: Vec<usize> = Vec::new();
        for (shard, _) in &replicas {
            let mut order = DataOrder::new(7);
            for _ in 0..n.div_ceil(world) {
                rows.push(order.next(n, *shard));
            }
        }
        rows.sort();
        rows.dedup();
        assert_eq!(rows, (0..n).collect::<Vec<_>>());
    }
}
