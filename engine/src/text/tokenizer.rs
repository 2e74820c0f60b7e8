//! The tokenizer, built with the `tokenizers` crate from the GGUF's own vocabulary and
//! merges (or from a `tokenizer.json` beside the model, which takes precedence).
//!
//! Pre-tokenization follows `tokenizer.ggml.pre` with the same regular expressions
//! llama.cpp uses, so prompts get the same ids as llama-server gives them.

use std::collections::HashMap;
use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer as HfTokenizer};

use crate::error::ModelError;
use crate::gguf::GgufFile;

/// GPT-2's split pattern, llama.cpp's default for byte-level BPE.
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

/// Text ↔ token ids for one model.
pub struct Tokenizer {
    inner: HfTokenizer,
    /// The bytes each token stands for (empty for control tokens), for streaming output.
    token_bytes: Vec<Vec<u8>>,
    is_control: Vec<bool>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Tokens that end generation: EOS, EOT and the chat template's end-of-turn.
    pub stop_tokens: Vec<u32>,
    /// Whether a BOS token is prepended when special tokens are added.
    pub add_bos: bool,
}

/// Pre-tokenizer split rules for a `tokenizer.ggml.pre` value.
fn pre_tokenizer_for(pre: &str) -> Result<PreTokenizerWrapper, ModelError> {
    let split = |pattern: &str| -> Result<PreTokenizerWrapper, ModelError> {
        let s = Split::new(
            SplitPattern::Regex(pattern.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| ModelError::Tokenizer(format!("pre-tokenizer regex: {e}")))?;
        Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            s.into(),
            ByteLevel::new(false, false, false).into(),
        ])))
    };
    match pre {
        // llama.cpp splits every digit first, then applies the GPT-2 pattern.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, false, true).into()])))
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => split(LLAMA3_PATTERN),
        "qwen2" | "deepseek-r1-qwen" => split(QWEN2_PATTERN),
        "default" | "gpt2" | "gpt-2" | "" => split(GPT2_PATTERN),
        other => Err(ModelError::Tokenizer(format!(
            "pre-tokenizer {other:?} is not supported (supported: smollm, llama-bpe, qwen2, gpt2 and their aliases)"
        ))),
    }
}

/// GPT-2's reversible byte ↔ printable-char mapping, reversed.
fn byte_level_decode_map() -> HashMap<char, u8> {
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

impl Tokenizer {
    /// Builds the tokenizer for a model: `tokenizer.json` next to `model_path` if present,
    /// else the GGUF's vocabulary.
    pub fn load(gguf: &GgufFile, model_path: Option<&Path>) -> Result<Self, ModelError> {
        let tokens: Vec<String> = gguf
            .meta("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .ok_or_else(|| ModelError::Tokenizer("the GGUF has no tokenizer.ggml.tokens".into()))?
            .iter()
            .map(|t| t.as_str().unwrap_or_default().to_string())
            .collect();
        let types: Vec<u64> = gguf
            .meta("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().map(|t| t.as_u64().unwrap_or(1)).collect())
            .unwrap_or_else(|| vec![1; tokens.len()]);
        let id = |k: &str| {
            gguf.meta(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as u32)
                .filter(|&v| (v as usize) < tokens.len())
        };
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let eot = id("tokenizer.ggml.eot_token_id");
        let add_bos = gguf
            .meta("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);

        let beside = model_path
            .and_then(|p| p.parent())
            .map(|d| d.join("tokenizer.json"))
            .filter(|p| p.is_file());
        let inner = match beside {
            Some(json) => HfTokenizer::from_file(&json)
                .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", json.display())))?,
            None => Self::from_gguf_vocab(gguf, &tokens, &types)?,
        };

        let map = byte_level_decode_map();
        let is_control: Vec<bool> = types.iter().map(|&t| t == TOKEN_TYPE_CONTROL).collect();
        let token_bytes = tokens
            .iter()
            .zip(&types)
            .map(|(t, &ty)| match ty {
                TOKEN_TYPE_CONTROL => Vec::new(),
                TOKEN_TYPE_USER_DEFINED => t.as_bytes().to_vec(),
                _ => t
                    .chars()
                    .flat_map(|c| {
                        map.get(&c)
                            .copied()
                            .map_or_else(|| c.to_string().into_bytes(), |b| vec![b])
                    })
                    .collect(),
            })
            .collect();

        // End-of-turn markers llama.cpp also treats as end of generation.
        let mut stop_tokens: Vec<u32> = [eos, eot].into_iter().flatten().collect();
        for (i, t) in tokens.iter().enumerate() {
            if is_control[i]
                && matches!(
                    t.as_str(),
                    "<|im_end|>" | "<|eot_id|>" | "<|end|>" | "<end_of_turn>" | "<|endoftext|>"
                )
            {
                stop_tokens.push(i as u32);
            }
        }
        stop_tokens.sort_unstable();
        stop_tokens.dedup();
        Ok(Tokenizer {
            inner,
            token_bytes,
            is_control,
            bos,
            eos,
            stop_tokens,
            add_bos,
        })
    }

    fn from_gguf_vocab(
        gguf: &GgufFile,
        tokens: &[String],
        types: &[u64],
    ) -> Result<HfTokenizer, ModelError> {
        let model = gguf.meta_str("tokenizer.ggml.model").unwrap_or("gpt2");
        if model != "gpt2" {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer model {model:?} is not supported from GGUF metadata (only gpt2-style BPE); put the model's tokenizer.json beside the GGUF file"
            )));
        }
        let merges: Vec<(String, String)> = gguf
            .meta("tokenizer.ggml.merges")
            .and_then(|v| v.as_array())
            .ok_or_else(|| ModelError::Tokenizer("the GGUF has no tokenizer.ggml.merges".into()))?
            .iter()
            .filter_map(|m| m.as_str())
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok((a.to_string(), b.to_string())),
                None => Err(ModelError::Tokenizer(format!("malformed merge {m:?}"))),
            })
            .collect::<Result<_, _>>()?;
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| ModelError::Tokenizer(format!("building BPE: {e}")))?;
        let mut tk = HfTokenizer::new(bpe);
        let pre = gguf.meta_str("tokenizer.ggml.pre").unwrap_or("default");
        tk.with_pre_tokenizer(Some(pre_tokenizer_for(pre)?));
        tk.with_decoder(Some(ByteLevelDecoder::default()));
        // Control and user-defined tokens are matched whole in the text, as llama.cpp
        // does when it parses special tokens in prompts.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(types)
            .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED)
            .map(|(t, &ty)| AddedToken::from(t.clone(), ty == TOKEN_TYPE_CONTROL).normalized(false))
            .collect();
        tk.add_special_tokens(&specials);
        Ok(tk)
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// Tokenizes `text`; with `add_special`, a BOS is prepended when the model wants one.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.get_ids().len() + 1);
        if add_special && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The bytes of one token as generated text (empty for control tokens).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes
            .get(id as usize)
            .map_or(&[], |b| b.as_slice())
    }

    /// Whether `id` is a control token (BOS, EOS, chat markers).
    pub fn is_control(&self, id: u32) -> bool {
        self.is_control.get(id as usize).copied().unwrap_or(false)
    }

    /// Decodes ids to text; control tokens are rendered when `with_special` is set.
    pub fn decode(&self, ids: &[u32], with_special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            if with_special && self.is_control(id) {
                bytes.extend_from_slice(self.inner.id_to_token(id).unwrap_or_default().as_bytes());
            } else {
                bytes.extend_from_slice(self.token_bytes(id));
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
