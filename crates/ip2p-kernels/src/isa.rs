//! Run-time choice of the SIMD instruction set, and a way for tests to force one.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

use rten_simd::SimdOp;

/// An instruction set the kernels can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    /// Whatever rten-simd's generic fallback is on this target (NEON on aarch64).
    Portable,
}

const AUTO: u8 = 0;
static FORCED: AtomicU8 = AtomicU8::new(AUTO);

fn encode(isa: Isa) -> u8 {
    match isa {
        Isa::Avx512 => 1,
        Isa::Avx2 => 2,
        Isa::Portable => 3,
    }
}

/// The instruction sets this machine can run, best first.
pub fn available() -> &'static [Isa] {
    static AVAILABLE: OnceLock<Vec<Isa>> = OnceLock::new();
    AVAILABLE.get_or_init(detect)
}

fn detect() -> Vec<Isa> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if rten_simd::isa::Avx512Isa::new().is_some() {
            v.push(Isa::Avx512);
        }
        if rten_simd::isa::Avx2Isa::new().is_some() {
            v.push(Isa::Avx2);
        }
    }
    v.push(Isa::Portable);
    v
}

/// The instruction set kernels use now: the forced one, else the best available.
pub fn current() -> Isa {
    match FORCED.load(Ordering::Relaxed) {
        1 => Isa::Avx512,
        2 => Isa::Avx2,
        3 => Isa::Portable,
        _ => available()[0],
    }
}

/// Force `isa` (for tests comparing instruction sets); `None` returns to automatic choice.
/// Returns false, changing nothing, when this machine cannot run `isa`.
pub fn force(isa: Option<Isa>) -> bool {
    match isa {
        None => {
            FORCED.store(AUTO, Ordering::Relaxed);
            true
        }
        Some(isa) if available().contains(&isa) => {
            FORCED.store(encode(isa), Ordering::Relaxed);
            true
        }
        Some(_) => false,
    }
}

/// Run a vectorised operation on [`current`]'s instruction set.
pub fn dispatch<Op: SimdOp>(op: Op) -> Op::Output {
    #[cfg(target_arch = "x86_64")]
    {
        use rten_simd::isa::{Avx2Isa, Avx512Isa};

        // The features enabled here are the ones rten-simd's `Avx512Isa::new` checks.
        #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")]
        unsafe fn avx512<Op: SimdOp>(isa: Avx512Isa, op: Op) -> Op::Output {
            op.eval(isa)
        }
        // The features enabled here are the ones rten-simd's `Avx2Isa::new` checks.
        #[target_feature(enable = "avx2,avx,fma,f16c")]
        unsafe fn avx2<Op: SimdOp>(isa: Avx2Isa, op: Op) -> Op::Output {
            op.eval(isa)
        }

        match current() {
            Isa::Avx512 => {
                if let Some(isa) = Avx512Isa::new() {
                    // SAFETY: `Avx512Isa::new` succeeded, so the CPU has every feature `avx512`
                    // enables.
                    return unsafe { avx512(isa, op) };
                }
            }
            Isa::Avx2 => {
                if let Some(isa) = Avx2Isa::new() {
                    // SAFETY: `Avx2Isa::new` succeeded, so the CPU has every feature `avx2` enables.
                    return unsafe { avx2(isa, op) };
                }
            }
            Isa::Portable => return op.eval(rten_simd::isa::GenericIsa::new()),
        }
    }
    #[allow(unreachable_code)]
    op.dispatch()
}
