//! What a conversation asks for, read from its first user turn: code, maths, or anything else
//! (chat). `prepare --topics` uses it to choose training conversations by domain: four of the six
//! benchmarks ask for code or maths, while ShareGPT in file order is mostly chat
//! (docs/recipe.md, "Lever 15: the data's domain").
//!
//! The rule is two regular expressions, nothing smarter, and it is the rule the lever was
//! measured with (experiments/levers/domain_data.py holds the same patterns):
//! - `code` when the turn shows code (a fence, `def f(`, `#include`, `=>`, `SELECT … FROM`, …) or
//!   names a programming language or code;
//! - otherwise `math` when it asks to solve, calculate or prove, names an equation, integral,
//!   derivative, probability, percentage, algebra or maths, asks "how many" or "sum of", or
//!   shows arithmetic (`12 * 7`);
//! - otherwise `chat`.
//!
//! Over the ShareGPT V3 file's 17 671 complete records, that script counts 3 080 code and 1 024
//! maths conversations.

use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// A conversation's domain, from its first user turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Topic {
    Chat,
    Code,
    Math,
}
crate::named_enum!(Topic, "topic", ["chat", "code", "math"]);

static CODE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)```|\bdef \w+\(|#include|public static|console\.log|\bimport \w+|SELECT .+ FROM|=>|\bfunction\b|\bclass \w+|python|javascript|\bjava\b|c\+\+|\bcode\b|\bsql\b",
    )
    .expect("the code pattern compiles")
});

static MATH: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)\b(solve|calculate|equation|integral|derivative|probability|how many|sum of|prove|percent|math|algebra)\b|\d+\s*[-+*/^]\s*\d+",
    )
    .expect("the maths pattern compiles")
});

impl Topic {
    /// The topic of a conversation whose first user turn is `first_user_turn`.
    pub fn of(first_user_turn: &str) -> Topic {
        if CODE.is_match(first_user_turn) {
            Topic::Code
        } else if MATH.is_match(first_user_turn) {
            Topic::Math
        } else {
            Topic::Chat
        }
    }
}

/// Which conversations `prepare` keeps by topic: the first `after` conversations it selects are
/// kept whatever their topic (the file's own mix), every later one only when its topic is one of
/// `topics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicFilter {
    pub topics: Vec<Topic>,
    pub after: usize,
}

impl TopicFilter {
    /// Whether the conversation that would be the `selected`-th (0-based) is kept.
    pub fn keeps(&self, selected: usize, first_user_turn: &str) -> bool {
        selected < self.after || self.topics.contains(&Topic::of(first_user_turn))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_comes_before_maths_and_chat_is_the_rest() {
        for code in [
            "Fix this:\n```\nx = 1\n```",
            "def area(r):\n    return 3.14 * r * r",
            "Write a Python script that renames files",
            "What does `const f = (x) => x + 1` do?",
            "SELECT name FROM users WHERE id = 3",
            "how do I sort a list in C++?",
        ] {
            assert_eq!(Topic::of(code), Topic::Code, "{code}");
        }
        for math in [
            "Solve x^2 - 4 = 0",
            "What is 12 * 7?",
            "How many apples are left if Ann eats three?",
            "Find the derivative of sin(x)",
        ] {
            assert_eq!(Topic::of(math), Topic::Math, "{math}");
        }
        for chat in ["Write a poem about the sea", "Summarise the French revolution", "What is the capital of Peru?"] {
            assert_eq!(Topic::of(chat), Topic::Chat, "{chat}");
        }
        // words that only contain a keyword do not count
        assert_eq!(Topic::of("a decoder ring and mathematician's notes"), Topic::Chat);
    }

    #[test]
    fn the_filter_keeps_the_first_conversations_whatever_their_topic() {
        let f = TopicFilter { topics: vec![Topic::Code], after: 2 };
        assert!(f.keeps(0, "a poem"));
        assert!(f.keeps(1, "a poem"));
        assert!(!f.keeps(2, "a poem"));
        assert!(f.keeps(2, "a python script"));
        assert!("maths".parse::<Topic>().unwrap_err().contains("chat, code, math"));
        assert_eq!(serde_json::to_string(&Topic::Math).unwrap(), "\"math\"");
    }
}
