//! One file per command.

pub mod bench;
pub mod device;
pub mod draft_vocab;
pub mod drafter_run;
pub mod eval;
pub mod experiment;
pub mod fetch;
pub mod generate;
pub mod init_drafter;
pub mod prepare;
pub mod progress;
pub mod quickstart;
pub mod serve;
pub mod train;

/// The message printed for a failed command: the error and its causes, joined by ": ", without
/// repeating a cause whose text the message already ends with. Many library errors name their
/// cause in their own text (`"preparing {path}: {source}"`, so that `Display` alone is complete
/// for library users) and also return it from `source()`; anyhow's `{:#}` would print it twice.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::error_text;

    #[derive(Debug, thiserror::Error)]
    #[error("disk full")]
    struct Leaf;

    #[derive(Debug, thiserror::Error)]
    #[error("writing {path}: {source}")]
    struct Named {
        path: String,
        source: Leaf,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("writing {path}")]
    struct Terse {
        path: String,
        source: Leaf,
    }

    #[test]
    fn a_cause_named_in_the_message_is_printed_once() {
        let e = anyhow::Error::new(Named { path: "a.json".into(), source: Leaf }).context("saving the run");
        assert_eq!(error_text(&e), "saving the run: writing a.json: disk full");
    }

    #[test]
    fn a_cause_not_in_the_message_is_still_printed() {
        let e = anyhow::Error::new(Terse { path: "a.json".into(), source: Leaf });
        assert_eq!(error_text(&e), "writing a.json: disk full");
    }
}
