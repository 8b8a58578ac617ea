//! Exact and near-duplicate detection.
//!
//! Exact: a 128-bit hash of the normalised text (line endings unified,
//! trailing whitespace dropped).
//!
//! Near: MinHash over shingles of `shingle_size` consecutive tokens (Broder
//! 1997), bucketed by LSH bands. Tokens are runs of `[A-Za-z0-9_]`, the
//! splitting used by BigCode's near-dedup of The Stack. Each shingle is hashed
//! once (a rolling hash over token hashes, mixed to 32 bits); the `num_perm`
//! permutations are `x -> a_i * x + b_i mod 2^32` with odd `a_i`, each a
//! bijection of the 32-bit space: the universal-hash "permutations" of
//! datasketch (which works mod the prime 2^61 - 1 instead). They are
//! evaluated 16 lanes at a time, one AVX-512 instruction per step.
//!
//! The index holds one 64-bit key per band per kept document, never text.
//! Documents are offered in a fixed order and the first one of a group is
//! kept, so the same input always keeps the same representative.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

use serde::Serialize;

/// Normalised-content hash for exact deduplication: each line without
/// trailing whitespace, `\n`-terminated (so CRLF and LF, and a missing final
/// newline, hash alike).
pub fn exact_key(text: &str) -> u128 {
    let mut hasher = twox_hash::XxHash3_128::new();
    if is_normal(text) {
        // Most files: already normal, hash them in one go.
        hasher.write(text.as_bytes());
        if !text.is_empty() && !text.ends_with('\n') {
            hasher.write(b"\n");
        }
        return hasher.finish_128();
    }
    for line in text.lines() {
        hasher.write(line.trim_end().as_bytes());
        hasher.write(b"\n");
    }
    hasher.finish_128()
}

/// Whether normalising would not change the text: no line ends in
/// whitespace (a non-ASCII last byte is treated as possible whitespace).
fn is_normal(text: &str) -> bool {
    let b = text.as_bytes();
    let clean_before =
        |end: usize| end == 0 || (b[end - 1] < 0x80 && !b[end - 1].is_ascii_whitespace());
    memchr::memchr_iter(b'\n', b).all(clean_before)
        && (b.last() == Some(&b'\n') || clean_before(b.len()))
}

/// Keys already seen, by [`exact_key`].
#[derive(Default)]
pub struct ExactIndex {
    seen: HashSet<u128, BuildHasherDefault<KeyHasher>>,
}

impl ExactIndex {
    /// True if `key` was seen before; records it otherwise.
    pub fn is_duplicate(&mut self, key: u128) -> bool {
        !self.seen.insert(key)
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// Hasher for keys that are already uniformly distributed hashes.
#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(word);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = (v as u64) ^ ((v >> 64) as u64);
    }
}

/// Lanes per vector step: 16 × u32 is one AVX-512 register.
const LANES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum MinHashError {
    #[error("--num-perm must be a positive multiple of {LANES}, got {0}")]
    NumPerm(usize),
    #[error("--shingle-size must be between 1 and {}", MAX_RING - 1)]
    ShingleSize,
    #[error("--near-threshold must be in (0, 1), got {0}")]
    Threshold(f64),
}

#[derive(Debug, Clone)]
pub struct MinHasher {
    shingle_size: usize,
    /// Odd multipliers and offsets of the permutations.
    mul: Vec<u32>,
    add: Vec<u32>,
}

/// A document's MinHash signature: the minimum of each permutation.
pub type Signature = Vec<u32>;

impl MinHasher {
    pub fn new(num_perm: usize, shingle_size: usize) -> Result<Self, MinHashError> {
        if num_perm == 0 || !num_perm.is_multiple_of(LANES) {
            return Err(MinHashError::NumPerm(num_perm));
        }
        if shingle_size == 0 || shingle_size >= MAX_RING {
            return Err(MinHashError::ShingleSize);
        }
        // Fixed parameters (splitmix64 of the index): signatures are
        // comparable across runs and machines.
        let param = |i: u64| splitmix64(i.wrapping_add(0x5eed));
        let mul = (0..num_perm as u64)
            .map(|i| param(2 * i) as u32 | 1)
            .collect();
        let add = (0..num_perm as u64)
            .map(|i| param(2 * i + 1) as u32)
            .collect();
        Ok(MinHasher {
            shingle_size,
            mul,
            add,
        })
    }

    pub fn num_perm(&self) -> usize {
        self.mul.len()
    }

    /// The 32-bit hashes of the text's shingles, in text order (repeats
    /// included; they do not change a minimum). A text with fewer tokens than
    /// a shingle gives one shingle of all its tokens, none if it has none.
    ///
    /// A shingle's hash is a polynomial rolling hash of its token hashes,
    /// `sum t_j * B^(k-1-j) mod 2^64`, updated in O(1) per token, then mixed.
    pub fn shingle_hashes(&self, text: &str, out: &mut Vec<u32>) {
        out.clear();
        let k = self.shingle_size;
        // B^k, to take the oldest token out of the rolling sum.
        let b_pow_k = (0..k).fold(1u64, |acc, _| acc.wrapping_mul(ROLL_BASE));
        let mut ring = [0u64; MAX_RING];
        let mut rolling = 0u64;
        let mut n_tokens = 0usize;
        let bytes = text.as_bytes();
        for_each_token(bytes, |start, end| {
            let t = hash_token(bytes, start, end);
            // The token leaving the window, k tokens back.
            let old = if n_tokens >= k {
                ring[(n_tokens - k) & (MAX_RING - 1)]
            } else {
                0
            };
            ring[n_tokens & (MAX_RING - 1)] = t;
            rolling = rolling
                .wrapping_mul(ROLL_BASE)
                .wrapping_add(t)
                .wrapping_sub(old.wrapping_mul(b_pow_k));
            n_tokens += 1;
            if n_tokens >= k {
                out.push(finish_shingle(rolling));
            }
        });
        if n_tokens > 0 && n_tokens < k {
            out.push(finish_shingle(rolling));
        }
    }

    /// The signature of a set of shingle hashes; `None` for an empty set,
    /// which has no meaningful signature (and must not match other empties).
    pub fn signature(&self, shingles: &[u32]) -> Option<Signature> {
        if shingles.is_empty() {
            return None;
        }
        let mut mins = vec![u32::MAX; self.mul.len()];
        update_mins(&mut mins, &self.mul, &self.add, shingles);
        Some(mins)
    }
}

/// Tokens are runs of `[A-Za-z0-9_]`.
#[inline(always)]
fn is_token_byte(b: u8) -> bool {
    // `|`, not `||`: no branches, so the block loop below vectorises.
    (b.wrapping_sub(b'0') < 10) | ((b | 0x20).wrapping_sub(b'a') < 26) | (b == b'_')
}

/// Calls `f(start, end)` for each token. Works on 64-byte blocks: a bitmask
/// of token bytes (vector compares), then the token boundaries by counting
/// trailing zeros, so the branch per byte (mispredicted at every boundary)
/// becomes a branch per boundary.
#[inline(always)]
fn for_each_token(bytes: &[u8], mut f: impl FnMut(usize, usize)) {
    let mut in_token = false;
    let mut start = 0usize;
    let mut block_start = 0usize;
    for block in bytes.chunks(64) {
        // Byte-wide flags (a vectorised loop; zero padding is no token),
        // then gathered to bits eight at a time by a multiplication.
        let mut bytes = [0u8; 64];
        bytes[..block.len()].copy_from_slice(block);
        let mut flags = [0u8; 64];
        for (flag, &b) in flags.iter_mut().zip(&bytes) {
            *flag = is_token_byte(b) as u8;
        }
        let mut mask = 0u64;
        for (k, group) in flags.chunks_exact(8).enumerate() {
            let mut word = [0u8; 8];
            word.copy_from_slice(group);
            mask |= (u64::from_le_bytes(word).wrapping_mul(0x0102_0408_1020_4080) >> 56) << (8 * k);
        }
        // Bit i set where byte i differs from the byte before it.
        let mut edges = mask ^ ((mask << 1) | in_token as u64);
        if block.len() < 64 {
            edges &= (1u64 << block.len()) - 1;
        }
        while edges != 0 {
            let pos = block_start + edges.trailing_zeros() as usize;
            edges &= edges - 1;
            if in_token {
                f(start, pos);
            } else {
                start = pos;
            }
            in_token = !in_token;
        }
        block_start += block.len();
    }
    if in_token {
        f(start, bytes.len());
    }
}

/// Odd multiplier of the rolling shingle hash.
const ROLL_BASE: u64 = 0x9e37_79b9_7f4a_7c15;
/// Ring of recent token hashes; a power of two above any shingle size.
const MAX_RING: usize = 64;

/// A 64-bit hash of the token `bytes[start..end]`, a word at a time. Tokens
/// of up to 8 bytes (most of them) take one unaligned load, masked.
#[inline(always)]
fn hash_token(bytes: &[u8], start: usize, end: usize) -> u64 {
    const K: u64 = 0xc4ce_b9fe_1a85_ec53;
    let len = end - start;
    let mut h = (len as u64).wrapping_mul(0xff51_afd7_ed55_8ccd);
    if len <= 8 && start + 8 <= bytes.len() {
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[start..start + 8]);
        let mask = if len == 8 {
            u64::MAX
        } else {
            (1u64 << (8 * len)) - 1
        };
        h = (h ^ (u64::from_le_bytes(word) & mask)).wrapping_mul(K);
    } else {
        let mut words = bytes[start..end].chunks_exact(8);
        for w in &mut words {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            h = (h ^ u64::from_le_bytes(word))
                .wrapping_mul(K)
                .rotate_left(29);
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            h = (h ^ u64::from_le_bytes(word))
                .wrapping_mul(K)
                .rotate_left(29);
        }
    }
    h ^ (h >> 32)
}

#[inline(always)]
fn finish_shingle(rolling: u64) -> u32 {
    let h = splitmix64(rolling);
    (h ^ (h >> 32)) as u32
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `mins[i] = min(mins[i], min over x of mul[i] * x + add[i])` (wrapping).
/// One block of 16 permutations stays in registers while all shingles
/// stream past it.
#[inline(always)]
fn update_mins_portable(mins: &mut [u32], mul: &[u32], add: &[u32], shingles: &[u32]) {
    let blocks = mins
        .chunks_exact_mut(LANES)
        .zip(mul.chunks_exact(LANES).zip(add.chunks_exact(LANES)));
    for (m_block, (a_block, b_block)) in blocks {
        let mut m = [u32::MAX; LANES];
        let mut a = [0u32; LANES];
        let mut b = [0u32; LANES];
        a.copy_from_slice(a_block);
        b.copy_from_slice(b_block);
        for &x in shingles {
            for l in 0..LANES {
                m[l] = m[l].min(a[l].wrapping_mul(x).wrapping_add(b[l]));
            }
        }
        for l in 0..LANES {
            m_block[l] = m_block[l].min(m[l]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
fn update_mins_avx512(mins: &mut [u32], mul: &[u32], add: &[u32], shingles: &[u32]) {
    update_mins_portable(mins, mul, add, shingles)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn update_mins_avx2(mins: &mut [u32], mul: &[u32], add: &[u32], shingles: &[u32]) {
    update_mins_portable(mins, mul, add, shingles)
}

fn update_mins(mins: &mut [u32], mul: &[u32], add: &[u32], shingles: &[u32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { update_mins_avx512(mins, mul, add, shingles) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { update_mins_avx2(mins, mul, add, shingles) };
        }
    }
    update_mins_portable(mins, mul, add, shingles)
}

/// LSH banding: `bands` bands of `rows` signature values each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LshParams {
    pub bands: usize,
    pub rows: usize,
}

impl LshParams {
    /// The (bands, rows) with `bands * rows <= num_perm` minimising the
    /// equally weighted areas of false positives (below the threshold) and
    /// false negatives (above it) under the S-curve `1 - (1 - s^r)^b`: the
    /// search of datasketch's `MinHashLSH._optimal_param`, with the integrals
    /// by composite Simpson's rule instead of scipy's quad.
    pub fn optimal(threshold: f64, num_perm: usize) -> Result<Self, MinHashError> {
        if !(threshold > 0.0 && threshold < 1.0) {
            return Err(MinHashError::Threshold(threshold));
        }
        if num_perm == 0 {
            return Err(MinHashError::NumPerm(num_perm));
        }
        // Simpson's rule on a fixed grid over each interval; for each row
        // count r, (1 - s^r)^b is built up by multiplication over b.
        const N: usize = 200; // even
        let simpson_weights = |a: f64, b: f64| -> Vec<(f64, f64)> {
            let h = (b - a) / N as f64;
            (0..=N)
                .map(|i| {
                    let w = if i == 0 || i == N {
                        1.0
                    } else if i % 2 == 1 {
                        4.0
                    } else {
                        2.0
                    };
                    (a + i as f64 * h, w * h / 3.0)
                })
                .collect()
        };
        let below = simpson_weights(0.0, threshold);
        let above = simpson_weights(threshold, 1.0);
        // error[r][b] = weighted areas of false positives and negatives.
        let mut error = vec![Vec::new(); num_perm + 1];
        for (rows, errors) in error.iter_mut().enumerate().skip(1) {
            let max_bands = num_perm / rows;
            errors.resize(max_bands + 1, 0.0);
            // miss = (1 - s^r)^b, the probability no band collides.
            let mut miss_below: Vec<f64> = vec![1.0; below.len()];
            let mut miss_above: Vec<f64> = vec![1.0; above.len()];
            let base = |grid: &[(f64, f64)]| -> Vec<f64> {
                grid.iter()
                    .map(|(s, _)| 1.0 - s.powi(rows as i32))
                    .collect()
            };
            let (base_below, base_above) = (base(&below), base(&above));
            for error_rb in errors.iter_mut().skip(1) {
                let mut false_pos = 0.0;
                for ((m, q), (_, w)) in miss_below.iter_mut().zip(&base_below).zip(&below) {
                    *m *= q;
                    false_pos += w * (1.0 - *m);
                }
                let mut false_neg = 0.0;
                for ((m, q), (_, w)) in miss_above.iter_mut().zip(&base_above).zip(&above) {
                    *m *= q;
                    false_neg += w * *m;
                }
                *error_rb = 0.5 * false_pos + 0.5 * false_neg;
            }
        }
        // datasketch's scan order (bands outer, rows inner; first minimum wins).
        let mut best = (f64::INFINITY, LshParams { bands: 1, rows: 1 });
        for bands in 1..=num_perm {
            for (rows, errors) in error.iter().enumerate().take(num_perm / bands + 1).skip(1) {
                if errors[bands] < best.0 {
                    best = (errors[bands], LshParams { bands, rows });
                }
            }
        }
        Ok(best.1)
    }

    /// One key per band; equal keys mean the band's rows are all equal.
    pub fn band_keys(&self, sig: &[u32]) -> Vec<u64> {
        sig.chunks_exact(self.rows)
            .take(self.bands)
            .enumerate()
            .map(|(band, rows)| {
                let mut h = splitmix64(band as u64);
                for &v in rows {
                    h = (h ^ v as u64)
                        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                        .rotate_left(31);
                }
                splitmix64(h)
            })
            .collect()
    }

    /// Probability that two documents with Jaccard similarity `s` share a band.
    pub fn collision_probability(&self, s: f64) -> f64 {
        1.0 - (1.0 - s.powi(self.rows as i32)).powi(self.bands as i32)
    }
}

/// Band keys of kept documents.
pub struct LshIndex {
    tables: Vec<HashSet<u64, BuildHasherDefault<KeyHasher>>>,
}

impl LshIndex {
    pub fn new(params: LshParams) -> Self {
        LshIndex {
            tables: (0..params.bands).map(|_| HashSet::default()).collect(),
        }
    }

    /// True if a kept document shares a band with this one. Otherwise the
    /// document is kept and its bands are recorded; a near-duplicate's bands
    /// are not (as in datasketch's query-then-insert).
    pub fn is_near_duplicate(&mut self, band_keys: &[u64]) -> bool {
        if band_keys
            .iter()
            .zip(&self.tables)
            .any(|(k, t)| t.contains(k))
        {
            return true;
        }
        for (k, t) in band_keys.iter().zip(&mut self.tables) {
            t.insert(*k);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_key_ignores_line_endings_and_trailing_space() {
        assert_eq!(exact_key("a = 1  \r\nb = 2\n"), exact_key("a = 1\nb = 2"));
        assert_eq!(exact_key("a = 1\nb = 2\n"), exact_key("a = 1\nb = 2"));
        assert_eq!(exact_key("a\u{3000}\nb"), exact_key("a\nb\n"));
        assert_eq!(exact_key("\n\nx\n"), exact_key("\n\nx"));
        assert_ne!(exact_key("a = 1\n"), exact_key("a = 2\n"));
        let mut idx = ExactIndex::default();
        assert!(!idx.is_duplicate(exact_key("x")));
        assert!(idx.is_duplicate(exact_key("x\n")));
    }

    #[test]
    fn tokens_across_block_boundaries() {
        let text = format!("{}abc_9 {}x", "-".repeat(61), "é".repeat(40));
        let mut tokens = Vec::new();
        for_each_token(text.as_bytes(), |s, e| tokens.push(&text[s..e]));
        assert_eq!(tokens, ["abc_9", "x"]);
        let long = "a".repeat(200) + " b";
        tokens.clear();
        for_each_token(long.as_bytes(), |s, e| tokens.push(&long[s..e]));
        assert_eq!(tokens, [&"a".repeat(200)[..], "b"]);
        tokens.clear();
        for_each_token(b"", |_, _| panic!("no tokens in an empty text"));
    }

    #[test]
    fn shingles_follow_tokens() {
        let mh = MinHasher::new(16, 3).unwrap();
        let mut a = Vec::new();
        let mut b = Vec::new();
        mh.shingle_hashes("foo(bar, baz) + qux", &mut a);
        mh.shingle_hashes("foo  bar\nbaz::qux", &mut b);
        assert_eq!(a.len(), 2);
        assert_eq!(a, b, "punctuation and spacing do not matter");
        mh.shingle_hashes("qux baz bar foo", &mut b);
        assert!(a.iter().all(|x| !b.contains(x)), "order matters");
        mh.shingle_hashes("one two", &mut a);
        assert_eq!(a.len(), 1);
        mh.shingle_hashes(" ;; ", &mut a);
        assert!(a.is_empty());
        assert!(mh.signature(&a).is_none());
    }

    /// The estimate from 256 permutations is unbiased and within its
    /// standard error (about 0.03 at J = 0.5) of the true Jaccard.
    #[test]
    fn signatures_estimate_jaccard() {
        let mh = MinHasher::new(256, 5).unwrap();
        let mut total_err = 0.0;
        let mut total_abs_err = 0.0;
        let trials = 40;
        for t in 0..trials {
            let n = 2000u32;
            let shared = 400 + t * 40;
            let a: Vec<u32> = (0..n)
                .map(|i| splitmix64((t as u64) << 32 | i as u64) as u32)
                .collect();
            let mut b = a[..shared as usize].to_vec();
            b.extend(
                (0..n - shared)
                    .map(|i| splitmix64(((t as u64) << 32) | (1 << 31) | i as u64) as u32),
            );
            let truth = shared as f64 / (2 * n - shared) as f64;
            let (sa, sb) = (mh.signature(&a).unwrap(), mh.signature(&b).unwrap());
            let est = sa.iter().zip(&sb).filter(|(x, y)| x == y).count() as f64 / 256.0;
            assert!(
                (est - truth).abs() < 0.12,
                "trial {t}: estimate {est} vs {truth}"
            );
            total_err += est - truth;
            total_abs_err += (est - truth).abs();
        }
        let bias = total_err / trials as f64;
        assert!(bias.abs() < 0.015, "mean error {bias}");
        // sqrt(J (1 - J) / 256) is at most 0.031; its mean absolute value 0.025.
        let mae = total_abs_err / trials as f64;
        assert!(mae < 0.035, "mean absolute error {mae}");
    }

    #[test]
    fn simd_and_portable_paths_agree() {
        let mh = MinHasher::new(64, 5).unwrap();
        let shingles: Vec<u32> = (0..1000).map(|i| splitmix64(i) as u32).collect();
        let mut portable = vec![u32::MAX; 64];
        update_mins_portable(&mut portable, &mh.mul, &mh.add, &shingles);
        assert_eq!(mh.signature(&shingles).unwrap(), portable);
    }

    /// Values printed by datasketch 2.0.0: `MinHashLSH(threshold, num_perm).b, .r`.
    #[test]
    fn optimal_params_match_datasketch() {
        for (threshold, num_perm, bands, rows) in DATASKETCH_PARAMS {
            let p = LshParams::optimal(threshold, num_perm).unwrap();
            assert_eq!(
                (p.bands, p.rows),
                (bands, rows),
                "threshold {threshold}, {num_perm} perms"
            );
        }
    }
    const DATASKETCH_PARAMS: [(f64, usize, usize, usize); 6] = [
        (0.85, 256, 13, 19),
        (0.7, 256, 25, 10),
        (0.5, 128, 25, 5),
        (0.9, 64, 3, 21),
        (0.8, 256, 17, 15),
        (0.95, 256, 5, 51),
    ];

    #[test]
    fn lsh_keeps_the_first_of_a_group() {
        let params = LshParams { bands: 4, rows: 2 };
        let mut idx = LshIndex::new(params);
        let a = [1, 2, 3, 4, 5, 6, 7, 8];
        let near_a = [1, 2, 9, 9, 9, 9, 9, 9]; // shares band 0
        let other = [10, 20, 30, 40, 50, 60, 70, 80];
        assert!(!idx.is_near_duplicate(&params.band_keys(&a)));
        assert!(idx.is_near_duplicate(&params.band_keys(&near_a)));
        assert!(!idx.is_near_duplicate(&params.band_keys(&other)));
        assert!(idx.is_near_duplicate(&params.band_keys(&a)));
    }
}
