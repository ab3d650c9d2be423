//! The noise source of a seeded run: the initial latents and every stochastic step draw from it.
//!
//! Three ways to draw, matching what a diffusers user can pass as `generator=`:
//! - [`Generator::torch`]: one `torch.Generator("cpu").manual_seed(seed)` for the batch. Every
//!   draw is one `torch.randn` of the whole shape, so with diffusers' order of draws (initial
//!   latents, then one per stochastic step) a seed gives diffusers' image.
//! - [`Generator::per_item`]: one torch generator per batch item (diffusers' list of
//!   generators): item `i` draws its `[1, ...]` slice from generator `i`, so an item's noise
//!   does not depend on what else is in the batch.
//! - [`Generator::ip2p`]: ip2p's earlier generator ([`NoiseRng`]), kept so old seeds still
//!   reproduce old images.
//!
//! Noise is drawn on the host and uploaded, so a seed gives the same noise on every backend.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::{NoiseRng, SchedError, TorchGenerator};

/// Which generator a seed drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RngKind {
    /// torch's CPU generator: diffusers' noise for `torch.Generator().manual_seed(seed)`.
    #[default]
    Torch,
    /// ip2p's earlier xoshiro generator (before torch's was added).
    Ip2p,
}

/// A seeded noise source for the initial latents and the stochastic scheduler steps.
#[derive(Debug, Clone)]
pub struct Generator {
    source: Source,
}

#[derive(Debug, Clone)]
enum Source {
    /// One generator for the batch. With `rows`, each draw of `[b, ...]` is rows
    /// `start..start + b` of the `[total, ...]` draw the whole batch would make.
    Torch {
        rng: TorchGenerator,
        rows: Option<Rows>,
    },
    PerItem(Vec<TorchGenerator>),
    /// `seed` derives the per-chunk scheduler seeds, as ip2p always did.
    Ip2p {
        rng: NoiseRng,
        seed: u64,
    },
}

#[derive(Debug, Clone, Copy)]
struct Rows {
    start: usize,
    total: usize,
}

impl Generator {
    /// The generator `kind` seeded with `seed`.
    pub fn new(kind: RngKind, seed: u64) -> Self {
        match kind {
            RngKind::Torch => Self::torch(seed),
            RngKind::Ip2p => Self::ip2p(seed),
        }
    }

    /// `torch.Generator("cpu").manual_seed(seed)`, one for the whole batch.
    pub fn torch(seed: u64) -> Self {
        TorchGenerator::new(seed).into()
    }

    /// One torch generator per batch item, `[torch.Generator().manual_seed(s) for s in seeds]`:
    /// item `i`'s noise depends only on `seeds[i]` (for datasets edited in shards).
    pub fn per_item(seeds: impl IntoIterator<Item = u64>) -> Self {
        Self::per_item_generators(seeds.into_iter().map(TorchGenerator::new).collect())
    }

    /// One given torch generator per batch item, in order.
    pub fn per_item_generators(generators: Vec<TorchGenerator>) -> Self {
        Self {
            source: Source::PerItem(generators),
        }
    }

    /// ip2p's earlier generator.
    pub fn ip2p(seed: u64) -> Self {
        Self {
            source: Source::Ip2p {
                rng: NoiseRng::new(seed),
                seed,
            },
        }
    }

    /// Which generator this is (per-item generators are torch's).
    pub fn kind(&self) -> RngKind {
        match self.source {
            Source::Ip2p { .. } => RngKind::Ip2p,
            _ => RngKind::Torch,
        }
    }

    /// The number of items of a per-item generator.
    pub fn items(&self) -> Option<usize> {
        match &self.source {
            Source::PerItem(g) => Some(g.len()),
            _ => None,
        }
    }

    /// Whether this can draw for a batch of `batch` (a per-item generator needs one per item,
    /// as diffusers' `prepare_latents` requires).
    pub fn check_batch(&self, batch: usize) -> Result<(), SchedError> {
        match self.items() {
            Some(n) if n != batch => Err(SchedError::GeneratorCount {
                generators: n,
                batch,
            }),
            _ => Ok(()),
        }
    }

    /// Standard normal values of `shape`, flattened, as `randn_tensor(shape, generator)`.
    pub fn randn(&mut self, shape: [usize; 4]) -> Result<Vec<f32>, SchedError> {
        let [b, c, h, w] = shape;
        let per_item = c * h * w;
        match &mut self.source {
            Source::Torch { rng, rows: None } => Ok(rng.randn(b * per_item)),
            Source::Torch {
                rng,
                rows: Some(Rows { start, total }),
            } => {
                if *start + b > *total {
                    return Err(SchedError::GeneratorRows {
                        start: *start,
                        end: *start + b,
                        total: *total,
                    });
                }
                let range = *start * per_item..(*start + b) * per_item;
                Ok(rng.randn_range(*total * per_item, range))
            }
            Source::PerItem(gens) => {
                if gens.len() != b {
                    return Err(SchedError::GeneratorCount {
                        generators: gens.len(),
                        batch: b,
                    });
                }
                Ok(gens.iter_mut().flat_map(|g| g.randn(per_item)).collect())
            }
            Source::Ip2p { rng, .. } => Ok((0..b * per_item)
                .map(|_| rng.next_normal() as f32)
                .collect()),
        }
    }

    /// An f32 tensor of standard normal values on `device` (drawn on the host).
    pub fn normal<B: Backend>(
        &mut self,
        shape: [usize; 4],
        device: &B::Device,
    ) -> Result<Tensor<B, 4>, SchedError> {
        let values = self.randn(shape)?;
        Ok(crate::to_f32(Tensor::from_data(
            TensorData::new(values, shape),
            device,
        )))
    }

    /// The generator a scheduler denoising rows `start..start + len` of a `total`-row batch
    /// draws its step noise from; `chunk` is the chunk's index (0 for a batch run whole).
    ///
    /// torch: a copy that takes these rows of each whole-batch draw, so splitting a batch into
    /// chunks leaves every item's noise as diffusers draws it for the unsplit batch (at the
    /// cost of drawing the other rows' uniforms once per chunk). Per item: these items'
    /// generators. ip2p: reseeded with `seed + 1 + chunk`, as ip2p always did.
    pub fn for_chunk(
        &self,
        chunk: usize,
        start: usize,
        len: usize,
        total: usize,
    ) -> Result<Generator, SchedError> {
        if start + len > total {
            return Err(SchedError::GeneratorRows {
                start,
                end: start + len,
                total,
            });
        }
        let source = match &self.source {
            Source::Torch { rng, rows } => {
                let rows = match rows {
                    Some(outer) => Some(Rows {
                        start: outer.start + start,
                        total: outer.total,
                    }),
                    None if start == 0 && len == total => None,
                    None => Some(Rows { start, total }),
                };
                Source::Torch {
                    rng: rng.clone(),
                    rows,
                }
            }
            Source::PerItem(gens) => {
                self.check_batch(total)?;
                Source::PerItem(gens[start..start + len].to_vec())
            }
            Source::Ip2p { seed, .. } => {
                let seed = seed.wrapping_add(1 + chunk as u64);
                Source::Ip2p {
                    rng: NoiseRng::new(seed),
                    seed,
                }
            }
        };
        Ok(Generator { source })
    }
}

impl From<TorchGenerator> for Generator {
    /// One torch generator for the whole batch.
    fn from(rng: TorchGenerator) -> Self {
        Self {
            source: Source::Torch { rng, rows: None },
        }
    }
}

impl Default for Generator {
    /// torch's generator seeded 0.
    fn default() -> Self {
        Self::torch(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(g: &mut Generator, shape: [usize; 4]) -> Vec<f32> {
        g.randn(shape).unwrap()
    }

    #[test]
    fn chunks_take_their_rows_of_the_whole_batch_draw() {
        let shape = [5, 4, 3, 3];
        let whole = Generator::torch(9);
        let mut reference = whole.clone();
        let steps: Vec<Vec<f32>> = (0..3).map(|_| draw(&mut reference, shape)).collect();
        let per = 4 * 3 * 3;
        for (chunk, (start, len)) in [(0, 2), (2, 2), (4, 1)].into_iter().enumerate() {
            let mut g = whole.for_chunk(chunk, start, len, 5).unwrap();
            for step in &steps {
                assert_eq!(
                    draw(&mut g, [len, 4, 3, 3]),
                    step[start * per..(start + len) * per]
                );
            }
        }
    }

    #[test]
    fn per_item_generators_draw_one_slice_each() {
        let mut g = Generator::per_item([3, 8]);
        let both = draw(&mut g, [2, 4, 2, 3]);
        let one = |seed| TorchGenerator::new(seed).randn(24);
        assert_eq!(both[..24], one(3));
        assert_eq!(both[24..], one(8));
        let mut second = Generator::per_item([3, 8]).for_chunk(1, 1, 1, 2).unwrap();
        assert_eq!(draw(&mut second, [1, 4, 2, 3]), one(8));
        assert!(matches!(
            g.randn([3, 4, 2, 3]),
            Err(SchedError::GeneratorCount {
                generators: 2,
                batch: 3
            })
        ));
        assert!(g.check_batch(2).is_ok() && g.check_batch(1).is_err());
    }

    #[test]
    fn ip2p_chunks_reseed_as_before() {
        let g = Generator::ip2p(10);
        let mut chunk = g.for_chunk(2, 0, 1, 1).unwrap();
        let mut old = NoiseRng::new(13);
        let expected: Vec<f32> = (0..8).map(|_| old.next_normal() as f32).collect();
        assert_eq!(draw(&mut chunk, [1, 2, 2, 2]), expected);
    }

    #[test]
    fn rows_past_the_batch_are_errors() {
        let g = Generator::torch(1);
        assert!(matches!(
            g.for_chunk(0, 3, 2, 4),
            Err(SchedError::GeneratorRows { .. })
        ));
        let mut c = g.for_chunk(1, 2, 2, 4).unwrap();
        assert!(c.randn([3, 1, 1, 1]).is_err());
    }
}
