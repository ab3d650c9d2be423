//! A small seeded generator for data order, flips and training draws (splitmix64).

/// splitmix64: fast, seedable, reproducible everywhere.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

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
