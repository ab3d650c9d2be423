//! Each item's seed, from the run's global seed and the item's id.
//!
//! The seed of an item is its manifest's `seed` column when given, else
//!
//! ```text
//! item_seed(global, id) = splitmix64(global XOR fnv1a64(utf8(id))) >> 11
//! ```
//!
//! FNV-1a 64 (offset 0xcbf29ce484222325, prime 0x100000001b3) over the id's bytes, then one
//! SplitMix64 output (Steele et al.; the `java.util.SplittableRandom` finaliser), keeping the top
//! 53 bits so the seed is exact in any JSON reader (doubles). It depends only on the two inputs:
//! not on the item's shard, batch or position. The seed drives a torch CPU generator of the item's
//! own (`torch.Generator().manual_seed(seed)`): its initial latents and every stochastic step's
//! noise, as diffusers does with a list of generators. In Python:
//!
//! ```python
//! def item_seed(g, id):
//!     h = 0xcbf29ce484222325
//!     for b in id.encode():
//!         h = ((h ^ b) * 0x100000001b3) % 2**64
//!     z = ((g ^ h) + 0x9e3779b97f4a7c15) % 2**64
//!     z = ((z ^ (z >> 30)) * 0xbf58476d1ce4e5b9) % 2**64
//!     z = ((z ^ (z >> 27)) * 0x94d049bb133111eb) % 2**64
//!     return (z ^ (z >> 31)) >> 11
//! ```

/// FNV-1a, 64 bits.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// One SplitMix64 output for state `x` (the state advanced once, then mixed).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of item `id` in a run seeded with `global` (see the module documentation).
pub fn item_seed(global: u64, id: &str) -> u64 {
    splitmix64(global ^ fnv1a64(id.as_bytes())) >> 11
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // FNV-1a's published test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        // SplitMix64 from state 0: the first output of the reference generator.
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn seeds_fit_in_53_bits_and_differ() {
        let a = item_seed(0, "item-1");
        let b = item_seed(0, "item-2");
        let c = item_seed(1, "item-1");
        assert!(a < 1 << 53 && b < 1 << 53 && c < 1 << 53);
        assert!(a != b && a != c && b != c);
        assert_eq!(a, item_seed(0, "item-1"));
    }

    #[test]
    fn matches_the_documented_python() {
        // The module documentation's Python function, run on CPython 3.
        assert_eq!(item_seed(0, "item-1"), 1_774_912_483_185_478);
        assert_eq!(item_seed(1234, "a"), 5_111_577_290_735_905);
    }
}
