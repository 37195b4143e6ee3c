//! Finding the all-zero blocks of a buffer, so the copier seeks over them instead of writing.

use std::ops::Range;

/// Whether every byte of `bytes` is zero.
///
/// Compares 128-byte chunks with a branch-free OR that the compiler vectorises, and stops at the
/// first chunk holding a non-zero byte: data blocks are rejected after a few bytes, zero blocks
/// cost one pass at memory speed.
pub(super) fn is_zero(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(128);
    chunks
        .by_ref()
        .all(|chunk| chunk.iter().fold(0u8, |acc, &b| acc | b) == 0)
        && chunks.remainder().iter().all(|&b| b == 0)
}

/// The runs of non-zero blocks of `buf`, as ranges of indexes into `buf`, consecutive non-zero
/// blocks merged into one run so that each run is one write.
///
/// `buf` holds the file's bytes from `offset`. Blocks are `block` bytes long and aligned to
/// multiples of `block` in the *file*, not in the buffer, so the first and last blocks of `buf`
/// may be partial; a block is skipped only if all its bytes inside `buf` are zero.
pub(super) fn nonzero_runs(buf: &[u8], offset: u64, block: usize) -> NonZeroRuns<'_> {
    NonZeroRuns {
        buf,
        offset,
        block: block.max(1),
        pos: 0,
    }
}

/// Iterator returned by [`nonzero_runs`].
pub(super) struct NonZeroRuns<'a> {
    buf: &'a [u8],
    offset: u64,
    block: usize,
    pos: usize,
}

impl NonZeroRuns<'_> {
    /// End (index into `buf`) of the block starting at `pos`.
    fn block_end(&self, pos: usize) -> usize {
        let block = self.block as u64;
        let into_block = (self.offset.wrapping_add(pos as u64) % block) as usize;
        (pos + (self.block - into_block)).min(self.buf.len())
    }
}

impl Iterator for NonZeroRuns<'_> {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        // Skip zero blocks up to the first non-zero one.
        let start = loop {
            if self.pos >= self.buf.len() {
                return None;
            }
            let end = self.block_end(self.pos);
            let found = !is_zero(&self.buf[self.pos..end]);
            let start = self.pos;
            self.pos = end;
            if found {
                break start;
            }
        };
        // Extend the run over the following non-zero blocks.
        while self.pos < self.buf.len() {
            let end = self.block_end(self.pos);
            if is_zero(&self.buf[self.pos..end]) {
                // This zero block is skipped by the next call, which starts here again.
                break;
            }
            self.pos = end;
        }
        Some(start..self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(buf: &[u8], offset: u64, block: usize) -> Vec<Range<usize>> {
        nonzero_runs(buf, offset, block).collect()
    }

    #[test]
    fn is_zero_checks_every_byte() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 1000]));
        for i in [0, 1, 127, 128, 129, 511, 999] {
            let mut b = vec![0u8; 1000];
            b[i] = 1;
            assert!(!is_zero(&b), "non-zero byte at {i} missed");
        }
        // Bits that would cancel out in an addition or XOR must still count.
        let mut b = vec![0u8; 256];
        b[3] = 0x80;
        b[200] = 0x80;
        assert!(!is_zero(&b));
    }

    #[test]
    fn all_zero_buffer_has_no_runs() {
        assert_eq!(runs(&[0; 4096], 0, 1024), Vec::<Range<usize>>::new());
        assert_eq!(runs(&[], 0, 1024), Vec::<Range<usize>>::new());
    }

    #[test]
    fn all_data_buffer_is_one_run() {
        assert_eq!(runs(&[7; 4096], 0, 1024), vec![0..4096]);
    }

    #[test]
    fn zero_blocks_split_runs_and_data_blocks_merge() {
        // Blocks: data, data, zero, data, zero, zero, data(partial, last).
        let mut b = vec![0u8; 6 * 100 + 50];
        b[0] = 1;
        b[150] = 1;
        b[399] = 1;
        b[640] = 1;
        assert_eq!(runs(&b, 0, 100), vec![0..200, 300..400, 600..650]);
    }

    #[test]
    fn a_single_non_zero_byte_keeps_its_whole_block() {
        let mut b = vec![0u8; 4096];
        b[2049] = 9;
        assert_eq!(runs(&b, 0, 1024), vec![2048..3072]);
    }

    #[test]
    fn blocks_are_aligned_to_the_file_not_the_buffer() {
        // The buffer starts 30 bytes into a 100-byte block: its first block is 70 bytes long.
        let mut b = vec![0u8; 300];
        b[69] = 1; // last byte of the partial first block (file offset 99)
        b[70] = 1; // first byte of the next block (file offset 100)
        b[275] = 1; // file offset 305, in the block 300..400, cut at the buffer's end
        assert_eq!(runs(&b, 30, 100), vec![0..170, 270..300]);
        // A zero partial first block is skipped.
        let mut b = vec![0u8; 300];
        b[70] = 1;
        assert_eq!(runs(&b, 30, 100), vec![70..170]);
    }

    #[test]
    fn runs_cover_exactly_the_non_zero_bytes_up_to_blocks() {
        // Every non-zero byte is inside a run and nothing outside the runs is non-zero.
        let mut b = vec![0u8; 10_000];
        let mut x: u32 = 12345;
        for _ in 0..40 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let len = b.len();
            b[(x as usize >> 8) % len] = (x >> 24) as u8 | 1;
        }
        let rs = runs(&b, 1234, 256);
        let mut covered = vec![false; b.len()];
        for r in &rs {
            assert!(r.start < r.end);
            covered[r.clone()].iter_mut().for_each(|c| *c = true);
        }
        for (i, &byte) in b.iter().enumerate() {
            if byte != 0 {
                assert!(covered[i], "byte {i} not covered");
            }
        }
        // Runs are ordered, disjoint and separated by at least one zero block.
        for w in rs.windows(2) {
            assert!(w[0].end < w[1].start);
            assert!(is_zero(&b[w[0].end..w[1].start]));
        }
    }

    #[test]
    fn block_size_zero_does_not_loop() {
        assert_eq!(runs(&[0, 1, 1, 0], 0, 0), vec![1..3]);
    }
}
