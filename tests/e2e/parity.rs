//! Parity with llama.cpp on the same GGUF, in-process: token ids for hard strings, prompt
//! token counts through the chat template, and greedy continuations.

use std::sync::{Arc, OnceLock};

use serde_json::Value;
use sluice_engine::chat_template::{ChatMessage, ChatTemplate};
use sluice_engine::model::Model;
use sluice_engine::sampling::SamplingParams;
use sluice_engine::thread_pool::ThreadPool;
use sluice_engine::tokenizer::Tokenizer;
use sluice_engine::{Engine, EngineConfig, Event, GenerationRequest};

use crate::support::{fixtures, model_path};

/// Characters of greedy output that must equal llama.cpp's.
const PREFIX_CHARS: usize = 48;

struct Loaded {
    engine: Engine,
    tokenizer: Arc<Tokenizer>,
    template: ChatTemplate,
}

fn loaded() -> &'static Loaded {
    static L: OnceLock<Loaded> = OnceLock::new();
    L.get_or_init(|| {
        let path = model_path();
        let pool = Arc::new(ThreadPool::new(2).expect("compute threads"));
        let model = Model::load(&path, pool).expect("model");
        let tokenizer = Arc::new(Tokenizer::load(&model.file, Some(&path)).expect("tokenizer"));
        let src = model
            .file
            .meta_str("tokenizer.chat_template")
            .expect("template")
            .to_string();
        let template =
            ChatTemplate::new(&src, "<|im_start|>", "<|im_end|>").expect("template compiles");
        let engine = Engine::start(model, tokenizer.clone(), EngineConfig::default())
            .expect("engine starts");
        Loaded {
            engine,
            tokenizer,
            template,
        }
    })
}

fn messages(v: &Value) -> Vec<ChatMessage> {
    v.as_array()
        .expect("messages")
        .iter()
        .map(|m| ChatMessage {
            role: m["role"].as_str().unwrap().into(),
            content: m["content"].as_str().unwrap().into(),
        })
        .collect()
}

/// Submits every prompt at once (they run batched) and collects the greedy output as
/// one text piece per token.
fn greedy_all(prompts: Vec<Vec<u32>>, max_tokens: usize) -> Vec<Vec<String>> {
    let l = loaded();
    let mut streams: Vec<_> = prompts
        .into_iter()
        .map(|p| {
            let req = GenerationRequest {
                prompt: p,
                max_tokens,
                sampling: SamplingParams {
                    temperature: 0.0,
                    ..Default::default()
                },
                ..Default::default()
            };
            l.engine.submit(req).expect("submit")
        })
        .collect();
    streams
        .iter_mut()
        .map(|s| {
            let mut pieces = Vec::new();
            while let Some(ev) = s.blocking_recv() {
                match ev {
                    Event::Token { text, .. } => pieces.push(text),
                    Event::Done { .. } => break,
                }
            }
            pieces
        })
        .collect()
}

fn common_prefix_chars(a: &str, b: &str) -> usize {
    a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count()
}

/// Whether `ours` agrees with llama.cpp's `theirs` for the first PREFIX_CHARS characters
/// (or entirely, when llama.cpp's answer is shorter).
fn agrees(ours: &str, theirs: &str) -> bool {
    let n = common_prefix_chars(ours, theirs);
    n >= PREFIX_CHARS || (n == theirs.chars().count() && n == ours.chars().count())
}

#[test]
fn tokenizer_matches_llama_cpp_on_hard_strings() {
    let l = loaded();
    let f = fixtures();
    let cases = f["tokenize"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = l.tokenizer.encode(text, false).unwrap();
        assert_eq!(got, want, "token ids differ for {text:?}");
        // And back: decoding gives the text again.
        assert_eq!(l.tokenizer.decode(&got, true), text);
    }
}

#[test]
fn chat_prompts_and_greedy_text_match_llama_cpp() {
    let l = loaded();
    let f = fixtures();
    let chats = f["chat"].as_array().unwrap();
    let max_tokens = f["max_tokens"].as_u64().unwrap() as usize;
    let mut prompts = Vec::new();
    for c in chats {
        let text = l.template.render(&messages(&c["messages"]), true).unwrap();
        let ids = l.tokenizer.encode(&text, false).unwrap();
        assert_eq!(
            ids.len() as u64,
            c["prompt_tokens"].as_u64().unwrap(),
            "prompt_tokens differ for {:?}",
            c["messages"]
        );
        prompts.push(ids);
    }
    let outs = greedy_all(prompts, max_tokens);
    let mut agreeing = 0;
    for (c, pieces) in chats.iter().zip(&outs) {
        let ours: String = pieces.concat();
        let theirs = c["text"].as_str().unwrap();
        let n = common_prefix_chars(&ours, theirs);
        println!(
            "{:>3} chars agree | ours: {:?}\n                 | llama.cpp: {:?}",
            n,
            truncate(&ours),
            truncate(theirs)
        );
        if agrees(&ours, theirs) {
            agreeing += 1;
            continue;
        }
        // Where we part ways, llama.cpp itself must have been nearly undecided between
        // its token and ours: a near-tie, not a numerical error in our forward pass.
        let margin = divergence_margin(pieces, &c["top_logprobs"], n);
        println!("                 | diverges at a {margin:.4}-nat margin in llama.cpp's logprobs");
        assert!(
            margin < MAX_TIE_MARGIN,
            "diverged from llama.cpp at a clear choice ({margin:.3} nats) for {}",
            c["messages"]
        );
    }
    assert!(
        agreeing * 2 >= chats.len(),
        "only {agreeing} of {} chats agree for {PREFIX_CHARS} chars",
        chats.len()
    );
}

/// Largest logprob gap (nats) between llama.cpp's pick and ours that still counts as a tie.
const MAX_TIE_MARGIN: f64 = 0.15;

/// llama.cpp's logprob margin of its token over ours at the first token whose text differs.
fn divergence_margin(pieces: &[String], top: &Value, agree_chars: usize) -> f64 {
    let mut seen = 0;
    for (i, p) in pieces.iter().enumerate() {
        seen += p.chars().count();
        if seen > agree_chars {
            let cands = top[i]
                .as_array()
                .expect("fixture has top_logprobs for every token");
            let best = cands[0]["logprob"].as_f64().unwrap();
            let ours = cands
                .iter()
                .find(|c| c["token"].as_str() == Some(p.as_str()))
                .or(cands.last());
            return best - ours.unwrap()["logprob"].as_f64().unwrap();
        }
    }
    f64::INFINITY
}

#[test]
fn plain_completions_match_llama_cpp() {
    let l = loaded();
    let f = fixtures();
    let cases = f["completions"].as_array().unwrap();
    let max_tokens = f["max_tokens"].as_u64().unwrap() as usize;
    let prompts: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| {
            l.tokenizer
                .encode(c["prompt"].as_str().unwrap(), true)
                .unwrap()
        })
        .collect();
    for (p, c) in prompts.iter().zip(cases) {
        assert_eq!(p.len() as u64, c["prompt_tokens"].as_u64().unwrap());
    }
    let outs = greedy_all(prompts, max_tokens);
    let mut misses = Vec::new();
    for (c, pieces) in cases.iter().zip(&outs) {
        let ours = pieces.concat();
        let theirs = c["text"].as_str().unwrap();
        println!(
            "{:>3} chars agree | {:?}",
            common_prefix_chars(&ours, theirs),
            truncate(&ours)
        );
        if !agrees(&ours, theirs) {
            misses.push(c["prompt"].to_string());
        }
    }
    assert!(misses.len() <= 1, "completions diverged early: {misses:?}");
}

fn truncate(s: &str) -> String {
    s.chars().take(70).collect()
}
