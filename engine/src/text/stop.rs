//! Stop strings over streamed text.
//!
//! Text that could still be the start of a stop string is held back until the next piece
//! decides it, so a client never sees part of a stop string, and the generation ends with
//! the text before the first stop string that completes.

/// Tracks the stop strings of one request.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What a new piece of text gives.
#[derive(Debug, PartialEq, Eq)]
pub struct StopCheck {
    /// Text that is safe to send now.
    pub emit: String,
    /// A stop string completed; `emit` ends right before it.
    pub stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Adds generated text.
    pub fn push(&mut self, piece: &str) -> StopCheck {
        if self.stops.is_empty() {
            return StopCheck {
                emit: piece.to_string(),
                stopped: false,
            };
        }
        self.held.push_str(piece);
        // The earliest stop string wins, wherever it starts.
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s)).min() {
            let emit = self.held[..at].to_string();
            self.held.clear();
            return StopCheck {
                emit,
                stopped: true,
            };
        }
        // Keep the longest tail that is a proper prefix of some stop string.
        let keep_from = (0..self.held.len())
            .filter(|&i| self.held.is_char_boundary(i))
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let emit = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        StopCheck {
            emit,
            stopped: false,
        }
    }

    /// Text still held back, released when the generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for p in pieces {
            let c = m.push(p);
            out.push(c.emit);
            if c.stopped {
                return (out, true, String::new());
            }
        }
        let rest = m.flush();
        (out, false, rest)
    }

    #[test]
    fn a_stop_string_split_over_pieces_is_never_leaked() {
        let (out, stopped, _) = run(&["END"], &["Hello E", "N", "D more"]);
        assert!(stopped);
        assert_eq!(out, vec!["Hello ", "", ""]);
    }

    #[test]
    fn a_false_start_is_released_once_it_cannot_match() {
        let (out, stopped, rest) = run(&["END"], &["Hello E", "ve", "ning EN"]);
        assert!(!stopped);
        assert_eq!(out, vec!["Hello ", "Eve", "ning "]);
        assert_eq!(rest, "EN");
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        let (out, stopped, _) = run(&["world", "lo"], &["hello world"]);
        assert!(stopped);
        assert_eq!(out, vec!["hel"]);
    }

    #[test]
    fn multibyte_text_is_cut_on_character_boundaries() {
        let (out, stopped, _) = run(&["é!"], &["café", "!"]);
        assert!(stopped);
        assert_eq!(out.concat(), "caf");
        let (out, _, rest) = run(&["😀x"], &["a😀", "b"]);
        assert_eq!(out.concat() + &rest, "a😀b");
    }

    #[test]
    fn without_stops_everything_passes_through() {
        let (out, stopped, rest) = run(&[], &["a", "b"]);
        assert_eq!(
            (out.concat(), stopped, rest.as_str()),
            ("ab".into(), false, "")
        );
    }
}
