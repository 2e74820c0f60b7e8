//! The tokenizer, built from the GGUF's own vocabulary as llama.cpp builds it, so that
//! prompts get the same ids as llama-server gives them:
//!
//! - `tokenizer.ggml.model = "llama"`: SentencePiece pieces with scores (`spm`): spaces
//!   become `▁`, pairs merge by score, characters without a piece become `<0xNN>` bytes.
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE (`bpe`) with the pre-tokenizer that
//!   `tokenizer.ggml.pre` names (`pre_tokenize`).
//!
//! Either way the text is first split on special tokens (`special_tokens`), and which
//! tokens are control or end generation follows llama.cpp's detection by text
//! (`end_of_generation`). A `tokenizer.json` beside the model file takes precedence
//! (`tokenizer_json`).

mod bpe;
mod end_of_generation;
mod error;
mod piece_map;
mod pre_tokenize;
mod special_tokens;
mod spm;
#[cfg(test)]
pub(crate) mod test_vocab;
mod tokenizer_json;
mod vocab;

use std::path::Path;

pub use error::TokenizerError;

use crate::error::ModelError;
use crate::gguf::GgufFile;
use bpe::Bpe;
use end_of_generation::{NamedIds, VocabKind};
use special_tokens::{Fragment, SpecialTokens};
use spm::SpmScratch;
use tokenizer_json::TokenizerJson;
use vocab::{attr, Vocab};

/// How raw text (between special tokens) becomes ids.
enum Model {
    /// SentencePiece: `byte_tokens[b]` stands for byte `b` when a character has no piece.
    Spm {
        byte_tokens: Box<[Option<u32>; 256]>,
        add_space_prefix: bool,
    },
    Bpe(Bpe),
    /// A `tokenizer.json` beside the model, which splits special tokens itself.
    Json(TokenizerJson),
}

/// Text ↔ token ids for one model.
pub struct Tokenizer {
    vocab: Vocab,
    model: Model,
    specials: SpecialTokens,
    /// The bytes each token stands for (empty for control tokens), for streaming output.
    token_bytes: Vec<Vec<u8>>,
    /// Whether to drop the leading space of a decoded text's first token (the prefix
    /// SentencePiece vocabularies add when encoding).
    strip_leading_space: bool,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Tokens that end generation: llama.cpp's end-of-generation set (EOS, EOT, and the
    /// end-of-turn markers it recognises by their text, e.g. Gemma's `<end_of_turn>`).
    pub stop_tokens: Vec<u32>,
    /// Whether a BOS token is prepended when special tokens are added.
    pub add_bos: bool,
}

/// The bytes a token stands for in generated text, as llama.cpp's `token_to_piece` with
/// `special = false`: nothing for control and unknown tokens, user-defined tokens as
/// spelled, normal pieces with `▁` as a space (SentencePiece) or decoded from GPT-2's byte
/// alphabet (BPE), `<0xNN>` as the byte itself.
fn token_bytes(vocab: &Vocab, kind: VocabKind) -> Vec<Vec<u8>> {
    let byte_map = bpe::byte_level_decode_map();
    (0..vocab.len() as u32)
        .map(|id| {
            let piece = &vocab.pieces[id as usize];
            if vocab.has(id, attr::CONTROL | attr::UNKNOWN) {
                Vec::new()
            } else if vocab.has(id, attr::USER_DEFINED) {
                piece.as_bytes().to_vec()
            } else if vocab.has(id, attr::NORMAL) {
                match kind {
                    VocabKind::Spm => piece.replace('▁', " ").into_bytes(),
                    VocabKind::Bpe => bpe::byte_level_bytes(&byte_map, piece),
                }
            } else if vocab.has(id, attr::BYTE) {
                byte_of(piece).map(|b| vec![b]).unwrap_or_default()
            } else {
                Vec::new()
            }
        })
        .collect()
}

/// The byte a `<0xNN>` piece stands for.
fn byte_of(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

/// For each byte, the token SentencePiece falls back to: `<0xNN>`, else the one-byte
/// piece, else the unknown token (where llama.cpp would throw).
fn spm_byte_tokens(vocab: &Vocab, unk: Option<u32>) -> Box<[Option<u32>; 256]> {
    let mut out = Box::new([None; 256]);
    for b in 0..=255u8 {
        out[b as usize] = vocab
            .id(format!("<0x{b:02X}>").as_bytes())
            .or_else(|| vocab.id(&[b]))
            .or(unk);
    }
    out
}

impl Tokenizer {
    /// Builds the tokenizer for a model: `tokenizer.json` next to `model_path` if present,
    /// else the GGUF's vocabulary.
    pub fn load(gguf: &GgufFile, model_path: Option<&Path>) -> Result<Self, ModelError> {
        Tokenizer::build(gguf, model_path).map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    fn build(gguf: &GgufFile, model_path: Option<&Path>) -> Result<Self, TokenizerError> {
        let model_name = gguf.meta_str("tokenizer.ggml.model").unwrap_or("gpt2");
        let kind = match model_name {
            "llama" => VocabKind::Spm,
            "gpt2" => VocabKind::Bpe,
            other => return Err(TokenizerError::UnknownModel(other.to_string())),
        };
        let mut vocab = Vocab::from_gguf(gguf)?;
        let mut ids = NamedIds::from_gguf(gguf, kind, vocab.len());
        let pre = match kind {
            VocabKind::Bpe => Some(pre_tokenize::for_name(
                gguf.meta_str("tokenizer.ggml.pre").unwrap_or("default"),
            )?),
            VocabKind::Spm => None,
        };
        if pre.is_some_and(|p| p.no_bos) {
            ids.bos = None;
        }
        let flag = |key: &str| gguf.meta(key).and_then(|v| v.as_bool());
        let add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(match kind {
            VocabKind::Spm => true,
            VocabKind::Bpe => pre.is_some_and(|p| p.add_bos),
        });
        let add_space_prefix =
            flag("tokenizer.ggml.add_space_prefix").unwrap_or(kind == VocabKind::Spm);
        let stop_tokens = end_of_generation::detect(&mut vocab, &mut ids);

        let beside = model_path
            .and_then(|p| p.parent())
            .map(|d| d.join("tokenizer.json"))
            .filter(|p| p.is_file());
        let model = match (beside, kind, pre) {
            (Some(json), _, _) => Model::Json(TokenizerJson::from_file(&json)?),
            (None, VocabKind::Bpe, Some(pre)) => Model::Bpe(Bpe::from_gguf(gguf, &vocab, &pre)?),
            (None, _, _) => Model::Spm {
                byte_tokens: spm_byte_tokens(&vocab, ids.unk),
                add_space_prefix,
            },
        };
        Ok(Tokenizer {
            specials: SpecialTokens::new(&vocab),
            token_bytes: token_bytes(&vocab, kind),
            strip_leading_space: add_space_prefix && !matches!(model, Model::Json(_)),
            vocab,
            model,
            bos: ids.bos,
            eos: ids.eos,
            stop_tokens,
            add_bos,
        })
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// Tokenizes `text`, special tokens spelled in it included; with `add_special`, a BOS
    /// is prepended when the model wants one.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, ModelError> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            ids.extend(self.bos);
        }
        self.encode_into(text, &mut ids)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(ids)
    }

    fn encode_into(&self, text: &str, ids: &mut Vec<u32>) -> Result<(), TokenizerError> {
        if let Model::Json(json) = &self.model {
            return json.encode(text, ids);
        }
        let fragments = if self.specials.is_empty() {
            vec![Fragment::Text(0..text.len())]
        } else {
            self.specials.partition(text)
        };
        let mut scratch = SpmScratch::default();
        let mut escaped = Vec::new();
        // SentencePiece's space prefix goes at the start and after each special token.
        let mut after_special = true;
        for f in fragments {
            let range = match f {
                Fragment::Token(id) => {
                    ids.push(id);
                    after_special = true;
                    continue;
                }
                Fragment::Text(r) if r.is_empty() => continue,
                Fragment::Text(r) => r,
            };
            match &self.model {
                Model::Spm {
                    byte_tokens,
                    add_space_prefix,
                } => {
                    escaped.clear();
                    if *add_space_prefix && after_special {
                        escaped.extend_from_slice("▁".as_bytes());
                    }
                    for &b in text[range].as_bytes() {
                        match b {
                            b' ' => escaped.extend_from_slice("▁".as_bytes()),
                            _ => escaped.push(b),
                        }
                    }
                    spm::encode(&self.vocab, byte_tokens, &escaped, &mut scratch, ids);
                }
                Model::Bpe(bpe) => bpe.encode(&text[range], ids)?,
                Model::Json(_) => unreachable!("handled above"),
            }
            after_special = false;
        }
        Ok(())
    }

    /// The bytes of one token as generated text (empty for control tokens).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes
            .get(id as usize)
            .map_or(&[], |b| b.as_slice())
    }

    /// Whether `id` renders as nothing in generated text (control and unknown tokens:
    /// BOS, EOS, chat markers).
    pub fn is_control(&self, id: u32) -> bool {
        self.vocab.has(id, attr::CONTROL | attr::UNKNOWN)
    }

    /// Decodes ids to text; control tokens are rendered when `with_special` is set. As
    /// llama.cpp's `detokenize`, the space a SentencePiece vocabulary prefixes is dropped
    /// from the first token.
    pub fn decode(&self, ids: &[u32], with_special: bool) -> String {
        let mut bytes = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let piece = if with_special && self.is_control(id) {
                self.vocab.pieces[id as usize].as_bytes()
            } else {
                self.token_bytes(id)
            };
            let piece = match piece {
                [b' ', rest @ ..] if i == 0 && self.strip_leading_space => rest,
                p => p,
            };
            bytes.extend_from_slice(piece);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests;
