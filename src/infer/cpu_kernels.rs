//! CPU kernels of the fast path: matrix–vector products of 4-bit and 8-bit
//! weights, for decode (one to a few rows).
//!
//! libtorch's CPU kernels for this (`_weight_int4pack_mm_for_cpu`,
//! `_weight_int8pack_mm`) are vectorised for AVX-512 only: on an AVX2 CPU
//! they measured 5.8 ms for one 4864×896 int4 product (2.0 ms dense f32) and
//! 103 ms for the 151,936×896 int8 output head, which made 4-bit decode 2.4×
//! slower than f32. These kernels read each weight once and multiply it with
//! the activations quantized to int8 (blocks of 32 with one f32 scale, the
//! Q8_0 blocks llama.cpp multiplies its weights with): integer products with
//! `maddubs`/`madd` (AVX2+FMA where the CPU has them, detected at run time;
//! portable code with the same arithmetic otherwise), one f32 scale per block,
//! rows split across a team of threads that stays awake between products
//! (`team`).
//!
//! Accuracy: the only error beyond f32 rounding is the activations'
//! rounding, at most half a step `d_b = max|x_b|/127` per element, so
//! `|Δy_r| ≤ Σ_b d_b/2 · Σ_{j∈b} |w_rj|` (the unit tests assert this bound).
//!
//! Int4 layout: per row, per group, a 4-byte header (the group's scale `s`
//! and zero `z` as f16) then the group's blocks of 32 consecutive columns in
//! 16 bytes each, byte `j` holding column `j` in its low nibble and column
//! `j + 16` in its high one (the arrangement of llama.cpp's Q4_0 blocks):
//! one stream per row, 20 bytes per 32 weights at group 32. With
//! `w = s·(q − z)`, `y = Σ_g s_g·(q_g·x_g) − Σ_g s_g·z_g·Σ x_g`.
//!
//! Where the CPU has AVX-512 VNNI, the int4 products take two blocks per
//! `vpdpbusd` instead (`x86::int4_row_512`, activations pre-arranged to
//! match once per product).
//!
//! Measured with `scripts/bench/decode` (0.5B, group 32, 2 threads): on an
//! AVX2 machine 14.4 tok/s with f32 activations and rayon, 20.9 with int8
//! activations and the team (0.63× llama.cpp Q4_0); on an AVX-512 machine
//! 0.50× llama.cpp before the VNNI kernel and the raw-slice decode step,
//! 0.77× after (BENCHMARKS.md).

use super::team::Team;
use half::f16;
use rayon::prelude::*;

/// Rows per task: enough work to amortise the task, small enough to
/// balance two to a few dozen threads.
const ROWS_PER_TASK: usize = 32;

/// Columns per activation block (one int8 scale each), as llama.cpp's Q8_0.
const BLOCK: usize = 32;

/// An activation vector quantized to int8 in blocks of [`BLOCK`]: element
/// `j` of block `b` is `d[b]·q[32b + j]`; the last block is zero-padded.
struct QuantizedX {
    q: Vec<i8>,
    d: Vec<f32>,
    /// `d[b]·Σ_j q[32b + j]`: the block's sum as the kernels see it.
    sums: Vec<f32>,
    /// For the AVX-512 kernels (empty without them): the blocks in pairs
    /// `(2p, 2p+1)` rearranged as the int4 kernel's 64 weights of a pair
    /// unpack, `[x_2p[0..16], x_2p+1[0..16], x_2p[16..32], x_2p+1[16..32]]`,
    /// and the pair's scales per i32 lane of that product,
    /// `[d_2p ×4, d_2p+1 ×4, d_2p ×4, d_2p+1 ×4]`.
    pairs: Vec<i8>,
    pair_d: Vec<f32>,
    /// Per pair `[sums_2p, 0, sums_2p+1, 0]`: the blocks' sums where the
    /// int4 kernel's `[s_0, z_0, s_1, z_1]·[z_0, z_0, z_1, z_1]` has `s·z`.
    pair_sums: Vec<f32>,
}

impl QuantizedX {
    fn new(x: &[f32]) -> Self {
        let blocks = x.len().div_ceil(BLOCK);
        let mut out = Self {
            q: vec![0i8; blocks * BLOCK],
            d: vec![0f32; blocks],
            sums: vec![0f32; blocks],
            pairs: Vec::new(),
            pair_d: Vec::new(),
            pair_sums: Vec::new(),
        };
        let full = x.len() / BLOCK;
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma_f16c() {
            for b in 0..full {
                // SAFETY: AVX2 checked; block `b` is whole in `x` and `q`.
                unsafe { x86::quantize_block(&x[b * BLOCK..], &mut out, b) };
            }
            for b in full..blocks {
                out.quantize_block_portable(&x[b * BLOCK..], b);
            }
            if has_avx512_vnni() {
                out.arrange_pairs(x.len());
            }
            return out;
        }
        for b in 0..blocks {
            out.quantize_block_portable(&x[b * BLOCK..], b);
        }
        out
    }

    /// Fills the AVX-512 layouts (see the fields) for the pairs of whole
    /// blocks among the `len` values.
    fn arrange_pairs(&mut self, len: usize) {
        let pairs = len / (2 * BLOCK);
        self.pairs = vec![0; pairs * 2 * BLOCK];
        self.pair_d = vec![0.0; pairs * 16];
        self.pair_sums = vec![0.0; pairs * 4];
        for p in 0..pairs {
            let (x0, x1) = (
                &self.q[2 * p * BLOCK..(2 * p + 1) * BLOCK],
                &self.q[(2 * p + 1) * BLOCK..(2 * p + 2) * BLOCK],
            );
            let out = &mut self.pairs[p * 2 * BLOCK..(p + 1) * 2 * BLOCK];
            out[..16].copy_from_slice(&x0[..16]);
            out[16..32].copy_from_slice(&x1[..16]);
            out[32..48].copy_from_slice(&x0[16..]);
            out[48..].copy_from_slice(&x1[16..]);
            for (lane, d) in self.pair_d[p * 16..(p + 1) * 16].iter_mut().enumerate() {
                *d = self.d[2 * p + (lane / 4) % 2];
            }
            self.pair_sums[p * 4] = self.sums[2 * p];
            self.pair_sums[p * 4 + 2] = self.sums[2 * p + 1];
        }
    }

    /// Block `b` from `x` (its first up to 32 values).
    fn quantize_block_portable(&mut self, x: &[f32], b: usize) {
        let xb = &x[..x.len().min(BLOCK)];
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 127.0 / amax } else { 0.0 };
        let mut isum = 0i32;
        for (o, v) in self.q[b * BLOCK..].iter_mut().zip(xb) {
            // Ties to even, as `_mm256_round_ps` rounds; |v·inv| ≤ 127.
            *o = (v * inv).round_ties_even() as i8;
            isum += i32::from(*o);
        }
        self.d[b] = scale;
        self.sums[b] = scale * isum as f32;
    }
}

/// Bytes before each group's nibbles: its scale and zero as f16.
const HEADER: usize = 4;

/// A 4-bit matrix in the layout above: per row, per group, the group's
/// header then its blocks, one stream the CPU prefetches in order.
#[derive(Debug)]
pub struct Int4Matrix {
    rows: usize,
    cols: usize,
    group: usize,
    data: Vec<u8>,
}

impl Int4Matrix {
    /// From row-major integers `q` (`rows × cols`, each in `0..16`) and per
    /// row, per group `scales` and `zeros` (`rows × cols/group`, row-major).
    /// `group` must be a power of two, a multiple of 32, dividing `cols`.
    /// Scales and zeros are kept as f16: exact for GPTQ and AWQ checkpoints,
    /// whose scales are f16 and zeros small integers.
    pub fn new(
        q: &[u8],
        scales: &[f32],
        zeros: &[f32],
        rows: usize,
        cols: usize,
        group: usize,
    ) -> Self {
        assert!(
            group.is_multiple_of(BLOCK) && group.is_power_of_two() && cols.is_multiple_of(group),
            "group {group}, cols {cols}"
        );
        assert_eq!(q.len(), rows * cols);
        let groups = cols / group;
        assert_eq!(scales.len(), rows * groups);
        assert_eq!(zeros.len(), rows * groups);
        let stride = HEADER + group / 2;
        let mut data = vec![0u8; rows * groups * stride];
        data.par_chunks_mut(stride)
            .zip(q.par_chunks(group))
            .zip(scales.par_iter().zip(zeros))
            .for_each(|((out, ints), (&s, &z))| {
                out[..2].copy_from_slice(&f16::from_f32(s).to_le_bytes());
                out[2..4].copy_from_slice(&f16::from_f32(z).to_le_bytes());
                for (block_out, block) in out[HEADER..]
                    .chunks_exact_mut(16)
                    .zip(ints.chunks_exact(BLOCK))
                {
                    for j in 0..16 {
                        block_out[j] = (block[j] & 15) | ((block[j + 16] & 15) << 4);
                    }
                }
            });
        Self {
            rows,
            cols,
            group,
            data,
        }
    }

    fn row(&self, r: usize) -> Int4Row<'_> {
        let bytes = self.cols / self.group * (HEADER + self.group / 2);
        Int4Row {
            data: &self.data[r * bytes..(r + 1) * bytes],
            group: self.group,
        }
    }

    /// `y = W·x` for one vector `x` (`cols`) into `y` (`rows`).
    fn gemv_int4(&self, x: &[f32], y: &mut [f32]) {
        assert_eq!(x.len(), self.cols);
        assert_eq!(y.len(), self.rows);
        let xq = QuantizedX::new(x);
        let group_sums: Vec<f32> = xq
            .sums
            .chunks_exact(self.group / BLOCK)
            .map(|g| g.iter().sum())
            .collect();
        let avx2 = has_avx2_fma_f16c();
        let avx512 = !xq.pairs.is_empty();
        let out = RowsOut::new(y);
        Team::global().run(self.rows.div_ceil(ROWS_PER_TASK), &|task| {
            for r in task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(self.rows) {
                let row = self.row(r);
                #[cfg(target_arch = "x86_64")]
                if avx512 {
                    // SAFETY: `pairs` exists only when the CPU has the
                    // AVX-512 features (and AVX2, FMA, F16C); `xq` covers
                    // the row's columns.
                    out.set(r, unsafe { x86::int4_row_512(&row, &xq, &group_sums) });
                    continue;
                }
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: the CPU has AVX2, FMA and F16C (checked
                    // above); `xq` covers the row's columns.
                    out.set(r, unsafe { x86::int4_row(&row, &xq, &group_sums) });
                    continue;
                }
                let _ = avx2;
                out.set(r, row.dot_portable(&xq) + row.min_term(&group_sums));
            }
        });
    }

    fn dequantize_int4(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(r, row_out)| {
                for ((s, z, nibbles), out) in self
                    .row(r)
                    .groups()
                    .zip(row_out.chunks_exact_mut(self.group))
                {
                    for (block_out, block) in
                        out.chunks_exact_mut(BLOCK).zip(nibbles.chunks_exact(16))
                    {
                        for j in 0..16 {
                            block_out[j] = s * (f32::from(block[j] & 15) - z);
                            block_out[j + 16] = s * (f32::from(block[j] >> 4) - z);
                        }
                    }
                }
            });
        out
    }
}

/// One row of an [`Int4Matrix`].
struct Int4Row<'a> {
    data: &'a [u8],
    group: usize,
}

impl Int4Row<'_> {
    /// Per group: scale, zero and nibbles.
    fn groups(&self) -> impl Iterator<Item = (f32, f32, &[u8])> {
        self.data.chunks_exact(HEADER + self.group / 2).map(|g| {
            let s = f16::from_le_bytes([g[0], g[1]]).to_f32();
            let z = f16::from_le_bytes([g[2], g[3]]).to_f32();
            (s, z, &g[HEADER..])
        })
    }

    /// `Σ_g s_g·Σ_b d_b·(q·x_q)_b`: the `s·q` part of the product.
    fn dot_portable(&self, x: &QuantizedX) -> f32 {
        let mut total = 0f32;
        let mut b = 0;
        for (s, _, nibbles) in self.groups() {
            let mut acc = 0f32;
            for bytes in nibbles.chunks_exact(16) {
                let xb = &x.q[b * BLOCK..(b + 1) * BLOCK];
                let mut isum = 0i32;
                for j in 0..16 {
                    isum += i32::from(bytes[j] & 15) * i32::from(xb[j])
                        + i32::from(bytes[j] >> 4) * i32::from(xb[j + 16]);
                }
                acc += x.d[b] * isum as f32;
                b += 1;
            }
            total += s * acc;
        }
        total
    }

    /// `−Σ_g s_g·z_g·Σ x_g` from the groups' sums of the quantized
    /// activations: the zeros' part of the product.
    fn min_term(&self, group_sums: &[f32]) -> f32 {
        -self
            .groups()
            .zip(group_sums)
            .map(|((s, z, _), sum)| s * z * sum)
            .sum::<f32>()
    }
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
        let xq = QuantizedX::new(x);
        let avx2 = has_avx2_fma_f16c();
        let cols = self.cols;
        let out = RowsOut::new(y);
        let per_task = ROWS_PER_TASK * 4;
        Team::global().run(self.rows.div_ceil(per_task), &|task| {
            for r in task * per_task..((task + 1) * per_task).min(self.rows) {
                let row = &self.q[r * cols..(r + 1) * cols];
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: AVX2 and FMA checked above; `xq` covers the
                    // row's columns.
                    out.set(r, self.scales[r] * unsafe { x86::int8_dot(row, &xq) });
                    continue;
                }
                let _ = avx2;
                out.set(r, self.scales[r] * int8_dot_portable(row, &xq));
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

/// The output vector of a product, written row by row from the team's
/// threads: each row by exactly one of them.
struct RowsOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: threads write disjoint rows (each chunk of rows once) while the
// borrow of the output outlives `Team::run`.
unsafe impl Sync for RowsOut {}

impl RowsOut {
    fn new(y: &mut [f32]) -> Self {
        Self {
            ptr: y.as_mut_ptr(),
            len: y.len(),
        }
    }

    fn set(&self, row: usize, v: f32) {
        assert!(row < self.len);
        // SAFETY: in bounds; no other thread writes this row.
        unsafe { self.ptr.add(row).write(v) }
    }
}

/// `Σ_b d_b·(q·x_q)_b` over one int8 row.
fn int8_dot_portable(row: &[i8], x: &QuantizedX) -> f32 {
    row.chunks(BLOCK)
        .zip(x.q.chunks_exact(BLOCK))
        .zip(&x.d)
        .map(|((w, xb), d)| {
            let isum: i32 = w
                .iter()
                .zip(xb)
                .map(|(&a, &b)| i32::from(a) * i32::from(b))
                .sum();
            d * isum as f32
        })
        .sum()
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

/// AVX-512 with VNNI (`vpdpbusd`: 64 u8×i8 products summed in fours per
/// instruction), beside AVX2, FMA and F16C.
fn has_avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx2_fma_f16c()
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn has_avx2_fma_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Int4Row, QuantizedX, BLOCK, HEADER};
    use std::arch::x86_64::*;

    const PREFETCH: usize = 1024;

    /// `Σ_b p_b·k_b` (a vector) over blocks `0..n`, where `$block!(b)` gives
    /// `(p_b, k_b)`: two blocks per iteration into two accumulators, so
    /// consecutive blocks do not wait on each other's FMA. (A macro, as the
    /// blocks' macros are: closures would not inherit the target features.)
    macro_rules! sum_blocks {
        ($n:expr, $block:ident) => {{
            let n = $n;
            let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut b = 0;
            while b + 1 < n {
                let (p0, k0) = $block!(b);
                let (p1, k1) = $block!(b + 1);
                acc0 = _mm256_fmadd_ps(p0, k0, acc0);
                acc1 = _mm256_fmadd_ps(p1, k1, acc1);
                b += 2;
            }
            if b < n {
                let (p0, k0) = $block!(b);
                acc0 = _mm256_fmadd_ps(p0, k0, acc0);
            }
            _mm256_add_ps(acc0, acc1)
        }};
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// One whole block of [`QuantizedX`] (as `quantize_block_portable`).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize_block(x: &[f32], out: &mut QuantizedX, b: usize) {
        debug_assert!(x.len() >= BLOCK && out.q.len() >= (b + 1) * BLOCK);
        let p = x.as_ptr();
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let m = v.iter().fold(_mm256_setzero_ps(), |m, &v| {
            _mm256_max_ps(m, _mm256_and_ps(v, abs_mask))
        });
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let scale = amax / 127.0;
        let inv = _mm256_set1_ps(if scale > 0.0 { 127.0 / amax } else { 0.0 });
        let i: [__m256i; 4] = std::array::from_fn(|k| {
            _mm256_cvtps_epi32(_mm256_round_ps::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(_mm256_mul_ps(v[k], inv)))
        });
        let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let s = _mm_add_epi32(
            _mm256_castsi256_si128(sum),
            _mm256_extracti128_si256(sum, 1),
        );
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let isum = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)));
        // Pack to bytes: packs interleave 128-bit lanes, the permute undoes it.
        let w = _mm256_packs_epi32(i[0], i[1]);
        let z = _mm256_packs_epi32(i[2], i[3]);
        let bytes = _mm256_packs_epi16(w, z);
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(out.q.as_mut_ptr().add(b * BLOCK).cast(), bytes);
        out.d[b] = scale;
        out.sums[b] = scale * isum as f32;
    }

    /// Four bytes at `p` into the low lane of a cleared register.
    #[inline(always)]
    unsafe fn load_u32(p: *const u8) -> __m128i {
        let v: __m128i;
        std::arch::asm!(
            "vmovd {v}, dword ptr [{p}]",
            v = out(xmm_reg) v,
            p = in(reg) p,
            options(pure, readonly, nostack, preserves_flags),
        );
        v
    }

    /// The 32 integers of one int4 block (16 bytes) in column order.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn unpack(p: *const u8) -> __m256i {
        let v = _mm_loadu_si128(p.cast());
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(v, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        _mm256_set_m128i(hi, lo)
    }

    /// Eight i32 partial sums of `a·b` for 32 unsigned `a` (≤ 255, with
    /// `|a·b|·2 < 2¹⁵`: no saturation) and 32 signed `b`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_u8_i8(a: __m256i, b: __m256i) -> __m256 {
        let pairs = _mm256_maddubs_epi16(a, b);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    /// One int4 row's product (see [`Int4Row`]) with the activations'
    /// blocks and their sums per group. Block `b` sits in group `b >> shift`
    /// (groups are powers of two), the data `PREFETCH` bytes ahead is
    /// requested early (measured on a 4864×896 product streamed from DRAM:
    /// 418 µs with the hardware prefetcher alone, ~330 µs with this).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn int4_row(row: &Int4Row, x: &QuantizedX, group_sums: &[f32]) -> f32 {
        let per_group = row.group / BLOCK;
        let stride = HEADER + row.group / 2;
        let blocks = row.data.len() / stride * per_group;
        debug_assert!(x.d.len() >= blocks);
        let shift = per_group.trailing_zeros();
        let (base, xp, dp) = (row.data.as_ptr(), x.q.as_ptr(), x.d.as_ptr());
        // A macro, not a closure: closures do not inherit the function's
        // target features, so their intrinsics would not be inlined.
        macro_rules! block {
            ($b:expr) => {{
                let b = $b;
                let group = base.add((b >> shift) * stride);
                let at = group.add(HEADER + (b & (per_group - 1)) * 16);
                _mm_prefetch::<_MM_HINT_T0>(at.add(PREFETCH).cast());
                // The f16 scale by a `vmovd` (which clears the register).
                // Left to itself the compiler narrows the load to the 16
                // bits it uses, a `vpinsrw` into whatever register it picks,
                // here the accumulator: that chained every block to the
                // previous block's FMA (seen in perf annotate; a plain
                // `_mm_loadu_si32` once avoided it, until a later compiler
                // narrowed that too). Inline asm cannot be narrowed.
                let sz = _mm_cvtph_ps(load_u32(group));
                let k = _mm256_broadcastss_ps(_mm_mul_ss(sz, _mm_load_ss(dp.add(b))));
                let p = dot_u8_i8(unpack(at), _mm256_loadu_si256(xp.add(b * BLOCK).cast()));
                (p, k)
            }};
        }
        let acc = sum_blocks!(blocks, block);
        // The zeros' part, −Σ_g s_g·z_g·Σ x_g (headers are in L1 by now),
        // in four independent sums: one running sum waited ~4 cycles per
        // group on the previous addition (at groups of 32, per block).
        macro_rules! term {
            ($g:expr, $sum:expr) => {{
                let sz = _mm_cvtph_ps(load_u32(base.add($g * stride)));
                _mm_cvtss_f32(sz) * _mm_cvtss_f32(_mm_movehdup_ps(sz)) * $sum
            }};
        }
        let mut partial = [0f32; 4];
        let quads = group_sums.chunks_exact(4);
        let rest = quads.remainder();
        for (i, sums) in quads.enumerate() {
            for j in 0..4 {
                partial[j] += term!(4 * i + j, sums[j]);
            }
        }
        let mut tail = 0f32;
        for (j, &sum) in rest.iter().enumerate() {
            tail += term!(group_sums.len() - rest.len() + j, sum);
        }
        hsum(acc) - ((partial[0] + partial[1]) + (partial[2] + partial[3]) + tail)
    }

    /// [`int4_row`] with AVX-512 VNNI, two blocks per step: a pair's 32
    /// nibble bytes unpack to 64 weights `[lo_0, lo_1, hi_0, hi_1]` (16
    /// each), which `vpdpbusd` multiplies with the activations arranged the
    /// same way (`QuantizedX::pairs`) into 16 i32 sums of four; each lane is
    /// then scaled by its block's `s·d` (the two headers' f16 scales spread
    /// over the lanes by one permute). The zeros' part `−Σ_b s·z·Σx_b`
    /// accumulates from the same headers in a vector of its own (a separate
    /// loop over the headers, summing into one scalar, waited ~4 cycles per
    /// group on the previous addition: at groups of 32 that was ~15% of the
    /// kernel in perf). An odd last block goes the portable way.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn int4_row_512(row: &Int4Row, x: &QuantizedX, group_sums: &[f32]) -> f32 {
        let per_group = row.group / BLOCK;
        let stride = HEADER + row.group / 2;
        let groups = row.data.len() / stride;
        let blocks = groups * per_group;
        let pairs = blocks / 2;
        debug_assert!(x.pairs.len() >= pairs * 2 * BLOCK && x.pair_d.len() >= pairs * 16);
        let (base, xp, dp, sp) = (
            row.data.as_ptr(),
            x.pairs.as_ptr(),
            x.pair_d.as_ptr(),
            x.pair_sums.as_ptr(),
        );
        let nibble = _mm512_set1_epi8(0x0F);
        // 32 nibble bytes [n_0 | n_1] → the pair's 64 weights in the order
        // of `QuantizedX::pairs`, times those activations, in 16 i32 lanes.
        macro_rules! dot {
            ($n:expr, $p:expr) => {{
                let n = $n;
                let w = _mm512_and_si512(
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(n), _mm256_srli_epi16::<4>(n)),
                    nibble,
                );
                let v = _mm512_loadu_si512(xp.add($p * 2 * BLOCK).cast());
                _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, v))
            }};
        }
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let (mut zacc0, mut zacc1) = (_mm_setzero_ps(), _mm_setzero_ps());
        if per_group == 1 {
            // Groups of 32: a pair is two groups, 40 bytes, two headers.
            let spread = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2);
            macro_rules! pair {
                ($p:expr) => {{
                    let p = $p;
                    let g0 = base.add(2 * p * stride);
                    let g1 = g0.add(stride);
                    _mm_prefetch::<_MM_HINT_T0>(g0.add(PREFETCH).cast());
                    let n = _mm256_inserti128_si256::<1>(
                        _mm256_castsi128_si256(_mm_loadu_si128(g0.add(HEADER).cast())),
                        _mm_loadu_si128(g1.add(HEADER).cast()),
                    );
                    // [s_0, z_0, s_1, z_1]
                    let headers =
                        _mm_insert_epi32::<1>(load_u32(g0), g1.cast::<i32>().read_unaligned());
                    let sz = _mm_cvtph_ps(headers);
                    let s = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(sz));
                    (
                        dot!(n, p),
                        _mm512_mul_ps(s, _mm512_loadu_ps(dp.add(p * 16))),
                        _mm_mul_ps(sz, _mm_movehdup_ps(sz)),
                        _mm_loadu_ps(sp.add(p * 4)),
                    )
                }};
            }
            let mut p = 0;
            while p + 1 < pairs {
                let (v0, k0, z0, t0) = pair!(p);
                let (v1, k1, z1, t1) = pair!(p + 1);
                acc0 = _mm512_fmadd_ps(v0, k0, acc0);
                acc1 = _mm512_fmadd_ps(v1, k1, acc1);
                zacc0 = _mm_fmadd_ps(z0, t0, zacc0);
                zacc1 = _mm_fmadd_ps(z1, t1, zacc1);
                p += 2;
            }
            if p < pairs {
                let (v0, k0, z0, t0) = pair!(p);
                acc0 = _mm512_fmadd_ps(v0, k0, acc0);
                zacc0 = _mm_fmadd_ps(z0, t0, zacc0);
            }
        } else {
            // Groups of 64 and more: one header, then whole pairs of blocks
            // in 32 contiguous bytes each.
            let pairs_per_group = per_group / 2;
            for (g, group_sum) in group_sums.iter().enumerate().take(groups) {
                let gp = base.add(g * stride);
                let sz = _mm_cvtph_ps(load_u32(gp));
                let s = _mm512_broadcastss_ps(sz);
                zacc0 = _mm_fmadd_ps(
                    _mm_mul_ps(sz, _mm_movehdup_ps(sz)),
                    _mm_load_ss(group_sum),
                    zacc0,
                );
                let first = g * pairs_per_group;
                macro_rules! pair {
                    ($k:expr) => {{
                        let at = gp.add(HEADER + $k * 2 * 16);
                        _mm_prefetch::<_MM_HINT_T0>(at.add(PREFETCH).cast());
                        let v = dot!(_mm256_loadu_si256(at.cast()), first + $k);
                        (
                            v,
                            _mm512_mul_ps(s, _mm512_loadu_ps(dp.add((first + $k) * 16))),
                        )
                    }};
                }
                let mut k = 0;
                while k + 1 < pairs_per_group {
                    let (v0, k0) = pair!(k);
                    let (v1, k1) = pair!(k + 1);
                    acc0 = _mm512_fmadd_ps(v0, k0, acc0);
                    acc1 = _mm512_fmadd_ps(v1, k1, acc1);
                    k += 2;
                }
                if k < pairs_per_group {
                    let (v0, k0) = pair!(k);
                    acc0 = _mm512_fmadd_ps(v0, k0, acc0);
                }
            }
        }
        let zacc = _mm_add_ps(zacc0, zacc1);
        // Lanes 0 and 2 hold s·z·Σx (1 and 3 hold z²·0).
        let zacc = _mm_add_ps(zacc, _mm_movehl_ps(zacc, zacc));
        let mut zeros = _mm_cvtss_f32(zacc);
        let mut total = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
        if blocks % 2 == 1 {
            // Only with groups of 32: the last group is the last block.
            let b = blocks - 1;
            let group = base.add(b * stride);
            let s = half::f16::from_le_bytes([*group, *group.add(1)]).to_f32();
            let bytes = std::slice::from_raw_parts(group.add(HEADER), 16);
            let xb = &x.q[b * BLOCK..(b + 1) * BLOCK];
            let isum: i32 = (0..16)
                .map(|j| {
                    i32::from(bytes[j] & 15) * i32::from(xb[j])
                        + i32::from(bytes[j] >> 4) * i32::from(xb[j + 16])
                })
                .sum();
            let z = half::f16::from_le_bytes([*group.add(2), *group.add(3)]).to_f32();
            total += s * x.d[b] * isum as f32;
            zeros += s * z * x.sums[b];
        }
        total - zeros
    }

    /// `Σ_b d_b·(q·x_q)_b` over one int8 row: `maddubs` needs an unsigned
    /// operand, so `|q|` times `x` with `q`'s sign (`|q| ≤ 128`, `|x| ≤ 127`).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn int8_dot(row: &[i8], x: &QuantizedX) -> f32 {
        let full = row.len() / BLOCK;
        let (wp, xp, dp) = (row.as_ptr(), x.q.as_ptr(), x.d.as_ptr());
        macro_rules! block {
            ($b:expr) => {{
                let b = $b;
                let w = _mm256_loadu_si256(wp.add(b * BLOCK).cast());
                let v = _mm256_loadu_si256(xp.add(b * BLOCK).cast());
                let p = dot_u8_i8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(v, w));
                (p, _mm256_set1_ps(*dp.add(b)))
            }};
        }
        let acc = sum_blocks!(full, block);
        let tail: i32 = row[full * BLOCK..]
            .iter()
            .zip(&x.q[full * BLOCK..])
            .map(|(&a, &b)| i32::from(a) * i32::from(b))
            .sum();
        let tail = if full * BLOCK < row.len() {
            x.d[full] * tail as f32
        } else {
            0.0
        };
        hsum(acc) + tail
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

    /// The activations as the kernels see them, `x̂ = d·q`, checked against
    /// `x`: within half a step of each block's scale.
    fn dequantized_x(x: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let xq = QuantizedX::new(x);
        let x_hat: Vec<f32> = (0..x.len())
            .map(|j| xq.d[j / BLOCK] * f32::from(xq.q[j]))
            .collect();
        for (j, (a, b)) in x.iter().zip(&x_hat).enumerate() {
            let d = xq.d[j / BLOCK];
            assert!(
                (a - b).abs() <= d / 2.0 * (1.0 + 1e-6),
                "x[{j}] {a} vs {b} (d {d})"
            );
        }
        (x_hat, xq.d)
    }

    /// Per row: the exact (f64) product with `x̂`, the f32 rounding allowed
    /// around it (1e-5 of `mag`, the row's Σ|terms| as the kernel adds them),
    /// and the exact product with `x` and its allowance (the module's bound
    /// `Σ_b d_b/2·Σ_{j∈b}|w_j|` on top of the rounding).
    fn check(y: &[f32], w: &[f32], x: &[f32], mag: impl Fn(usize, &[f32]) -> f64) {
        let cols = x.len();
        let (x_hat, d) = dequantized_x(x);
        for (r, &yr) in y.iter().enumerate() {
            let row = &w[r * cols..(r + 1) * cols];
            let dot = |v: &[f32]| -> f64 {
                row.iter()
                    .zip(v)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum()
            };
            let rounding = 1e-6 + 1e-5 * mag(r, &x_hat);
            let got = f64::from(yr);
            assert!(
                (got - dot(&x_hat)).abs() <= rounding,
                "row {r}: {got} vs {}",
                dot(&x_hat)
            );
            let bound: f64 = row
                .chunks(BLOCK)
                .zip(&d)
                .map(|(wb, &db)| {
                    f64::from(db) / 2.0 * wb.iter().map(|v| f64::from(v.abs())).sum::<f64>()
                })
                .sum();
            assert!(
                (got - dot(x)).abs() <= rounding + bound,
                "row {r}: {got} vs {}",
                dot(x)
            );
        }
    }

    #[test]
    fn int4_gemv_and_dequantize_match_the_definition() {
        for (rows, cols, group) in [
            (70, 64, 32),
            (33, 256, 128),
            (5, 512, 256),
            (48, 96, 32),
            (9, 192, 64),
        ] {
            let mut next = stream(rows as u64 * 7919 + cols as u64);
            let groups = cols / group;
            let q: Vec<u8> = (0..rows * cols).map(|_| (next() % 16) as u8).collect();
            // f16 values, as checkpoints store them.
            let scales: Vec<f32> = (0..rows * groups)
                .map(|_| f16::from_f32((next() % 1000) as f32 / 7000.0 + 0.01).to_f32())
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
            // The same product by the portable code (the kernel when the CPU
            // has no AVX2).
            let xq = QuantizedX::new(&x);
            let group_sums: Vec<f32> = xq
                .sums
                .chunks(group / BLOCK)
                .map(|g| g.iter().sum())
                .collect();
            let y_portable: Vec<f32> = (0..rows)
                .map(|r| {
                    let row = m.row(r);
                    row.dot_portable(&xq) + row.min_term(&group_sums)
                })
                .collect();
            // The kernel sums s·q·x and −s·z·x separately: its rounding is
            // relative to those terms, not to their (smaller) difference.
            let mag = |r: usize, x: &[f32]| -> f64 {
                (0..cols)
                    .map(|c| {
                        let g = r * groups + c / group;
                        f64::from(scales[g] * (f32::from(q[r * cols + c]) + zeros[g]))
                            * f64::from(x[c].abs())
                    })
                    .sum()
            };
            check(&y, &w, &x, mag);
            check(&y_portable, &w, &x, mag);
            // Each vectorised kernel this CPU has, whichever `gemv` picked.
            #[cfg(target_arch = "x86_64")]
            {
                let rows_by = |f: &dyn Fn(&Int4Row) -> f32| -> Vec<f32> {
                    (0..rows).map(|r| f(&m.row(r))).collect()
                };
                if has_avx2_fma_f16c() {
                    // SAFETY: features checked; `xq` covers the columns.
                    let y = rows_by(&|row| unsafe { x86::int4_row(row, &xq, &group_sums) });
                    check(&y, &w, &x, mag);
                }
                if has_avx512_vnni() {
                    assert!(!xq.pairs.is_empty() || cols < 2 * BLOCK);
                    // SAFETY: as above.
                    let y = rows_by(&|row| unsafe { x86::int4_row_512(row, &xq, &group_sums) });
                    check(&y, &w, &x, mag);
                }
            }
        }
    }

    #[test]
    fn int8_gemv_and_dequantize_match_the_definition() {
        for (rows, cols) in [(300, 96), (7, 40), (130, 896)] {
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
            let xq = QuantizedX::new(&x);
            let y_portable: Vec<f32> = (0..rows)
                .map(|r| m.scales[r] * int8_dot_portable(&m.q[r * cols..(r + 1) * cols], &xq))
                .collect();
            let mag = |r: usize, x: &[f32]| -> f64 {
                (0..cols)
                    .map(|c| f64::from(w[r * cols + c].abs()) * f64::from(x[c].abs()))
                    .sum()
            };
            check(&y, &w, &x, mag);
            check(&y_portable, &w, &x, mag);
            #[cfg(target_arch = "x86_64")]
            {
                let rows_by = |f: &dyn Fn(&[i8]) -> f32| -> Vec<f32> {
                    (0..rows)
                        .map(|r| m.scales[r] * f(&m.q[r * cols..(r + 1) * cols]))
                        .collect()
                };
                if has_avx2_fma_f16c() {
                    // SAFETY: features checked; `xq` covers the columns.
                    check(
                        &rows_by(&|row| unsafe { x86::int8_dot(row, &xq) }),
                        &w,
                        &x,
                        mag,
                    );
                }
            }
        }
    }

    #[test]
    fn activation_blocks_of_zeros_and_extremes() {
        let mut x = vec![0f32; 70];
        x[33] = -3.5;
        x[69] = 1e-30;
        let xq = QuantizedX::new(&x);
        assert_eq!(xq.d[0], 0.0);
        assert_eq!(xq.q[33], -127);
        assert_eq!(xq.q[69], 127);
        assert_eq!(xq.q.len(), 96);
        assert!(xq.q[70..].iter().all(|&v| v == 0));

        // The vectorised quantizer rounds exactly as the portable one.
        let mut next = stream(5);
        let x: Vec<f32> = (0..4864)
            .map(|i| {
                ((next() % 20001) as f32 / 1000.0 - 10.0) * if i % 97 == 0 { 50.0 } else { 1.0 }
            })
            .collect();
        let fast = QuantizedX::new(&x);
        let mut portable = QuantizedX::new(&x[..0]);
        portable.q = vec![0; x.len()];
        portable.d = vec![0.0; x.len() / BLOCK];
        portable.sums = vec![0.0; x.len() / BLOCK];
        for b in 0..x.len() / BLOCK {
            portable.quantize_block_portable(&x[b * BLOCK..], b);
        }
        assert_eq!(fast.q, portable.q);
        assert_eq!(fast.d, portable.d);
        assert_eq!(fast.sums, portable.sums);
    }
}

/// Kernel timings on the shapes of Qwen2.5-Coder-0.5B (24 layers' linears at
/// group 32, streamed from memory, and its 151,936 × 896 int8 head), for
/// comparing kernel variants on the machine at hand; min over repetitions,
/// which a noisy machine disturbs least. Not a test of anything:
/// `cargo test --release --lib kernel_timings -- --ignored --nocapture`.
#[cfg(all(test, target_arch = "x86_64"))]
mod timings {
    use super::*;
    use std::time::Instant;

    fn min_time(reps: usize, mut f: impl FnMut()) -> f64 {
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    }

    #[test]
    #[ignore]
    fn kernel_timings() {
        let (hidden, ffn, kv) = (896, 4864, 128);
        let shapes = [
            (hidden, hidden),
            (kv, hidden),
            (kv, hidden),
            (hidden, hidden),
            (ffn, hidden),
            (ffn, hidden),
            (hidden, ffn),
        ];
        let layers: Vec<Vec<Int4Matrix>> = (0..24)
            .map(|_| {
                shapes
                    .iter()
                    .map(|&(rows, cols)| {
                        let q: Vec<u8> = (0..rows * cols).map(|i| (i * 7 % 16) as u8).collect();
                        let g = rows * cols / 32;
                        let s: Vec<f32> = (0..g).map(|i| 0.01 + (i % 13) as f32 * 1e-3).collect();
                        let z: Vec<f32> = (0..g).map(|i| (i % 16) as f32).collect();
                        Int4Matrix::new(&q, &s, &z, rows, cols, 32)
                    })
                    .collect()
            })
            .collect();
        let x: Vec<f32> = (0..ffn)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let mut y = vec![0f32; ffn];
        let all_layers = min_time(10, || {
            for layer in &layers {
                for m in layer {
                    m.gemv(&x[..m.cols], &mut y[..m.rows]);
                }
            }
        });
        let head = Int8Matrix::new(
            (0..151_936 * hidden)
                .map(|i| (i * 31 % 255) as i8)
                .collect(),
            vec![0.01; 151_936],
            151_936,
            hidden,
        );
        let mut logits = vec![0f32; 151_936];
        let head_time = min_time(10, || head.gemv(&x[..hidden], &mut logits));
        let quantize = min_time(100, || {
            std::hint::black_box(QuantizedX::new(&x));
        });
        println!(
            "avx512 vnni: {}; 24 layers' int4 products {:.2} ms, int8 head {:.2} ms, one 4864-wide activation quantization {:.1} µs",
            has_avx512_vnni(),
            all_layers * 1e3,
            head_time * 1e3,
            quantize * 1e6
        );
    }
}
