//! Generated tokens to streamed text: incremental detokenisation that never splits a UTF-8
//! character, with stop strings.
//!
//! Invariants: the concatenation of everything taken equals the decoded generation, cut just
//! before the first stop string if one occurs; text that could still turn out to be the start
//! of a stop string is held back until it cannot.

use eagle_engine::tokenizer::{IncrementalDecoder, Tokenizer};

/// Stop-string scanning over text arriving in pieces.
pub struct StopScan {
    stops: Vec<String>,
    text: String,
    sent: usize,
    stopped: bool,
}

impl StopScan {
    pub fn new(stops: Vec<String>) -> Self {
        StopScan {
            stops,
            text: String::new(),
            sent: 0,
            stopped: false,
        }
    }

    /// Appends a piece; returns true once the text holds a stop string (it is then cut before
    /// it and later pieces are ignored).
    pub fn append(&mut self, piece: &str) -> bool {
        if self.stopped {
            return true;
        }
        let longest = self.stops.iter().map(|s| s.len()).max().unwrap_or(0);
        let from = floor_boundary(&self.text, self.sent.saturating_sub(longest));
        self.text.push_str(piece);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(i) = hit {
            self.text.truncate(i);
            self.stopped = true;
        }
        self.stopped
    }

    /// Final text not yet taken, holding back a tail that could begin a stop string.
    pub fn take(&mut self) -> String {
        let mut end = self.text.len();
        if !self.stopped {
            let hold = self
                .stops
                .iter()
                .map(|s| {
                    (1..s.len())
                        .rev()
                        .find(|&k| s.is_char_boundary(k) && self.text.ends_with(&s[..k]))
                        .unwrap_or(0)
                })
                .max()
                .unwrap_or(0);
            end = floor_boundary(&self.text, end - hold.min(end));
        }
        let end = end.max(self.sent);
        let out = self.text[self.sent..end].to_string();
        self.sent = end;
        out
    }

    /// Everything not yet taken (the generation ended).
    pub fn rest(&mut self) -> String {
        let out = self.text[self.sent..].to_string();
        self.sent = self.text.len();
        out
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }
}

/// Tokens in, final text out.
pub struct TextStream<'a> {
    dec: IncrementalDecoder<'a>,
    scan: StopScan,
}

impl<'a> TextStream<'a> {
    pub fn new(tok: &'a Tokenizer, stops: Vec<String>) -> Self {
        TextStream {
            dec: IncrementalDecoder::new(tok),
            scan: StopScan::new(stops),
        }
    }

    /// Adds a token; returns true if the text now holds a stop string.
    pub fn push(&mut self, id: u32) -> eagle_engine::Result<bool> {
        if self.scan.stopped() {
            return Ok(true);
        }
        let piece = self.dec.push(id)?;
        Ok(self.scan.append(&piece))
    }

    pub fn take(&mut self) -> String {
        self.scan.take()
    }

    /// Flushes what the decoder holds (the generation ended) and returns the rest of the text.
    pub fn finish(&mut self) -> eagle_engine::Result<String> {
        if !self.scan.stopped() {
            let tail = self.dec.finish()?;
            self.scan.append(&tail);
        }
        Ok(self.scan.rest())
    }
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streams pieces through a scanner, taking after each; returns all text and whether it
    /// stopped.
    fn drive(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut s = StopScan::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let stop = s.append(p);
            out.push_str(&s.take());
            if stop {
                break;
            }
        }
        out.push_str(&s.rest());
        (out, s.stopped())
    }

    #[test]
    fn stops_across_pieces_and_holds_back_prefixes() {
        assert_eq!(
            drive(&["END"], &["ab", "cE", "N", "Dxyz"]),
            ("abc".into(), true)
        );
        assert_eq!(
            drive(&["END"], &["ab", "cE", "Nx"]),
            ("abcENx".into(), false)
        );
        assert_eq!(
            drive(&[], &["héllo", " wörld"]),
            ("héllo wörld".into(), false)
        );
        assert_eq!(
            drive(&["\n\n", "ö"], &["h", "éll", "o\n", "\nw"]),
            ("héllo".into(), true)
        );
        assert_eq!(drive(&["ö"], &["wör"]), ("w".into(), true));
    }

    #[test]
    fn held_back_text_is_not_emitted_early() {
        let mut s = StopScan::new(vec!["STOP".into()]);
        s.append("go ST");
        assert_eq!(s.take(), "go ");
        s.append("AY");
        assert_eq!(s.take(), "STAY");
    }
}
