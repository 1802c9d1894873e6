use std::io::BufReader;
use std::path::{Path, PathBuf};

use specauf::data::sharegpt::{
    self, heldout_group, id_is_heldout, is_heldout, Conversation, LoadReport, Role,
    ShareGptError, Turn,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sharegpt")
        .join(name)
}

fn skipped(report: &LoadReport, reason: &str) -> usize {
    report.skipped.get(reason).copied().unwrap_or(0)
}

fn turn(role: Role, content: &str) -> Turn {
    Turn {
        role,
        content: content.to_string(),
    }
}

#[test]
fn truncated_array_keeps_complete_records_and_counts_malformed_ones() {
    let report = sharegpt::load(&fixture("truncated.json")).expect("fixture loads");
    assert!(report.truncated_tail);
    let ids: Vec<&str> = report.conversations.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["AAAAAAA_0", "BBBBBBB_3", "42"]);
    for reason in [
        "bad_json",
        "no_turns",
        "unknown_role",
        "empty_content",
        "not_alternating",
        "no_exchange",
    ] {
        assert_eq!(
            skipped(&report, reason),
            1,
            "{reason} in {:?}",
            report.skipped
        );
    }
    assert_eq!(
        report.skipped_total(),
        6,
        "the cut-off record is not counted as skipped"
    );
}

#[test]
fn strings_with_quotes_brackets_and_escapes_do_not_confuse_the_splitter() {
    let report = sharegpt::load(&fixture("truncated.json")).expect("fixture loads");
    assert_eq!(
        report.conversations[0].turns,
        [
            turn(Role::User, "Say \"hi\" [twice] {ok} \\"),
            turn(Role::Assistant, "hi, hi ]},")
        ]
    );
}

#[test]
fn a_leading_answer_and_a_trailing_question_are_trimmed() {
    let report = sharegpt::load(&fixture("truncated.json")).expect("fixture loads");
    assert_eq!(
        report.conversations[1].turns,
        [turn(Role::User, "next?"), turn(Role::Assistant, "next.")]
    );
    assert_eq!(
        report.conversations[2].turns,
        [
            turn(Role::System, "Be brief."),
            turn(Role::User, "Hi"),
            turn(Role::Assistant, "Hello")
        ]
    );
}

#[test]
fn splitting_across_tiny_read_buffers_gives_the_same_result() {
    let bytes = std::fs::read(fixture("truncated.json")).expect("fixture readable");
    let (whole, records) = sharegpt::parse_bytes(&bytes);
    for capacity in [1, 2, 3, 7, 64] {
        let mut reader = BufReader::with_capacity(capacity, bytes.as_slice());
        let (small, small_records) = sharegpt::parse_reader(&mut reader).expect("in-memory read");
        assert_eq!(
            small.conversations, whole.conversations,
            "capacity {capacity}"
        );
        assert_eq!(small.skipped, whole.skipped, "capacity {capacity}");
        assert_eq!(small.truncated_tail, whole.truncated_tail);
        assert_eq!(small_records, records);
    }
    assert_eq!(records, 9, "nine complete elements before the cut");
}

#[test]
fn jsonl_with_role_content_messages_skips_bad_lines_and_flags_a_cut_last_line() {
    let report = sharegpt::load(&fixture("records.jsonl")).expect("fixture loads");
    let ids: Vec<&str> = report.conversations.iter().map(|c| c.id.as_str()).collect();
    // The record without an id is the third non-blank line (index 2).
    assert_eq!(ids, ["m1", "#2"]);
    assert_eq!(
        report.conversations[0].turns,
        [turn(Role::User, "2+2?"), turn(Role::Assistant, "4")]
    );
    assert_eq!(skipped(&report, "bad_json"), 1);
    assert_eq!(skipped(&report, "bad_turn"), 1);
    assert_eq!(skipped(&report, "not_alternating"), 1);
    assert_eq!(report.skipped_total(), 3);
    assert!(report.truncated_tail);
}

#[test]
fn a_closed_array_with_trailing_garbage_is_complete_but_counts_the_garbage() {
    let text = br#"[{"id": "x", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}] junk"#;
    let (report, records) = sharegpt::parse_bytes(text);
    assert_eq!(records, 1);
    assert_eq!(report.conversations.len(), 1);
    assert!(!report.truncated_tail);
    assert_eq!(skipped(&report, "trailing_data"), 1);
}

#[test]
fn an_empty_array_is_a_typed_error_naming_the_file() {
    let path = fixture("empty.json");
    match sharegpt::load(&path) {
        Err(ShareGptError::NoUsableConversation {
            path: p, records, ..
        }) => {
            assert_eq!(p, path);
            assert_eq!(records, 0);
        }
        other => panic!("expected NoUsableConversation, got {other:?}"),
    }
}

#[test]
fn a_file_of_only_unusable_records_is_a_typed_error_that_lists_the_reasons() {
    let path = fixture("unusable.jsonl");
    let err = sharegpt::load(&path).expect_err("nothing usable");
    assert!(
        matches!(&err, ShareGptError::NoUsableConversation { records: 2, .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("unusable.jsonl")
            && msg.contains("no_exchange: 1")
            && msg.contains("unknown_role: 1"),
        "{msg}"
    );
}

#[test]
fn a_missing_file_is_an_io_error_naming_it() {
    let path = fixture("does-not-exist.json");
    let err = sharegpt::load(&path).expect_err("missing");
    assert!(matches!(&err, ShareGptError::Io { path: p, .. } if *p == path));
}

#[test]
fn chunks_of_one_shared_conversation_fall_on_the_same_side() {
    assert_eq!(heldout_group("QWJhYvA_0"), "QWJhYvA");
    assert_eq!(heldout_group("QWJhYvA_17"), "QWJhYvA");
    // Other id shapes are their own group.
    assert_eq!(heldout_group("identity_3"), "identity_3");
    assert_eq!(heldout_group("QWJhYvA_x"), "QWJhYvA_x");
    assert_eq!(heldout_group("QWJh-vA_1"), "QWJh-vA_1");
    for i in 0..2000 {
        let base = format!("s{i:06}");
        let side = id_is_heldout(&format!("{base}_0"));
        for chunk in [1, 5, 23] {
            assert_eq!(id_is_heldout(&format!("{base}_{chunk}")), side, "{base}");
        }
    }
}

#[test]
fn about_one_conversation_in_twenty_is_held_out() {
    let n = 20_000;
    let held = (0..n)
        .filter(|i| id_is_heldout(&format!("conv-{i}")))
        .count();
    let rate = held as f64 / n as f64;
    assert!((0.04..0.06).contains(&rate), "held-out rate {rate}");
    let conv = Conversation {
        id: "conv-1".into(),
        turns: vec![],
    };
    assert_eq!(is_heldout(&conv), id_is_heldout("conv-1"));
}
