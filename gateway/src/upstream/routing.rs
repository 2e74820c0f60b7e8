//! Which replica a request goes to: healthy ones first, least loaded, and, for long
//! prompts, the replica their prefix hashes to (its prefix cache likely holds it) as long
//! as that costs little balance.
//!
//! The policy, for the replicas serving the request's model:
//! 1. Candidates are the healthy replicas (all of them when none is healthy: the health
//!    view may be stale, and trying costs a connection attempt).
//! 2. A replica's load is the gateway's own requests in flight on it plus the others it
//!    reported running or waiting at its last health check.
//! 3. A prompt of at least `affinity_prefix_bytes` bytes (chat: the messages' roles and
//!    text in order; completions: the prompt) has an affine replica: the highest
//!    rendezvous score of a hash of its first `affinity_prefix_bytes` bytes and the
//!    replica's URL, so prompts sharing that prefix pick the same replica while the set
//!    of replicas is the same, and only the keys of a removed replica move.
//! 4. The affine replica is taken while its load is at most the least load plus
//!    `affinity_slack`; otherwise (and without affinity) a least-loaded replica, ties
//!    taken in turn. Affinity never outweighs balance by more than the slack.
//! 5. The rest follow, least loaded first, unhealthy ones last: the failover order.

use serde_json::Value;

/// What the choice needs to know of a replica.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub load: u64,
    pub healthy: bool,
    /// Its identity for rendezvous hashing (a hash of its URL).
    pub id: u64,
}

/// 64-bit FNV-1a: stable across processes and builds, so every gateway maps a prefix to
/// the same replica.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// splitmix64's finalizer: spreads a combined key over all 64 bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The candidates' indices in the order to try them (see the module's policy).
/// `affinity` is the prompt's prefix hash, if it has one; `turn` breaks ties in turn.
pub fn order(cands: &[Candidate], affinity: Option<u64>, slack: u64, turn: usize) -> Vec<usize> {
    let any_healthy = cands.iter().any(|c| c.healthy);
    let eligible = |c: &Candidate| c.healthy || !any_healthy;
    let mut rest: Vec<usize> = (0..cands.len()).collect();
    // Eligible first, then least loaded; a stable sort keeps configuration order on ties.
    rest.sort_by_key(|&i| (!eligible(&cands[i]), cands[i].load));
    let Some(&first) = rest.first() else {
        return rest;
    };
    if !eligible(&cands[first]) {
        return rest;
    }
    let least = cands[first].load;
    let affine = affinity.and_then(|key| {
        rest.iter()
            .copied()
            .filter(|&i| eligible(&cands[i]))
            .max_by_key(|&i| mix(key ^ cands[i].id))
    });
    let pick = match affine {
        Some(a) if cands[a].load <= least + slack => a,
        _ => {
            let tied: Vec<usize> = rest
                .iter()
                .copied()
                .take_while(|&i| eligible(&cands[i]) && cands[i].load == least)
                .collect();
            tied[turn % tied.len()]
        }
    };
    // `pick` came from `rest`, so it is found; moved to the front.
    if let Some(at) = rest.iter().position(|&i| i == pick) {
        rest.remove(at);
        rest.insert(0, pick);
    }
    rest
}

/// The prompt's bytes as routing sees them: each chat message's role and text (string
/// content or text parts), or the completion prompt's strings.
fn prompt_pieces(request: &Value) -> Vec<&str> {
    let mut out = Vec::new();
    if let Some(messages) = request.get("messages").and_then(Value::as_array) {
        for m in messages {
            if let Some(r) = m.get("role").and_then(Value::as_str) {
                out.push(r);
            }
            match m.get("content") {
                Some(Value::String(s)) => out.push(s),
                Some(Value::Array(parts)) => out.extend(
                    parts
                        .iter()
                        .filter_map(|p| p.get("text").and_then(Value::as_str)),
                ),
                _ => {}
            }
        }
    } else {
        match request.get("prompt") {
            Some(Value::String(s)) => out.push(s),
            Some(Value::Array(items)) => out.extend(items.iter().filter_map(Value::as_str)),
            _ => {}
        }
    }
    out
}

/// The prompt's size in bytes (a prompt of token ids counts 4 bytes a token) and, when it
/// is at least `prefix_bytes` long (and `prefix_bytes` > 0), the hash of its first
/// `prefix_bytes` bytes.
pub fn prompt_info(request: &Value, prefix_bytes: usize) -> (usize, Option<u64>) {
    let pieces = prompt_pieces(request);
    let mut size: usize = pieces.iter().map(|p| p.len()).sum();
    if let Some(Value::Array(items)) = request.get("prompt") {
        size += 4 * items.iter().filter(|v| v.is_number()).count();
    }
    if prefix_bytes == 0 || size < prefix_bytes {
        return (size, None);
    }
    let mut prefix = Vec::with_capacity(prefix_bytes);
    for p in pieces {
        let take = (prefix_bytes - prefix.len()).min(p.len());
        prefix.extend_from_slice(&p.as_bytes()[..take]);
        if prefix.len() == prefix_bytes {
            break;
        }
    }
    // Token-id prompts have no text prefix to hash.
    let key = (prefix.len() == prefix_bytes).then(|| fnv1a(&prefix));
    (size, key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn c(load: u64, healthy: bool, id: u64) -> Candidate {
        Candidate { load, healthy, id }
    }

    #[test]
    fn least_loaded_first_ties_in_turn_unhealthy_last() {
        let cands = [c(3, true, 1), c(1, true, 2), c(1, true, 3), c(0, false, 4)];
        assert_eq!(order(&cands, None, 2, 0), vec![1, 2, 0, 3]);
        assert_eq!(order(&cands, None, 2, 1), vec![2, 1, 0, 3]);
        // None healthy: all are tried, least loaded first.
        let down = [c(2, false, 1), c(1, false, 2)];
        assert_eq!(order(&down, None, 2, 0), vec![1, 0]);
        assert!(order(&[], None, 2, 0).is_empty());
    }

    #[test]
    fn affinity_holds_within_the_slack_only() {
        let ids = [fnv1a(b"http://a"), fnv1a(b"http://b")];
        let key = fnv1a(b"some long shared prefix");
        let affine = order(&[c(0, true, ids[0]), c(0, true, ids[1])], Some(key), 2, 0)[0];
        let other = 1 - affine;
        // The same key, whatever the turn, while within the slack.
        for turn in 0..4 {
            let mut loads = [0, 0];
            loads[affine] = 2;
            let cands = [c(loads[0], true, ids[0]), c(loads[1], true, ids[1])];
            assert_eq!(order(&cands, Some(key), 2, turn)[0], affine);
        }
        // Past the slack, balance wins.
        let mut loads = [0, 0];
        loads[affine] = 3;
        let cands = [c(loads[0], true, ids[0]), c(loads[1], true, ids[1])];
        assert_eq!(order(&cands, Some(key), 2, 0), vec![other, affine]);
        // An unhealthy affine replica is not taken.
        let mut cands = [c(0, true, ids[0]), c(0, true, ids[1])];
        cands[affine].healthy = false;
        assert_eq!(order(&cands, Some(key), 2, 0)[0], other);
    }

    #[test]
    fn prefixes_spread_over_replicas() {
        let ids: Vec<u64> = (0..4)
            .map(|i| fnv1a(format!("http://r{i}").as_bytes()))
            .collect();
        let cands: Vec<Candidate> = ids.iter().map(|&id| c(0, true, id)).collect();
        let mut hits = [0; 4];
        for k in 0..400 {
            hits[order(&cands, Some(fnv1a(format!("p{k}").as_bytes())), 0, 0)[0]] += 1;
        }
        assert!(hits.iter().all(|&h| h > 50), "{hits:?}");
    }

    #[test]
    fn prompts_hash_their_prefix_only_when_long_enough() {
        let long = "x".repeat(600);
        let chat = |user: &str| json!({"messages": [{"role": "system", "content": long}, {"role": "user", "content": user}]});
        let (size, a) = prompt_info(&chat("one"), 512);
        assert_eq!(size, 6 + 600 + 4 + 3);
        assert!(a.is_some());
        assert_eq!(a, prompt_info(&chat("two, different"), 512).1);
        assert_eq!(prompt_info(&chat("one"), 0).1, None, "0 turns it off");
        assert_eq!(prompt_info(&json!({"prompt": "short"}), 512), (5, None));
        let parts =
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": long}]}]});
        assert!(prompt_info(&parts, 512).1.is_some());
        assert_eq!(prompt_info(&json!({"prompt": [1, 2, 3]}), 512), (12, None));
        assert_eq!(prompt_info(&json!({"prompt": ["ab", "cd"]}), 512).0, 4);
    }
}
