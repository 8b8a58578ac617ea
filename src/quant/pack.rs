//! Integer layouts of the quantized checkpoint formats qcoder writes and reads.
//!
//! GPTQ "v1" (AutoGPTQ `qlinear_cuda_old.py` `QuantLinear.pack`, the format
//! GPTQModel calls `checkpoint_format: "gptq"`, read by transformers and vLLM):
//! * `qweight` int32 `[in * bits / 32, out]`: for each output column the
//!   integers of the input rows are one little-endian bit stream, row k at bits
//!   `[k*bits, (k+1)*bits)`; word r of the stream is `qweight[r, col]`. For 2, 4
//!   and 8 bits this is `qweight[r] |= q[j] << (bits * (j - i))`; for 3 bits
//!   AutoGPTQ writes the same stream with an explicit 10 + 1 + 10 + 1 + 10 split
//!   of 32 values over 3 words.
//! * `qzeros` int32 `[groups, out * bits / 32]`: each group's zero points, the
//!   same stream along the output dimension, stored as `zero - 1` (the
//!   format's historical off-by-one; readers add 1 back). `gptq_v2` stores the
//!   zero itself.
//! * `scales` f16 `[groups, out]`, `g_idx` int32 `[in]` (group of each input
//!   row; with act-order it is not monotone), optional `bias` f16 `[out]`.
//! * Dequantisation: `W[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])`.
//!
//! AWQ "GEMM" (AutoAWQ `awq/modules/linear/gemm.py` `WQLinear_GEMM.from_linear`),
//! 4 bits only:
//! * `qweight` int32 `[in, out / 8]`: word c of input row i holds the 8 output
//!   columns `8c .. 8c+7`, nibble k holding column `8c + ORDER[k]` with
//!   `ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`.
//! * `qzeros` int32 `[groups, out / 8]`, same interleave, zeros as-is.
//! * `scales` f16 `[groups, out]`; groups are contiguous (`i / group_size`).

/// AutoAWQ's nibble order within a 32-bit word (`order_map` in gemm.py).
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// Packs values (each `< 2^bits`) as one little-endian bit stream of u32
/// words. `values.len() * bits` must be a multiple of 32.
pub fn pack_stream(values: &[u32], bits: u32) -> Vec<u32> {
    let total_bits = values.len() * bits as usize;
    debug_assert!(total_bits.is_multiple_of(32), "stream of {total_bits} bits");
    let mut words = vec![0u32; total_bits / 32];
    let mask = (1u64 << bits) - 1;
    for (k, &v) in values.iter().enumerate() {
        let bit = k * bits as usize;
        let (word, shift) = (bit / 32, bit % 32);
        let v = v as u64 & mask;
        let spread = v << shift;
        words[word] |= spread as u32;
        if shift + bits as usize > 32 {
            words[word + 1] |= (spread >> 32) as u32;
        }
    }
    words
}

/// Inverse of [`pack_stream`]: the first `count` values of the stream.
pub fn unpack_stream(words: &[u32], bits: u32, count: usize) -> Vec<u32> {
    let mask = (1u64 << bits) - 1;
    (0..count)
        .map(|k| {
            let bit = k * bits as usize;
            let (word, shift) = (bit / 32, bit % 32);
            let lo = words[word] as u64;
            let hi = words.get(word + 1).copied().unwrap_or(0) as u64;
            (((hi << 32 | lo) >> shift) & mask) as u32
        })
        .collect()
}

/// GPTQ `qweight` from integers `q` stored row-major as (out, in).
pub fn gptq_pack_qweight(
    q: &[u32],
    out_features: usize,
    in_features: usize,
    bits: u32,
) -> Vec<i32> {
    let rows = in_features * bits as usize / 32;
    let mut qweight = vec![0i32; rows * out_features];
    for o in 0..out_features {
        let words = pack_stream(&q[o * in_features..(o + 1) * in_features], bits);
        for (r, w) in words.into_iter().enumerate() {
            qweight[r * out_features + o] = w as i32;
        }
    }
    qweight
}

/// Integers (out, in) row-major from a GPTQ `qweight` `[in*bits/32, out]`.
pub fn gptq_unpack_qweight(
    qweight: &[i32],
    out_features: usize,
    in_features: usize,
    bits: u32,
) -> Vec<u32> {
    let rows = in_features * bits as usize / 32;
    let mut q = vec![0u32; out_features * in_features];
    let mut column = vec![0u32; rows];
    for o in 0..out_features {
        for (r, w) in column.iter_mut().enumerate() {
            *w = qweight[r * out_features + o] as u32;
        }
        q[o * in_features..(o + 1) * in_features].copy_from_slice(&unpack_stream(
            &column,
            bits,
            in_features,
        ));
    }
    q
}

/// GPTQ `qzeros` `[groups, out*bits/32]` from zero points (groups, out);
/// `offset` is 1 for the v1 format (stores `zero - 1`), 0 for v2.
pub fn gptq_pack_qzeros(
    zeros: &[u32],
    groups: usize,
    out_features: usize,
    bits: u32,
    offset: u32,
) -> Vec<i32> {
    let mask = (1u32 << bits) - 1;
    (0..groups)
        .flat_map(|g| {
            let row: Vec<u32> = zeros[g * out_features..(g + 1) * out_features]
                .iter()
                .map(|&z| z.wrapping_sub(offset) & mask)
                .collect();
            pack_stream(&row, bits).into_iter().map(|w| w as i32)
        })
        .collect()
}

/// Zero points (groups, out) from GPTQ `qzeros`, undoing `offset`.
pub fn gptq_unpack_qzeros(
    qzeros: &[i32],
    groups: usize,
    out_features: usize,
    bits: u32,
    offset: u32,
) -> Vec<u32> {
    let words_per_row = out_features * bits as usize / 32;
    (0..groups)
        .flat_map(|g| {
            let row: Vec<u32> = qzeros[g * words_per_row..(g + 1) * words_per_row]
                .iter()
                .map(|&w| w as u32)
                .collect();
            unpack_stream(&row, bits, out_features)
                .into_iter()
                .map(move |z| z + offset)
        })
        .collect()
}

/// AWQ GEMM words for a (rows, cols) matrix of 4-bit values, cols % 8 == 0:
/// `[rows, cols/8]` with [`AWQ_ORDER`] inside each word.
pub fn awq_pack(values: &[u32], rows: usize, cols: usize) -> Vec<i32> {
    let words = cols / 8;
    let mut out = vec![0i32; rows * words];
    for r in 0..rows {
        for c in 0..words {
            let mut w = 0u32;
            for (k, &col) in AWQ_ORDER.iter().enumerate() {
                w |= (values[r * cols + c * 8 + col] & 0xF) << (4 * k);
            }
            out[r * words + c] = w as i32;
        }
    }
    out
}

/// Inverse of [`awq_pack`].
pub fn awq_unpack(words: &[i32], rows: usize, cols: usize) -> Vec<u32> {
    let n = cols / 8;
    let mut out = vec![0u32; rows * cols];
    for r in 0..rows {
        for c in 0..n {
            let w = words[r * n + c] as u32;
            for (k, &col) in AWQ_ORDER.iter().enumerate() {
                out[r * cols + c * 8 + col] = (w >> (4 * k)) & 0xF;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, bits: u32, seed: u32) -> Vec<u32> {
        let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x % (1 << bits)
            })
            .collect()
    }

    #[test]
    fn stream_round_trips_for_every_width() {
        for bits in [2, 3, 4, 8] {
            let v = values(96, bits, bits);
            assert_eq!(
                unpack_stream(&pack_stream(&v, bits), bits, v.len()),
                v,
                "{bits} bits"
            );
        }
    }

    /// The 3-bit stream equals AutoGPTQ's explicit word split.
    #[test]
    fn three_bit_stream_matches_autogptq_split() {
        let v = values(32, 3, 7);
        let mut w = [0u32; 3];
        for (j, &x) in v[..10].iter().enumerate() {
            w[0] |= x << (3 * j);
        }
        w[0] |= v[10] << 30;
        w[1] |= (v[10] >> 2) & 1;
        for (j, &x) in v[11..21].iter().enumerate() {
            w[1] |= x << (3 * j + 1);
        }
        w[1] |= v[21] << 31;
        w[2] |= (v[21] >> 1) & 3;
        for (j, &x) in v[22..32].iter().enumerate() {
            w[2] |= x << (3 * j + 2);
        }
        assert_eq!(pack_stream(&v, 3), w.to_vec());
    }

    #[test]
    fn gptq_layouts_round_trip() {
        for bits in [2, 3, 4, 8] {
            let (out_f, in_f, groups) = (64, 96, 3);
            let q = values(out_f * in_f, bits, 11 + bits);
            let packed = gptq_pack_qweight(&q, out_f, in_f, bits);
            assert_eq!(packed.len(), in_f * bits as usize / 32 * out_f);
            assert_eq!(gptq_unpack_qweight(&packed, out_f, in_f, bits), q);
            // v1 zeros live in [1, 2^bits - 1] after the -1 offset is undone... and
            // any zero round-trips through v2.
            let zeros: Vec<u32> = values(groups * out_f, bits, 5)
                .into_iter()
                .map(|z| z.max(1))
                .collect();
            for offset in [0, 1] {
                let qz = gptq_pack_qzeros(&zeros, groups, out_f, bits, offset);
                assert_eq!(gptq_unpack_qzeros(&qz, groups, out_f, bits, offset), zeros);
            }
        }
    }

    #[test]
    fn gptq_4bit_nibble_k_of_word_r_is_row_8r_plus_k() {
        let (out_f, in_f) = (1, 8);
        let q: Vec<u32> = (0..8).collect();
        let packed = gptq_pack_qweight(&q, out_f, in_f, 4);
        assert_eq!(packed, vec![0x7654_3210]);
    }

    #[test]
    fn awq_interleave_round_trips_and_follows_order_map() {
        let v: Vec<u32> = (0..8).collect();
        // nibble k holds column ORDER[k]: columns 0,2,4,6,1,3,5,7
        assert_eq!(awq_pack(&v, 1, 8), vec![0x7531_6420u32 as i32]);
        let m = values(4 * 32, 4, 3);
        assert_eq!(awq_unpack(&awq_pack(&m, 4, 32), 4, 32), m);
    }
}
