//! k-quant encoders (Q4_K, Q5_K, Q6_K), following the reference quantizers of
//! llama.cpp's `ggml/src/ggml-quants.c` (`quantize_row_q{4,5,6}_K_ref`, which
//! is what `llama-quantize` runs when no importance matrix is given):
//!
//! * Q4_K / Q5_K: for each sub-block of 32, `make_qkx2_quants` searches a
//!   scale and a min that minimise the weighted squared error (weights
//!   `sqrt(mean x²) + |x|`), trying 21 (Q4_K) or 16 (Q5_K) candidate grids and
//!   refitting scale and min by least squares on each; the eight scales and
//!   mins are then quantized to 6 bits against the super-block's largest, and
//!   the values are re-rounded against the quantized scales.
//! * Q6_K: for each sub-block of 16, `make_qx_quants` (rmse_type 1, weights
//!   x²) tries 19 symmetric scales and keeps the least-squares best; scales are
//!   quantized to 8 bits against the largest.
//!
//! The float operations are done in the same order as the C code, so the
//! output matches llama.cpp's up to FMA contraction in the C build.

use super::blocks::*;
use super::types::QK_K;

/// `GROUP_MAX_EPS` of ggml-quants.c: a group whose largest magnitude is below
/// this is stored as zeros.
const GROUP_MAX_EPS: f32 = 1e-15;

/// Round to nearest, ties to even, via the float-add trick of ggml's
/// `nearest_int` (valid for |x| < 2^22, which every caller guarantees).
fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// `make_qkx2_quants`: quantizes `x` to levels 0..=nmax as `scale·L − min`
/// (min ≥ 0 is returned as the offset to subtract), searching `nstep + 1`
/// candidate inverse scales `(rmin + rdelta·is + nmax) / (max − min)`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    levels: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.iter_mut().for_each(|l| *l = 0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        levels[i] = l as u8;
        let diff = scale * levels[i] as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut aux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = l as u8;
            let (w, lf) = (weights[i], l as f32);
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                levels[..n].copy_from_slice(&aux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// `make_qx_quants` with `rmse_type = 1` and no importance weights: symmetric
/// levels −nmax..nmax−1 (stored offset by nmax) and the scale that minimises
/// Σ x²·(x − scale·l)² over 19 candidate grids.
fn make_qx_quants(nmax: i32, x: &[f32], levels: &mut [i8]) -> f32 {
    let mut max = 0f32;
    let mut amax = 0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        levels.iter_mut().for_each(|l| *l = 0);
        return 0.0;
    }
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (i, &v) in x.iter().enumerate() {
        let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        levels[i] = (l + nmax) as i8;
        let w = v * v;
        sumlx += w * v * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
            let w = v * v;
            sumlx += w * v * l as f32;
            suml2 += w * l as f32 * l as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (i, &v) in x.iter().enumerate() {
                let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
                levels[i] = (nmax + l) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Shared first half of Q4_K and Q5_K: per-sub-block scale/min search, 6-bit
/// quantization of scales and mins, and the final levels. Returns (d, dmin,
/// packed scales, levels).
fn quant_k_scales_mins(
    x: &[f32],
    nmax: i32,
    rmin: f32,
    nstep: i32,
) -> ([u8; 2], [u8; 2], [u8; 12], [u8; QK_K]) {
    let mut levels = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut weights = [0f32; 32];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (scale, min) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut levels[32 * j..32 * j + 32],
            rmin,
            0.1,
            nstep,
        );
        scales[j] = scale;
        mins[j] = min;
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        // `uint8_t ls = nearest_int(...)` then MIN(63, ls): the C code narrows
        // to u8 before the clamp.
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    let packed = pack_scale_min_k4(&ls, &lm);
    let d_bytes = f16_bytes(max_scale / 63.0);
    let dmin_bytes = f16_bytes(max_min / 63.0);
    let (d, dmin) = (f16_from(d_bytes), f16_from(dmin_bytes));
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let d1 = d * sc as f32;
        if d1 == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for ii in 0..32 {
            let l = nearest_int((x[32 * j + ii] + dm) / d1).clamp(0, nmax);
            levels[32 * j + ii] = l as u8;
        }
    }
    (d_bytes, dmin_bytes, packed, levels)
}

/// `quantize_row_q4_K_ref` for one super-block of 256 values.
pub fn quant_q4_k(x: &[f32], b: &mut BlockQ4K) {
    let (d, dmin, scales, levels) = quant_k_scales_mins(x, 15, -1.0, 20);
    b.d = d;
    b.dmin = dmin;
    b.scales = scales;
    for (chunk, q) in b.qs.chunks_exact_mut(32).enumerate() {
        let base = 64 * chunk;
        for l in 0..32 {
            q[l] = levels[base + l] | (levels[base + l + 32] << 4);
        }
    }
}

/// `quantize_row_q5_K_ref` for one super-block of 256 values.
pub fn quant_q5_k(x: &[f32], b: &mut BlockQ5K) {
    let (d, dmin, scales, levels) = quant_k_scales_mins(x, 31, -0.5, 15);
    b.d = d;
    b.dmin = dmin;
    b.scales = scales;
    b.qh = [0; QK_K / 8];
    let (mut m1, mut m2) = (1u8, 2u8);
    for (chunk, q) in b.qs.chunks_exact_mut(32).enumerate() {
        let base = 64 * chunk;
        for j in 0..32 {
            let mut l1 = levels[base + j];
            if l1 > 15 {
                l1 -= 16;
                b.qh[j] |= m1;
            }
            let mut l2 = levels[base + j + 32];
            if l2 > 15 {
                l2 -= 16;
                b.qh[j] |= m2;
            }
            q[j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
}

/// `quantize_row_q6_K_ref` for one super-block of 256 values.
pub fn quant_q6_k(x: &[f32], b: &mut BlockQ6K) {
    let mut levels = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let scale = make_qx_quants(
            32,
            &x[16 * ib..16 * ib + 16],
            &mut levels[16 * ib..16 * ib + 16],
        );
        scales[ib] = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        *b = BlockQ6K::default();
        return;
    }
    let iscale = -128.0 / max_scale;
    b.d = f16_bytes(1.0 / iscale);
    for (q, &scale) in b.scales.iter_mut().zip(&scales) {
        *q = nearest_int(iscale * scale).min(127) as i8 as u8;
    }
    let d = f16_from(b.d);
    for j in 0..16 {
        let dj = d * (b.scales[j] as i8) as f32;
        if dj == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let l = nearest_int(x[16 * j + ii] / dj).clamp(-32, 31);
            levels[16 * j + ii] = (l + 32) as i8;
        }
    }
    for half in 0..2 {
        let (ql, qh) = (
            &mut b.ql[64 * half..64 * half + 64],
            &mut b.qh[32 * half..32 * half + 32],
        );
        let lv = &levels[128 * half..128 * half + 128];
        for l in 0..32 {
            let q = |k: usize| lv[l + 32 * k] as u8;
            ql[l] = (q(0) & 0xF) | ((q(2) & 0xF) << 4);
            ql[l + 32] = (q(1) & 0xF) | ((q(3) & 0xF) << 4);
            qh[l] = (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        for (x, want) in [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (3.49, 3),
            (-7.7, -8),
        ] {
            assert_eq!(nearest_int(x), want, "{x}");
        }
    }
}
