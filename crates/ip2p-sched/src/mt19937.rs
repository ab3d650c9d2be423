//! The 32-bit Mersenne Twister (MT19937), seeded as torch's CPU generator seeds it.
//!
//! torch's `manual_seed(S)` keeps only the low 32 bits of `S` for the engine's state; the
//! engine itself is the textbook MT19937 (Matsumoto & Nishimura 1998), so the outputs are
//! those of C++'s `std::mt19937` for the same 32-bit seed.

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER: u32 = 0x8000_0000;
const LOWER: u32 = 0x7fff_ffff;

/// MT19937 state: 624 words and the index of the next one to temper.
#[derive(Clone)]
pub struct Mt19937 {
    // Boxed: 2.5 KB inline would make every generator (and enum holding one) that large.
    state: Box<[u32; N]>,
    next: usize,
}

impl Mt19937 {
    /// The engine of `torch.Generator("cpu").manual_seed(seed)`.
    pub fn new(seed: u64) -> Self {
        let mut state = Box::new([0u32; N]);
        state[0] = seed as u32;
        for i in 1..N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        // The first draw regenerates the whole state, as torch's does.
        Self { state, next: N }
    }

    /// The next 32-bit output.
    pub fn next_u32(&mut self) -> u32 {
        if self.next == N {
            self.regenerate();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    fn regenerate(&mut self) {
        let s = &mut self.state;
        for i in 0..N {
            let y = (s[i] & UPPER) | (s[(i + 1) % N] & LOWER);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            s[i] = s[(i + M) % N] ^ (y >> 1) ^ mag;
        }
        self.next = 0;
    }
}

impl std::fmt::Debug for Mt19937 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mt19937")
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::Mt19937;

    /// The C++ standard's check value: the 10000th output of `std::mt19937` seeded 5489.
    #[test]
    fn matches_std_mt19937() {
        let mut e = Mt19937::new(5489);
        assert_eq!(e.next_u32(), 3_499_211_612);
        let last = (1..10_000).map(|_| e.next_u32()).last().unwrap();
        assert_eq!(last, 4_123_659_995);
    }

    /// torch keeps the low 32 bits of a 64-bit seed.
    #[test]
    fn seeds_with_the_low_32_bits() {
        let (mut a, mut b) = (Mt19937::new(7), Mt19937::new((1 << 40) | 7));
        assert!((0..700).all(|_| a.next_u32() == b.next_u32()));
    }
}
