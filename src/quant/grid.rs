//! The uniform integer grid shared by RTN, GPTQ and AWQ: per-row scale and
//! zero point over a block of columns, as GPTQ's `Quantizer.find_params`
//! (IST-DASLab/gptq `quant.py`): the range always includes 0; symmetric grids
//! put the zero point in the middle (`(maxq + 1) / 2`).
//!
//! qcoder differences, both so that quantization sees exactly the numbers a
//! reader dequantizes with: the scale is rounded to f16 (the stored
//! precision) before any weight is rounded, and an asymmetric zero point is
//! kept >= 1, because the GPTQ v1 format stores `zero - 1` in `bits` bits and
//! a zero of 0 would wrap around (GPTQModel notes v1 asym "overflow"); when
//! that happens the scale is widened so the range still covers the block.

use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub bits: u32,
    pub sym: bool,
    /// Fit each row's range by least squared rounding error over shrunk
    /// ranges (see [`Grid::params`]) instead of taking its min and max.
    pub search: bool,
}

/// Range shrink factors the search tries: 1, 0.99, …, 0.21 (GPTQ's
/// `Quantizer` with `grid=100, maxshrink=0.8`).
const SEARCH_STEPS: usize = 80;

impl Grid {
    pub fn maxq(&self) -> f64 {
        ((1u32 << self.bits) - 1) as f64
    }

    /// Scale and zero point of each row of `w` (rows, cols), both (rows, 1) f32.
    ///
    /// With `search`, each row's range [min, max] is shrunk by the factors
    /// 1, 0.99, …, 0.21 and the grid with the least Σ(ŵ − w)² kept, as GPTQ's
    /// `Quantizer(mse=True)` and GPTQModel's `mse` option (which default to
    /// an error norm of 2.4; 2 here, the squared error GPTQ's own objective
    /// uses). Clipping the few largest weights buys a finer step for the
    /// rest, which pays most at 2 and 3 bits.
    pub fn params(&self, w: &Tensor) -> (Tensor, Tensor) {
        if self.search {
            return self.searched_params(w);
        }
        self.minmax_params(w)
    }

    fn minmax_params(&self, w: &Tensor) -> (Tensor, Tensor) {
        let w = w.to_kind(Kind::Float);
        let zero_t = Tensor::zeros([1], (Kind::Float, w.device()));
        let mut xmin = w.amin(1, true).minimum(&zero_t);
        let mut xmax = w.amax(1, true).maximum(&zero_t);
        if self.sym {
            xmax = xmax.maximum(&xmin.abs());
            xmin = -&xmax;
        }
        let empty = xmin.eq(0.0).logical_and(&xmax.eq(0.0));
        xmin = xmin.where_self(&empty.logical_not(), &(-Tensor::ones_like(&xmin)));
        xmax = xmax.where_self(&empty.logical_not(), &Tensor::ones_like(&xmax));
        let maxq = self.maxq();
        if self.sym {
            let scale = to_f16_grid(&((&xmax - &xmin) / maxq));
            let zero = Tensor::full_like(&scale, ((maxq + 1.0) / 2.0).floor());
            (scale, zero)
        } else {
            let scale = (&xmax - &xmin) / maxq;
            let zero = (-&xmin / &scale).round();
            // zero == 0 only when the block has no negative weight: use
            // zero 1 and stretch the scale over [−scale, xmax].
            let low = zero.lt(1.0);
            let scale = scale.where_self(&low.logical_not(), &(&xmax / (maxq - 1.0)));
            let scale = to_f16_grid(&scale);
            let zero = (-&xmin / &scale).round().clamp(1.0, maxq);
            (scale, zero)
        }
    }

    /// Integers `clamp(round(w / scale) + zero, 0, maxq)`.
    pub fn quantize(&self, w: &Tensor, scale: &Tensor, zero: &Tensor) -> Tensor {
        ((w / scale).round() + zero).clamp(0.0, self.maxq())
    }

    /// `scale * (q - zero)`.
    pub fn dequantize(q: &Tensor, scale: &Tensor, zero: &Tensor) -> Tensor {
        scale * (q - zero)
    }

    /// Round-trip through the grid.
    pub fn fake_quantize(&self, w: &Tensor, scale: &Tensor, zero: &Tensor) -> Tensor {
        Self::dequantize(&self.quantize(w, scale, zero), scale, zero)
    }
}

impl Grid {
    /// Scale and zero point for the range [lo, hi] (lo ≤ 0 ≤ hi), with
    /// exactly `minmax_params`'s rules, on one row.
    fn fit(&self, lo: f32, hi: f32) -> (f32, f32) {
        let maxq = self.maxq() as f32;
        let (mut lo, mut hi) = (lo, hi);
        if self.sym {
            hi = hi.max(-lo);
            lo = -hi;
        }
        if lo == 0.0 && hi == 0.0 {
            (lo, hi) = (-1.0, 1.0);
        }
        let f16 = |s: f32| half::f16::from_f32(s).to_f32().max(5.960_464_5e-8);
        if self.sym {
            (f16((hi - lo) / maxq), ((maxq + 1.0) / 2.0).floor())
        } else {
            let mut scale = (hi - lo) / maxq;
            if (-lo / scale).round_ties_even() < 1.0 {
                scale = hi / (maxq - 1.0);
            }
            let scale = f16(scale);
            (scale, (-lo / scale).round_ties_even().clamp(1.0, maxq))
        }
    }

    fn searched_params(&self, w: &Tensor) -> (Tensor, Tensor) {
        use rayon::prelude::*;
        let device = w.device();
        let (rows, cols) = w.size2().expect("a grid is fitted on a matrix");
        let cols = cols as usize;
        let flat = w
            .to_kind(Kind::Float)
            .to_device(tch::Device::Cpu)
            .contiguous()
            .view(-1);
        let values = Vec::<f32>::try_from(&flat).expect("an f32 CPU tensor converts");
        let fitted: Vec<(f32, f32)> = values
            .par_chunks(cols.max(1))
            .map(|row| self.search_row(row))
            .collect();
        let column = |f: fn(&(f32, f32)) -> f32| {
            let v: Vec<f32> = fitted.iter().map(f).collect();
            Tensor::from_slice(&v).view([rows, 1]).to_device(device)
        };
        (column(|p| p.0), column(|p| p.1))
    }
}

/// Candidate ranges the search measures side by side, one per vector lane.
const LANES: usize = 8;
const _: () = assert!(SEARCH_STEPS.is_multiple_of(LANES));

impl Grid {
    /// The grid for shrink factor number `i` of the search.
    fn candidate(&self, lo: f32, hi: f32, i: usize) -> (f32, f32) {
        let p = 1.0 - i as f32 / 100.0;
        self.fit(p * lo, p * hi)
    }

    /// One row's searched scale and zero point (see [`Grid::params`]).
    ///
    /// Eight candidate ranges at a time, one per lane: each lane sums its
    /// squared errors over the row in the row's order, so every candidate's
    /// error is the very number a one-candidate-at-a-time loop computes
    /// (test below), but eight independent sums replace one long chain of
    /// dependent additions and the divisions and roundings run eight wide.
    /// Compiled twice, like the decode attention: for AVX2 where the CPU has
    /// it and as is (on baseline x86-64 `round_ties_even` is a libm call per
    /// element).
    fn search_row(&self, row: &[f32]) -> (f32, f32) {
        #[inline(always)]
        fn body(grid: &Grid, row: &[f32]) -> (f32, f32) {
            let maxq = grid.maxq() as f32;
            let lo = row.iter().fold(0f32, |a, &x| a.min(x));
            let hi = row.iter().fold(0f32, |a, &x| a.max(x));
            let mut best = (f32::INFINITY, grid.fit(lo, hi));
            for first in (0..SEARCH_STEPS).step_by(LANES) {
                let grids: [(f32, f32); LANES] =
                    std::array::from_fn(|l| grid.candidate(lo, hi, first + l));
                let scale: [f32; LANES] = std::array::from_fn(|l| grids[l].0);
                let zero: [f32; LANES] = std::array::from_fn(|l| grids[l].1);
                let mut err = [0f32; LANES];
                for &x in row {
                    for l in 0..LANES {
                        let q = ((x / scale[l]).round_ties_even() + zero[l]).clamp(0.0, maxq);
                        let d = scale[l] * (q - zero[l]) - x;
                        err[l] += d * d;
                    }
                }
                for (e, g) in err.into_iter().zip(grids) {
                    if e < best.0 {
                        best = (e, g);
                    }
                }
            }
            best.1
        }
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2")]
            unsafe fn wide(grid: &Grid, row: &[f32]) -> (f32, f32) {
                body(grid, row)
            }
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the feature was just detected.
                return unsafe { wide(self, row) };
            }
        }
        body(self, row)
    }
}

/// Rounds positive scales to the nearest f16 value, never to 0.
fn to_f16_grid(scale: &Tensor) -> Tensor {
    // 2^-24: the smallest positive f16 (subnormal).
    scale
        .to_kind(Kind::Half)
        .to_kind(Kind::Float)
        .clamp_min(5.960_464_5e-8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_4bit_zero_is_8_and_range_covers_the_row() {
        let w = Tensor::from_slice(&[-1.0f32, 0.5, 0.25, 0.75]).view([1, 4]);
        let g = Grid {
            bits: 4,
            sym: true,
            search: false,
        };
        let (scale, zero) = g.params(&w);
        assert_eq!(zero.double_value(&[0, 0]), 8.0);
        let err = (g.fake_quantize(&w, &scale, &zero) - &w)
            .abs()
            .max()
            .double_value(&[]);
        assert!(err <= scale.double_value(&[0, 0]) / 2.0 + 1e-7, "{err}");
    }

    #[test]
    fn asymmetric_zero_never_below_one() {
        // All weights positive: plain GPTQ would pick zero 0.
        let w = Tensor::from_slice(&[0.1f32, 0.2, 0.3, 0.9]).view([1, 4]);
        let g = Grid {
            bits: 4,
            sym: false,
            search: false,
        };
        let (scale, zero) = g.params(&w);
        assert!(zero.double_value(&[0, 0]) >= 1.0);
        let q = g.quantize(&w, &scale, &zero);
        assert!(q.max().double_value(&[]) <= 15.0);
        let err = (Grid::dequantize(&q, &scale, &zero) - &w)
            .abs()
            .max()
            .double_value(&[]);
        assert!(err <= scale.double_value(&[0, 0]) / 2.0 + 1e-6, "{err}");
    }

    #[test]
    fn scales_are_f16_values() {
        let w = Tensor::randn([8, 32], (Kind::Float, tch::Device::Cpu));
        for search in [false, true] {
            let (scale, _) = Grid {
                bits: 3,
                sym: false,
                search,
            }
            .params(&w);
            let round_trip = scale.to_kind(Kind::Half).to_kind(Kind::Float);
            assert_eq!((round_trip - &scale).abs().max().double_value(&[]), 0.0);
        }
    }

    /// The lane-parallel search picks exactly what trying one candidate
    /// range at a time, errors summed in the row's order, picks (GPTQ's
    /// `Quantizer` loop), on rows of several lengths and both grids.
    #[test]
    fn search_equals_one_candidate_at_a_time() {
        let one_at_a_time = |g: &Grid, row: &[f32]| {
            let maxq = g.maxq() as f32;
            let lo = row.iter().fold(0f32, |a, &x| a.min(x));
            let hi = row.iter().fold(0f32, |a, &x| a.max(x));
            let mut best = (f32::INFINITY, g.fit(lo, hi));
            for i in 0..SEARCH_STEPS {
                let (scale, zero) = g.candidate(lo, hi, i);
                let mut err = 0f32;
                for &x in row {
                    let q = ((x / scale).round_ties_even() + zero).clamp(0.0, maxq);
                    let d = scale * (q - zero) - x;
                    err += d * d;
                }
                if err < best.0 {
                    best = (err, (scale, zero));
                }
            }
            best.1
        };
        tch::manual_seed(11);
        for cols in [1, 7, 32, 128, 300] {
            let w = Tensor::randn([40, cols], (Kind::Float, tch::Device::Cpu));
            let w = &w * w.abs(); // heavier tails: clipping matters
            let values = Vec::<f32>::try_from(&w.view(-1)).unwrap();
            for (bits, sym) in [(2, false), (3, true), (3, false), (4, true), (8, false)] {
                let g = Grid {
                    bits,
                    sym,
                    search: true,
                };
                for row in values.chunks(cols as usize) {
                    let (a, b) = (g.search_row(row), one_at_a_time(&g, row));
                    assert_eq!(a.0.to_bits(), b.0.to_bits(), "{bits} bits sym {sym}");
                    assert_eq!(a.1.to_bits(), b.1.to_bits(), "{bits} bits sym {sym}");
                }
            }
        }
    }

    /// The search starts from the min/max grid itself (shrink factor 1), so
    /// it never rounds a row worse, and on Gaussian rows at 3 bits clipping
    /// the tails pays.
    #[test]
    fn searched_grid_never_rounds_worse_than_min_max() {
        tch::manual_seed(5);
        let w = Tensor::randn([64, 128], (Kind::Float, tch::Device::Cpu));
        for sym in [true, false] {
            let plain = Grid {
                bits: 3,
                sym,
                search: false,
            };
            let searched = Grid {
                search: true,
                ..plain
            };
            let err = |g: &Grid| {
                let (s, z) = g.params(&w);
                (g.fake_quantize(&w, &s, &z) - &w)
                    .square()
                    .sum_dim_intlist(1, false, Kind::Float)
            };
            let (e0, e1) = (err(&plain), err(&searched));
            let worse = (&e1 - &e0 * (1.0 + 1e-5)).gt(0.0).any().int64_value(&[]);
            assert_eq!(worse, 0, "sym {sym}: a searched row rounds worse");
            let gain =
                e1.sum(Kind::Double).double_value(&[]) / e0.sum(Kind::Double).double_value(&[]);
            println!("sym {sym}: searched/min-max squared error {gain:.3}");
            assert!(gain < 0.9, "sym {sym}: {gain}");
        }
    }
}
