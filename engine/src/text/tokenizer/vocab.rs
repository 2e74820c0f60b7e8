//! The vocabulary as llama.cpp loads it from GGUF metadata: piece texts, scores, and
//! per-token attributes derived from `tokenizer.ggml.token_type`.

use crate::gguf::GgufFile;
use crate::text::tokenizer::error::TokenizerError;
use crate::text::tokenizer::piece_map::PieceMap;

/// Token attribute bits, as llama.cpp's `llama_token_attr` (a token may hold several:
/// an end-of-turn marker stored as user-defined is also made control).
pub(crate) mod attr {
    pub const UNKNOWN: u32 = 1 << 0;
    pub const UNUSED: u32 = 1 << 1;
    pub const NORMAL: u32 = 1 << 2;
    pub const CONTROL: u32 = 1 << 3;
    pub const USER_DEFINED: u32 = 1 << 4;
    pub const BYTE: u32 = 1 << 5;
}

/// The attribute of a GGUF token type (llama.cpp's `llama_token_type`); 0 for types it
/// does not know, which render as nothing.
fn attr_of_type(ty: u64) -> u32 {
    match ty {
        1 => attr::NORMAL,
        2 => attr::UNKNOWN,
        3 => attr::CONTROL,
        4 => attr::USER_DEFINED,
        5 => attr::UNUSED,
        6 => attr::BYTE,
        _ => 0,
    }
}

/// Pieces, scores and attributes of every token, and the piece → id map.
pub(crate) struct Vocab {
    pub pieces: Vec<String>,
    /// SentencePiece merge priorities (higher merges first); 0 where the GGUF has none.
    pub scores: Vec<f32>,
    pub attrs: Vec<u32>,
    map: PieceMap,
}

impl Vocab {
    /// Builds a vocabulary from its parts (tests and GGUF loading).
    pub(crate) fn new(
        mut pieces: Vec<String>,
        scores: Vec<f32>,
        attrs: Vec<u32>,
    ) -> Result<Vocab, TokenizerError> {
        // llama.cpp renames empty pieces so that each one stays addressable.
        for (i, p) in pieces.iter_mut().enumerate() {
            if p.is_empty() {
                *p = format!("[EMPTY_{i}]");
            }
        }
        let map =
            PieceMap::build(&pieces).map_err(|(first, second)| TokenizerError::DuplicateToken {
                text: pieces[second as usize].clone(),
                first,
                second,
            })?;
        Ok(Vocab {
            pieces,
            scores,
            attrs,
            map,
        })
    }

    /// Reads `tokenizer.ggml.tokens`, `.scores` and `.token_type`.
    pub(crate) fn from_gguf(gguf: &GgufFile) -> Result<Vocab, TokenizerError> {
        const TOKENS: &str = "tokenizer.ggml.tokens";
        let pieces: Vec<String> = gguf
            .meta(TOKENS)
            .and_then(|v| v.as_array())
            .ok_or(TokenizerError::MissingKey(TOKENS))?
            .iter()
            .map(|t| t.as_str().unwrap_or_default().to_string())
            .collect();
        let n = pieces.len();
        let array = |key: &'static str| -> Result<Option<Vec<_>>, TokenizerError> {
            match gguf.meta(key).and_then(|v| v.as_array()) {
                None => Ok(None),
                Some(a) if a.len() < n => Err(TokenizerError::ShortArray {
                    key,
                    got: a.len(),
                    tokens: n,
                }),
                Some(a) => Ok(Some(a[..n].to_vec())),
            }
        };
        let scores = match array("tokenizer.ggml.scores")? {
            // `+ 0.0` turns -0.0 into 0.0: llama.cpp compares scores with `<`, for which
            // the two are equal, and the merge queue orders with a total order.
            Some(a) => a
                .iter()
                .map(|s| s.as_f64().unwrap_or(0.0) as f32 + 0.0)
                .collect(),
            None => vec![0.0; n],
        };
        let attrs = match array("tokenizer.ggml.token_type")? {
            Some(a) => a
                .iter()
                .map(|t| attr_of_type(t.as_u64().unwrap_or(0)))
                .collect(),
            None => vec![attr::NORMAL; n],
        };
        Vocab::new(pieces, scores, attrs)
    }

    /// Number of tokens.
    pub(crate) fn len(&self) -> usize {
        self.pieces.len()
    }

    /// The token whose piece is exactly `bytes`.
    #[inline]
    pub(crate) fn id(&self, bytes: &[u8]) -> Option<u32> {
        self.map.get(&self.pieces, bytes)
    }

    /// Whether token `id` has any of the attribute bits in `mask`.
    #[inline]
    pub(crate) fn has(&self, id: u32, mask: u32) -> bool {
        self.attrs.get(id as usize).is_some_and(|a| a & mask != 0)
    }
}
