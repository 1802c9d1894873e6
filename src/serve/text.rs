//! Output tokens → text deltas, with stop sequences.
//!
//! The output is decoded as a whole (as `specauf generate` decodes it, special tokens
//! skipped) and each delta is what is new. Text is held back while it may still change: an
//! incomplete UTF-8 character (decoded as U+FFFD), or a tail that is the start of a stop
//! sequence. A stop sequence ends the output before it (it is not returned), as OpenAI does.

use crate::tokenizer::{Tokenizer, TokenizerError};

pub struct TextAssembler<'t> {
    tokenizer: &'t Tokenizer,
    ids: Vec<u32>,
    text: String,
    /// Bytes of `text` handed out.
    emitted: usize,
    stops: Vec<String>,
    stopped: bool,
}

impl<'t> TextAssembler<'t> {
    pub fn new(tokenizer: &'t Tokenizer, stops: Vec<String>) -> Self {
        Self { tokenizer, ids: Vec::new(), text: String::new(), emitted: 0, stops, stopped: false }
    }

    /// Adds tokens; returns the text that can be handed out now.
    pub fn push(&mut self, ids: &[u32]) -> Result<String, TokenizerError> {
        if self.stopped || ids.is_empty() {
            return Ok(String::new());
        }
        self.ids.extend_from_slice(ids);
        self.text = self.tokenizer.decode(&self.ids, true)?;
        if !self.text.is_char_boundary(self.emitted) || self.emitted > self.text.len() {
            // The decode of the longer output changed text already handed out (a tokenizer
            // whose decode is not prefix-stable); hand out nothing until the end.
            return Ok(String::new());
        }
        // A stop sequence starts at or after `emitted`: every earlier start was held back.
        let hit = self.stops.iter().filter_map(|s| self.text[self.emitted..].find(s.as_str()).map(|i| self.emitted + i)).min();
        if let Some(cut) = hit {
            self.stopped = true;
            let delta = self.text[self.emitted..cut].to_string();
            self.text.truncate(cut);
            self.emitted = cut;
            return Ok(delta);
        }
        if self.text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let safe = self.text.len() - self.stop_prefix_len();
        if safe <= self.emitted {
            return Ok(String::new());
        }
        let delta = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        Ok(delta)
    }

    /// The text not handed out yet, at the end of the output.
    pub fn finish(&mut self) -> String {
        if self.emitted >= self.text.len() || !self.text.is_char_boundary(self.emitted) {
            return String::new();
        }
        let delta = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        delta
    }

    /// A stop sequence ended the output.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The whole text (cut at the stop sequence, if one was hit).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Tokens pushed so far.
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    /// Length of the longest tail of the unemitted text that is a proper prefix of a stop
    /// sequence (on a char boundary).
    fn stop_prefix_len(&self) -> usize {
        let tail = &self.text[self.emitted..];
        let mut best = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                let prefix = &s[..i];
                if i > best && tail.ends_with(prefix) {
                    best = i;
                }
            }
        }
        best
    }
}
