//! A Hugging Face `tokenizer.json` beside the model file, which takes precedence over the
//! GGUF's vocabulary (for models whose GGUF tokenizer is not supported). It splits its own
//! added tokens, so it gets the whole text.

use std::path::Path;

use tokenizers::Tokenizer as HfTokenizer;

use crate::text::tokenizer::error::TokenizerError;

/// A tokenizer loaded from `tokenizer.json`.
pub(crate) struct TokenizerJson {
    inner: HfTokenizer,
}

impl TokenizerJson {
    /// Loads `path`.
    pub(crate) fn from_file(path: &Path) -> Result<TokenizerJson, TokenizerError> {
        let inner = HfTokenizer::from_file(path).map_err(|e| TokenizerError::TokenizerJson {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(TokenizerJson { inner })
    }

    /// Tokenizes `text` onto `out`.
    pub(crate) fn encode(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        out.extend_from_slice(enc.get_ids());
        Ok(())
    }
}
