//! Matrix multiplication on strided `f32` slices, through the `gemm` crate (runtime dispatch to
//! AVX-512 or AVX2+FMA; parallel with rayon). The one place the kernels call a GEMM.

/// A read-only matrix view: element `(r, c)` is `data[r * row_stride + c * col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

/// A mutable matrix view, laid out as [`MatRef`].
#[derive(Debug)]
pub struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols, 1)
    }

    pub fn strided(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        let m = Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        };
        assert!(
            span(rows, cols, row_stride, col_stride) <= data.len(),
            "matrix view {rows}×{cols} (strides {row_stride}, {col_stride}) exceeds its {} elements",
            data.len()
        );
        m
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            data: self.data,
        }
    }
}

impl<'a> MatMut<'a> {
    /// A row-major `rows × cols` matrix.
    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols, 1)
    }

    pub fn strided(
        data: &'a mut [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        assert!(
            span(rows, cols, row_stride, col_stride) <= data.len(),
            "matrix view {rows}×{cols} (strides {row_stride}, {col_stride}) exceeds its {} elements",
            data.len()
        );
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }
}

/// Elements a view spans: one past its last element's index.
fn span(rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * row_stride + (cols - 1) * col_stride + 1
    }
}

/// Whether a GEMM may use every core, or must stay on the calling thread (when the caller
/// already runs one GEMM per core).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    All,
    One,
}

/// The most of the inner dimension one `gemm` call sees. `gemm` splits `k` into blocks itself
/// (each block's sum is added to the output), by rules that depend on `m` and `n` (512 for
/// outputs up to 64×64, a cache-derived even split otherwise); at or below 512 it never splits.
const K_BLOCK: usize = 512;

/// Largest output (`m·n`) for which `gemm` uses its dot-product ("horizontal") kernels when
/// `a` is row-major and `b` column-major.
const HORIZONTAL_MAX: usize = 16 * 16;

/// `c = a · b` (`accumulate == false`) or `c += a · b`, scaled: `c = [c +] alpha · a · b`.
///
/// Batch-invariant: an element of `c` depends on its row of `a`, its column of `b`, `k` and its
/// old value only, never on `m`, `n`, the layouts or the threads. So a batch folded into the
/// rows or columns gives every item the bits it gets alone. The `gemm` crate sums in other
/// orders for vectors (`m` or `n` of 1), small dot-product-layout outputs and, above
/// [`K_BLOCK`], in `k` blocks sized by `m` and `n`; those cases are steered here to its one
/// micro-kernel path (one fused multiply-add chain per element over `k`), in fixed `k` blocks.
///
/// Panics when the shapes disagree (a programming error inside the kernels, never user input:
/// the callers check user shapes first).
pub fn matmul(c: MatMut, a: MatRef, b: MatRef, alpha: f32, accumulate: bool, threads: Threads) {
    assert_eq!(a.cols, b.rows, "matmul: inner dimensions differ");
    assert_eq!(c.rows, a.rows, "matmul: output rows differ");
    assert_eq!(c.cols, b.cols, "matmul: output columns differ");
    let (m, n, k) = (c.rows, c.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                for col in 0..n {
                    c.data[r * c.row_stride + col * c.col_stride] = 0.0;
                }
            }
        }
        return;
    }
    if m == 1 || n == 1 {
        return vector_product(c, a, b, alpha, accumulate, threads);
    }
    if b.row_stride == 1 && a.col_stride == 1 && m * n <= HORIZONTAL_MAX {
        // Copy `b` row-major (`n >= 2`, so its row stride is no longer 1).
        let mut rows = vec![0.0; k * n];
        for (p, row) in rows.chunks_exact_mut(n).enumerate() {
            for (j, x) in row.iter_mut().enumerate() {
                *x = b.data[p * b.row_stride + j * b.col_stride];
            }
        }
        let b = MatRef::row_major(&rows, k, n);
        return matmul(c, a, b, alpha, accumulate, threads);
    }
    let parallelism = match threads {
        Threads::All if rayon::current_num_threads() > 1 => {
            gemm::Parallelism::Rayon(rayon::current_num_threads())
        }
        _ => gemm::Parallelism::None,
    };
    // Blocks fixed by `k` alone, near-equal, each at most K_BLOCK (and, above it, at least
    // 257, never `gemm`'s k ≤ 2 kernel).
    let blocks = k.div_ceil(K_BLOCK);
    let block = k.div_ceil(blocks);
    for (i, p0) in (0..k).step_by(block).enumerate() {
        let kb = block.min(k - p0);
        // SAFETY: each view was checked on construction to lie inside its slice, so columns
        // `p0..p0 + kb` of `a` and rows `p0..p0 + kb` of `b` do too; the shapes were checked
        // above; `c` is borrowed mutably, so it overlaps neither input.
        unsafe {
            gemm::gemm(
                m,
                n,
                kb,
                c.data.as_mut_ptr(),
                c.col_stride as isize,
                c.row_stride as isize,
                accumulate || i > 0,
                a.data.as_ptr().add(p0 * a.col_stride),
                a.col_stride as isize,
                a.row_stride as isize,
                b.data.as_ptr().add(p0 * b.row_stride),
                b.col_stride as isize,
                b.row_stride as isize,
                1.0,
                alpha,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
}

/// [`matmul`] with `m` or `n` of 1, through a 2-row or 2-column copy (`gemm` has matrix-vector
/// kernels that sum in another order than its matrix kernel).
fn vector_product(c: MatMut, a: MatRef, b: MatRef, alpha: f32, accumulate: bool, threads: Threads) {
    let (m, n, k) = (c.rows, c.cols, a.cols);
    let (pm, pn) = (m.max(2), n.max(2));
    // Row (column) 0 is the real one; the copy in row (column) 1 is discarded.
    let at = |r: usize, p: usize| a.data[r.min(m - 1) * a.row_stride + p * a.col_stride];
    let bt = |p: usize, j: usize| b.data[p * b.row_stride + j.min(n - 1) * b.col_stride];
    let pa: Vec<f32> = (0..pm * k).map(|i| at(i / k, i % k)).collect();
    let pb: Vec<f32> = (0..k * pn).map(|i| bt(i / pn, i % pn)).collect();
    let mut pc = vec![0.0; pm * pn];
    if accumulate {
        for r in 0..m {
            for j in 0..n {
                pc[r * pn + j] = c.data[r * c.row_stride + j * c.col_stride];
            }
        }
    }
    matmul(
        MatMut::row_major(&mut pc, pm, pn),
        MatRef::row_major(&pa, pm, k),
        MatRef::row_major(&pb, k, pn),
        alpha,
        accumulate,
        threads,
    );
    for r in 0..m {
        for j in 0..n {
            c.data[r * c.row_stride + j * c.col_stride] = pc[r * pn + j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: MatRef, b: MatRef) -> Vec<f32> {
        let mut out = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                let mut s = 0.0f64;
                for p in 0..a.cols {
                    s += a.data[i * a.row_stride + p * a.col_stride] as f64
                        * b.data[p * b.row_stride + j * b.col_stride] as f64;
                }
                out[i * b.cols + j] = s as f32;
            }
        }
        out
    }

    #[test]
    fn strided_and_accumulating_products_match_a_naive_loop() {
        let (m, k, n) = (7, 13, 5);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 9) as f32 - 4.0).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.5).collect();
        let a = MatRef::row_major(&a, m, k);
        let b = MatRef::row_major(&bt, n, k).t();
        let want = naive(a, b);
        let mut c = vec![1.0; m * n];
        matmul(
            MatMut::row_major(&mut c, m, n),
            a,
            b,
            1.0,
            false,
            Threads::All,
        );
        assert_eq!(c, want);
        matmul(
            MatMut::row_major(&mut c, m, n),
            a,
            b,
            0.5,
            true,
            Threads::One,
        );
        for (x, w) in c.iter().zip(&want) {
            assert!((x - 1.5 * w).abs() < 1e-4);
        }
    }
}
