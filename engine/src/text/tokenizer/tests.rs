//! The tokenizer end to end on tiny GGUF vocabularies.

use super::test_vocab::gemma_like;
use super::*;
use crate::gguf::MetaValue;

fn gemma() -> Tokenizer {
    Tokenizer::load(&gemma_like(&[]), None).unwrap()
}

#[test]
fn chat_markers_spelled_in_text_become_their_tokens() {
    let t = gemma();
    let ids = t
        .encode("<start_of_turn>user\nhi<end_of_turn>", false)
        .unwrap();
    // user, "\n" (user-defined, split out like a special token), "hi" (no space prefix).
    assert_eq!(ids, vec![4, 19, 6, 11, 5]);
    assert_eq!(t.decode(&ids, true), "<start_of_turn>user\nhi<end_of_turn>");
    assert_eq!(t.decode(&ids, false), "user\nhi");
}

#[test]
fn spaces_become_the_metaspace_and_merge_by_score() {
    let t = gemma();
    // " hi": ▁ + h + i; "hi" (-4) outscores "▁h" (absent), then "▁hi" (-5) merges.
    assert_eq!(t.encode(" hi", false).unwrap(), vec![12]);
    // Two spaces: "hi" (-4) then "▁hi" (-5) merge before "▁▁" (-13) could.
    assert_eq!(t.encode("  hi", false).unwrap(), vec![8, 12]);
}

#[test]
fn characters_without_a_piece_fall_back_to_bytes_and_decode_back() {
    let t = gemma();
    let text = "hé 世界 👋🏽\n\n\nhi";
    let ids = t.encode(text, false).unwrap();
    let byte = |b: u8| 22 + b as u32;
    let cjk = "世".as_bytes();
    assert!(ids
        .windows(3)
        .any(|w| w == [byte(cjk[0]), byte(cjk[1]), byte(cjk[2])]));
    assert!(ids.contains(&21), "é has its own piece");
    assert_eq!(t.decode(&ids, false), text);
}

#[test]
fn bos_is_added_by_default_and_end_of_turn_stops_generation() {
    let t = gemma();
    assert!(
        t.add_bos,
        "SentencePiece adds BOS unless the GGUF says not to"
    );
    assert_eq!(t.encode("hi", true).unwrap(), vec![2, 11]);
    assert_eq!(t.stop_tokens, vec![1, 5], "<eos> and <end_of_turn>");
    assert!(t.is_control(5) && !t.is_control(6));
    assert_eq!(t.token_bytes(12), b" hi");
    assert_eq!(t.token_bytes(22 + 0xE4), &[0xE4]);
}

#[test]
fn llama2_style_space_prefix_goes_first_and_after_special_tokens_and_decodes_away() {
    let t = Tokenizer::load(
        &gemma_like(&[("tokenizer.ggml.add_space_prefix", MetaValue::Bool(true))]),
        None,
    )
    .unwrap();
    assert_eq!(t.encode("hi", false).unwrap(), vec![12]);
    assert_eq!(
        t.encode("hi<end_of_turn>hi", false).unwrap(),
        vec![12, 5, 12]
    );
    assert_eq!(t.decode(&[12, 5, 12], false), "hi hi");
}

#[test]
fn an_unknown_tokenizer_model_is_named_with_what_is_supported() {
    let file = gemma_like(&[("tokenizer.ggml.model", MetaValue::Str("t5".into()))]);
    let e = Tokenizer::load(&file, None).err().unwrap().to_string();
    assert!(
        e.contains("\"t5\"") && e.contains("llama") && e.contains("gpt2"),
        "{e}"
    );
    let file = gemma_like(&[
        ("tokenizer.ggml.model", MetaValue::Str("gpt2".into())),
        ("tokenizer.ggml.pre", MetaValue::Str("wordpiece-ish".into())),
        ("tokenizer.ggml.merges", MetaValue::Array(Vec::new())),
    ]);
    let e = Tokenizer::load(&file, None).err().unwrap().to_string();
    assert!(
        e.contains("\"wordpiece-ish\"") && e.contains("smollm"),
        "{e}"
    );
    assert!(!e.contains('\n'), "one line: {e}");
}
