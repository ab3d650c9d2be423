//! Batch invariance: every kernel gives an item the same bits alone as in a batch, and the GEMM
//! gives a row (column) the same bits whatever the other rows (columns). This is what makes
//! `--memory-budget-mib` chunking, `edit-dataset`'s batches and the thread count leave results
//! bit-identical. Shapes are drawn by proptest around the sizes where the `gemm` crate switches
//! paths (vectors, outputs ≤ 16×16 and ≤ 64×64, `k` above 512) and where the conv and Winograd
//! choices sit (512 positions, 14 tiles per image). `IP2P_FUZZ_CASES` sets the cases per
//! property (default 64).

use ip2p_kernels::attention::{AttentionLayout, AttentionShape, attention};
use ip2p_kernels::conv::{Conv2dShape, conv2d};
use ip2p_kernels::gemm::{MatMut, MatRef, Threads, matmul};
use ip2p_kernels::linear::{WeightLayout, linear};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("IP2P_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

/// Deterministic values in [-1, 1) from a seed.
fn values(seed: u64, len: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let x = s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
            x as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn same_bits(what: &str, a: &[f32], b: &[f32]) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.len(), b.len());
    if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
        return Err(TestCaseError::fail(format!(
            "{what}: element {i} differs: {} vs {}",
            a[i], b[i]
        )));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// Row `r` of `a·b` is the same computed alone or with other rows, and column `j` the same
    /// alone or with other columns, accumulating or not, with a transposed `b` or not.
    #[test]
    fn gemm_rows_and_columns_do_not_depend_on_the_others(
        m in 1usize..80, n in 1usize..80, k in prop_oneof![1usize..40, 500usize..1100],
        transposed in any::<bool>(), accumulate in any::<bool>(), seed in any::<u64>(),
    ) {
        let a = values(seed, m * k);
        let b = values(seed ^ 1, k * n);
        let c0 = values(seed ^ 2, m * n);
        let b_data = b;
        // `b` stored as [n, k] when transposed: the dot-product layout.
        let b_ref = || if transposed {
            MatRef::row_major(&b_data, n, k).t()
        } else {
            MatRef::row_major(&b_data, k, n)
        };
        let mut whole = c0.clone();
        matmul(MatMut::row_major(&mut whole, m, n), MatRef::row_major(&a, m, k), b_ref(), 0.5, accumulate, Threads::All);
        let r = (seed as usize) % m;
        let mut row = c0[r * n..(r + 1) * n].to_vec();
        matmul(MatMut::row_major(&mut row, 1, n), MatRef::row_major(&a[r * k..(r + 1) * k], 1, k), b_ref(), 0.5, accumulate, Threads::One);
        same_bits("row", &row, &whole[r * n..(r + 1) * n])?;
        let j = (seed as usize / 7) % n;
        let col_b: Vec<f32> = if transposed { b_data[j * k..(j + 1) * k].to_vec() } else { (0..k).map(|p| b_data[p * n + j]).collect() };
        let mut col: Vec<f32> = (0..m).map(|i| c0[i * n + j]).collect();
        matmul(MatMut::row_major(&mut col, m, 1), MatRef::row_major(&a, m, k), MatRef::row_major(&col_b, k, 1), 0.5, accumulate, Threads::All);
        let want: Vec<f32> = (0..m).map(|i| whole[i * n + j]).collect();
        same_bits("column", &col, &want)?;
    }

    /// A conv's image `i` is the same alone as in a batch (3×3 pad 1 exercises Winograd F2/F4
    /// and im2col around their thresholds; 1×1 and strided ones the folded GEMM).
    #[test]
    fn conv_items_do_not_depend_on_the_batch(
        batch in 2usize..5, cin in prop_oneof![1usize..5, 14usize..40], cout in 1usize..40,
        h in 1usize..30, w in 1usize..30, kind in 0usize..3, bias in any::<bool>(),
        residual in any::<bool>(), seed in any::<u64>(),
    ) {
        let (kernel, stride, pad) = match kind {
            0 => (3, 1, 1),
            1 => (1, 1, 0),
            _ => (3, 2, 1),
        };
        let shape = |batch| Conv2dShape {
            batch, in_channels: cin, height: h, width: w, out_channels: cout,
            kernel: [kernel; 2], stride: [stride; 2], padding: [pad; 4],
        };
        let all = shape(batch);
        let x = values(seed, all.input_len());
        let wt = values(seed ^ 1, all.weight_len());
        let b = values(seed ^ 2, cout);
        let res = values(seed ^ 3, all.output_len());
        let mut out = vec![0.0; all.output_len()];
        conv2d(&all, &x, &wt, bias.then_some(&b[..]), residual.then_some(&res[..]), &mut out);
        let one = shape(1);
        let i = (seed as usize) % batch;
        let (ilen, olen) = (one.input_len(), one.output_len());
        let mut alone = vec![0.0; olen];
        let r = &res[i * olen..(i + 1) * olen];
        conv2d(&one, &x[i * ilen..(i + 1) * ilen], &wt, bias.then_some(&b[..]), residual.then_some(r), &mut alone);
        same_bits("conv item", &alone, &out[i * olen..(i + 1) * olen])?;
    }

    /// A Linear's rows are the same whatever the other rows (the batch is folded into them).
    #[test]
    fn linear_rows_do_not_depend_on_the_batch(
        rows in 1usize..200, fin in 1usize..700, fout in 1usize..70,
        bias in any::<bool>(), residual in any::<bool>(), seed in any::<u64>(),
    ) {
        let x = values(seed, rows * fin);
        let wt = values(seed ^ 1, fin * fout);
        let b = values(seed ^ 2, fout);
        let res = values(seed ^ 3, rows * fout);
        let mut out = vec![0.0; rows * fout];
        linear(&x, rows, fin, &wt, WeightLayout::InOut, fout, bias.then_some(&b[..]), residual.then_some(&res[..]), &mut out);
        let r = (seed as usize) % rows;
        let mut alone = vec![0.0; fout];
        let rr = &res[r * fout..(r + 1) * fout];
        linear(&x[r * fin..(r + 1) * fin], 1, fin, &wt, WeightLayout::InOut, fout, bias.then_some(&b[..]), residual.then_some(rr), &mut alone);
        same_bits("linear row", &alone, &out[r * fout..(r + 1) * fout])?;
    }

    /// Attention of batch item `i` is the same alone as in the batch (the tiling over
    /// batch × heads × queries changes with the batch).
    #[test]
    fn attention_items_do_not_depend_on_the_batch(
        batch in 2usize..5, heads in 1usize..4, q_len in 1usize..300, kv_len in 1usize..100,
        head_dim in 1usize..24, seed in any::<u64>(),
    ) {
        let shape = |batch| AttentionShape { batch, heads, q_len, kv_len, head_dim, causal: false };
        let all = shape(batch);
        let inner = all.inner();
        let q = values(seed, batch * q_len * inner);
        let k = values(seed ^ 1, batch * kv_len * inner);
        let v = values(seed ^ 2, batch * kv_len * inner);
        let mut out = vec![0.0; batch * q_len * inner];
        attention(&all, &AttentionLayout::contiguous(&all), &q, &k, &v, 0.3, &mut out);
        let one = shape(1);
        let i = (seed as usize) % batch;
        let (ql, kl) = (q_len * inner, kv_len * inner);
        let mut alone = vec![0.0; ql];
        attention(&one, &AttentionLayout::contiguous(&one), &q[i * ql..(i + 1) * ql], &k[i * kl..(i + 1) * kl], &v[i * kl..(i + 1) * kl], 0.3, &mut alone);
        same_bits("attention item", &alone, &out[i * ql..(i + 1) * ql])?;
    }
}
