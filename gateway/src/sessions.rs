//! Collaborative sessions: several WebSocket clients share one conversation and see every
//! event of it, in the same order, as it happens.
//!
//! Ordering: every change to a session and the broadcast of its event happen under the
//! session's lock, and each participant has one FIFO queue, so all participants receive
//! the same events in the same order. A joiner's snapshot is taken and its queue
//! registered under the same lock, so snapshot + later events = everything, with no gap
//! and no repeat.
//!
//! Bounds: a participant's queue holds `send_queue` events. A reader too slow to keep up
//! is removed from the session and its connection is closed with 1013 rather than
//! buffered without limit; on rejoin it gets a fresh snapshot, so it loses nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, Notify};

/// One connection's end of a session: its event queue and the way to cut it off.
#[derive(Clone)]
pub struct Subscriber {
    pub conn: u64,
    pub user: String,
    pub tx: mpsc::Sender<Arc<str>>,
    /// Notified when the connection must close with 1013 (too slow).
    pub kick: Arc<Notify>,
}

/// A message of the shared conversation.
#[derive(Clone)]
struct SessionMessage {
    role: &'static str,
    user: Option<String>,
    content: String,
}

/// The generation running in a session.
struct LiveGeneration {
    id: String,
    by: String,
    text: String,
    tokens: usize,
    cancel: Option<oneshot::Sender<()>>,
}

struct SessionState {
    messages: Vec<SessionMessage>,
    /// Bytes of all message contents, bounded by `Session::max_bytes`.
    bytes: usize,
    participants: Vec<Subscriber>,
    generation: Option<LiveGeneration>,
    last_active: Instant,
}

/// One shared conversation.
pub struct Session {
    pub id: String,
    /// Most text the conversation may hold, in bytes.
    pub max_bytes: usize,
    state: Mutex<SessionState>,
}

/// Why a session operation was refused, as the `code` of an error event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A generation is already running.
    Busy,
    /// Cancel with nothing running.
    NoGeneration,
    /// Generate with no user message yet.
    EmptyConversation,
    /// The conversation reached `Session::max_bytes`.
    ConversationFull,
    /// The hub holds `MAX_SESSIONS` sessions and none can be evicted.
    TooManySessions,
}

impl Refusal {
    /// The protocol's error code.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::Busy => "busy",
            Refusal::NoGeneration => "no_generation",
            Refusal::EmptyConversation => "empty_conversation",
            Refusal::ConversationFull => "conversation_full",
            Refusal::TooManySessions => "too_many_sessions",
        }
    }
}

impl Session {
    fn lock(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `event` to every participant; removes (and kicks) the ones whose queue is
    /// full, announcing their departure to the rest. Call with the lock held.
    fn broadcast(st: &mut SessionState, event: &Value) {
        let text: Arc<str> = event.to_string().into();
        let mut slow = Vec::new();
        st.participants
            .retain(|p| match p.tx.try_send(text.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    p.kick.notify_one();
                    slow.push(p.user.clone());
                    false
                }
                // The connection is gone; its reader will also call `leave`.
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
        for user in slow {
            Self::broadcast(st, &json!({"type": "participant_left", "user": user}));
        }
    }

    /// Adds `sub`, sending it the snapshot first, then telling everyone it joined.
    pub fn join(&self, sub: Subscriber) {
        let mut st = self.lock();
        st.last_active = Instant::now();
        let messages: Vec<Value> = st
            .messages
            .iter()
            .map(|m| json!({"role": m.role, "user": m.user, "content": m.content}))
            .collect();
        let mut participants: Vec<&str> = st.participants.iter().map(|p| p.user.as_str()).collect();
        participants.push(&sub.user);
        let generation = st
            .generation
            .as_ref()
            .map(|g| json!({"id": g.id, "by": g.by, "text": g.text}));
        let snapshot = json!({
            "type": "session", "session": self.id, "messages": messages,
            "participants": participants, "generation": generation,
        });
        let user = sub.user.clone();
        // The snapshot goes first in the joiner's queue; a fresh queue has room for it.
        let _ = sub.tx.try_send(snapshot.to_string().into());
        st.participants.push(sub);
        Self::broadcast(
            &mut st,
            &json!({"type": "participant_joined", "user": user}),
        );
    }

    /// Removes connection `conn`, telling the others.
    pub fn leave(&self, conn: u64) {
        let mut st = self.lock();
        st.last_active = Instant::now();
        let Some(i) = st.participants.iter().position(|p| p.conn == conn) else {
            return;
        };
        let p = st.participants.remove(i);
        Self::broadcast(
            &mut st,
            &json!({"type": "participant_left", "user": p.user}),
        );
        // Nobody is left to read the reply: stop spending compute on it, as an HTTP
        // request is cancelled when its client hangs up. (A participant cut off for
        // being slow was removed without `leave`, so its reply keeps going for the
        // snapshot it will get on rejoining.)
        if st.participants.is_empty() {
            if let Some(c) = st.generation.as_mut().and_then(|g| g.cancel.take()) {
                let _ = c.send(());
            }
        }
    }

    /// Adds a user message, unless the conversation is full.
    pub fn say(&self, user: &str, content: &str) -> Result<(), Refusal> {
        let mut st = self.lock();
        if st.bytes + content.len() > self.max_bytes {
            return Err(Refusal::ConversationFull);
        }
        st.bytes += content.len();
        st.last_active = Instant::now();
        st.messages.push(SessionMessage {
            role: "user",
            user: Some(user.to_string()),
            content: content.to_string(),
        });
        Self::broadcast(
            &mut st,
            &json!({"type": "message", "role": "user", "user": user, "content": content}),
        );
        Ok(())
    }

    /// The conversation as (role, content) pairs, for the chat template.
    pub fn transcript(&self) -> Vec<(String, String)> {
        self.lock()
            .messages
            .iter()
            .map(|m| (m.role.to_string(), m.content.clone()))
            .collect()
    }

    /// Marks a generation `id` by `by` as running, unless one already is.
    pub fn start_generation(
        &self,
        id: &str,
        by: &str,
        cancel: oneshot::Sender<()>,
    ) -> Result<(), Refusal> {
        let mut st = self.lock();
        if st.generation.is_some() {
            return Err(Refusal::Busy);
        }
        if !st.messages.iter().any(|m| m.role == "user") {
            return Err(Refusal::EmptyConversation);
        }
        st.last_active = Instant::now();
        st.generation = Some(LiveGeneration {
            id: id.to_string(),
            by: by.to_string(),
            text: String::new(),
            tokens: 0,
            cancel: Some(cancel),
        });
        Self::broadcast(
            &mut st,
            &json!({"type": "generation_started", "id": id, "by": by}),
        );
        Ok(())
    }

    /// Whether a generation is running (checked before doing the work to start one).
    pub fn is_busy(&self) -> bool {
        self.lock().generation.is_some()
    }

    /// A piece of the running generation's text.
    pub fn token(&self, text: &str) {
        let mut st = self.lock();
        let Some(g) = st.generation.as_mut() else {
            return;
        };
        g.tokens += 1;
        if text.is_empty() {
            return;
        }
        g.text.push_str(text);
        let id = g.id.clone();
        Self::broadcast(&mut st, &json!({"type": "token", "id": id, "text": text}));
    }

    /// Ends the running generation: its text becomes an assistant message.
    pub fn finish_generation(&self, reason: &str, prompt_tokens: usize, completion: Option<usize>) {
        let mut st = self.lock();
        let Some(g) = st.generation.take() else {
            return;
        };
        st.last_active = Instant::now();
        if !g.text.is_empty() {
            // Replies are bounded by max_tokens; they may take the conversation past the
            // limit, after which `say` refuses.
            st.bytes += g.text.len();
            st.messages.push(SessionMessage {
                role: "assistant",
                user: None,
                content: g.text,
            });
        }
        let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion.unwrap_or(g.tokens)});
        Self::broadcast(
            &mut st,
            &json!({"type": "generation_done", "id": g.id, "finish_reason": reason, "usage": usage}),
        );
    }

    /// Asks the running generation to stop.
    pub fn cancel(&self) -> Result<(), Refusal> {
        let mut st = self.lock();
        let g = st.generation.as_mut().ok_or(Refusal::NoGeneration)?;
        if let Some(c) = g.cancel.take() {
            let _ = c.send(());
        }
        Ok(())
    }
}

/// One connection's place in at most one session: joining a session leaves the previous
/// one, and dropping the membership (the connection ending) leaves as well.
pub struct Membership {
    conn: u64,
    tx: mpsc::Sender<Arc<str>>,
    kick: Arc<Notify>,
    joined: Option<(Arc<Session>, String)>,
}

impl Membership {
    /// Connection `conn`, whose events go to `tx`; `kick` closes it when too slow.
    pub fn new(conn: u64, tx: mpsc::Sender<Arc<str>>, kick: Arc<Notify>) -> Self {
        Membership {
            conn,
            tx,
            kick,
            joined: None,
        }
    }

    /// Leaves the current session, then joins (creating if new) session `id` as `user`.
    pub fn join(&mut self, hub: &SessionHub, id: &str, user: String) -> Result<(), Refusal> {
        self.leave();
        let s = hub.session(id)?;
        s.join(Subscriber {
            conn: self.conn,
            user: user.clone(),
            tx: self.tx.clone(),
            kick: self.kick.clone(),
        });
        self.joined = Some((s, user));
        Ok(())
    }

    /// Leaves the current session, if any.
    pub fn leave(&mut self) {
        if let Some((s, _)) = self.joined.take() {
            s.leave(self.conn);
        }
    }

    /// The joined session and the name this connection goes by in it.
    pub fn current(&self) -> Option<(&Arc<Session>, &str)> {
        self.joined.as_ref().map(|(s, u)| (s, u.as_str()))
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Most sessions a server holds at once.
pub const MAX_SESSIONS: usize = 10_000;
/// Default for the most text one conversation holds (user messages and replies), in
/// bytes (`limits.session_max_bytes`).
pub const MAX_CONVERSATION_BYTES: usize = 1 << 20;

/// Every live session.
pub struct SessionHub {
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    next_conn: AtomicU64,
    /// Events a participant's queue holds before it is cut off.
    pub send_queue: usize,
    idle: Duration,
    /// Most text one conversation holds (`limits.session_max_bytes`).
    pub max_conversation_bytes: usize,
}

impl SessionHub {
    /// A hub whose empty sessions expire after `idle`.
    pub fn new(send_queue: usize, idle: Duration) -> Self {
        SessionHub {
            sessions: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            send_queue,
            idle,
            max_conversation_bytes: MAX_CONVERSATION_BYTES,
        }
    }

    /// A fresh connection id.
    pub fn connection_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// The session called `id`, created when new. At `MAX_SESSIONS`, the empty session
    /// idle longest makes room; with none empty, new sessions are refused.
    pub fn session(&self, id: &str) -> Result<Arc<Session>, Refusal> {
        let mut map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(id) {
            return Ok(s.clone());
        }
        if map.len() >= MAX_SESSIONS {
            let evict = map
                .iter()
                .filter_map(|(k, s)| {
                    let st = s.lock();
                    (st.participants.is_empty() && st.generation.is_none())
                        .then(|| (st.last_active, k.clone()))
                })
                .min();
            match evict {
                Some((_, k)) => {
                    map.remove(&k);
                }
                None => return Err(Refusal::TooManySessions),
            }
        }
        let s = Arc::new(Session {
            id: id.to_string(),
            max_bytes: self.max_conversation_bytes,
            state: Mutex::new(SessionState {
                messages: Vec::new(),
                bytes: 0,
                participants: Vec::new(),
                generation: None,
                last_active: Instant::now(),
            }),
        });
        map.insert(id.to_string(), s.clone());
        Ok(s)
    }

    /// Drops sessions with nobody in them, nothing running, idle longer than the limit.
    pub fn expire_idle(&self) -> usize {
        let mut map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let before = map.len();
        map.retain(|_, s| {
            let st = s.lock();
            !(st.participants.is_empty()
                && st.generation.is_none()
                && st.last_active.elapsed() > self.idle)
        });
        before - map.len()
    }

    /// Live sessions.
    pub fn len(&self) -> usize {
        self.sessions.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(hub: &SessionHub, user: &str, cap: usize) -> (Subscriber, mpsc::Receiver<Arc<str>>) {
        let (tx, rx) = mpsc::channel(cap);
        (
            Subscriber {
                conn: hub.connection_id(),
                user: user.into(),
                tx,
                kick: Arc::new(Notify::new()),
            },
            rx,
        )
    }

    fn users(s: &Session) -> Vec<String> {
        s.lock()
            .participants
            .iter()
            .map(|p| p.user.clone())
            .collect()
    }

    #[test]
    fn a_membership_is_in_one_session_at_a_time_and_leaves_when_dropped() {
        let hub = SessionHub::new(16, Duration::from_secs(60));
        let (tx, _rx) = mpsc::channel(16);
        let mut m = Membership::new(hub.connection_id(), tx, Arc::new(Notify::new()));
        assert!(m.current().is_none());
        m.join(&hub, "a", "ann".into()).unwrap();
        let a = hub.session("a").unwrap();
        assert_eq!(users(&a), ["ann"]);
        m.join(&hub, "b", "anna".into()).unwrap();
        let b = hub.session("b").unwrap();
        assert!(users(&a).is_empty(), "joining b left a");
        assert_eq!(users(&b), ["anna"]);
        let (s, user) = m.current().unwrap();
        assert_eq!((s.id.as_str(), user), ("b", "anna"));
        m.leave();
        assert!(users(&b).is_empty() && m.current().is_none());
        m.join(&hub, "a", "ann".into()).unwrap();
        drop(m);
        assert!(users(&a).is_empty(), "dropping the membership left a");
    }

    fn drain(rx: &mut mpsc::Receiver<Arc<str>>) -> Vec<Value> {
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            out.push(serde_json::from_str(&m).unwrap());
        }
        out
    }

    #[test]
    fn everyone_sees_the_same_events_and_a_late_joiner_gets_the_partial_text() {
        let hub = SessionHub::new(64, Duration::from_secs(60));
        let s = hub.session("s1").unwrap();
        let (a, mut ra) = sub(&hub, "ann", 64);
        let (b, mut rb) = sub(&hub, "bob", 64);
        s.join(a);
        s.join(b);
        s.say("ann", "hello").unwrap();
        let (tx, _cancel) = oneshot::channel();
        s.start_generation("g1", "bob", tx).unwrap();
        s.token("Hel");
        let (c, mut rc) = sub(&hub, "cy", 64);
        s.join(c);
        s.token("lo");
        s.finish_generation("stop", 5, Some(2));
        let (ea, eb) = (drain(&mut ra), drain(&mut rb));
        // Ann: her snapshot, her own join, then what bob sees after his snapshot.
        assert_eq!(ea[0]["type"], "session");
        assert_eq!(eb[0]["type"], "session");
        assert_eq!(
            ea[2..],
            eb[1..],
            "from bob's join on, both see the same events"
        );
        let ec = drain(&mut rc);
        assert_eq!(ec[0]["type"], "session");
        assert_eq!(ec[0]["generation"]["text"], "Hel");
        assert_eq!(ec[0]["participants"], json!(["ann", "bob", "cy"]));
        let rest: String = ec
            .iter()
            .filter(|e| e["type"] == "token")
            .map(|e| e["text"].as_str().unwrap())
            .collect();
        assert_eq!(format!("Hel{rest}"), "Hello");
        assert_eq!(
            s.transcript().last().unwrap(),
            &("assistant".into(), "Hello".into())
        );
    }

    #[test]
    fn one_generation_at_a_time_and_cancel_reaches_it() {
        let hub = SessionHub::new(64, Duration::from_secs(60));
        let s = hub.session("s").unwrap();
        let (tx, _) = oneshot::channel();
        assert_eq!(
            s.start_generation("g0", "x", tx),
            Err(Refusal::EmptyConversation)
        );
        s.say("x", "hi").unwrap();
        let (tx, mut rx) = oneshot::channel();
        s.start_generation("g1", "x", tx).unwrap();
        let (tx2, _) = oneshot::channel();
        assert_eq!(s.start_generation("g2", "y", tx2), Err(Refusal::Busy));
        s.cancel().unwrap();
        assert!(rx.try_recv().is_ok());
        s.finish_generation("cancelled", 3, None);
        assert_eq!(s.cancel(), Err(Refusal::NoGeneration));
    }

    #[test]
    fn a_slow_reader_is_cut_off_and_the_others_are_told() {
        let hub = SessionHub::new(4, Duration::from_secs(60));
        let s = hub.session("s").unwrap();
        let (fast, mut rf) = sub(&hub, "fast", 1000);
        let (slow, _rs) = sub(&hub, "slow", 2);
        let kick = slow.kick.clone();
        s.join(fast);
        s.join(slow);
        for i in 0..5 {
            s.say("fast", &format!("m{i}")).unwrap();
        }
        let events = drain(&mut rf);
        assert!(events
            .iter()
            .any(|e| e["type"] == "participant_left" && e["user"] == "slow"));
        // The kick was signalled (a stored permit makes this complete at once).
        let mut fut = std::pin::pin!(kick.notified());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(std::future::Future::poll(fut.as_mut(), &mut cx).is_ready());
    }

    #[test]
    fn empty_idle_sessions_expire() {
        let hub = SessionHub::new(4, Duration::from_millis(0));
        let s = hub.session("s").unwrap();
        let (a, _ra) = sub(&hub, "a", 8);
        let conn = a.conn;
        s.join(a);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(hub.expire_idle(), 0, "someone is in it");
        s.leave(conn);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(hub.expire_idle(), 1);
        assert!(hub.is_empty());
    }

    #[test]
    fn conversations_and_the_number_of_sessions_are_bounded() {
        let hub = SessionHub::new(8, Duration::from_secs(60));
        let s = hub.session("big").unwrap();
        let chunk = "x".repeat(MAX_CONVERSATION_BYTES / 4);
        for _ in 0..4 {
            s.say("u", &chunk).unwrap();
        }
        assert_eq!(s.say("u", "one more"), Err(Refusal::ConversationFull));
        assert_eq!(s.transcript().len(), 4);

        // A full hub evicts the empty session idle longest...
        let (occupant, _rx) = sub(&hub, "here", 8);
        let busy = hub.session("occupied").unwrap();
        busy.join(occupant);
        for i in 0..MAX_SESSIONS - 2 {
            hub.session(&format!("s{i}")).unwrap();
        }
        assert_eq!(hub.len(), MAX_SESSIONS);
        hub.session("new").unwrap();
        assert_eq!(hub.len(), MAX_SESSIONS);
        assert!(hub.sessions.lock().unwrap().contains_key("occupied"));
        assert!(!hub.sessions.lock().unwrap().contains_key("big"));
        // ...and refuses when every session has someone in it.
        let mut keep = Vec::new();
        for (i, sess) in hub.sessions.lock().unwrap().values().enumerate() {
            let (p, rx) = sub(&hub, &format!("p{i}"), 8);
            sess.join(p);
            keep.push(rx);
        }
        assert_eq!(hub.session("refused").err(), Some(Refusal::TooManySessions));
    }
}
