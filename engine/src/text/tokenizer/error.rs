//! Why a vocabulary cannot be loaded or a text cannot be tokenized.

use thiserror::Error;

/// A tokenizer failure; `Tokenizer::load` reports it as `ModelError::Tokenizer`.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum TokenizerError {
    #[error("the GGUF has no {0}")]
    MissingKey(&'static str),
    #[error("{key} has {got} entries for {tokens} tokens")]
    ShortArray {
        key: &'static str,
        got: usize,
        tokens: usize,
    },
    #[error("duplicate token in the vocabulary: {text:?} has ids {first} and {second}")]
    DuplicateToken {
        text: String,
        first: u32,
        second: u32,
    },
    #[error("tokenizer model {0:?} is not supported (supported: llama (SentencePiece), gpt2 (byte-level BPE))")]
    UnknownModel(String),
    #[error("pre-tokenizer {name:?} is not supported (supported: {supported})")]
    UnknownPreTokenizer { name: String, supported: String },
    #[error(
        "pre-tokenizer {name:?} needs llama.cpp's own splitting code, which is not ported: {why}"
    )]
    UnportedPreTokenizer { name: String, why: &'static str },
    #[error("malformed merge {0:?}")]
    BadMerge(String),
    #[error("building the BPE model: {0}")]
    Bpe(String),
    #[error("pre-tokenizer regex {regex:?}: {reason}")]
    BadRegex { regex: String, reason: String },
    #[error("{path}: {reason}")]
    TokenizerJson { path: String, reason: String },
    #[error("encoding: {0}")]
    Encode(String),
}
