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
//! (`team`), in long runs of consecutive rows first and shorter ones at the
//! end (`guided_parts`). Layers that share an input (q/k/v, gate/up) can run
//! as one stacked product (`int4_gemv_stacked`).
//!
//! Accuracy: the only error beyond f32 rounding is the activations'
//! rounding, at most half a step `d_b = max|x_b|/127` per element, so
//! `|Δy_r| ≤ Σ_b d_b/2 · Σ_{j∈b} |w_rj|` (the unit tests assert this bound).
//!
//! Int4 layout: rows in tiles of eight, per tile and group a header (the
//! eight rows' scales `s`, then their zeros `z`, as f16) and the group's
//! blocks of 32 columns, 128 bytes each, arranged so that one 32-byte load
//! holds four consecutive weights of every row of the tile (`nibble_place`):
//! the AVX2 kernel multiplies them with four activations broadcast to all
//! lanes, and the eight rows' sums come out one per lane, without the
//! per-row horizontal sums, scale broadcasts and unpacking shuffles a row at
//! a time needs (the idea of llama.cpp's repacked `q4_0_8x8` layout). One
//! stream per tile, 20 bytes per 32 weights at group 32. With
//! `w = s·(q − z)`, `y = Σ_g s_g·(q_g·x_g) − Σ_g s_g·z_g·Σ x_g`.
//!
//! Measured with `scripts/bench/decode` (0.5B, group 32, 2 threads): on an
//! AVX2 machine 14.4 tok/s with f32 activations and rayon, 20.9 with int8
//! activations and the team (0.63× llama.cpp Q4_0); on an AVX-512 machine
//! 0.50× llama.cpp before a VNNI row kernel and the raw-slice decode step,
//! 0.77× after; on the AVX2 machine again with the tiles (which replaced
//! the VNNI row kernel), 1.00–1.08× in three runs; on the AVX-512 machine
//! again, 0.86–0.91× with the AVX2 tiles in parts of four tiles, 1.04× and
//! 1.19× with guided parts; with stacked products too, 1.10–1.19× in three
//! runs on an Intel AVX-512 machine (BENCHMARKS.md).

use crate::team::Team;
use half::f16;
use rayon::prelude::*;

/// Columns per activation block (one int8 scale each), as llama.cpp's Q8_0.
const BLOCK: usize = 32;

/// An activation vector quantized to int8 in blocks of [`BLOCK`]: element
/// `j` of block `b` is `d[b]·q[32b + j]`; the last block is zero-padded.
struct QuantizedX {
    q: Vec<i8>,
    d: Vec<f32>,
    /// `d[b]·Σ_j q[32b + j]`: the block's sum as the kernels see it.
    sums: Vec<f32>,
}

impl QuantizedX {
    fn new(x: &[f32]) -> Self {
        let blocks = x.len().div_ceil(BLOCK);
        let mut out = Self {
            q: vec![0i8; blocks * BLOCK],
            d: vec![0f32; blocks],
            sums: vec![0f32; blocks],
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
            return out;
        }
        for b in 0..blocks {
            out.quantize_block_portable(&x[b * BLOCK..], b);
        }
        out
    }

    /// `Σx` per group of `group` columns (a multiple of [`BLOCK`]).
    fn group_sums(&self, group: usize) -> Vec<f32> {
        self.sums
            .chunks(group / BLOCK)
            .map(|g| g.iter().sum())
            .collect()
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

/// Rows per tile of the int4 layout: one AVX2 register holds one i32 or f32
/// lane per row.
const TILE: usize = 8;

/// Bytes before each group of a tile: its rows' scales, then their zeros,
/// as f16.
const HEADER: usize = 4 * TILE;

/// Bytes of one block of a tile: `TILE` rows × 32 columns of nibbles.
const TILE_BLOCK: usize = TILE * BLOCK / 2;

/// The byte of a tile's block holding row `r`, column `c` (`0..32`) of the
/// block, and whether it is in the high nibble. The block is four 32-byte
/// chunks; in chunk `k`, bytes `4r..4r+4` hold row `r`'s columns
/// `8k..8k+4` in their low nibbles and `8k+4..8k+8` in their high ones.
/// So one 32-byte load and a mask give a vector whose i32 lane `r` is four
/// consecutive weights of row `r`: multiplied (`maddubs`) with those four
/// activations broadcast to every lane, all eight rows advance together and
/// the sums come out one lane per row, with no horizontal additions.
#[inline(always)]
fn nibble_place(r: usize, c: usize) -> (usize, bool) {
    let (chunk, within) = (c / 8, c % 8);
    (32 * chunk + 4 * r + within % 4, within >= 4)
}

/// A 4-bit matrix in tiles of [`TILE`] rows (the last tile padded with zero
/// rows): per tile, per group, the group's [`HEADER`] then its blocks of
/// [`TILE_BLOCK`] bytes (see [`nibble_place`]); each tile is one stream the
/// CPU prefetches in order, 20 bytes per 32 weights at group 32.
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
    /// `group` must be a multiple of 32 dividing `cols`. Scales and zeros
    /// are kept as f16: exact for GPTQ and AWQ checkpoints, whose scales are
    /// f16 and zeros small integers.
    pub fn new(
        q: &[u8],
        scales: &[f32],
        zeros: &[f32],
        rows: usize,
        cols: usize,
        group: usize,
    ) -> Self {
        assert!(
            group.is_multiple_of(BLOCK) && group > 0 && cols.is_multiple_of(group),
            "group {group}, cols {cols}"
        );
        assert_eq!(q.len(), rows * cols);
        let groups = cols / group;
        assert_eq!(scales.len(), rows * groups);
        assert_eq!(zeros.len(), rows * groups);
        let mut m = Self {
            rows,
            cols,
            group,
            data: Vec::new(),
        };
        let (tile_bytes, group_bytes) = (m.tile_bytes(), m.group_bytes());
        let mut data = vec![0u8; rows.div_ceil(TILE) * tile_bytes];
        data.par_chunks_mut(tile_bytes)
            .enumerate()
            .for_each(|(t, tile)| {
                for (g, out) in tile.chunks_exact_mut(group_bytes).enumerate() {
                    for r in 0..TILE.min(rows - t * TILE) {
                        let row = t * TILE + r;
                        let (s, z) = (scales[row * groups + g], zeros[row * groups + g]);
                        out[2 * r..2 * r + 2].copy_from_slice(&f16::from_f32(s).to_le_bytes());
                        out[2 * (TILE + r)..2 * (TILE + r) + 2]
                            .copy_from_slice(&f16::from_f32(z).to_le_bytes());
                        let ints = &q[row * cols + g * group..][..group];
                        for (block_out, block) in out[HEADER..]
                            .chunks_exact_mut(TILE_BLOCK)
                            .zip(ints.chunks_exact(BLOCK))
                        {
                            for (c, &v) in block.iter().enumerate() {
                                let (at, high) = nibble_place(r, c);
                                block_out[at] |= if high { (v & 15) << 4 } else { v & 15 };
                            }
                        }
                    }
                }
            });
        m.data = data;
        m
    }

    fn group_bytes(&self) -> usize {
        HEADER + self.group / BLOCK * TILE_BLOCK
    }

    fn tile_bytes(&self) -> usize {
        self.cols / self.group * self.group_bytes()
    }

    #[cfg(test)]
    fn tiles(&self) -> usize {
        self.rows.div_ceil(TILE)
    }

    fn tile(&self, t: usize) -> Int4Tile<'_> {
        let bytes = self.tile_bytes();
        Int4Tile {
            data: &self.data[t * bytes..(t + 1) * bytes],
            group: self.group,
        }
    }

    /// `y = W·x` for `n` vectors `x` (`n × cols`, row-major) into `y`
    /// (`n × rows`): each tile is read once for all of them.
    fn product_int4(&self, x: &[f32], y: &mut [f32]) {
        let n = rows_of(x, y, self.rows, self.cols);
        if n == 1 {
            // Decode at batch 1.
            return int4_gemv_stacked(&[self], x, y);
        }
        let xq: Vec<QuantizedX> = x.chunks_exact(self.cols).map(QuantizedX::new).collect();
        let sums: Vec<Vec<f32>> = xq.iter().map(|q| q.group_sums(self.group)).collect();
        let kernel = Int4Kernel::best();
        by_blocks(y, n, TILE, 1, &|t, out| {
            self.tile(t).products(kernel, &xq, &sums, out)
        });
    }

    /// Whether [`int4_gemv_stacked`] takes the two together (same input
    /// size and group).
    pub fn stacks_with(&self, other: &Int4Matrix) -> bool {
        (self.cols, self.group) == (other.cols, other.group)
    }

    fn dequantize_int4(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(row, row_out)| {
                let r = row % TILE;
                for ((s, z, blocks), out) in self
                    .tile(row / TILE)
                    .groups()
                    .zip(row_out.chunks_exact_mut(self.group))
                {
                    for (block_out, block) in out
                        .chunks_exact_mut(BLOCK)
                        .zip(blocks.chunks_exact(TILE_BLOCK))
                    {
                        for (c, o) in block_out.iter_mut().enumerate() {
                            *o = s[r] * (f32::from(nibble(block, r, c)) - z[r]);
                        }
                    }
                }
            });
        out
    }
}

/// `y = [W₁; W₂; …]·x` for one vector `x`: the products of several int4
/// matrices with the same input (equal `cols` and group, see
/// [`Int4Matrix::stacks_with`]), their outputs one after another in `y`,
/// with one activation quantization and one pass of the team over all
/// their tiles. Decode's q/k/v and gate/up each share an input: three and
/// two hand-offs to the team become one.
pub fn int4_gemv_stacked(mats: &[&Int4Matrix], x: &[f32], y: &mut [f32]) {
    assert_eq!(
        y.len(),
        mats.iter().map(|m| m.rows).sum::<usize>(),
        "y does not hold the stacked rows"
    );
    let Some(first) = mats.first() else {
        return;
    };
    assert!(
        mats.iter().all(|m| m.stacks_with(first)),
        "stacked matrices of different input sizes or groups"
    );
    assert_eq!(
        x.len(),
        first.cols,
        "x is not one row of the matrices' width"
    );
    let xq = QuantizedX::new(x);
    let sums = xq.group_sums(first.group);
    let kernel = Int4Kernel::best();
    // Every tile as (matrix, tile, its first row in `y`), in `y`'s order.
    let mut tiles = Vec::new();
    let mut at = 0;
    for (i, m) in mats.iter().enumerate() {
        tiles.extend((0..m.rows.div_ceil(TILE)).map(|t| (i, t, at + t * TILE)));
        at += m.rows;
    }
    let team = Team::global();
    let bounds: Vec<usize> = guided_parts(tiles.len(), team.threads(), 1)
        .into_iter()
        .map(|p| tiles.get(p).map_or(y.len(), |t| t.2))
        .collect();
    team.run_parts_mut(y, &bounds, &|start, out| {
        let mut done = 0;
        for &(i, t, _) in &tiles[tiles.partition_point(|t| t.2 < start)..] {
            if done == out.len() {
                break;
            }
            let m = mats[i];
            let len = TILE.min(m.rows - t * TILE);
            let v = m.tile(t).product(kernel, [&xq], [sums.as_slice()]);
            out[done..done + len].copy_from_slice(&v[0][..len]);
            done += len;
        }
    });
}

/// Row `r`, column `c` of a tile's block.
#[inline(always)]
fn nibble(block: &[u8], r: usize, c: usize) -> u8 {
    let (at, high) = nibble_place(r, c);
    if high {
        block[at] >> 4
    } else {
        block[at] & 15
    }
}

/// The int4 products' implementations; `best` is what this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Int4Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Int4Kernel {
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma_f16c() {
            return Self::Avx2;
        }
        Self::Portable
    }
}

/// One tile of an [`Int4Matrix`].
struct Int4Tile<'a> {
    data: &'a [u8],
    group: usize,
}

impl Int4Tile<'_> {
    /// Per group: the rows' scales and zeros, and the group's blocks.
    fn groups(&self) -> impl Iterator<Item = ([f32; TILE], [f32; TILE], &[u8])> {
        self.data
            .chunks_exact(HEADER + self.group / BLOCK * TILE_BLOCK)
            .map(|g| {
                let half = |at: usize| f16::from_le_bytes([g[at], g[at + 1]]).to_f32();
                let s = std::array::from_fn(|r| half(2 * r));
                let z = std::array::from_fn(|r| half(2 * (TILE + r)));
                (s, z, &g[HEADER..])
            })
    }

    /// The tile's rows times each of `xs` into `out` (`[x][row]`, `TILE`
    /// values per x, cut where `out` ends: the last tile's padding rows),
    /// up to [`MAX_X`] activation vectors per pass over the tile.
    fn products(&self, kernel: Int4Kernel, xs: &[QuantizedX], sums: &[Vec<f32>], out: &mut [f32]) {
        let mut j = 0;
        while j < xs.len() {
            let m = (xs.len() - j).min(MAX_X);
            macro_rules! pass {
                ($n:literal) => {{
                    let v = self.product::<$n>(
                        kernel,
                        std::array::from_fn(|i| &xs[j + i]),
                        std::array::from_fn(|i| sums[j + i].as_slice()),
                    );
                    for (i, v) in v.iter().enumerate() {
                        let at = (j + i) * TILE;
                        let end = (at + TILE).min(out.len());
                        out[at..end].copy_from_slice(&v[..end - at]);
                    }
                }};
            }
            match m {
                1 => pass!(1),
                2 => pass!(2),
                3 => pass!(3),
                _ => pass!(4),
            }
            j += m;
        }
    }

    /// The tile's rows times each of `xs`: `Σ_g s_g·(q_g·x_g) − Σ_g
    /// s_g·z_g·Σx_g` per row (`group_sums` holds the `Σx_g` of each
    /// quantized x).
    fn product<const N: usize>(
        &self,
        kernel: Int4Kernel,
        xs: [&QuantizedX; N],
        group_sums: [&[f32]; N],
    ) -> [[f32; TILE]; N] {
        match kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx2` is only chosen where the CPU has AVX2, FMA and
            // F16C; the kernel checks that `xs` and `group_sums` cover the
            // tile's columns.
            Int4Kernel::Avx2 => unsafe { x86::int4_tile(self, xs, group_sums) },
            Int4Kernel::Portable => self.product_portable(xs, group_sums),
        }
    }

    fn product_portable<const N: usize>(
        &self,
        xs: [&QuantizedX; N],
        group_sums: [&[f32]; N],
    ) -> [[f32; TILE]; N] {
        let mut acc = [[0f32; TILE]; N];
        let mut zeros = [[0f32; TILE]; N];
        let mut b = 0;
        for (g, (s, z, blocks)) in self.groups().enumerate() {
            for block in blocks.chunks_exact(TILE_BLOCK) {
                for r in 0..TILE {
                    let w: [i32; BLOCK] = std::array::from_fn(|c| i32::from(nibble(block, r, c)));
                    for (x, acc) in xs.iter().zip(acc.iter_mut()) {
                        let xb = &x.q[b * BLOCK..(b + 1) * BLOCK];
                        let isum: i32 = w.iter().zip(xb).map(|(&w, &v)| w * i32::from(v)).sum();
                        acc[r] += s[r] * x.d[b] * isum as f32;
                    }
                }
                b += 1;
            }
            for (sums, zeros) in group_sums.iter().zip(zeros.iter_mut()) {
                for r in 0..TILE {
                    zeros[r] += s[r] * z[r] * sums[g];
                }
            }
        }
        std::array::from_fn(|j| std::array::from_fn(|r| acc[j][r] - zeros[j][r]))
    }
}

/// Activation vectors multiplied in one pass over the weights: each weight
/// load and unpacking serves this many products (more would spill the
/// sixteen AVX2 registers).
const MAX_X: usize = 4;

/// The number of vectors in `x` (`n × cols`), checking that `y` holds
/// `n × rows`.
fn rows_of(x: &[f32], y: &[f32], rows: usize, cols: usize) -> usize {
    let n = x.len() / cols.max(1);
    assert_eq!(x.len(), n * cols, "x is not a whole number of rows");
    assert_eq!(y.len(), n * rows, "y does not hold n × rows");
    n
}

/// Runs `f(block, out)` over the team for every block of `unit` weight
/// rows, where `out` takes the block's products with all `n` vectors,
/// `[x][row]`; then `y` (`n × rows`) gets them. With one vector `out` is
/// `y`'s own slice (the last block's cut short); with several, a scratch
/// buffer is transposed into `y`. The blocks go to the threads in runs of
/// consecutive blocks, at least `min_part` per run ([`guided_parts`]).
fn by_blocks(
    y: &mut [f32],
    n: usize,
    unit: usize,
    min_part: usize,
    f: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    let team = Team::global();
    let rows = y.len() / n.max(1);
    let blocks = rows.div_ceil(unit);
    let parts = guided_parts(blocks, team.threads(), min_part);
    if n == 1 {
        let bounds: Vec<usize> = parts.iter().map(|&b| (b * unit).min(rows)).collect();
        team.run_parts_mut(y, &bounds, &|start, out| {
            for (k, out) in out.chunks_mut(unit).enumerate() {
                f(start / unit + k, out);
            }
        });
        return;
    }
    let mut scratch = vec![0f32; blocks * n * unit];
    let bounds: Vec<usize> = parts.iter().map(|&b| b * n * unit).collect();
    team.run_parts_mut(&mut scratch, &bounds, &|start, out| {
        for (k, out) in out.chunks_mut(n * unit).enumerate() {
            f(start / (n * unit) + k, out);
        }
    });
    for (b, block) in scratch.chunks_exact(n * unit).enumerate() {
        for (j, values) in block.chunks_exact(unit).enumerate() {
            let at = b * unit;
            let end = (at + unit).min(rows);
            y[j * rows + at..j * rows + end].copy_from_slice(&values[..end - at]);
        }
    }
}

/// Bounds of the parts `0..blocks` is handed out in: each part takes
/// `1/(2·threads)` of the blocks not yet handed out, at least `min` (and at
/// least 1), so the first parts are long runs of consecutive rows, which
/// the CPU's prefetcher streams best (a 151,936 × 896 int4 product: 18.9
/// GB/s in parts of four tiles, 27.9 in parts of sixteen), and the last
/// ones short, so the threads finish together.
fn guided_parts(blocks: usize, threads: usize, min: usize) -> Vec<usize> {
    let mut bounds = vec![0];
    let mut at = 0;
    while at < blocks {
        let part = (blocks - at).div_ceil(threads).max(min).max(1);
        at = (at + part).min(blocks);
        bounds.push(at);
    }
    bounds
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

    /// Row-wise symmetric RTN of a row-major f32 matrix: per row
    /// `s = max(max|w|/127, 1e-12)`, `q = clamp(round(w/s), −127, 127)`
    /// (ties to even, as libtorch's `round`), one pass over the weights
    /// (the 151,936 × 896 head of a 0.5B model: 545 MB of f32, which a
    /// chain of libtorch ops read and wrote several times over).
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols);
        let mut q = vec![0i8; rows * cols];
        let mut scales = vec![0f32; rows];
        q.par_chunks_mut(cols.max(1))
            .zip(w.par_chunks(cols.max(1)))
            .zip(scales.par_iter_mut())
            .for_each(|((q, w), s)| {
                let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                *s = (amax / 127.0).max(1e-12);
                // Ties to even by adding and removing 1.5·2²³ (exact for
                // |v| < 2²²; here |v/s| ≤ 127.5): `round_ties_even` is a
                // libm call per element on baseline x86-64.
                const MAGIC: f32 = 12_582_912.0;
                for (q, v) in q.iter_mut().zip(w) {
                    *q = ((v / *s + MAGIC) - MAGIC).clamp(-127.0, 127.0) as i8;
                }
            });
        Self::new(q, scales, rows, cols)
    }

    /// `y = W·x` for `n` vectors `x` (`n × cols`) into `y` (`n × rows`):
    /// each weight row is read once for all of them.
    fn product_int8(&self, x: &[f32], y: &mut [f32]) {
        let n = rows_of(x, y, self.rows, self.cols);
        let xq: Vec<QuantizedX> = x.chunks_exact(self.cols).map(QuantizedX::new).collect();
        let avx2 = has_avx2_fma_f16c();
        let cols = self.cols;
        by_blocks(y, n, 1, 16, &|r, out| {
            let row = &self.q[r * cols..(r + 1) * cols];
            let mut j = 0;
            while j < n {
                let m = (n - j).min(MAX_X);
                macro_rules! pass {
                    ($n:literal) => {{
                        let xs: [&QuantizedX; $n] = std::array::from_fn(|i| &xq[j + i]);
                        #[cfg(target_arch = "x86_64")]
                        let v = if avx2 {
                            // SAFETY: AVX2 and FMA checked above; the kernel
                            // checks that `xs` cover the row's columns.
                            unsafe { x86::int8_dot(row, xs) }
                        } else {
                            int8_dot_portable(row, xs)
                        };
                        #[cfg(not(target_arch = "x86_64"))]
                        let v = {
                            let _ = avx2;
                            int8_dot_portable(row, xs)
                        };
                        for (o, v) in out[j..j + $n].iter_mut().zip(v) {
                            *o = self.scales[r] * v;
                        }
                    }};
                }
                match m {
                    1 => pass!(1),
                    2 => pass!(2),
                    3 => pass!(3),
                    _ => pass!(4),
                }
                j += m;
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

/// `Σ_b d_b·(q·x_q)_b` over one int8 row, for each of `xs`.
fn int8_dot_portable<const N: usize>(row: &[i8], xs: [&QuantizedX; N]) -> [f32; N] {
    xs.map(|x| {
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
    })
}

/// A weight matrix the CPU kernels multiply with.
pub trait MatVec: Send + Sync {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    /// `y = W·x` for one vector `x` (`cols`) into `y` (`rows`).
    fn gemv(&self, x: &[f32], y: &mut [f32]) {
        self.products(x, y)
    }
    /// `y = W·x` for each of the `n` vectors in `x` (`n × cols`, row-major)
    /// into `y` (`n × rows`), reading the weights once for all of them.
    fn products(&self, x: &[f32], y: &mut [f32]);
    /// The f32 weights, row-major (for products of many rows, where a dense
    /// matrix product is faster than any matrix–vector kernel).
    fn dequantize(&self) -> Vec<f32>;
}

macro_rules! mat_vec {
    ($t:ty, $products:ident, $dequantize:ident) => {
        impl MatVec for $t {
            fn rows(&self) -> usize {
                self.rows
            }
            fn cols(&self) -> usize {
                self.cols
            }
            fn products(&self, x: &[f32], y: &mut [f32]) {
                self.$products(x, y)
            }
            fn dequantize(&self) -> Vec<f32> {
                self.$dequantize()
            }
        }
    };
}
mat_vec!(Int4Matrix, product_int4, dequantize_int4);
mat_vec!(Int8Matrix, product_int8, dequantize_int8);

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
    use super::{Int4Tile, QuantizedX, BLOCK, HEADER, TILE, TILE_BLOCK};
    use std::arch::x86_64::*;

    const PREFETCH: usize = 1024;

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

    /// Eight i32 partial sums of `a·b` for 32 unsigned `a` (≤ 255, with
    /// `|a·b|·2 < 2¹⁵`: no saturation) and 32 signed `b`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_u8_i8(a: __m256i, b: __m256i) -> __m256 {
        let pairs = _mm256_maddubs_epi16(a, b);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    /// One tile's product (see [`Int4Tile`] and `nibble_place`): per block,
    /// four 32-byte loads and masks give eight vectors of four weights per
    /// row (i32 lane `r` = row `r`), each multiplied (`maddubs`) by the
    /// matching four activations broadcast to every lane and summed in i16
    /// lanes (at most 8·2·15·127 = 30,480: activations stay within ±127, so
    /// nothing overflows), widened once (`madd`), converted and scaled by the
    /// rows' `s` times the block's `d`. The zeros' term, one vector FMA per
    /// group, accumulates beside it. About 4 vector instructions per row and
    /// block where a row at a time needed ~20 (unpacking, a scale broadcast
    /// and a horizontal sum per row).
    ///
    /// With several activation vectors (`N`), each block's loads and masks
    /// serve all of them: batched decode reads the weights once per step,
    /// not once per sequence.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn int4_tile<const N: usize>(
        tile: &Int4Tile,
        xs: [&QuantizedX; N],
        group_sums: [&[f32]; N],
    ) -> [[f32; TILE]; N] {
        let per_group = tile.group / BLOCK;
        let group_bytes = HEADER + per_group * TILE_BLOCK;
        let groups = tile.data.len() / group_bytes;
        for (x, sums) in xs.iter().zip(&group_sums) {
            assert!(x.d.len() >= groups * per_group && sums.len() >= groups);
            assert!(x.q.len() >= groups * per_group * BLOCK);
        }
        let base = tile.data.as_ptr();
        let xp: [*const i32; N] = std::array::from_fn(|j| xs[j].q.as_ptr().cast::<i32>());
        let dp: [*const f32; N] = std::array::from_fn(|j| xs[j].d.as_ptr());
        let sp: [*const f32; N] = std::array::from_fn(|j| group_sums[j].as_ptr());
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); N];
        let mut zacc = [_mm256_setzero_ps(); N];
        let mut b = 0;
        for g in 0..groups {
            let gp = base.add(g * group_bytes);
            let s = _mm256_cvtph_ps(_mm_loadu_si128(gp.cast()));
            let z = _mm256_cvtph_ps(_mm_loadu_si128(gp.add(2 * TILE).cast()));
            let sz = _mm256_mul_ps(s, z);
            for j in 0..N {
                zacc[j] = _mm256_fmadd_ps(sz, _mm256_set1_ps(*sp[j].add(g)), zacc[j]);
            }
            for k in 0..per_group {
                let w = gp.add(HEADER + k * TILE_BLOCK);
                _mm_prefetch::<_MM_HINT_T0>(w.add(PREFETCH).cast());
                _mm_prefetch::<_MM_HINT_T0>(w.add(PREFETCH + 64).cast());
                // Two sums per vector (chunks 0–1 and 2–3), so the adds
                // do not form one dependency chain.
                let mut sum = [[_mm256_setzero_si256(); N]; 2];
                // Chunk `c`: columns 8c..8c+4 (low nibbles) and 8c+4..8c+8.
                for c in 0..4 {
                    let v = _mm256_loadu_si256(w.add(32 * c).cast());
                    let lo = _mm256_and_si256(v, mask);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
                    for j in 0..N {
                        let xb = xp[j].add(b * BLOCK / 4 + 2 * c);
                        let x_lo = _mm256_set1_epi32(xb.read_unaligned());
                        let x_hi = _mm256_set1_epi32(xb.add(1).read_unaligned());
                        sum[c / 2][j] = _mm256_add_epi16(
                            sum[c / 2][j],
                            _mm256_add_epi16(
                                _mm256_maddubs_epi16(lo, x_lo),
                                _mm256_maddubs_epi16(hi, x_hi),
                            ),
                        );
                    }
                }
                for j in 0..N {
                    let sum = _mm256_add_epi16(sum[0][j], sum[1][j]);
                    let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum, ones));
                    let scale = _mm256_mul_ps(s, _mm256_set1_ps(*dp[j].add(b)));
                    acc[j] = _mm256_fmadd_ps(p, scale, acc[j]);
                }
                b += 1;
            }
        }
        let mut out = [[0f32; TILE]; N];
        for j in 0..N {
            _mm256_storeu_ps(out[j].as_mut_ptr(), _mm256_sub_ps(acc[j], zacc[j]));
        }
        out
    }

    /// `Σ_b d_b·(q·x_q)_b` over one int8 row, for each of `xs`: `maddubs`
    /// needs an unsigned operand, so `|q|` times `x` with `q`'s sign
    /// (`|q| ≤ 128`, `|x| ≤ 127`). Two blocks per iteration into two
    /// accumulators, so consecutive blocks do not wait on each other's FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn int8_dot<const N: usize>(row: &[i8], xs: [&QuantizedX; N]) -> [f32; N] {
        let full = row.len() / BLOCK;
        for x in &xs {
            assert!(x.q.len() >= row.len() && x.d.len() >= row.len().div_ceil(BLOCK));
        }
        let wp = row.as_ptr();
        let xp: [*const i8; N] = std::array::from_fn(|j| xs[j].q.as_ptr());
        let dp: [*const f32; N] = std::array::from_fn(|j| xs[j].d.as_ptr());
        let mut acc0 = [_mm256_setzero_ps(); N];
        let mut acc1 = [_mm256_setzero_ps(); N];
        macro_rules! block {
            ($b:expr, $acc:ident) => {{
                let b = $b;
                let w = _mm256_loadu_si256(wp.add(b * BLOCK).cast());
                let w_abs = _mm256_sign_epi8(w, w);
                for j in 0..N {
                    let v = _mm256_loadu_si256(xp[j].add(b * BLOCK).cast());
                    let p = dot_u8_i8(w_abs, _mm256_sign_epi8(v, w));
                    $acc[j] = _mm256_fmadd_ps(p, _mm256_set1_ps(*dp[j].add(b)), $acc[j]);
                }
            }};
        }
        let mut b = 0;
        while b + 1 < full {
            block!(b, acc0);
            block!(b + 1, acc1);
            b += 2;
        }
        if b < full {
            block!(b, acc0);
        }
        let mut out = [0f32; N];
        for j in 0..N {
            let tail: i32 = row[full * BLOCK..]
                .iter()
                .zip(&xs[j].q[full * BLOCK..])
                .map(|(&a, &b)| i32::from(a) * i32::from(b))
                .sum();
            let tail = if full * BLOCK < row.len() {
                xs[j].d[full] * tail as f32
            } else {
                0.0
            };
            out[j] = hsum(_mm256_add_ps(acc0[j], acc1[j])) + tail;
        }
        out
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

    /// A random int4 matrix (weights 0..15, scales in [0.01, 0.12], zeros
    /// 0..15) drawn from `next`.
    fn random_int4(
        next: &mut impl FnMut() -> u64,
        rows: usize,
        cols: usize,
        group: usize,
    ) -> Int4Matrix {
        let q: Vec<u8> = (0..rows * cols).map(|_| (next() % 16) as u8).collect();
        let g = rows * cols / group;
        let scales: Vec<f32> = (0..g)
            .map(|_| (next() % 1000) as f32 / 9000.0 + 0.01)
            .collect();
        let zeros: Vec<f32> = (0..g).map(|_| (next() % 16) as f32).collect();
        Int4Matrix::new(&q, &scales, &zeros, rows, cols, group)
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
    fn guided_parts_cover_the_blocks_long_runs_first() {
        for (blocks, threads, min) in [
            (0, 2, 1),
            (1, 2, 1),
            (112, 2, 1),
            (608, 16, 1),
            (151_936, 2, 16),
        ] {
            let b = guided_parts(blocks, threads, min);
            assert_eq!((b[0], *b.last().unwrap()), (0, blocks));
            let parts: Vec<usize> = b.windows(2).map(|w| w[1] - w[0]).collect();
            assert!(parts.iter().all(|&p| p > 0), "{parts:?}");
            // Non-increasing, and none below `min` but the last.
            assert!(parts.windows(2).all(|w| w[0] >= w[1]), "{parts:?}");
            assert!(parts.iter().rev().skip(1).all(|&p| p >= min), "{parts:?}");
            if blocks > 0 {
                assert_eq!(parts[0], blocks.div_ceil(threads).max(min));
            }
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
            // Every kernel this CPU has (`gemv` ran the best of them), the
            // padding rows of the last tile included: they come out zero.
            let xq = QuantizedX::new(&x);
            let group_sums = xq.group_sums(group);
            let mut kernels = vec![Int4Kernel::Portable];
            #[cfg(target_arch = "x86_64")]
            if has_avx2_fma_f16c() {
                kernels.push(Int4Kernel::Avx2);
            }
            for kernel in kernels {
                let all: Vec<f32> = (0..m.tiles())
                    .flat_map(|t| m.tile(t).product(kernel, [&xq], [&group_sums])[0])
                    .collect();
                assert!(all[rows..].iter().all(|&v| v == 0.0), "{kernel:?}");
                check(&all[..rows], &w, &x, mag);
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
                .map(|r| m.scales[r] * int8_dot_portable(&m.q[r * cols..(r + 1) * cols], [&xq])[0])
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
                        &rows_by(&|row| unsafe { x86::int8_dot(row, [&xq])[0] }),
                        &w,
                        &x,
                        mag,
                    );
                }
            }
        }
    }

    /// Products of several vectors at once equal each vector's own product
    /// exactly (each vector's arithmetic is the same, in the same order),
    /// for every count of vectors up to past two passes of [`MAX_X`], on
    /// both matrix kinds, with a last tile of padding rows; and the portable
    /// multi-vector tile product equals the one-vector one.
    #[test]
    fn products_of_many_vectors_equal_one_at_a_time() {
        let (rows, cols, group) = (37, 128, 64);
        let mut next = stream(11);
        let int4 = random_int4(&mut next, rows, cols, group);
        let int8 = Int8Matrix::new(
            (0..rows * cols).map(|_| (next() % 255) as i8).collect(),
            (0..rows).map(|_| (next() % 100) as f32 / 3000.0).collect(),
            rows,
            cols,
        );
        for n in 1..=2 * MAX_X + 1 {
            let x: Vec<f32> = (0..n * cols)
                .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            for m in [&int4 as &dyn MatVec, &int8] {
                let mut all = vec![0f32; n * rows];
                m.products(&x, &mut all);
                for (j, (xj, got)) in x.chunks(cols).zip(all.chunks(rows)).enumerate() {
                    let mut one = vec![0f32; rows];
                    m.gemv(xj, &mut one);
                    assert_eq!(got, &one[..], "{n} vectors, vector {j}");
                }
            }
            let xq: Vec<QuantizedX> = x.chunks(cols).map(QuantizedX::new).collect();
            let sums: Vec<Vec<f32>> = xq.iter().map(|q| q.group_sums(group)).collect();
            let mut out = vec![0f32; n * TILE];
            int4.tile(4)
                .products(Int4Kernel::Portable, &xq, &sums, &mut out);
            for (j, got) in out.chunks(TILE).enumerate() {
                let one = int4.tile(4).product_portable([&xq[j]], [&sums[j]]);
                assert_eq!(got, &one[0][..], "portable, {n} vectors, vector {j}");
            }
        }
    }

    #[test]
    fn stacked_products_equal_one_matrix_at_a_time() {
        let (cols, group) = (256, 64);
        let mut next = stream(5);
        // Row counts that are and are not whole tiles (the last tile of a
        // matrix padded in the middle of the stack).
        let mats: Vec<Int4Matrix> = [40, 13, 8, 1, 77]
            .iter()
            .map(|&rows| random_int4(&mut next, rows, cols, group))
            .collect();
        let x: Vec<f32> = (0..cols)
            .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        for take in [1, 2, 5] {
            let stack: Vec<&Int4Matrix> = mats.iter().take(take).collect();
            let mut y = vec![f32::NAN; stack.iter().map(|m| m.rows).sum()];
            int4_gemv_stacked(&stack, &x, &mut y);
            let mut want = Vec::new();
            for m in &stack {
                let mut one = vec![0f32; m.rows];
                m.gemv(&x, &mut one);
                want.extend(one);
            }
            assert_eq!(y, want, "{take} matrices");
        }
        let other = Int4Matrix::new(&[0; 32 * 128], &[1.0; 32], &[8.0; 32], 32, 128, 128);
        assert!(!mats[0].stacks_with(&other) && mats[0].stacks_with(&mats[1]));
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
            "int4 kernel {:?}: 24 layers' int4 products {:.2} ms, int8 head {:.2} ms, one 4864-wide activation quantization {:.1} µs",
            Int4Kernel::best(),
            all_layers * 1e3,
            head_time * 1e3,
            quantize * 1e6
        );
        // Streaming rate of one long int4 product (the head's shape) next
        // to the int8 head's.
        {
            let rows = 151_936;
            let q: Vec<u8> = (0..rows * hidden).map(|i| (i * 7 % 16) as u8).collect();
            let g = rows * hidden / 32;
            let s: Vec<f32> = (0..g).map(|i| 0.01 + (i % 13) as f32 * 1e-3).collect();
            let z: Vec<f32> = (0..g).map(|i| (i % 16) as f32).collect();
            let big = Int4Matrix::new(&q, &s, &z, rows, hidden, 32);
            let t = min_time(10, || big.gemv(&x[..hidden], &mut logits));
            println!(
                "a {rows} × {hidden} int4 product {:.2} ms ({:.1} GB/s); the int8 head {:.1} GB/s",
                t * 1e3,
                big.data.len() as f64 / t / 1e9,
                (rows * hidden) as f64 / head_time / 1e9
            );
        }
        // A batch's decode step: n vectors through the same weights.
        for n in [2, 4, 8] {
            let xs: Vec<f32> = (0..n).flat_map(|_| x.iter().copied()).collect();
            let mut ys = vec![0f32; n * ffn];
            let layers_n = min_time(5, || {
                for layer in &layers {
                    for m in layer {
                        m.products(&xs[..n * m.cols], &mut ys[..n * m.rows]);
                    }
                }
            });
            let mut logits_n = vec![0f32; n * 151_936];
            let head_n = min_time(5, || head.products(&xs[..n * hidden], &mut logits_n));
            println!(
                "{n} vectors: layers {:.2} ms ({:.2}× one vector's time), head {:.2} ms ({:.2}×)",
                layers_n * 1e3,
                layers_n / all_layers,
                head_n * 1e3,
                head_n / head_time
            );
        }
    }
}
