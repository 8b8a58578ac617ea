//! GPTQ/AWQ integers into llama.cpp blocks without rounding them again.
//!
//! A 4-bit checkpoint with groups of 32 consecutive input columns has exactly
//! the geometry of llama.cpp's 32-weight blocks: a symmetric grid (zero point
//! 8) is `block_q4_0` (x = d·(q − 8), d = the group's f16 scale, the same
//! integers), an asymmetric one is `block_q4_1` (x = d·q + m with d = s and
//! m = −s·z rounded to f16, the only rounding). Any other geometry — another
//! group size, act-order groups that are not consecutive columns, another bit
//! width — does not fit, and the caller must dequantize and re-encode.

use super::blocks::{blocks_as_bytes, f16_bytes, f16_from, BlockQ4_0, BlockQ4_1};
use super::types::GgmlType;

/// Weights per Q4_0 / Q4_1 block.
pub const BLOCK: usize = 32;

/// A quantized matrix in plain arrays, row-major.
pub struct IntMatrix<'a> {
    pub rows: usize,
    pub cols: usize,
    /// (rows, cols) integers in 0..16.
    pub ints: &'a [u8],
    /// (rows, cols / 32) scales, f16-representable.
    pub scales: &'a [f32],
    /// (rows, cols / 32) zero points in 0..16.
    pub zeros: &'a [u8],
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RepackError {
    #[error("{0} cannot hold GPTQ integers (only Q4_0 and Q4_1 can)")]
    Type(GgmlType),
    #[error("{cols} columns are not a multiple of the {BLOCK}-weight block")]
    Columns { cols: usize },
    #[error("row {row}, group {group}: zero point {zero} is not 8, so Q4_0 (symmetric) cannot hold it; use Q4_1")]
    Asymmetric { row: usize, group: usize, zero: u8 },
    #[error("row {row}, group {group}: scale {scale} is not an f16 value")]
    Scale {
        row: usize,
        group: usize,
        scale: f32,
    },
    #[error("integer {value} at row {row} is outside 0..16")]
    Range { row: usize, value: u8 },
}

impl IntMatrix<'_> {
    fn check(&self) -> Result<usize, RepackError> {
        if !self.cols.is_multiple_of(BLOCK) {
            return Err(RepackError::Columns { cols: self.cols });
        }
        let groups = self.cols / BLOCK;
        assert_eq!(self.ints.len(), self.rows * self.cols, "ints shape");
        assert_eq!(self.scales.len(), self.rows * groups, "scales shape");
        assert_eq!(self.zeros.len(), self.rows * groups, "zeros shape");
        if let Some(i) = self.ints.iter().position(|&q| q > 15) {
            return Err(RepackError::Range {
                row: i / self.cols,
                value: self.ints[i],
            });
        }
        for (i, &s) in self.scales.iter().enumerate() {
            if f16_from(f16_bytes(s)) != s {
                return Err(RepackError::Scale {
                    row: i / groups,
                    group: i % groups,
                    scale: s,
                });
            }
        }
        Ok(groups)
    }

    /// The rows in the order `order` (row `r` of the result is row `order[r]`).
    pub fn reordered(&self, order: &[usize]) -> (Vec<u8>, Vec<f32>, Vec<u8>) {
        let groups = self.cols / BLOCK;
        let mut ints = Vec::with_capacity(self.ints.len());
        let mut scales = Vec::with_capacity(self.scales.len());
        let mut zeros = Vec::with_capacity(self.zeros.len());
        for &r in order {
            ints.extend_from_slice(&self.ints[r * self.cols..(r + 1) * self.cols]);
            scales.extend_from_slice(&self.scales[r * groups..(r + 1) * groups]);
            zeros.extend_from_slice(&self.zeros[r * groups..(r + 1) * groups]);
        }
        (ints, scales, zeros)
    }

    /// The GGUF data of the matrix as `ty` (Q4_0 or Q4_1), row after row.
    pub fn to_blocks(&self, ty: GgmlType) -> Result<Vec<u8>, RepackError> {
        let groups = self.check()?;
        // qs[j] holds weight j in its low nibble and weight j + 16 in its high one.
        let nibbles = |q: &[u8]| {
            let mut qs = [0u8; 16];
            for (j, b) in qs.iter_mut().enumerate() {
                *b = q[j] | (q[j + 16] << 4);
            }
            qs
        };
        let block_ints = |i: usize| {
            let (row, g) = (i / groups, i % groups);
            &self.ints[row * self.cols + g * BLOCK..row * self.cols + (g + 1) * BLOCK]
        };
        match ty {
            GgmlType::Q4_0 => {
                let mut blocks = Vec::with_capacity(self.rows * groups);
                for i in 0..self.rows * groups {
                    if self.zeros[i] != 8 {
                        return Err(RepackError::Asymmetric {
                            row: i / groups,
                            group: i % groups,
                            zero: self.zeros[i],
                        });
                    }
                    blocks.push(BlockQ4_0 {
                        d: f16_bytes(self.scales[i]),
                        qs: nibbles(block_ints(i)),
                    });
                }
                Ok(blocks_as_bytes(&blocks).to_vec())
            }
            GgmlType::Q4_1 => {
                let blocks: Vec<BlockQ4_1> = (0..self.rows * groups)
                    .map(|i| {
                        let s = self.scales[i];
                        BlockQ4_1 {
                            d: f16_bytes(s),
                            m: f16_bytes(-s * f32::from(self.zeros[i])),
                            qs: nibbles(block_ints(i)),
                        }
                    })
                    .collect();
                Ok(blocks_as_bytes(&blocks).to_vec())
            }
            other => Err(RepackError::Type(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::codec;

    fn matrix(zero: impl Fn(usize) -> u8) -> (Vec<u8>, Vec<f32>, Vec<u8>) {
        let (rows, cols) = (3, 64);
        let ints: Vec<u8> = (0..rows * cols)
            .map(|i| ((i * 7 + i / 5) % 16) as u8)
            .collect();
        let scales: Vec<f32> = (0..rows * 2).map(|i| 0.01 + 0.005 * i as f32).collect();
        // f16-representable scales, as a checkpoint stores them.
        let scales = scales.iter().map(|&s| f16_from(f16_bytes(s))).collect();
        let zeros = (0..rows * 2).map(zero).collect();
        (ints, scales, zeros)
    }

    fn reference(m: &IntMatrix<'_>) -> Vec<f32> {
        (0..m.rows * m.cols)
            .map(|i| {
                let g = (i / m.cols) * (m.cols / BLOCK) + (i % m.cols) / BLOCK;
                m.scales[g] * (f32::from(m.ints[i]) - f32::from(m.zeros[g]))
            })
            .collect()
    }

    #[test]
    fn symmetric_integers_become_q4_0_exactly() {
        let (ints, scales, zeros) = matrix(|_| 8);
        let m = IntMatrix {
            rows: 3,
            cols: 64,
            ints: &ints,
            scales: &scales,
            zeros: &zeros,
        };
        let bytes = m.to_blocks(GgmlType::Q4_0).unwrap();
        let decoded = codec::decode(GgmlType::Q4_0, &bytes, 64, 3 * 64).unwrap();
        assert_eq!(decoded, reference(&m));
    }

    #[test]
    fn asymmetric_integers_become_q4_1_up_to_the_f16_offset() {
        let (ints, scales, zeros) = matrix(|i| (i % 16) as u8);
        let m = IntMatrix {
            rows: 3,
            cols: 64,
            ints: &ints,
            scales: &scales,
            zeros: &zeros,
        };
        assert!(matches!(
            m.to_blocks(GgmlType::Q4_0),
            Err(RepackError::Asymmetric { .. })
        ));
        let bytes = m.to_blocks(GgmlType::Q4_1).unwrap();
        let decoded = codec::decode(GgmlType::Q4_1, &bytes, 64, 3 * 64).unwrap();
        for (d, r) in decoded.iter().zip(reference(&m)) {
            // m = −s·z is rounded to f16: at most half an f16 ulp of s·z ≤ 15·s.
            assert!(
                (d - r).abs() <= 15.0 * 0.04 * 2f32.powi(-11) + 1e-7,
                "{d} vs {r}"
            );
        }
        assert_eq!(
            m.to_blocks(GgmlType::Q8_0),
            Err(RepackError::Type(GgmlType::Q8_0))
        );
    }
}
