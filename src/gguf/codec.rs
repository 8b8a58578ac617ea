//! Block codecs: GGUF tensor bytes ⇄ f32, one row at a time, parallel over rows.
//!
//! Decoding follows ggml's `dequantize_row_*` (ggml-quants.c) with the same
//! float operations in the same order, so results equal gguf-py's
//! `gguf.quants.dequantize` bit for bit (checked by `tests/gguf_codecs.rs`).
//! The simple encoders are ggml's reference `quantize_row_*_ref`; the k-quant
//! encoders live in [`super::kquants`].

use rayon::prelude::*;

use super::blocks::*;
use super::kquants;
use super::types::GgmlType;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("decoding {0} tensors is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)")]
    DecodeUnsupported(GgmlType),
    #[error("encoding to {0} is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)")]
    EncodeUnsupported(GgmlType),
    #[error("rows of {row_len} values cannot be stored as {ty} (blocks of {block})")]
    RowLength {
        ty: GgmlType,
        row_len: usize,
        block: usize,
    },
    #[error(
        "{ty}: {got} bytes given for {rows} rows of {row_len} values, which take {want} bytes"
    )]
    Size {
        ty: GgmlType,
        rows: usize,
        row_len: usize,
        got: usize,
        want: usize,
    },
}

/// Bytes of one row of `row_len` values stored as `ty`.
pub fn row_bytes(ty: GgmlType, row_len: usize) -> Result<usize, CodecError> {
    if !row_len.is_multiple_of(ty.block_size()) {
        return Err(CodecError::RowLength {
            ty,
            row_len,
            block: ty.block_size(),
        });
    }
    Ok(row_len / ty.block_size() * ty.type_size())
}

fn check_sizes(
    ty: GgmlType,
    bytes: usize,
    values: usize,
    row_len: usize,
) -> Result<usize, CodecError> {
    let row_b = row_bytes(ty, row_len)?;
    let rows = values.checked_div(row_len).unwrap_or(0);
    if row_len == 0 || !values.is_multiple_of(row_len) || bytes != rows * row_b {
        return Err(CodecError::Size {
            ty,
            rows,
            row_len,
            got: bytes,
            want: rows * row_b,
        });
    }
    Ok(row_b)
}

/// Decodes `bytes` (whole rows of `row_len` values of type `ty`) into `out`.
pub fn decode_rows(
    ty: GgmlType,
    bytes: &[u8],
    row_len: usize,
    out: &mut [f32],
) -> Result<(), CodecError> {
    if !ty.can_decode() {
        return Err(CodecError::DecodeUnsupported(ty));
    }
    let row_b = check_sizes(ty, bytes.len(), out.len(), row_len)?;
    if out.is_empty() {
        return Ok(());
    }
    out.par_chunks_mut(row_len)
        .zip(bytes.par_chunks(row_b))
        .with_min_len(8)
        .for_each(|(y, x)| decode_row(ty, x, y));
    Ok(())
}

/// Decodes a whole tensor into a new vector.
pub fn decode(
    ty: GgmlType,
    bytes: &[u8],
    row_len: usize,
    n_values: usize,
) -> Result<Vec<f32>, CodecError> {
    let mut out = vec![0f32; n_values];
    decode_rows(ty, bytes, row_len, &mut out)?;
    Ok(out)
}

/// Encodes `values` (whole rows of `row_len`) as `ty` into `out`.
pub fn encode_rows(
    ty: GgmlType,
    values: &[f32],
    row_len: usize,
    out: &mut [u8],
) -> Result<(), CodecError> {
    if !ty.can_encode() {
        return Err(CodecError::EncodeUnsupported(ty));
    }
    let row_b = check_sizes(ty, out.len(), values.len(), row_len)?;
    if values.is_empty() {
        return Ok(());
    }
    out.par_chunks_mut(row_b)
        .zip(values.par_chunks(row_len))
        .with_min_len(8)
        .for_each(|(y, x)| encode_row(ty, x, y));
    Ok(())
}

/// Encodes a whole tensor into a new byte vector.
pub fn encode(ty: GgmlType, values: &[f32], row_len: usize) -> Result<Vec<u8>, CodecError> {
    let rows = values.len().checked_div(row_len).unwrap_or(0);
    let mut out = vec![0u8; rows * row_bytes(ty, row_len)?];
    encode_rows(ty, values, row_len, &mut out)?;
    Ok(out)
}

fn decode_row(ty: GgmlType, x: &[u8], y: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (v, b) in y.iter_mut().zip(x.chunks_exact(4)) {
                *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (v, b) in y.iter_mut().zip(x.chunks_exact(2)) {
                *v = f16_from([b[0], b[1]]);
            }
        }
        GgmlType::Bf16 => {
            for (v, b) in y.iter_mut().zip(x.chunks_exact(2)) {
                *v = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        GgmlType::Q4_0 => blocks(x, y, dequant_q4_0),
        GgmlType::Q4_1 => blocks(x, y, dequant_q4_1),
        GgmlType::Q5_0 => blocks(x, y, dequant_q5_0),
        GgmlType::Q5_1 => blocks(x, y, dequant_q5_1),
        GgmlType::Q8_0 => blocks(x, y, dequant_q8_0),
        GgmlType::Q4K => blocks(x, y, dequant_q4_k),
        GgmlType::Q5K => blocks(x, y, dequant_q5_k),
        GgmlType::Q6K => blocks(x, y, dequant_q6_k),
        // `decode_rows` checked `can_decode`.
        _ => unreachable!("decode_row called for {ty}"),
    }
}

fn blocks<B: Block>(x: &[u8], y: &mut [f32], f: fn(&B, &mut [f32])) {
    let bs = as_blocks::<B>(x);
    let per = y.len() / bs.len().max(1);
    for (b, out) in bs.iter().zip(y.chunks_exact_mut(per)) {
        f(b, out);
    }
}

// Element j of a 32-wide block: j < 16 in the low nibble of qs[j], j >= 16 in
// the high nibble of qs[j - 16].
fn nibble(qs: &[u8; 16], j: usize) -> u8 {
    if j < 16 {
        qs[j] & 0xF
    } else {
        qs[j - 16] >> 4
    }
}

fn dequant_q4_0(b: &BlockQ4_0, y: &mut [f32]) {
    let d = f16_from(b.d);
    for (j, v) in y.iter_mut().enumerate() {
        *v = d * (nibble(&b.qs, j) as i32 - 8) as f32;
    }
}

fn dequant_q4_1(b: &BlockQ4_1, y: &mut [f32]) {
    let (d, m) = (f16_from(b.d), f16_from(b.m));
    for (j, v) in y.iter_mut().enumerate() {
        *v = d * nibble(&b.qs, j) as f32 + m;
    }
}

fn q5_value(qs: &[u8; 16], qh: u32, j: usize) -> u8 {
    nibble(qs, j) | ((((qh >> j) & 1) as u8) << 4)
}

fn dequant_q5_0(b: &BlockQ5_0, y: &mut [f32]) {
    let d = f16_from(b.d);
    let qh = u32::from_le_bytes(b.qh);
    for (j, v) in y.iter_mut().enumerate() {
        *v = d * (q5_value(&b.qs, qh, j) as i32 - 16) as f32;
    }
}

fn dequant_q5_1(b: &BlockQ5_1, y: &mut [f32]) {
    let (d, m) = (f16_from(b.d), f16_from(b.m));
    let qh = u32::from_le_bytes(b.qh);
    for (j, v) in y.iter_mut().enumerate() {
        *v = d * q5_value(&b.qs, qh, j) as f32 + m;
    }
}

fn dequant_q8_0(b: &BlockQ8_0, y: &mut [f32]) {
    let d = f16_from(b.d);
    for (v, &q) in y.iter_mut().zip(&b.qs) {
        *v = q as i8 as f32 * d;
    }
}

// Q4_K / Q5_K: sub-block s (of 32) takes the low nibbles of qs[32·(s/2)..] when
// s is even and the high nibbles when odd; Q5_K's fifth bit of element l of
// sub-block s is bit s of qh[l].
fn dequant_q4_k(b: &BlockQ4K, y: &mut [f32]) {
    let (d, dmin) = (f16_from(b.d), f16_from(b.dmin));
    for (s, out) in y.chunks_exact_mut(32).enumerate() {
        let (sc, m) = scale_min_k4(s, &b.scales);
        let (d1, m1) = (d * sc as f32, dmin * m as f32);
        let qs = &b.qs[32 * (s / 2)..32 * (s / 2) + 32];
        let shift = 4 * (s % 2);
        for (v, &q) in out.iter_mut().zip(qs) {
            *v = d1 * ((q >> shift) & 0xF) as f32 - m1;
        }
    }
}

fn dequant_q5_k(b: &BlockQ5K, y: &mut [f32]) {
    let (d, dmin) = (f16_from(b.d), f16_from(b.dmin));
    for (s, out) in y.chunks_exact_mut(32).enumerate() {
        let (sc, m) = scale_min_k4(s, &b.scales);
        let (d1, m1) = (d * sc as f32, dmin * m as f32);
        let qs = &b.qs[32 * (s / 2)..32 * (s / 2) + 32];
        let shift = 4 * (s % 2);
        for (l, v) in out.iter_mut().enumerate() {
            let q = ((qs[l] >> shift) & 0xF) | (((b.qh[l] >> s) & 1) << 4);
            *v = d1 * q as f32 - m1;
        }
    }
}

// Q6_K: element p = 128·h + 32·k + l (h half, k quarter, l lane) keeps its low
// four bits in ql[64·h + 32·(k%2) + l] (nibble k/2) and its top two bits in
// qh[32·h + l] (bits 2k, 2k+1); its scale is scales[p / 16].
fn dequant_q6_k(b: &BlockQ6K, y: &mut [f32]) {
    let d = f16_from(b.d);
    for (p, v) in y.iter_mut().enumerate() {
        let (h, k, l) = (p / 128, (p % 128) / 32, p % 32);
        let lo = (b.ql[64 * h + 32 * (k % 2) + l] >> (4 * (k / 2))) & 0xF;
        let hi = (b.qh[32 * h + l] >> (2 * k)) & 3;
        let q = (lo | (hi << 4)) as i32 - 32;
        let sc = d * (b.scales[p / 16] as i8) as f32;
        *v = sc * q as f32;
    }
}

fn encode_row(ty: GgmlType, x: &[f32], y: &mut [u8]) {
    match ty {
        GgmlType::F32 => {
            for (b, v) in y.chunks_exact_mut(4).zip(x) {
                b.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (b, &v) in y.chunks_exact_mut(2).zip(x) {
                b.copy_from_slice(&f16_bytes(v));
            }
        }
        GgmlType::Bf16 => {
            for (b, &v) in y.chunks_exact_mut(2).zip(x) {
                b.copy_from_slice(&bf16_bits(v).to_le_bytes());
            }
        }
        GgmlType::Q4_0 => encode_blocks(x, y, quant_q4_0),
        GgmlType::Q4_1 => encode_blocks(x, y, quant_q4_1),
        GgmlType::Q5_0 => encode_blocks(x, y, quant_q5_0),
        GgmlType::Q5_1 => encode_blocks(x, y, quant_q5_1),
        GgmlType::Q8_0 => encode_blocks(x, y, quant_q8_0),
        GgmlType::Q4K => encode_blocks(x, y, kquants::quant_q4_k),
        GgmlType::Q5K => encode_blocks(x, y, kquants::quant_q5_k),
        GgmlType::Q6K => encode_blocks(x, y, kquants::quant_q6_k),
        // `encode_rows` checked `can_encode`.
        _ => unreachable!("encode_row called for {ty}"),
    }
}

fn encode_blocks<B: Block>(x: &[f32], y: &mut [u8], f: fn(&[f32], &mut B)) {
    let bs = as_blocks_mut::<B>(y);
    let per = x.len() / bs.len().max(1);
    for (b, xs) in bs.iter_mut().zip(x.chunks_exact(per)) {
        f(xs, b);
    }
}

/// f32 → bf16 as `ggml_compute_fp32_to_bf16` (ggml-impl.h): NaNs are made
/// quiet, everything else rounds to nearest even.
pub fn bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u as u64 + (0x7fff + ((u >> 16) & 1)) as u64) >> 16) as u16
}

// The reference encoders of ggml-quants.c (`quantize_row_q4_0_ref` & co.),
// which llama-quantize uses when no importance matrix is given.

/// The value with the largest magnitude (the first one on ties), as a signed number.
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

fn inv(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// `(int8_t)(v)` then `MIN(hi, ·)`: truncation toward zero, clamped.
fn trunc_clamp(v: f32, hi: i32) -> u8 {
    (v as i32).clamp(0, hi) as u8
}

fn quant_q4_0(x: &[f32], b: &mut BlockQ4_0) {
    let d = signed_absmax(x) / -8.0;
    let id = inv(d);
    b.d = f16_bytes(d);
    for j in 0..16 {
        let lo = trunc_clamp(x[j] * id + 8.5, 15);
        let hi = trunc_clamp(x[j + 16] * id + 8.5, 15);
        b.qs[j] = lo | (hi << 4);
    }
}

fn quant_q4_1(x: &[f32], b: &mut BlockQ4_1) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inv(d);
    b.d = f16_bytes(d);
    b.m = f16_bytes(min);
    for j in 0..16 {
        let lo = trunc_clamp((x[j] - min) * id + 0.5, 15);
        let hi = trunc_clamp((x[j + 16] - min) * id + 0.5, 15);
        b.qs[j] = lo | (hi << 4);
    }
}

fn quant_q5_0(x: &[f32], b: &mut BlockQ5_0) {
    let d = signed_absmax(x) / -16.0;
    let id = inv(d);
    b.d = f16_bytes(d);
    let mut qh = 0u32;
    for j in 0..16 {
        let q0 = trunc_clamp(x[j] * id + 16.5, 31);
        let q1 = trunc_clamp(x[j + 16] * id + 16.5, 31);
        b.qs[j] = (q0 & 0xF) | ((q1 & 0xF) << 4);
        qh |= ((q0 as u32 & 0x10) >> 4) << j;
        qh |= ((q1 as u32 & 0x10) >> 4) << (j + 16);
    }
    b.qh = qh.to_le_bytes();
}

fn quant_q5_1(x: &[f32], b: &mut BlockQ5_1) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inv(d);
    b.d = f16_bytes(d);
    b.m = f16_bytes(min);
    let mut qh = 0u32;
    for j in 0..16 {
        let q0 = trunc_clamp((x[j] - min) * id + 0.5, 31);
        let q1 = trunc_clamp((x[j + 16] - min) * id + 0.5, 31);
        b.qs[j] = (q0 & 0xF) | ((q1 & 0xF) << 4);
        qh |= ((q0 as u32 & 0x10) >> 4) << j;
        qh |= ((q1 as u32 & 0x10) >> 4) << (j + 16);
    }
    b.qh = qh.to_le_bytes();
}

fn quant_q8_0(x: &[f32], b: &mut BlockQ8_0) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = inv(d);
    b.d = f16_bytes(d);
    for (q, &v) in b.qs.iter_mut().zip(x) {
        // roundf: halves away from zero, like f32::round.
        *q = (v * id).round() as i8 as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize, seed: u32) -> Vec<f32> {
        // A deterministic spread of magnitudes, signs and a few outliers.
        (0..n)
            .map(|i| {
                let t =
                    (i as u32).wrapping_mul(2654435761).wrapping_add(seed) as f32 / u32::MAX as f32;
                let v = (t - 0.5) * 0.2;
                if i % 97 == 3 {
                    v * 10.0
                } else {
                    v
                }
            })
            .collect()
    }

    fn rmse(a: &[f32], b: &[f32]) -> f64 {
        let s: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        (s / a.len() as f64).sqrt()
    }

    #[test]
    fn every_encoder_round_trips_through_its_decoder() {
        let row_len = 512;
        let x = ramp(row_len * 4, 7);
        let rms = rmse(&x, &vec![0.0; x.len()]);
        // Ceilings ~30% above what these encoders measured on this data
        // (a regression guard; tests/gguf_export.rs compares them with
        // gguf-py's encoders on real weights).
        for (ty, bound) in [
            (GgmlType::F32, 0.0),
            (GgmlType::F16, 1e-3),
            (GgmlType::Bf16, 5e-3),
            (GgmlType::Q8_0, 0.013),
            (GgmlType::Q6K, 0.035),
            (GgmlType::Q5_0, 0.1),
            (GgmlType::Q5_1, 0.06),
            (GgmlType::Q5K, 0.06),
            (GgmlType::Q4_0, 0.2),
            (GgmlType::Q4_1, 0.13),
            (GgmlType::Q4K, 0.12),
        ] {
            let bytes = encode(ty, &x, row_len).unwrap();
            assert_eq!(bytes.len(), 4 * row_bytes(ty, row_len).unwrap());
            let y = decode(ty, &bytes, row_len, x.len()).unwrap();
            let rel = rmse(&x, &y) / rms;
            println!("{ty}: relative RMSE {rel:.4}");
            assert!(rel <= bound, "{ty}: relative RMSE {rel} > {bound}");
        }
    }

    #[test]
    fn zeros_stay_zero() {
        let x = vec![0f32; 256];
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q8_0,
            GgmlType::Q4K,
            GgmlType::Q5K,
            GgmlType::Q6K,
        ] {
            let y = decode(ty, &encode(ty, &x, 256).unwrap(), 256, 256).unwrap();
            assert!(y.iter().all(|v| *v == 0.0), "{ty}");
        }
    }

    #[test]
    fn size_errors_are_reported() {
        assert!(matches!(
            decode(GgmlType::Q4K, &[0u8; 10], 256, 256),
            Err(CodecError::Size { .. })
        ));
        assert!(matches!(
            encode(GgmlType::Q4_0, &[0f32; 48], 48),
            Err(CodecError::RowLength { .. })
        ));
        assert!(matches!(
            decode(GgmlType::Q2K, &[0u8; 84], 256, 256),
            Err(CodecError::DecodeUnsupported(GgmlType::Q2K))
        ));
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is exactly half way between two bf16 values: ties to even.
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16_bits(f32::NAN) & 0x7fc0, 0x7fc0);
    }
}
