//! Incremental detokenization for streaming: tokens go in one at a time, text comes
//! out as soon as it forms whole UTF-8 characters, never half of one.

use crate::text::tokenizer::Tokenizer;

/// Accumulates token bytes and releases the longest valid UTF-8 prefix.
#[derive(Default)]
pub struct IncrementalDetokenizer {
    pending: Vec<u8>,
}

impl IncrementalDetokenizer {
    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.push_bytes(tok.token_bytes(id))
    }

    /// Adds raw bytes; returns the text they complete.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // SAFETY-free: the prefix up to `valid` is valid UTF-8 by definition.
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // Incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        // Bytes that can never become valid: replace them, as a lossy
                        // decode of the whole text would.
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Ends the stream: any incomplete trailing character becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multibyte_characters_split_across_tokens_are_held_back() {
        let mut d = IncrementalDetokenizer::default();
        let text = "héllo 世界 👋🏽!";
        let mut out = String::new();
        // Feed one byte at a time: the worst possible token split.
        for b in text.as_bytes() {
            let piece = d.push_bytes(&[*b]);
            assert!(std::str::from_utf8(piece.as_bytes()).is_ok());
            out.push_str(&piece);
        }
        out.push_str(&d.finish());
        assert_eq!(out, text);
    }

    #[test]
    fn emoji_arrives_whole_only_when_complete() {
        let mut d = IncrementalDetokenizer::default();
        let wave = "👋".as_bytes();
        assert_eq!(d.push_bytes(&wave[..2]), "");
        assert_eq!(d.push_bytes(&wave[2..3]), "");
        assert_eq!(d.push_bytes(&wave[3..]), "👋");
    }

    #[test]
    fn sentencepiece_pieces_stream_spaces_and_byte_tokens_as_text() {
        use crate::text::tokenizer::test_vocab::gemma_like;
        let tok = Tokenizer::load(&gemma_like(&[]), None).unwrap();
        let text = "hi 世界\n\nhi 👋";
        let ids = tok.encode(text, false).unwrap();
        assert!(
            ids.len() > text.chars().count(),
            "CJK and emoji arrive as byte tokens"
        );
        let mut d = IncrementalDetokenizer::default();
        let mut out = String::new();
        for &id in &ids {
            let piece = d.push(&tok, id);
            // Byte tokens of one character come out together, never half of one.
            assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
            out.push_str(&piece);
        }
        out.push_str(&d.finish());
        assert_eq!(out, text);
    }

    #[test]
    fn invalid_bytes_become_replacement_chars_without_stalling() {
        let mut d = IncrementalDetokenizer::default();
        assert_eq!(d.push_bytes(&[b'a', 0xFF, b'b']), "a\u{FFFD}b");
        assert_eq!(d.push_bytes(&[0xE4, 0xB8]), "");
        assert_eq!(d.finish(), "\u{FFFD}");
    }
}
