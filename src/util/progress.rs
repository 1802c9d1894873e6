//! How library code reports long work. The library draws nothing: it calls a [`Progress`]
//! observer, and the command line implements it with progress bars (src/cli/progress.rs); tests
//! and servers pass [`Silent`]. The evaluation's richer observer (`eval::runner::EvalObserver`,
//! which also resumes requests) follows the same pattern.

use std::sync::{Arc, RwLock};

/// What a phase counts, so that a front end can format it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Steps, conversations, requests: plain counts.
    Items,
    /// Bytes (downloads, hashing, unpacking).
    Bytes,
    /// Tokens.
    Tokens,
}

/// An observer of long work. Every method has a do-nothing default.
pub trait Progress: Send + Sync {
    /// A new phase named `name` of `total` units (`None`: unknown length), `done` of them already
    /// done (a resumed phase). It replaces the previous phase.
    fn phase(&self, _name: &str, _total: Option<u64>, _done: u64, _unit: Unit) {}
    /// Units done so far in the current phase, and a short status (loss, rate, τ).
    fn update(&self, _done: u64, _status: &str) {}
    /// A line of log that must not be lost under a bar ("arm dflash-auf: trained").
    fn note(&self, _line: &str) {}
    /// The current phase ended; `keep` leaves its final state on screen.
    fn finish(&self, _keep: bool) {}
}

/// Reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Progress for Silent {}

static GLOBAL: RwLock<Option<Arc<dyn Progress>>> = RwLock::new(None);

/// Installs the observer of work that is reached from everywhere (the asset fetcher runs on the
/// first use of a model or data set, deep inside any command). The CLI installs its bars at
/// start; without it, such work reports nothing.
pub fn set_global(p: Arc<dyn Progress>) {
    if let Ok(mut g) = GLOBAL.write() {
        *g = Some(p);
    }
}

/// The observer installed by [`set_global`], or [`Silent`].
pub fn global() -> Arc<dyn Progress> {
    GLOBAL.read().ok().and_then(|g| g.clone()).unwrap_or_else(|| Arc::new(Silent))
}

/// A shareable observer that can sit in an options struct (Debug, Clone, Default = [`Silent`]).
#[derive(Clone)]
pub struct Observer(pub Arc<dyn Progress>);

impl Default for Observer {
    fn default() -> Self {
        Observer(Arc::new(Silent))
    }
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

impl std::ops::Deref for Observer {
    type Target = dyn Progress;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref()
    }
}
