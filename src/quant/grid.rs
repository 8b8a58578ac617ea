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
}

impl Grid {
    pub fn maxq(&self) -> f64 {
        ((1u32 << self.bits) - 1) as f64
    }

    /// Scale and zero point of each row of `w` (rows, cols), both (rows, 1) f32.
    pub fn params(&self, w: &Tensor) -> (Tensor, Tensor) {
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
        let g = Grid { bits: 4, sym: true };
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
        let (scale, _) = Grid {
            bits: 3,
            sym: false,
        }
        .params(&w);
        let round_trip = scale.to_kind(Kind::Half).to_kind(Kind::Float);
        assert_eq!((round_trip - &scale).abs().max().double_value(&[]), 0.0);
    }
}
