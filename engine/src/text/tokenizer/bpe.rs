//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`), built with the `tokenizers` crate from
//! the GGUF's vocabulary and merges: the pre-tokenizer's regexes split the text, each piece
//! is mapped to GPT-2's printable byte alphabet, and merges apply by rank (lowest first,
//! ties leftmost), as llama.cpp's `llm_tokenizer_bpe_session` does. Special tokens are cut
//! out before this runs (`special_tokens`), so the model sees raw text only.

use std::collections::HashMap;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{SplitDelimiterBehavior, Tokenizer as HfTokenizer};

use crate::gguf::GgufFile;
use crate::text::tokenizer::error::TokenizerError;
use crate::text::tokenizer::pre_tokenize::PreTokenizer;
use crate::text::tokenizer::vocab::Vocab;

/// The BPE model and pre-tokenizer for one vocabulary.
pub(crate) struct Bpe {
    inner: HfTokenizer,
}

/// The `tokenizers` pre-tokenizer for `pre`: its regexes in sequence, then GPT-2's byte
/// mapping.
pub(crate) fn pre_tokenizer(pre: &PreTokenizer) -> Result<PreTokenizerWrapper, TokenizerError> {
    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(pre.regexes.len() + 1);
    for r in pre.regexes {
        let split = Split::new(
            SplitPattern::Regex(r.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| TokenizerError::BadRegex {
            regex: r.to_string(),
            reason: e.to_string(),
        })?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, false, false).into());
    Ok(PreTokenizerWrapper::Sequence(Sequence::new(steps)))
}

impl Bpe {
    /// Builds the model from `tokenizer.ggml.merges` over `vocab`.
    pub(crate) fn from_gguf(
        gguf: &GgufFile,
        vocab: &Vocab,
        pre: &PreTokenizer,
    ) -> Result<Bpe, TokenizerError> {
        const MERGES: &str = "tokenizer.ggml.merges";
        let merges: Vec<(String, String)> = gguf
            .meta(MERGES)
            .and_then(|v| v.as_array())
            .ok_or(TokenizerError::MissingKey(MERGES))?
            .iter()
            .filter_map(|m| m.as_str())
            .map(|m| {
                // llama.cpp splits at the first space after the first byte.
                match m.bytes().skip(1).position(|b| b == b' ') {
                    Some(i) => Ok((m[..i + 1].to_string(), m[i + 2..].to_string())),
                    None => Err(TokenizerError::BadMerge(m.to_string())),
                }
            })
            .collect::<Result<_, _>>()?;
        Bpe::new(vocab, merges, pre)
    }

    /// Builds the model from merges given as pairs.
    pub(crate) fn new(
        vocab: &Vocab,
        merges: Vec<(String, String)>,
        pre: &PreTokenizer,
    ) -> Result<Bpe, TokenizerError> {
        let map: tokenizers::models::bpe::Vocab = vocab
            .pieces
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(map, merges)
            .ignore_merges(pre.ignore_merges)
            .build()
            .map_err(|e| TokenizerError::Bpe(e.to_string()))?;
        let mut inner = HfTokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
        Ok(Bpe { inner })
    }

    /// Tokenizes one raw fragment (no special tokens in it) onto `out`.
    pub(crate) fn encode(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        out.extend_from_slice(enc.get_ids());
        Ok(())
    }
}

/// GPT-2's reversible byte ↔ printable-char mapping, reversed: char → byte.
pub(crate) fn byte_level_decode_map() -> HashMap<char, u8> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter()
        .zip(cs)
        .map(|(b, c)| (char::from_u32(c).unwrap_or('\u{FFFD}'), b as u8))
        .collect()
}

/// The bytes a byte-level piece stands for (characters outside the alphabet as UTF-8).
pub(crate) fn byte_level_bytes(map: &HashMap<char, u8>, piece: &str) -> Vec<u8> {
    piece
        .chars()
        .flat_map(|c| {
            map.get(&c)
                .copied()
                .map_or_else(|| c.to_string().into_bytes(), |b| vec![b])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use tokenizers::PreTokenizedString;
    use tokenizers::PreTokenizer as _;

    use super::*;
    use crate::text::tokenizer::pre_tokenize::for_name;
    use crate::text::tokenizer::vocab::attr;

    /// The pieces `pre` splits `text` into, mapped back from GPT-2's byte alphabet.
    fn split(pre: &str, text: &str) -> Vec<String> {
        let p = pre_tokenizer(&for_name(pre).unwrap()).unwrap();
        let mut s = PreTokenizedString::from(text);
        p.pre_tokenize(&mut s).unwrap();
        let map = byte_level_decode_map();
        s.get_splits(
            tokenizers::OffsetReferential::Original,
            tokenizers::OffsetType::Byte,
        )
        .into_iter()
        .map(|(piece, _, _)| {
            String::from_utf8(byte_level_bytes(&map, piece)).expect("whole characters")
        })
        .collect()
    }

    #[test]
    fn each_family_splits_as_its_llama_cpp_regexes_do() {
        let cases: &[(&str, &str, &[&str])] = &[
            // llama.cpp's default: punctuation runs, GPT-2, digit runs, then groups of three.
            (
                "default",
                "Hello, world 123456!",
                &["Hello", ",", " world", " ", "123", "456", "!"],
            ),
            ("gpt-2", "it's  a test", &["it", "'s", " ", " a", " test"]),
            ("smollm", "abc 2024", &["abc", " ", "2", "0", "2", "4"]),
            (
                "llama-bpe",
                "I'M 12345 ok\n\n",
                &["I", "'M", " ", "123", "45", " ok", "\n\n"],
            ),
            ("qwen2", "x 123", &["x", " ", "1", "2", "3"]),
            ("gpt-4o", "HelloWorld's", &["Hello", "World's"]),
            ("tekken", "HelloWorld", &["Hello", "World"]),
            ("bloom", "hi, there.", &["hi", ",", " there", "."]),
            ("viking", "ab12, c", &["ab", "1", "2", ",", " c"]),
            ("deepseek-coder", "a1\nb", &["a", "1", "\n", "b"]),
            ("deepseek-llm", "ab 12\n", &["ab", " ", "12", "\n"]),
            ("deepseek-v3", "abc 12345", &["abc", " ", "123", "45"]),
            ("falcon", "x=1000", &["x", "=", "100", "0"]),
            ("tiny_aya", "1234567", &["1", "234", "567"]),
            // Zero-width matches split too, as llama.cpp's std::regex loop does.
            ("superbpe", "x 1234567", &["x ", "1", "234", "567"]),
            ("chameleon", "a\tb", &["a", "\t", "b"]),
            ("seed-coder", "a \r\nb", &["a", " \r\n", "b"]),
            ("bailingmoe", "it'S", &["it", "'S"]),
            ("jais-2", "a     b", &["a", "    ", " b"]),
            ("exaone-moe", "ab cd", &["ab cd"]),
            ("laguna", "a\n\nb", &["a", "\n\n", "b"]),
        ];
        for (pre, text, want) in cases {
            assert_eq!(split(pre, text), *want, "{pre} on {text:?}");
        }
    }

    #[test]
    fn every_supported_regex_compiles() {
        for pre in [
            "default",
            "minicpm5",
            "llama3",
            "deepseek-llm",
            "deepseek-coder",
            "deepseek-v3",
            "spark2_5",
            "youtu",
            "falcon",
            "gpt-2",
            "jais-2",
            "starcoder",
            "qwen2",
            "qwen35",
            "dbrx",
            "poro-chat",
            "chatglm-bpe",
            "glm4",
            "viking",
            "tekken",
            "chameleon",
            "gpt-4o",
            "granite-embed-multi-97m",
            "tiny_aya",
            "superbpe",
            "bailingmoe",
            "seed-coder",
            "ufakzeka",
            "grok-2",
            "laguna",
            "exaone-moe",
        ] {
            let p = for_name(pre).unwrap_or_else(|e| panic!("{pre}: {e}"));
            pre_tokenizer(&p).unwrap_or_else(|e| panic!("{pre}: {e}"));
        }
    }

    #[test]
    fn unknown_and_unported_names_are_refused_by_name() {
        let e = for_name("not-a-tokenizer").unwrap_err().to_string();
        assert!(
            e.contains("\"not-a-tokenizer\"") && e.contains("llama-bpe, "),
            "{e}"
        );
        assert!(e.contains("smollm") && e.contains("qwen2"), "{e}");
        let e = for_name("kimi-k2").unwrap_err().to_string();
        assert!(e.contains("\"kimi-k2\"") && e.contains("not ported"), "{e}");
    }

    /// A byte-level vocabulary: the 256 byte characters, then `extra` pieces.
    fn tiny_vocab(extra: &[&str]) -> Vocab {
        let map = byte_level_decode_map();
        let mut by_byte: Vec<(u8, char)> = map.iter().map(|(&c, &b)| (b, c)).collect();
        by_byte.sort_unstable();
        let mut pieces: Vec<String> = by_byte.iter().map(|(_, c)| c.to_string()).collect();
        pieces.extend(extra.iter().map(|s| s.to_string()));
        let n = pieces.len();
        Vocab::new(pieces, vec![0.0; n], vec![attr::NORMAL; n]).unwrap()
    }

    #[test]
    fn merges_apply_by_rank_within_each_piece() {
        // "Ġ" is the space's byte character.
        let v = tiny_vocab(&["ab", "Ġa", "Ġab", "bc"]);
        let merges = [("Ġ", "a"), ("a", "b"), ("Ġa", "b"), ("b", "c")]
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .to_vec();
        let bpe = Bpe::new(&v, merges, &for_name("gpt-2").unwrap()).unwrap();
        let mut out = Vec::new();
        bpe.encode("abc abc", &mut out).unwrap();
        // "abc" → ab + c (rank 1 beats bc's 3); " abc" → Ġa (rank 0), then Ġab (2) + c.
        let id = |p: &str| v.id(p.as_bytes()).unwrap();
        assert_eq!(out, vec![id("ab"), id("c"), id("Ġab"), id("c")]);
    }

    #[test]
    fn llama3_takes_a_whole_piece_that_is_a_token_without_merging() {
        let v = tiny_vocab(&["ab", "abc"]);
        let merges = vec![("a".to_string(), "b".to_string())];
        let id = |p: &str| v.id(p.as_bytes()).unwrap();
        let llama3 = Bpe::new(&v, merges.clone(), &for_name("llama-bpe").unwrap()).unwrap();
        let mut out = Vec::new();
        llama3.encode("abc", &mut out).unwrap();
        assert_eq!(out, vec![id("abc")], "ignore_merges: the piece is a token");
        let gpt2 = Bpe::new(&v, merges, &for_name("gpt-2").unwrap()).unwrap();
        out.clear();
        gpt2.encode("abc", &mut out).unwrap();
        assert_eq!(out, vec![id("ab"), id("c")], "no merge makes abc");
    }
}
