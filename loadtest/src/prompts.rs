//! Prompts: a built-in set, or a JSONL file of `{"prompt": "..."}` (or `{"messages": ...}`
//! reduced to its last user message, or plain strings).

use std::path::Path;

/// Everyday chat prompts of varied length.
pub fn builtin_prompts() -> Vec<String> {
    [
        "Write a short story about a robot who learns to paint.",
        "Explain how a bicycle stays upright.",
        "List five facts about the moon.",
        "What is the capital of France, and why is it famous?",
        "Describe a rainy day in a small village.",
        "Give me three tips for learning to cook.",
        "Why is the sky blue?",
        "Tell me about the history of the printing press.",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

/// Reads prompts from a JSONL file.
pub fn load_prompts(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| format!("{}:{}: not JSON: {e}", path.display(), i + 1))?;
        let p = match &v {
            serde_json::Value::String(s) => Some(s.clone()),
            _ => v["prompt"].as_str().map(String::from).or_else(|| {
                v["messages"].as_array().and_then(|m| {
                    m.iter()
                        .rev()
                        .find(|m| m["role"] == "user")
                        .and_then(|m| m["content"].as_str())
                        .map(String::from)
                })
            }),
        };
        out.push(p.ok_or_else(|| {
            format!(
                "{}:{}: expected a string, {{\"prompt\"}} or {{\"messages\"}}",
                path.display(),
                i + 1
            )
        })?);
    }
    if out.is_empty() {
        return Err(format!("{}: no prompts", path.display()));
    }
    Ok(out)
}
