//! SentencePiece-style tokenization of one raw fragment, as llama.cpp's
//! `llm_tokenizer_spm_session`: the text (spaces already escaped to `▁`) starts as one
//! symbol per UTF-8 character; the adjacent pair whose concatenation is the
//! highest-scoring piece merges first (ties: the leftmost pair), until no pair is a piece;
//! a symbol that is not a piece is emitted as byte tokens `<0xNN>`.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::text::tokenizer::vocab::Vocab;

/// A span of the text in the linked list of current symbols.
#[derive(Clone, Copy)]
struct Symbol {
    start: u32,
    /// Byte length; 0 once merged into its left neighbour.
    len: u32,
    prev: i32,
    next: i32,
}

/// A candidate merge of two adjacent symbols.
struct Bigram {
    score: f32,
    left: u32,
    right: u32,
    /// Byte length of the merged piece when queued; a different sum means it is stale.
    size: u32,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// The max-heap's top is the highest score, and among equal scores the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// Buffers reused across fragments of one `encode` call.
#[derive(Default)]
pub(crate) struct SpmScratch {
    symbols: Vec<Symbol>,
    queue: BinaryHeap<Bigram>,
}

/// Length of the UTF-8 sequence a lead byte starts (1 for stray continuation bytes), as
/// llama.cpp's `unicode_len_utf8`.
#[inline]
fn utf8_len(lead: u8) -> usize {
    const LOOKUP: [usize; 16] = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4];
    LOOKUP[(lead >> 4) as usize]
}

/// Tokenizes `text` (already `▁`-escaped) onto `out`. `byte_tokens[b]` is the token for
/// byte `b` (`<0xNN>`, else the one-byte piece, else the unknown token).
pub(crate) fn encode(
    vocab: &Vocab,
    byte_tokens: &[Option<u32>; 256],
    text: &[u8],
    scratch: &mut SpmScratch,
    out: &mut Vec<u32>,
) {
    let SpmScratch { symbols, queue } = scratch;
    symbols.clear();
    queue.clear();
    let mut offs = 0;
    while offs < text.len() {
        let len = utf8_len(text[offs]).min(text.len() - offs);
        let index = symbols.len() as i32;
        offs += len;
        symbols.push(Symbol {
            start: (offs - len) as u32,
            len: len as u32,
            prev: index - 1,
            next: if offs == text.len() { -1 } else { index + 1 },
        });
    }

    let try_add = |symbols: &[Symbol], queue: &mut BinaryHeap<Bigram>, left: i32, right: i32| {
        if left < 0 || right < 0 {
            return;
        }
        let (l, r) = (symbols[left as usize], symbols[right as usize]);
        let span = l.start as usize..(l.start + l.len + r.len) as usize;
        if let Some(id) = vocab.id(&text[span]) {
            queue.push(Bigram {
                score: vocab.scores[id as usize],
                left: left as u32,
                right: right as u32,
                size: l.len + r.len,
            });
        }
    };

    for i in 1..symbols.len() as i32 {
        try_add(symbols, queue, i - 1, i);
    }
    while let Some(b) = queue.pop() {
        let (l, r) = (symbols[b.left as usize], symbols[b.right as usize]);
        // Either side already merged elsewhere: the pair no longer exists.
        if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
            continue;
        }
        symbols[b.left as usize].len += r.len;
        symbols[b.right as usize].len = 0;
        symbols[b.left as usize].next = r.next;
        if r.next >= 0 {
            symbols[r.next as usize].prev = b.left as i32;
        }
        try_add(symbols, queue, l.prev, b.left as i32);
        try_add(symbols, queue, b.left as i32, r.next);
    }

    // Every merged symbol is a piece by construction; a lone character may not be.
    let mut i = if symbols.is_empty() { -1 } else { 0 };
    while i >= 0 {
        let s = symbols[i as usize];
        let piece = &text[s.start as usize..(s.start + s.len) as usize];
        match vocab.id(piece) {
            Some(id) => out.push(id),
            None => out.extend(piece.iter().filter_map(|&b| byte_tokens[b as usize])),
        }
        i = s.next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::tokenizer::vocab::attr;

    /// A vocabulary of `(piece, score)`, plus the 256 byte tokens after them.
    fn vocab(pieces: &[(&str, f32)]) -> (Vocab, [Option<u32>; 256]) {
        let mut texts: Vec<String> = pieces.iter().map(|p| p.0.to_string()).collect();
        let mut scores: Vec<f32> = pieces.iter().map(|p| p.1).collect();
        let mut attrs = vec![attr::NORMAL; pieces.len()];
        let mut bytes = [None; 256];
        for b in 0..=255u8 {
            bytes[b as usize] = Some(texts.len() as u32);
            texts.push(format!("<0x{b:02X}>"));
            scores.push(0.0);
            attrs.push(attr::BYTE);
        }
        (Vocab::new(texts, scores, attrs).unwrap(), bytes)
    }

    fn run(v: &(Vocab, [Option<u32>; 256]), text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        encode(
            &v.0,
            &v.1,
            text.as_bytes(),
            &mut SpmScratch::default(),
            &mut out,
        );
        out
    }

    #[test]
    fn the_highest_scoring_pair_merges_first() {
        // "abc": "bc" outscores "ab", so the result is a + bc, not ab + c.
        let v = vocab(&[
            ("a", -1.0),
            ("b", -1.0),
            ("c", -1.0),
            ("ab", -5.0),
            ("bc", -2.0),
        ]);
        assert_eq!(run(&v, "abc"), vec![0, 4]);
    }

    #[test]
    fn equal_scores_merge_the_leftmost_pair() {
        let v = vocab(&[("a", -1.0), ("aa", -2.0)]);
        // "aaa" → "aa" + "a", never "a" + "aa".
        assert_eq!(run(&v, "aaa"), vec![1, 0]);
        assert_eq!(run(&v, "aaaa"), vec![1, 1]);
    }

    #[test]
    fn merges_continue_through_intermediate_pieces() {
        let v = vocab(&[
            ("▁", -1.0),
            ("h", -1.0),
            ("i", -1.0),
            ("▁h", -3.0),
            ("▁hi", -2.0),
        ]);
        assert_eq!(run(&v, "▁hi"), vec![4]);
    }

    #[test]
    fn characters_without_a_piece_fall_back_to_their_bytes() {
        let v = vocab(&[("a", -1.0)]);
        let e_acute = "é".as_bytes();
        let byte = |b: u8| v.1[b as usize].unwrap();
        assert_eq!(run(&v, "aé"), vec![0, byte(e_acute[0]), byte(e_acute[1])]);
        assert_eq!(run(&v, ""), Vec::<u32>::new());
    }
}
