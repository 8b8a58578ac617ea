//! Block layouts of the quantized types, field for field as in llama.cpp's
//! `ggml/src/ggml-common.h`. Half-precision fields are kept as little-endian
//! byte pairs so every block has alignment 1: a block slice can then be viewed
//! straight out of a memory-mapped file at any offset.

use half::f16;

use super::types::QK_K;

/// A block type: `#[repr(C)]`, built only from `u8` arrays (alignment 1, no
/// padding, every bit pattern valid).
///
/// # Safety
/// Implementors must be `#[repr(C)]` structs whose fields are all `u8` or
/// `[u8; N]`.
pub unsafe trait Block: Copy + Default {
    const SIZE: usize = std::mem::size_of::<Self>();
}

/// Views bytes as blocks. `bytes.len()` must be a multiple of `B::SIZE`.
pub fn as_blocks<B: Block>(bytes: &[u8]) -> &[B] {
    assert_eq!(
        bytes.len() % B::SIZE,
        0,
        "byte length is not a whole number of blocks"
    );
    // SAFETY: `B` has alignment 1 and no invalid bit patterns (trait contract),
    // and the length is a whole number of blocks.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<B>(), bytes.len() / B::SIZE) }
}

/// Views blocks as bytes (for writing them out).
pub fn blocks_as_bytes<B: Block>(blocks: &[B]) -> &[u8] {
    // SAFETY: `B` is plain bytes without padding (trait contract).
    unsafe {
        std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), std::mem::size_of_val(blocks))
    }
}

/// Views a mutable byte buffer as blocks.
pub fn as_blocks_mut<B: Block>(bytes: &mut [u8]) -> &mut [B] {
    assert_eq!(
        bytes.len() % B::SIZE,
        0,
        "byte length is not a whole number of blocks"
    );
    // SAFETY: as in `as_blocks`; the borrow is exclusive.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<B>(), bytes.len() / B::SIZE) }
}

pub fn f16_from(bytes: [u8; 2]) -> f32 {
    f16::from_le_bytes(bytes).to_f32()
}

/// f32 → f16 bytes, rounding to nearest even (`GGML_FP32_TO_FP16`).
pub fn f16_bytes(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

/// `block_q4_0`: `ggml_half d; uint8_t qs[QK4_0 / 2]`. x = d·(q − 8).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct BlockQ4_0 {
    pub d: [u8; 2],
    pub qs: [u8; 16],
}

/// `block_q4_1`: `ggml_half d, m; uint8_t qs[QK4_1 / 2]`. x = d·q + m.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct BlockQ4_1 {
    pub d: [u8; 2],
    pub m: [u8; 2],
    pub qs: [u8; 16],
}

/// `block_q5_0`: `ggml_half d; uint8_t qh[4]; uint8_t qs[QK5_0 / 2]`. x = d·(q − 16).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct BlockQ5_0 {
    pub d: [u8; 2],
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

/// `block_q5_1`: `ggml_half d, m; uint8_t qh[4]; uint8_t qs[QK5_1 / 2]`. x = d·q + m.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct BlockQ5_1 {
    pub d: [u8; 2],
    pub m: [u8; 2],
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

/// `block_q8_0`: `ggml_half d; int8_t qs[QK8_0]`. x = d·q.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ8_0 {
    pub d: [u8; 2],
    pub qs: [u8; 32],
}

/// `block_q4_K`: `ggml_half d, dmin; uint8_t scales[K_SCALE_SIZE]; uint8_t
/// qs[QK_K/2]`. Eight sub-blocks of 32 with 6-bit scales and mins:
/// x = (d·scale)·q − (dmin·min).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ4K {
    pub d: [u8; 2],
    pub dmin: [u8; 2],
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

/// `block_q5_K`: as `block_q4_K` plus `uint8_t qh[QK_K/8]`, the fifth bits.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ5K {
    pub d: [u8; 2],
    pub dmin: [u8; 2],
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

/// `block_q6_K`: `uint8_t ql[QK_K/2]; uint8_t qh[QK_K/4]; int8_t
/// scales[QK_K/16]; ggml_half d`. Sixteen sub-blocks of 16 with 8-bit scales:
/// x = (d·scale)·(q − 32).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [u8; QK_K / 16],
    pub d: [u8; 2],
}

// Default for the big blocks (arrays over 32 elements have no derived Default).
macro_rules! zeroed_default {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                // SAFETY: plain bytes; all-zero is a valid value.
                unsafe { std::mem::zeroed() }
            }
        }
    )*};
}
zeroed_default!(BlockQ8_0, BlockQ4K, BlockQ5K, BlockQ6K);

// SAFETY: all of these are #[repr(C)] structs of u8 arrays.
unsafe impl Block for BlockQ4_0 {}
unsafe impl Block for BlockQ4_1 {}
unsafe impl Block for BlockQ5_0 {}
unsafe impl Block for BlockQ5_1 {}
unsafe impl Block for BlockQ8_0 {}
unsafe impl Block for BlockQ4K {}
unsafe impl Block for BlockQ5K {}
unsafe impl Block for BlockQ6K {}

// The sizes ggml-common.h asserts with `static_assert(sizeof(block_...) == ...)`.
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);
const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);
const _: () = assert!(std::mem::align_of::<BlockQ6K>() == 1);

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K super-block
/// (`get_scale_min_k4` in ggml-quants.c): sub-blocks 0–3 keep theirs in the
/// low 6 bits of bytes 0–3 / 4–7; sub-blocks 4–7 split theirs between the
/// nibbles of bytes 8–11 and the top two bits of bytes 0–7.
pub fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Inverse of [`scale_min_k4`] for all eight sub-blocks.
pub fn pack_scale_min_k4(scales: &[u8; 8], mins: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..8 {
        let (ls, lm) = (scales[j], mins[j]);
        if j < 4 {
            q[j] = ls;
            q[j + 4] = lm;
        } else {
            q[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            q[j - 4] |= (ls >> 4) << 6;
            q[j] |= (lm >> 4) << 6;
        }
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_min_packing_round_trips() {
        let scales = [0, 1, 17, 63, 32, 5, 62, 48];
        let mins = [63, 0, 31, 2, 7, 63, 33, 1];
        let q = pack_scale_min_k4(&scales, &mins);
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &q), (scales[j], mins[j]), "sub-block {j}");
        }
    }
}
