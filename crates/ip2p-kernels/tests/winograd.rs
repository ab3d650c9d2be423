//! Winograd 3×3 convolution against the f64 direct reference and against im2col + GEMM.
//!
//! Tolerance: relative L2 error `‖got − want‖ / ‖want‖` below 5e-5. F(4×4, 3×3)'s transforms
//! have coefficients up to 8 (and 1/24), which amplifies f32 rounding about 4× over direct
//! conv's: on these random inputs F(4×4) measures 0.5e-6…1.5e-6 against the f64 reference
//! (4.5e-6 against im2col + GEMM with 512 input channels), F(2×2) about 1e-7. 5e-5 keeps a
//! margin below the 1e-4 the model-level parity tests allow, while a wrong tile, edge, channel
//! or epilogue gives an error of order 1.

use ip2p_kernels::conv::{Conv2dShape, conv2d, conv2d_reference};
use ip2p_kernels::isa;
use ip2p_kernels::winograd::{conv3x3, suitable};

const TOLERANCE: f64 = 5e-5;

/// A small deterministic generator (xorshift64*), uniform in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
        bits as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

fn shape(batch: usize, cin: usize, cout: usize, h: usize, w: usize) -> Conv2dShape {
    Conv2dShape {
        batch,
        in_channels: cin,
        height: h,
        width: w,
        out_channels: cout,
        kernel: [3, 3],
        stride: [1, 1],
        padding: [1; 4],
    }
}

fn relative_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        diff += (g as f64 - w as f64).powi(2);
        norm += (w as f64).powi(2);
    }
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

/// Random operands of one conv.
struct Case {
    shape: Conv2dShape,
    input: Vec<f32>,
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    residual: Option<Vec<f32>>,
}

impl Case {
    fn random(shape: Conv2dShape, bias: bool, residual: bool, seed: u64) -> Self {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        Self {
            input: rng.vec(shape.input_len()),
            weight: rng.vec(shape.weight_len()),
            bias: bias.then(|| rng.vec(shape.out_channels)),
            residual: residual.then(|| rng.vec(shape.output_len())),
            shape,
        }
    }

    /// NaN-filled output, so an unwritten element fails the comparison.
    fn winograd(&self) -> Vec<f32> {
        let mut out = vec![f32::NAN; self.shape.output_len()];
        conv3x3(
            &self.shape,
            &self.input,
            &self.weight,
            self.bias.as_deref(),
            self.residual.as_deref(),
            &mut out,
        );
        out
    }

    fn reference(&self) -> Vec<f32> {
        conv2d_reference(
            &self.shape,
            &self.input,
            &self.weight,
            self.bias.as_deref(),
            self.residual.as_deref(),
        )
    }

    fn im2col(&self) -> Vec<f32> {
        let mut out = vec![f32::NAN; self.shape.output_len()];
        conv2d(
            &self.shape,
            &self.input,
            &self.weight,
            self.bias.as_deref(),
            self.residual.as_deref(),
            &mut out,
        );
        out
    }
}

fn check_against_reference(shape: Conv2dShape, bias: bool, residual: bool, seed: u64) {
    let case = Case::random(shape, bias, residual, seed);
    let err = relative_l2(&case.winograd(), &case.reference());
    assert!(
        err < TOLERANCE,
        "relative L2 error {err:e} in {shape:?}, bias {bias}, residual {residual}"
    );
}

fn check_against_im2col(shape: Conv2dShape, bias: bool, residual: bool, seed: u64) {
    let case = Case::random(shape, bias, residual, seed);
    let err = relative_l2(&case.winograd(), &case.im2col());
    assert!(
        err < TOLERANCE,
        "relative L2 error {err:e} against conv2d in {shape:?}"
    );
}

#[test]
fn matches_the_reference_over_channels_maps_and_batches() {
    let maps = [(1, 1), (2, 3), (5, 7), (8, 8), (13, 9), (32, 32)];
    let channels = [1, 3, 5, 17, 32];
    let mut seed = 0;
    for &(h, w) in &maps {
        for &c in &channels {
            for batch in [1, 3] {
                seed += 1;
                // Output channels differ from input ones, so a swapped index shows.
                let cout = channels[seed as usize % channels.len()];
                let (bias, residual) = (seed % 2 == 0, seed % 3 == 0);
                check_against_reference(shape(batch, c, cout, h, w), bias, residual, seed);
            }
        }
    }
}

#[test]
fn bias_and_residual_are_added_in_every_combination() {
    let combinations = [(false, false), (true, false), (false, true), (true, true)];
    for (i, (bias, residual)) in combinations.into_iter().enumerate() {
        let seed = 100 + 2 * i as u64;
        // F(4×4) with partial tiles on both sides (29 = 7·4 + 1, 18 = 4·4 + 2).
        check_against_reference(shape(3, 5, 17, 29, 18), bias, residual, seed);
        // F(2×2) with partial tiles on both sides.
        check_against_reference(shape(3, 17, 5, 5, 7), bias, residual, seed + 1);
    }
}

/// More output channels than tiles: the tiles are transformed once and the output channels
/// stream past them in blocks (with F(4×4), and F(2×2) above).
#[test]
fn many_channels_on_few_tiles_match_the_reference() {
    check_against_reference(shape(1, 40, 96, 28, 28), true, true, 200);
    check_against_reference(shape(3, 24, 200, 9, 10), true, false, 201);
}

#[test]
fn tall_and_wide_maps_match_the_reference() {
    check_against_reference(shape(1, 3, 4, 40, 6), true, false, 300);
    check_against_reference(shape(2, 4, 3, 6, 40), false, true, 301);
    check_against_reference(shape(1, 2, 2, 1, 21), true, true, 302);
    // Rows of more tiles than a vector has lanes, ending at or short of the right edge; bands
    // of several steps of tiles, steps starting mid-row.
    check_against_reference(shape(2, 3, 5, 21, 150), true, true, 303);
    check_against_reference(shape(1, 4, 4, 40, 301), false, true, 304);
    check_against_reference(shape(3, 2, 2, 9, 66), true, false, 305);
    // Rows of exactly 16 tiles (F(4×4) at 64 wide, F(2×2) at 32), rows of 16 tiles and a
    // remainder, with both edges inside whole vectors of tiles.
    check_against_reference(shape(2, 3, 5, 12, 64), true, true, 306);
    check_against_reference(shape(1, 4, 3, 5, 32), true, true, 307);
    check_against_reference(shape(1, 3, 2, 6, 130), false, true, 308);
    check_against_reference(shape(2, 2, 3, 13, 63), true, true, 309);
}

#[test]
fn matches_im2col_gemm_at_a_unet_like_shape() {
    check_against_im2col(shape(3, 64, 64, 32, 32), true, true, 400);
}

/// Tiles split into chunks (the 32 MiB scratch bound), one chunk edge inside an image, and the
/// output channels into blocks.
#[test]
fn chunked_tiles_match_im2col_gemm() {
    check_against_im2col(shape(2, 512, 520, 68, 52), false, true, 500);
}

/// Weights transformed in two blocks of output channels (the scratch bound), the tiles
/// streamed past each.
#[test]
fn weights_in_blocks_match_im2col_gemm() {
    check_against_im2col(shape(1, 384, 384, 80, 80), true, false, 600);
}

/// AVX-512 works on 16 tiles at once, AVX2 on 8 and the portable fallback on 4.
#[test]
fn every_instruction_set_matches_the_reference() {
    for &set in isa::available() {
        assert!(isa::force(Some(set)));
        check_against_reference(shape(2, 7, 9, 23, 70), true, true, 700);
        check_against_reference(shape(3, 9, 33, 7, 10), true, true, 701);
    }
    isa::force(None);
}

fn sd(batch: usize, channels: usize, side: usize) -> Conv2dShape {
    shape(batch, channels, channels, side, side)
}

#[test]
fn suitable_for_the_sd_convs_it_speeds_up() {
    // The UNet at batch 3, the VAE decoder at batch 1.
    for s in [
        sd(3, 320, 64),
        sd(3, 320, 32),
        sd(3, 640, 32),
        sd(3, 640, 16),
        sd(3, 1280, 16),
        sd(3, 1280, 8),
        sd(1, 128, 256),
        sd(1, 256, 128),
        sd(1, 512, 64),
        sd(1, 512, 32),
        shape(3, 320, 4, 64, 64),
    ] {
        assert!(suitable(&s), "{s:?}");
    }
    // 4×4 maps, and convs from the 8-channel latents or 4-channel latents.
    for s in [
        sd(3, 1280, 4),
        shape(3, 8, 320, 64, 64),
        shape(1, 4, 512, 64, 64),
    ] {
        assert!(!suitable(&s), "{s:?}");
    }
    let unet = sd(3, 320, 64);
    for other in [
        Conv2dShape {
            stride: [2, 2],
            ..unet
        },
        Conv2dShape {
            padding: [0, 1, 1, 1],
            ..unet
        },
        Conv2dShape {
            kernel: [1, 1],
            padding: [0; 4],
            ..unet
        },
    ] {
        assert!(!suitable(&other), "{other:?}");
    }
}

#[test]
#[should_panic(expected = "not a 3×3 stride-1 pad-1 conv")]
fn other_convs_are_refused() {
    let s = Conv2dShape {
        stride: [2, 2],
        ..shape(1, 1, 1, 4, 4)
    };
    let mut out = vec![0.0; s.output_len()];
    let (input, weight) = (vec![0.0; s.input_len()], vec![0.0; s.weight_len()]);
    conv3x3(&s, &input, &weight, None, None, &mut out);
}
