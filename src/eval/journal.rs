//! The resume journal of an evaluation: `OUT/requests.partial.jsonl` holds a header line with the
//! evaluation's settings, then one line per finished request (every run of it, so AR and drafter
//! timings stay paired). A rerun with the same settings takes those requests back instead of
//! generating them again; a journal written with other settings is refused. It is removed once
//! the results are written.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::datasets::BenchmarkName;
use super::runner::{EvalError, EvalObserver, RequestEntry, RequestRecord};
use crate::util::progress::{Progress, Unit};

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a readable evaluation journal (cut off or overwritten); delete it to start over")]
    Unreadable { path: PathBuf },
    #[error(
        "{path} holds a partial evaluation with other settings (model, weights, drafters, benchmarks, limit or \
         generation settings differ); delete it to start over, or choose another --out"
    )]
    OtherSettings { path: PathBuf },
}

pub struct Journal {
    path: PathBuf,
    done: HashMap<(String, String), RequestEntry>,
    file: std::fs::File,
}

impl Journal {
    pub const FILE: &'static str = "requests.partial.jsonl";

    /// Opens the journal in `out`, keeping the requests of an interrupted run with the same
    /// `settings`; refuses one written with other settings (its records would not be comparable).
    pub fn open(out: &Path, settings: &serde_json::Value) -> Result<Journal, JournalError> {
        let path = out.join(Self::FILE);
        let io = |source| JournalError::Io { path: path.clone(), source };
        let mut done = HashMap::new();
        let mut kept = Vec::new();
        if path.is_file() {
            let text = std::fs::read_to_string(&path).map_err(io)?;
            let mut lines = text.lines();
            let header: Option<serde_json::Value> = lines.next().and_then(|l| serde_json::from_str(l).ok());
            let Some(header) = header.filter(|h| h.get("journal").and_then(|j| j.as_str()) == Some("specauf-eval")) else {
                return Err(JournalError::Unreadable { path });
            };
            if header.get("settings") != Some(settings) {
                return Err(JournalError::OtherSettings { path });
            }
            for line in lines {
                // A line cut off by the interruption ends the journal: that request runs again.
                let Ok(entry) = serde_json::from_str::<RequestEntry>(line) else { break };
                kept.push(line.to_string());
                done.insert((entry.benchmark.clone(), entry.id.clone()), entry);
            }
        }
        // Rewrite header + complete entries (dropping a cut-off tail), then append to it.
        let header = serde_json::json!({ "journal": "specauf-eval", "settings": settings });
        let mut body = header.to_string();
        body.push('\n');
        for line in &kept {
            body.push_str(line);
            body.push('\n');
        }
        crate::util::fs::write_atomic(&path, body.as_bytes()).map_err(|source| JournalError::Io { path: path.clone(), source })?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|source| JournalError::Io { path: path.clone(), source })?;
        Ok(Journal { path, done, file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Requests taken back from an interrupted run.
    pub fn resumable(&self) -> usize {
        self.done.len()
    }

    fn append(&mut self, entry: &RequestEntry) -> std::io::Result<()> {
        let mut line = serde_json::to_string(entry).map_err(std::io::Error::other)?;
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.flush()
    }

    /// The finished evaluation's results hold every request now: the journal has done its job.
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The observer of an evaluation that resumes from and records to a [`Journal`], reporting
/// turn-runs to a [`Progress`].
pub struct JournaledObserver<'a> {
    pub journal: Journal,
    pub progress: &'a dyn Progress,
    done: u64,
}

impl<'a> JournaledObserver<'a> {
    pub fn new(journal: Journal, progress: &'a dyn Progress) -> Self {
        JournaledObserver { journal, progress, done: 0 }
    }
}

impl EvalObserver for JournaledObserver<'_> {
    fn start(&mut self, total: usize) {
        self.progress.phase("eval", Some(total as u64), 0, Unit::Items);
    }
    fn turn_done(&mut self, r: &RequestRecord, running_tau: f64) {
        self.done += 1;
        self.progress.update(self.done, &format!("{} {} τ {running_tau:.2}", r.benchmark, r.drafter));
    }
    fn resumed(&mut self, benchmark: BenchmarkName, id: &str) -> Option<RequestEntry> {
        self.journal.done.remove(&(benchmark.to_string(), id.to_string()))
    }
    fn request_done(&mut self, entry: &RequestEntry) -> Result<(), EvalError> {
        self.journal.append(entry).map_err(|e| EvalError::InvalidConfig {
            what: format!("cannot record finished requests in {}: {e}", self.journal.path.display()),
        })
    }
}
