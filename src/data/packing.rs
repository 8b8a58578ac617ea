//! Packing tokenised documents into fixed-length training blocks: documents
//! are concatenated, each followed by EOS, and cut into `seq_len` tokens, so
//! no position is padding (only the incomplete last block is dropped).
//! The order of documents and of blocks in each epoch comes from the seed.

use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Fixed-length blocks stored flat: block `i` is `tokens[i*seq_len..(i+1)*seq_len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocks {
    pub seq_len: usize,
    pub tokens: Vec<u32>,
}

impl Blocks {
    pub fn len(&self) -> usize {
        self.tokens.len() / self.seq_len
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn block(&self, i: usize) -> &[u32] {
        &self.tokens[i * self.seq_len..(i + 1) * self.seq_len]
    }
    /// Splits off the last `n` blocks (e.g. as a held-out set).
    pub fn split_off_last(&mut self, n: usize) -> Blocks {
        let keep = self.len().saturating_sub(n) * self.seq_len;
        let rest = self.tokens.split_off(keep);
        self.tokens.truncate(keep);
        Blocks {
            seq_len: self.seq_len,
            tokens: rest[..(rest.len() / self.seq_len) * self.seq_len].to_vec(),
        }
    }
}

/// Concatenates `docs` in a seeded random order, EOS after each, into blocks.
pub fn pack(docs: Vec<Vec<u32>>, eos: u32, seq_len: usize, seed: u64) -> Blocks {
    let mut order: Vec<usize> = (0..docs.len()).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let total: usize = docs.iter().map(|d| d.len() + 1).sum();
    let mut tokens = Vec::with_capacity(total);
    for i in order {
        tokens.extend_from_slice(&docs[i]);
        tokens.push(eos);
    }
    tokens.truncate((tokens.len() / seq_len) * seq_len);
    Blocks { seq_len, tokens }
}

/// The order blocks are visited in during `epoch`: a fresh seeded permutation
/// per epoch, so a resumed run can recompute where it was.
pub fn epoch_order(n_blocks: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n_blocks).collect();
    let seed = seed ^ (epoch + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_without_padding_and_with_separators() {
        let docs = vec![vec![1, 2, 3], vec![4, 5], vec![6, 7, 8, 9]];
        let blocks = pack(docs.clone(), 0, 4, 1);
        // 3+1 + 2+1 + 4+1 = 12 tokens = 3 blocks, nothing dropped.
        assert_eq!(blocks.len(), 3);
        assert_eq!(blocks.tokens.iter().filter(|&&t| t == 0).count(), 3);
        let mut seen: Vec<u32> = blocks.tokens.iter().copied().filter(|&t| t != 0).collect();
        seen.sort();
        assert_eq!(seen, (1..=9).collect::<Vec<_>>());
        assert_eq!(blocks, pack(docs, 0, 4, 1));
    }

    #[test]
    fn epoch_orders_are_permutations_that_differ() {
        let a = epoch_order(50, 9, 0);
        let b = epoch_order(50, 9, 1);
        assert_ne!(a, b);
        assert_eq!(a, epoch_order(50, 9, 0));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn split_off_keeps_whole_blocks() {
        let mut b = Blocks {
            seq_len: 2,
            tokens: (0..10).collect(),
        };
        let held = b.split_off_last(2);
        assert_eq!(b.len(), 3);
        assert_eq!(held.tokens, vec![6, 7, 8, 9]);
    }
}
