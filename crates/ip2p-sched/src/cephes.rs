//! Cephes single-precision `log` and `sincos`, evaluated as torch's AVX2 `randn` kernel does
//! (its `log256_ps` and `sincos256_ps`, after Pommier's sse_mathfun), one lane at a time.
//!
//! torch's x86 builds use these instead of the C library in the f32 Box–Muller, and they differ
//! from a correctly rounded `logf`/`sinf`/`cosf` by up to tens of ulps near the zeros of sine and
//! cosine, so matching torch's draws bit for bit needs the same polynomials in the same order of
//! f32 operations, with the multiply-adds fused where torch's compiled kernel fuses them (the
//! compiler contracts them; which ones was settled by matching 10⁶ torch draws bit for bit).
//! Arguments here are positive and below 2π (the Box–Muller inputs).

// The constants are spelled as torch's header spells them, digits beyond f32's included, so each
// rounds (through f64, as C's float initialisers do) to the same f32.
#![allow(clippy::excessive_precision)]

const SQRT_HALF: f32 = std::f64::consts::FRAC_1_SQRT_2 as f32;
const LOG_P: [f32; 9] = [
    7.0376836292E-2_f64 as f32,
    -1.1514610310E-1_f64 as f32,
    1.1676998740E-1_f64 as f32,
    -1.2420140846E-1_f64 as f32,
    1.4249322787E-1_f64 as f32,
    -1.6668057665E-1_f64 as f32,
    2.0000714765E-1_f64 as f32,
    -2.4999993993E-1_f64 as f32,
    3.3333331174E-1_f64 as f32,
];
/// ln 2 split in two so `e · ln 2` keeps its precision.
const LN2_LO: f32 = -2.12194440e-4_f64 as f32;
const LN2_HI: f32 = 0.693359375;

/// 4/π, and π/4 split in three (negated) for the argument reduction.
const FOUR_OVER_PI: f32 = 1.27323954473516_f64 as f32;
const MINUS_DP: [f32; 3] = [
    -0.78515625,
    -2.4187564849853515625e-4,
    -3.77489497744594108e-8_f64 as f32,
];
const SIN_P: [f32; 3] = [
    -1.9515295891E-4_f64 as f32,
    8.3321608736E-3_f64 as f32,
    -1.6666654611E-1_f64 as f32,
];
const COS_P: [f32; 3] = [
    2.443315711809948E-005_f64 as f32,
    -1.388731625493765E-003_f64 as f32,
    4.166664568298827E-002_f64 as f32,
];

/// Natural log of a positive `x`.
pub fn log(x: f32) -> f32 {
    let x = x.max(f32::MIN_POSITIVE);
    let bits = x.to_bits();
    // Exponent and a mantissa in [0.5, 1).
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    let m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    // Below √½ the mantissa is doubled (and the exponent lowered) to keep it near 1.
    let below = m < SQRT_HALF;
    let doubled = if below { m } else { 0.0 };
    let mut m = m - 1.0;
    e -= if below { 1.0 } else { 0.0 };
    m += doubled;

    let z = m * m;
    let mut y = LOG_P[0];
    for p in &LOG_P[1..] {
        y = y.mul_add(m, *p);
    }
    y = (y * m).mul_add(z, e * LN2_LO);
    y -= z * 0.5;
    m += y;
    e.mul_add(LN2_HI, m)
}

/// `(sin x, cos x)` for `x ≥ 0` below 2²⁴.
pub fn sincos(x: f32) -> (f32, f32) {
    let sign_in = x.to_bits() & 0x8000_0000;
    let ax = x.abs();
    // The octant, rounded up to even: which polynomial and which signs.
    let j = (((ax * FOUR_OVER_PI) as i32) + 1) & !1;
    let y = j as f32;
    let sin_flip = ((j & 4) as u32) << 29;
    let cos_flip = ((!(j - 2) & 4) as u32) << 29;
    let sin_first = j & 2 == 0;

    let mut r = ax;
    for dp in MINUS_DP {
        r = y.mul_add(dp, r);
    }
    let z = r * r;
    let mut c = COS_P[0];
    c = c.mul_add(z, COS_P[1]);
    c = c.mul_add(z, COS_P[2]);
    c = (c * z).mul_add(z, -(z * 0.5));
    c += 1.0;
    let mut s = SIN_P[0];
    s = s.mul_add(z, SIN_P[1]);
    s = s.mul_add(z, SIN_P[2]);
    s = (s * z).mul_add(r, r);

    // The kernel selects by masking and adding +0, which turns a -0 into +0; so does this.
    let (sin, cos) = if sin_first {
        (0.0 + s, c + 0.0)
    } else {
        (c + 0.0, 0.0 + s)
    };
    (
        f32::from_bits(sin.to_bits() ^ sign_in ^ sin_flip),
        f32::from_bits(cos.to_bits() ^ cos_flip),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn close_to_the_c_library() {
        for i in 1..2000 {
            let x = i as f32 / 2000.0;
            assert!(
                (super::log(x) - x.ln()).abs() <= 2e-7 * x.ln().abs().max(1.0),
                "{x}"
            );
            let t = x * std::f32::consts::TAU;
            let (s, c) = super::sincos(t);
            assert!(
                (s - t.sin()).abs() < 2e-7 && (c - t.cos()).abs() < 2e-7,
                "{t}"
            );
        }
    }
}
