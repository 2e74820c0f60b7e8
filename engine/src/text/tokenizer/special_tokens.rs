//! Splitting text on special tokens before anything else, as llama.cpp's
//! `tokenizer_st_partition` does with `parse_special = true` (its `/tokenize` and chat
//! path): control, user-defined and unknown tokens spelled in the text become those
//! tokens, and only the text between them is tokenized.
//!
//! llama.cpp takes the special tokens longest first and, for each, cuts every leftmost
//! non-overlapping occurrence out of the text fragments still left. A short token never
//! wins over a longer one that overlaps it, even one that starts later ("ab" loses to
//! "bcd" in "abcd"), so this is not a leftmost-longest scan. The same result comes from
//! finding every occurrence of every special token once (a byte trie walked from each
//! position) and accepting them greedily in llama.cpp's order (longer first, then the
//! token order, then position) when they do not overlap one already accepted.

use std::ops::Range;

use crate::text::tokenizer::vocab::{attr, Vocab};

/// A piece of the text: raw text still to tokenize, or a special token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fragment {
    Text(Range<usize>),
    Token(u32),
}

/// One trie node: children by byte and the special token ending here.
#[derive(Default)]
struct Node {
    children: Vec<(u8, u32)>,
    token: Option<u32>,
}

/// A byte trie of the special tokens' texts.
pub(crate) struct SpecialTokens {
    nodes: Vec<Node>,
    /// Child of the root per first byte (0: none); most text bytes stop here.
    root: Box<[u32; 256]>,
}

impl SpecialTokens {
    /// The trie of every token with a control, user-defined or unknown attribute.
    pub(crate) fn new(vocab: &Vocab) -> SpecialTokens {
        let mut t = SpecialTokens {
            nodes: vec![Node::default()],
            root: Box::new([0; 256]),
        };
        let mask = attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN;
        for id in 0..vocab.len() as u32 {
            if vocab.has(id, mask) {
                t.insert(vocab.pieces[id as usize].as_bytes(), id);
            }
        }
        t
    }

    fn insert(&mut self, text: &[u8], id: u32) {
        let mut n = 0usize;
        for (depth, &b) in text.iter().enumerate() {
            let next = if depth == 0 {
                self.root[b as usize] as usize
            } else {
                self.nodes[n]
                    .children
                    .iter()
                    .find(|c| c.0 == b)
                    .map_or(0, |c| c.1 as usize)
            };
            n = if next != 0 {
                next
            } else {
                self.nodes.push(Node::default());
                let new = (self.nodes.len() - 1) as u32;
                if depth == 0 {
                    self.root[b as usize] = new;
                } else {
                    self.nodes[n].children.push((b, new));
                }
                new as usize
            };
        }
        // Pieces are unique, so a node ends at most one token.
        self.nodes[n].token = Some(id);
    }

    /// Whether there are no special tokens at all.
    pub(crate) fn is_empty(&self) -> bool {
        self.nodes.len() == 1
    }

    /// Splits `text` into raw fragments and special tokens, in order.
    pub(crate) fn partition(&self, text: &str) -> Vec<Fragment> {
        let bytes = text.as_bytes();
        // Every occurrence: (length, id, start).
        let mut found: Vec<(usize, u32, usize)> = Vec::new();
        for start in 0..bytes.len() {
            let mut n = self.root[bytes[start] as usize] as usize;
            let mut end = start + 1;
            while n != 0 {
                if let Some(id) = self.nodes[n].token {
                    found.push((end - start, id, start));
                }
                let Some(&b) = bytes.get(end) else { break };
                n = self.nodes[n]
                    .children
                    .iter()
                    .find(|c| c.0 == b)
                    .map_or(0, |c| c.1 as usize);
                end += 1;
            }
        }
        if found.is_empty() {
            return if text.is_empty() {
                Vec::new()
            } else {
                vec![Fragment::Text(0..bytes.len())]
            };
        }
        found.sort_unstable_by_key(|&(len, id, start)| (std::cmp::Reverse(len), id, start));
        let mut taken = vec![false; bytes.len()];
        let mut accepted: Vec<(usize, usize, u32)> = Vec::new();
        for (len, id, start) in found {
            // Everything accepted so far is at least as long, so an overlap covers the
            // candidate's first or last byte.
            if taken[start] || taken[start + len - 1] {
                continue;
            }
            taken[start..start + len].fill(true);
            accepted.push((start, len, id));
        }
        accepted.sort_unstable();
        let mut out = Vec::with_capacity(accepted.len() * 2 + 1);
        let mut at = 0;
        for (start, len, id) in accepted {
            if start > at {
                out.push(Fragment::Text(at..start));
            }
            out.push(Fragment::Token(id));
            at = start + len;
        }
        if at < bytes.len() {
            out.push(Fragment::Text(at..bytes.len()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Fragment::{Text, Token};

    fn specials(pieces: &[(&str, u32)]) -> SpecialTokens {
        let v = Vocab::new(
            pieces.iter().map(|p| p.0.to_string()).collect(),
            vec![0.0; pieces.len()],
            pieces.iter().map(|p| p.1).collect(),
        )
        .unwrap();
        SpecialTokens::new(&v)
    }

    #[test]
    fn control_and_user_defined_tokens_are_cut_out_and_normal_ones_are_not() {
        let s = specials(&[
            ("<start_of_turn>", attr::CONTROL),
            ("<end_of_turn>", attr::CONTROL),
            ("\n", attr::USER_DEFINED),
            ("user", attr::NORMAL),
        ]);
        let text = "<start_of_turn>user\nhi<end_of_turn>";
        assert_eq!(
            s.partition(text),
            vec![Token(0), Text(15..19), Token(2), Text(20..22), Token(1)]
        );
        assert_eq!(s.partition("plain"), vec![Text(0..5)]);
        assert_eq!(s.partition(""), vec![]);
    }

    #[test]
    fn a_longer_token_wins_even_when_a_shorter_one_starts_first() {
        let s = specials(&[("ab", attr::CONTROL), ("bcd", attr::CONTROL)]);
        assert_eq!(s.partition("abcd"), vec![Text(0..1), Token(1)]);
    }

    #[test]
    fn runs_take_the_longest_token_repeatedly_then_the_rest() {
        let runs: Vec<(String, u32)> = (1..=4)
            .map(|n| (" ".repeat(n), attr::USER_DEFINED))
            .collect();
        let pieces: Vec<(&str, u32)> = runs.iter().map(|(s, a)| (s.as_str(), *a)).collect();
        let s = specials(&pieces);
        // 11 spaces: two runs of 4, then 3.
        assert_eq!(
            s.partition(&" ".repeat(11)),
            vec![Token(3), Token(3), Token(2)]
        );
    }

    #[test]
    fn overlapping_occurrences_of_one_token_are_taken_leftmost_first() {
        let s = specials(&[("aa", attr::CONTROL)]);
        assert_eq!(s.partition("aaa"), vec![Token(0), Text(2..3)]);
    }
}
