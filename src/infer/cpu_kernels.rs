//! CPU kernels of the fast path: matrix–vector products of 4-bit and 8-bit
//! weights with f32 activations, for decode (one to a few rows).
//!
//! libtorch's CPU kernels for this (`_weight_int4pack_mm_for_cpu`,
//! `_weight_int8pack_mm`) are vectorised for AVX-512 only: on an AVX2 CPU
//! they measured 5.8 ms for one 4864×896 int4 product (2.0 ms dense f32) and
//! 103 ms for the 151,936×896 int8 output head, which made 4-bit decode 2.4×
//! slower than f32. These kernels read each weight once, widen nibbles or
//! bytes to f32 in registers and accumulate with FMA (AVX2+FMA where the CPU
//! has them, detected at run time; portable code otherwise), rows split
//! across rayon's threads.
//!
//! Int4 layout: per row, blocks of 32 consecutive columns in 16 bytes, byte
//! `j` holding column `j` in its low nibble and column `j + 16` in its high
//! one (the arrangement of llama.cpp's Q4_0 blocks); per row and group a scale
//! `s` and `m = −s·z`, so that `w = s·q + m` and
//! `y = Σ_g s_g·(q_g·x_g) + Σ_g m_g·Σ x_g`.

use rayon::prelude::*;

/// Rows per rayon task: enough work to amortise the task, small enough to
/// balance two to a few dozen threads.
const ROWS_PER_TASK: usize = 32;

/// A 4-bit matrix in the layout above.
#[derive(Debug)]
pub struct Int4Matrix {
    rows: usize,
    cols: usize,
    group: usize,
    nibbles: Vec<u8>,
    scales: Vec<f32>,
    mins: Vec<f32>,
}

impl Int4Matrix {
    /// From row-major integers `q` (`rows × cols`, each in `0..16`) and per
    /// row, per group `scales` and `zeros` (`rows × cols/group`, row-major).
    /// `group` must be a multiple of 32 dividing `cols`.
    pub fn new(
        q: &[u8],
        scales: &[f32],
        zeros: &[f32],
        rows: usize,
        cols: usize,
        group: usize,
    ) -> Self {
        assert!(
            group % 32 == 0 && cols % group == 0,
            "group {group}, cols {cols}"
        );
        assert_eq!(q.len(), rows * cols);
        let groups = cols / group;
        assert_eq!(scales.len(), rows * groups);
        assert_eq!(zeros.len(), rows * groups);
        let mut nibbles = vec![0u8; rows * cols / 2];
        nibbles
            .par_chunks_mut(cols / 2)
            .zip(q.par_chunks(cols))
            .for_each(|(out, row)| {
                for (block_out, block) in out.chunks_exact_mut(16).zip(row.chunks_exact(32)) {
                    for j in 0..16 {
                        block_out[j] = (block[j] & 15) | ((block[j + 16] & 15) << 4);
                    }
                }
            });
        let mins = scales.iter().zip(zeros).map(|(s, z)| -s * z).collect();
        Self {
            rows,
            cols,
            group,
            nibbles,
            scales: scales.to_vec(),
            mins,
        }
    }

    /// `y = W·x` for one vector `x` (`cols`) into `y` (`rows`).
    fn gemv_int4(&self, x: &[f32], y: &mut [f32]) {
        assert_eq!(x.len(), self.cols);
        assert_eq!(y.len(), self.rows);
        let groups = self.cols / self.group;
        let sums: Vec<f32> = x.chunks_exact(self.group).map(|g| g.iter().sum()).collect();
        let half = self.cols / 2;
        let avx2 = has_avx2_fma();
        y.par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .for_each(|(task, out)| {
                for (i, yi) in out.iter_mut().enumerate() {
                    let r = task * ROWS_PER_TASK + i;
                    let nib = &self.nibbles[r * half..(r + 1) * half];
                    let scales = &self.scales[r * groups..(r + 1) * groups];
                    let mins = &self.mins[r * groups..(r + 1) * groups];
                    #[cfg(target_arch = "x86_64")]
                    if avx2 {
                        // SAFETY: the CPU has AVX2 and FMA (checked above);
                        // the slices have the lengths the kernel reads.
                        *yi = unsafe { x86::int4_row(nib, scales, mins, x, &sums, self.group) };
                        continue;
                    }
                    let _ = avx2;
                    *yi = int4_row_portable(nib, scales, mins, x, &sums, self.group);
                }
            });
    }

    fn dequantize_int4(&self) -> Vec<f32> {
        let groups = self.cols / self.group;
        let half = self.cols / 2;
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(r, row)| {
                let nib = &self.nibbles[r * half..(r + 1) * half];
                for (b, (block_out, block)) in row
                    .chunks_exact_mut(32)
                    .zip(nib.chunks_exact(16))
                    .enumerate()
                {
                    let g = r * groups + b * 32 / self.group;
                    let (s, m) = (self.scales[g], self.mins[g]);
                    for j in 0..16 {
                        block_out[j] = s * f32::from(block[j] & 15) + m;
                        block_out[j + 16] = s * f32::from(block[j] >> 4) + m;
                    }
                }
            });
        out
    }
}

fn int4_row_portable(
    nib: &[u8],
    scales: &[f32],
    mins: &[f32],
    x: &[f32],
    sums: &[f32],
    group: usize,
) -> f32 {
    let mut total = 0f32;
    for (g, (&s, xg)) in scales.iter().zip(x.chunks_exact(group)).enumerate() {
        let bytes = &nib[g * group / 2..(g + 1) * group / 2];
        let mut acc = 0f32;
        for (block, xb) in bytes.chunks_exact(16).zip(xg.chunks_exact(32)) {
            for j in 0..16 {
                acc += f32::from(block[j] & 15) * xb[j] + f32::from(block[j] >> 4) * xb[j + 16];
            }
        }
        total += s * acc;
    }
    total + mins.iter().zip(sums).map(|(m, s)| m * s).sum::<f32>()
}

/// An 8-bit matrix, one scale per row (symmetric): `w = s·q`.
#[derive(Debug)]
pub struct Int8Matrix {
    rows: usize,
    cols: usize,
    q: Vec<i8>,
    scales: Vec<f32>,
}

impl Int8Matrix {
    pub fn new(q: Vec<i8>, scales: Vec<f32>, rows: usize, cols: usize) -> Self {
        assert_eq!(q.len(), rows * cols);
        assert_eq!(scales.len(), rows);
        Self {
            rows,
            cols,
            q,
            scales,
        }
    }

    fn gemv_int8(&self, x: &[f32], y: &mut [f32]) {
        assert_eq!(x.len(), self.cols);
        assert_eq!(y.len(), self.rows);
        let avx2 = has_avx2_fma();
        let cols = self.cols;
        y.par_chunks_mut(ROWS_PER_TASK * 4)
            .enumerate()
            .for_each(|(task, out)| {
                for (i, yi) in out.iter_mut().enumerate() {
                    let r = task * ROWS_PER_TASK * 4 + i;
                    let row = &self.q[r * cols..(r + 1) * cols];
                    #[cfg(target_arch = "x86_64")]
                    if avx2 {
                        // SAFETY: AVX2 and FMA checked above; equal lengths.
                        *yi = self.scales[r] * unsafe { x86::int8_dot(row, x) };
                        continue;
                    }
                    let _ = avx2;
                    *yi = self.scales[r]
                        * row
                            .iter()
                            .zip(x)
                            .map(|(&q, &v)| f32::from(q) * v)
                            .sum::<f32>();
                }
            });
    }

    fn dequantize_int8(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .zip(self.q.par_chunks(self.cols))
            .zip(self.scales.par_iter())
            .for_each(|((o, q), &s)| {
                for (o, &q) in o.iter_mut().zip(q) {
                    *o = s * f32::from(q);
                }
            });
        out
    }
}

/// A weight matrix the CPU kernels multiply with.
pub trait MatVec: Send + Sync {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    /// `y = W·x` for one vector `x` (`cols`) into `y` (`rows`).
    fn gemv(&self, x: &[f32], y: &mut [f32]);
    /// The f32 weights, row-major (for products of many rows, where a dense
    /// matrix product is faster than any matrix–vector kernel).
    fn dequantize(&self) -> Vec<f32>;
}

macro_rules! mat_vec {
    ($t:ty, $gemv:ident, $dequantize:ident) => {
        impl MatVec for $t {
            fn rows(&self) -> usize {
                self.rows
            }
            fn cols(&self) -> usize {
                self.cols
            }
            fn gemv(&self, x: &[f32], y: &mut [f32]) {
                self.$gemv(x, y)
            }
            fn dequantize(&self) -> Vec<f32> {
                self.$dequantize()
            }
        }
    };
}
mat_vec!(Int4Matrix, gemv_int4, dequantize_int4);
mat_vec!(Int8Matrix, gemv_int8, dequantize_int8);

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// One row of an int4 product (see the module's layout).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn int4_row(
        nib: &[u8],
        scales: &[f32],
        mins: &[f32],
        x: &[f32],
        sums: &[f32],
        group: usize,
    ) -> f32 {
        debug_assert_eq!(nib.len() * 2, x.len());
        debug_assert_eq!(scales.len() * group, x.len());
        let mask = _mm_set1_epi8(0x0F);
        let blocks = group / 32;
        let mut total = _mm256_setzero_ps();
        let mut np = nib.as_ptr();
        let mut xp = x.as_ptr();
        for &s in scales {
            let mut a0 = _mm256_setzero_ps();
            let mut a1 = _mm256_setzero_ps();
            for _ in 0..blocks {
                let v = _mm_loadu_si128(np.cast());
                let lo = _mm_and_si128(v, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
                let q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
                let q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
                let q2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
                let q3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
                a0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(xp), a0);
                a1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xp.add(8)), a1);
                a0 = _mm256_fmadd_ps(q2, _mm256_loadu_ps(xp.add(16)), a0);
                a1 = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xp.add(24)), a1);
                np = np.add(16);
                xp = xp.add(32);
            }
            total = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(s), total);
        }
        let mut m = 0f32;
        for (a, b) in mins.iter().zip(sums) {
            m += a * b;
        }
        hsum(total) + m
    }

    /// Σ q·x over one int8 row.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn int8_dot(q: &[i8], x: &[f32]) -> f32 {
        debug_assert_eq!(q.len(), x.len());
        let n = q.len() / 16 * 16;
        let mut a0 = _mm256_setzero_ps();
        let mut a1 = _mm256_setzero_ps();
        let mut i = 0;
        while i < n {
            let v = _mm_loadu_si128(q.as_ptr().add(i).cast());
            let f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
            let f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
            a0 = _mm256_fmadd_ps(f0, _mm256_loadu_ps(x.as_ptr().add(i)), a0);
            a1 = _mm256_fmadd_ps(f1, _mm256_loadu_ps(x.as_ptr().add(i + 8)), a1);
            i += 16;
        }
        let mut tail = 0f32;
        for j in n..q.len() {
            tail += f32::from(q[j]) * x[j];
        }
        hsum(_mm256_add_ps(a0, a1)) + tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random stream (no dependency for a test).
    fn stream(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    /// Exact (f64) products and, per row, the tolerance of an f32
    /// accumulation: 1e-5 of Σ|w·x|.
    fn reference(w: &[f32], x: &[f32], rows: usize, cols: usize) -> Vec<(f64, f64)> {
        (0..rows)
            .map(|r| {
                let terms = (0..cols).map(|c| f64::from(w[r * cols + c]) * f64::from(x[c]));
                let mag: f64 = terms.clone().map(f64::abs).sum();
                (terms.sum(), 1e-5 * mag + 1e-6)
            })
            .collect()
    }

    #[test]
    fn int4_gemv_and_dequantize_match_the_definition() {
        for (rows, cols, group) in [(70, 64, 32), (33, 256, 128), (5, 512, 256), (48, 96, 32)] {
            let mut next = stream(rows as u64 * 7919 + cols as u64);
            let groups = cols / group;
            let q: Vec<u8> = (0..rows * cols).map(|_| (next() % 16) as u8).collect();
            let scales: Vec<f32> = (0..rows * groups)
                .map(|_| (next() % 1000) as f32 / 7000.0 + 0.01)
                .collect();
            let zeros: Vec<f32> = (0..rows * groups).map(|_| (next() % 16) as f32).collect();
            let x: Vec<f32> = (0..cols)
                .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            let m = Int4Matrix::new(&q, &scales, &zeros, rows, cols, group);
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| {
                    let g = (i / cols) * groups + (i % cols) / group;
                    scales[g] * (f32::from(q[i]) - zeros[g])
                })
                .collect();
            let deq = m.dequantize();
            for (a, b) in deq.iter().zip(&w) {
                assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
            }
            let mut y = vec![0f32; rows];
            m.gemv(&x, &mut y);
            let sums: Vec<f32> = x.chunks_exact(group).map(|g| g.iter().sum()).collect();
            let half = cols / 2;
            let y_portable: Vec<f32> = (0..rows)
                .map(|r| {
                    int4_row_portable(
                        &m.nibbles[r * half..(r + 1) * half],
                        &m.scales[r * groups..(r + 1) * groups],
                        &m.mins[r * groups..(r + 1) * groups],
                        &x,
                        &sums,
                        group,
                    )
                })
                .collect();
            // The kernel sums s·q·x and −s·z·x separately: its rounding is
            // relative to those terms, not to their (smaller) difference.
            let want = reference(&w, &x, rows, cols);
            for (r, ((a, b), (c, _))) in y.iter().zip(&y_portable).zip(want).enumerate() {
                let tol = 1e-6
                    + 1e-5
                        * (0..cols)
                            .map(|c| {
                                let g = r * groups + c / group;
                                f64::from(scales[g] * (f32::from(q[r * cols + c]) + zeros[g]))
                                    * f64::from(x[c].abs())
                            })
                            .sum::<f64>();
                assert!((f64::from(*a) - c).abs() <= tol, "{a} vs {c}");
                assert!((f64::from(*b) - c).abs() <= tol, "{b} vs {c}");
            }
        }
    }

    #[test]
    fn int8_gemv_and_dequantize_match_the_definition() {
        for (rows, cols) in [(300, 96), (7, 40)] {
            let mut next = stream(cols as u64);
            let q: Vec<i8> = (0..rows * cols).map(|_| (next() % 255) as i8).collect();
            let scales: Vec<f32> = (0..rows).map(|_| (next() % 100) as f32 / 3000.0).collect();
            let x: Vec<f32> = (0..cols)
                .map(|_| (next() % 200) as f32 / 100.0 - 1.0)
                .collect();
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| scales[i / cols] * f32::from(q[i]))
                .collect();
            let m = Int8Matrix::new(q, scales, rows, cols);
            assert_eq!(m.dequantize(), w);
            let mut y = vec![0f32; rows];
            m.gemv(&x, &mut y);
            for (a, (c, tol)) in y.iter().zip(reference(&w, &x, rows, cols)) {
                assert!((f64::from(*a) - c).abs() <= tol, "{a} vs {c}");
            }
        }
    }
}
