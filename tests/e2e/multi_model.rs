//! Two models served by one process: one compute budget (`--threads` in all), both
//! streaming at once and both progressing, engine metrics kept apart by `model` label,
//! and nothing spinning once they are idle.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::support::{metric_sum, Server};

const KEY: &str = "Bearer sk-sluice-dev";

/// Streams a completion from `model`; returns when each piece of text arrived.
async fn stream_times(server: &Server, model: &str, max_tokens: usize) -> Vec<Instant> {
    let resp = Server::client()
        .post(format!("{}/v1/completions", server.base))
        .header("Authorization", KEY)
        .json(
            &json!({"model": model, "prompt": "The history of the harbour town begins",
                      "max_tokens": max_tokens, "ignore_eos": true, "temperature": 0,
                      "stream": true}),
        )
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let (mut buf, mut times) = (String::new(), Vec::new());
    while let Some(chunk) = body.next().await {
        buf.push_str(std::str::from_utf8(&chunk.expect("body")).expect("utf-8"));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).expect("event JSON");
            if v["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
            {
                times.push(Instant::now());
            }
        }
    }
    times
}

/// Threads of process `pid` whose name starts with `prefix`.
fn threads_named(pid: u32, prefix: &str) -> Option<usize> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with(prefix))
            .count(),
    )
}

/// User plus system CPU ticks of process `pid` so far.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

#[tokio::test]
async fn two_models_share_the_threads_both_progress_and_report_apart() {
    let server = Server::with_config(
        "[engine]\nthreads = 2\nkv_cache_tokens = 2048\n\n\
         [[models]]\nname = \"a\"\npath = \"{model}\"\n\n\
         [[models]]\nname = \"b\"\npath = \"{model}\"\n",
        &[],
    );
    // One pool for the process: with 2 threads, one worker (the engine thread that holds
    // the pool is the other), not one per model.
    match threads_named(server.pid(), "sluice-compute") {
        Some(n) => assert_eq!(n, 1, "compute workers for two models on 2 threads"),
        None => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED two_models_share_the_threads (thread count part): no /proc here"
            );
        }
    }

    // Both stream at once, and each gets a fair share of the steps while the other runs.
    // Measured over the time both were streaming (from the later first piece to the
    // earlier last one), so a request that reached its engine late does not count
    // against fairness; long enough streams that the two overlap on any machine.
    let n = 128;
    let (a, b) = tokio::join!(stream_times(&server, "a", n), stream_times(&server, "b", n));
    assert!(
        a.len() >= n - 2 && b.len() >= n - 2,
        "{} and {} pieces",
        a.len(),
        b.len()
    );
    let from = a[0].max(b[0]);
    let to = (*a.last().unwrap()).min(*b.last().unwrap());
    let within = |t: &[std::time::Instant]| t.iter().filter(|&&x| x >= from && x <= to).count();
    let (a_in, b_in) = (within(&a), within(&b));
    assert!(
        a_in + b_in >= n / 2,
        "the two streams hardly overlapped ({a_in} + {b_in} pieces): one model waited for the other"
    );
    assert!(
        a_in * 4 >= a_in + b_in && b_in * 4 >= a_in + b_in,
        "while both streamed, a got {a_in} pieces and b {b_in}: one model starved the other"
    );

    // An n = 4 completion over a 710-token prompt on "a" computes the prompt about once;
    // the work shows in a's series only.
    server.wait_until_idle().await;
    let before = server.metrics().await;
    let steps = |m: &str, model| metric_sum(m, "sluice_step_tokens_sum", &[("model", model)]);
    let prompt: Vec<u32> = (0..710).map(|i| 1000 + (i * 37) % 20_000).collect();
    let resp = Server::client()
        .post(format!("{}/v1/completions", server.base))
        .header("Authorization", KEY)
        .json(
            &json!({"model": "a", "prompt": prompt, "n": 4, "max_tokens": 4,
                      "ignore_eos": true, "temperature": 0}),
        )
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let texts: Vec<&str> = (0..4)
        .map(|i| v["choices"][i]["text"].as_str().unwrap())
        .collect();
    assert!(texts.iter().all(|t| *t == texts[0]), "{texts:?}");
    let after = server.metrics().await;
    let computed = steps(&after, "a").unwrap() - steps(&before, "a").unwrap();
    // The prompt once (plus the last partial block of the three others) and 3 decodes each.
    assert!(
        computed <= 1.1 * 710.0 + 4.0 * 3.0,
        "computed {computed} tokens for n = 4 over a 710-token prompt"
    );
    assert_eq!(steps(&after, "b"), steps(&before, "b"));

    // Every engine series is per model.
    for model in ["a", "b"] {
        let m = [("model", model)];
        let count = |name| metric_sum(&after, name, &m);
        let want = if model == "a" { n + 4 * 4 } else { n };
        assert_eq!(
            count("sluice_generation_tokens_total"),
            Some(want as f64),
            "{model}"
        );
        let length = [("model", model), ("reason", "length")];
        let finished = metric_sum(&after, "sluice_requests_finished_total", &length);
        assert_eq!(finished, Some(if model == "a" { 5.0 } else { 1.0 }));
        for name in [
            "sluice_requests_running",
            "sluice_requests_waiting",
            "sluice_kv_cache_usage_ratio",
            "sluice_kv_cache_touched_bytes",
            "sluice_prefix_cache_hit_ratio",
            "sluice_step_duration_seconds_count",
            "sluice_request_queue_seconds_count",
            "sluice_prompt_tokens_total",
        ] {
            assert!(count(name).is_some(), "no {name} for {model}:\n{after}");
        }
        // vLLM's names for the same gauges, labelled as vLLM labels them, for routers
        // written for vLLM; they agree with ours.
        let vllm = [("model_name", model)];
        for (ours, theirs) in [
            ("sluice_requests_running", "vllm:num_requests_running"),
            ("sluice_requests_waiting", "vllm:num_requests_waiting"),
            ("sluice_kv_cache_usage_ratio", "vllm:kv_cache_usage_perc"),
        ] {
            let v = metric_sum(&after, theirs, &vllm);
            assert!(
                v.is_some() && v == count(ours),
                "{theirs} for {model}:\n{after}"
            );
        }
        let info = metric_sum(&after, "vllm:cache_config_info", &vllm);
        assert_eq!(info, Some(1.0), "vllm:cache_config_info for {model}");
    }
    assert!(
        !after
            .lines()
            .any(|l| l.starts_with("sluice_requests_running ")),
        "an unlabelled engine series:\n{after}"
    );

    // Idle, the process uses no CPU: the compute threads and both engine loops sleep.
    server.wait_until_idle().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    match cpu_ticks(server.pid()) {
        Some(t0) => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let used = cpu_ticks(server.pid()).unwrap() - t0;
            assert!(
                used <= 5,
                "an idle server used {used} ticks of CPU in a second"
            );
        }
        None => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED two_models_share_the_threads (idle CPU part): no /proc here"
            );
        }
    }
}
