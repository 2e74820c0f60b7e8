//! Tiny GGUF vocabularies for tests: a Gemma-like SentencePiece vocabulary.

use crate::gguf::{writer, GgufFile, MetaValue};

/// GGUF token types.
pub(crate) const NORMAL: i32 = 1;
pub(crate) const CONTROL: i32 = 3;
pub(crate) const USER_DEFINED: i32 = 4;
pub(crate) const BYTE: i32 = 6;

/// A SentencePiece vocabulary shaped like Gemma 3's: `<pad>`, `<eos>`, `<bos>`, `<unk>`,
/// the turn markers, user-defined newline runs, a few scored pieces, then the 256 byte
/// tokens; `extra` metadata is added (or overrides) at the end.
pub(crate) fn gemma_like(extra: &[(&str, MetaValue)]) -> GgufFile {
    let mut pieces: Vec<(String, f32, i32)> = [
        ("<pad>", 0.0, CONTROL),
        ("<eos>", 0.0, CONTROL),
        ("<bos>", 0.0, CONTROL),
        ("<unk>", 0.0, CONTROL),
        ("<start_of_turn>", 0.0, CONTROL),
        ("<end_of_turn>", 0.0, CONTROL),
        ("\n", 0.0, USER_DEFINED),
        ("\n\n", 0.0, USER_DEFINED),
        ("▁", -1.0, NORMAL),
        ("h", -2.0, NORMAL),
        ("i", -3.0, NORMAL),
        ("hi", -4.0, NORMAL),
        ("▁hi", -5.0, NORMAL),
        ("u", -6.0, NORMAL),
        ("s", -7.0, NORMAL),
        ("e", -8.0, NORMAL),
        ("r", -9.0, NORMAL),
        ("us", -10.0, NORMAL),
        ("er", -11.0, NORMAL),
        ("user", -12.0, NORMAL),
        ("▁▁", -13.0, NORMAL),
        ("é", -14.0, NORMAL),
    ]
    .into_iter()
    .map(|(p, s, t)| (p.to_string(), s, t))
    .collect();
    for b in 0..=255u8 {
        pieces.push((format!("<0x{b:02X}>"), 0.0, BYTE));
    }
    let mut meta: Vec<(String, MetaValue)> = [
        ("tokenizer.ggml.model", MetaValue::Str("llama".into())),
        (
            "tokenizer.ggml.tokens",
            MetaValue::Array(pieces.iter().map(|p| MetaValue::Str(p.0.clone())).collect()),
        ),
        (
            "tokenizer.ggml.scores",
            MetaValue::Array(pieces.iter().map(|p| MetaValue::F32(p.1)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            MetaValue::Array(pieces.iter().map(|p| MetaValue::I32(p.2)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", MetaValue::U32(2)),
        ("tokenizer.ggml.eos_token_id", MetaValue::U32(1)),
        ("tokenizer.ggml.unknown_token_id", MetaValue::U32(3)),
        ("tokenizer.ggml.add_space_prefix", MetaValue::Bool(false)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in extra {
        meta.retain(|(key, _)| key != k);
        meta.push((k.to_string(), v.clone()));
    }
    GgufFile::from_bytes(writer::write(&meta, &[])).expect("a valid GGUF")
}
