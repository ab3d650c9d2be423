//! Seeds for data order, flips and training draws, from ip2p-sched's splitmix64.

pub use ip2p_sched::SplitMix;

/// The seed of one item's draws (posterior noise, DDPM noise, timestep, dropout, flip):
/// keyed by the run's seed, the optimiser step, the micro-batch and the item's place in the
/// global batch (`item · world + rank` for a rank's `item`-th pair), so an item draws the same
/// values whichever rank holds it: N ranks with batch b draw what one process with batch N·b
/// draws.
pub fn item_seed(seed: u64, step: usize, micro: usize, global_item: usize) -> u64 {
    let mut s = SplitMix::new(seed);
    for k in [step, micro, global_item] {
        s = SplitMix::new(s.next_u64() ^ k as u64);
    }
    s.next_u64()
}
