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

/// `c = a · b` (`accumulate == false`) or `c += a · b`, scaled: `c = [c +] alpha · a · b`.
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
    let parallelism = match threads {
        Threads::All if rayon::current_num_threads() > 1 => {
            gemm::Parallelism::Rayon(rayon::current_num_threads())
        }
        _ => gemm::Parallelism::None,
    };
    // SAFETY: each view was checked on construction to lie inside its slice; the shapes were
    // checked above; `c` is borrowed mutably, so it overlaps neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.data.as_mut_ptr(),
            c.col_stride as isize,
            c.row_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
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
