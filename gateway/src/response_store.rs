//! Stored Responses-API responses (`store: true`, the default): what
//! `previous_response_id` continues and `GET /v1/responses/{id}` returns.
//!
//! Kept in memory, bounded by bytes: when a new response would exceed the budget, the
//! oldest are dropped first (a `previous_response_id` naming one then gets a 404, as for
//! an unknown id). A response is visible only to the key that created it. A restart
//! forgets them all.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde_json::Value;

use crate::api_types::InMessage;

/// One stored response.
#[derive(Clone)]
pub struct StoredResponse {
    /// The key that created it (by name): the only one that may read or continue it.
    pub key: String,
    /// The response object, as returned.
    pub response: Value,
    /// The conversation up to and including this response's output, as chat messages
    /// (without `instructions`, which OpenAI does not carry over).
    pub conversation: Vec<InMessage>,
    bytes: usize,
}

impl StoredResponse {
    /// A response and the conversation it ends.
    pub fn new(key: &str, response: Value, conversation: Vec<InMessage>) -> Self {
        let text = |m: &InMessage| {
            m.content.as_ref().map_or(0, |c| c.to_string().len())
                + m.tool_calls
                    .as_ref()
                    .map_or(0, |c| c.iter().map(|v| v.to_string().len()).sum())
        };
        let bytes = response.to_string().len() + conversation.iter().map(text).sum::<usize>();
        StoredResponse {
            key: key.to_string(),
            response,
            conversation,
            bytes,
        }
    }
}

/// The store: at most `budget` bytes of responses.
pub struct ResponseStore {
    inner: Mutex<Inner>,
    budget: usize,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<String, StoredResponse>,
    /// Ids, oldest first.
    order: VecDeque<String>,
    bytes: usize,
}

impl ResponseStore {
    /// A store holding at most `budget` bytes.
    pub fn new(budget: usize) -> Self {
        ResponseStore {
            inner: Mutex::new(Inner::default()),
            budget,
        }
    }

    /// Stores `r` under `id`, dropping the oldest responses beyond the budget; one
    /// larger than the whole budget is not stored.
    pub fn put(&self, id: String, r: StoredResponse) {
        if r.bytes > self.budget {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        while g.bytes + r.bytes > self.budget {
            let Some(old) = g.order.pop_front() else {
                break;
            };
            if let Some(o) = g.by_id.remove(&old) {
                g.bytes -= o.bytes;
            }
        }
        g.bytes += r.bytes;
        g.order.push_back(id.clone());
        if let Some(prev) = g.by_id.insert(id, r) {
            g.bytes -= prev.bytes;
        }
    }

    /// The response `id`, if stored and created by `key`.
    pub fn get(&self, id: &str, key: &str) -> Option<StoredResponse> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.by_id.get(id).filter(|r| r.key == key).cloned()
    }

    /// Deletes the response `id` when `key` created it; whether it did.
    pub fn delete(&self, id: &str, key: &str) -> bool {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.by_id.get(id).is_none_or(|r| r.key != key) {
            return false;
        }
        if let Some(r) = g.by_id.remove(id) {
            g.bytes -= r.bytes;
        }
        g.order.retain(|x| x != id);
        true
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn r(key: &str, size: usize) -> StoredResponse {
        StoredResponse::new(key, json!({"text": "x".repeat(size)}), Vec::new())
    }

    #[test]
    fn the_oldest_go_first_and_keys_see_only_their_own() {
        let s = ResponseStore::new(1000);
        s.put("a".into(), r("k1", 300));
        s.put("b".into(), r("k2", 300));
        s.put("c".into(), r("k1", 300));
        assert!(s.get("a", "k1").is_some());
        assert!(s.get("b", "k1").is_none(), "another key's response");
        s.put("d".into(), r("k1", 300));
        assert!(s.get("a", "k1").is_none(), "evicted, oldest first");
        assert!(s.get("b", "k2").is_some() && s.get("d", "k1").is_some());
        assert!(!s.delete("b", "k1"));
        assert!(s.delete("b", "k2"));
        assert!(s.get("b", "k2").is_none());
        s.put("huge".into(), r("k1", 5000));
        assert!(s.get("huge", "k1").is_none(), "larger than the budget");
        assert!(s.get("c", "k1").is_some(), "and nothing evicted for it");
    }
}
