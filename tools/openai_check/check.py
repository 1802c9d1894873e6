"""Drives `specauf serve` with the official `openai` Python client: models, a chat completion,
a streamed chat completion with usage, a legacy completion, and the error classes the client
raises. Prints `openai check: ok` at the end; any failure raises.

    python check.py --base-url http://127.0.0.1:8000/v1 --model smollm2 [--api-key KEY]
"""

import argparse

import openai
from openai import OpenAI


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--api-key", default="none")
    a = ap.parse_args()
    client = OpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=0, timeout=60)

    models = client.models.list()
    assert [m.id for m in models.data] == [a.model], models

    chat = client.chat.completions.create(
        model=a.model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=16,
        temperature=0,
    )
    text = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length"), chat
    assert chat.usage.completion_tokens >= 1 and chat.usage.prompt_tokens >= 1, chat.usage
    spec = chat.usage.model_extra["speculative"]
    assert spec["cycles"] >= 1 and spec["tau"] >= 1.0, spec

    stream = client.chat.completions.create(
        model=a.model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == text, (pieces, text)
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage

    comp = client.completions.create(model=a.model, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert comp.choices[0].text is not None and comp.usage.completion_tokens >= 1, comp

    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404 and e.body["code"] == "model_not_found", e.body
    try:
        client.chat.completions.create(model=a.model, messages=[{"role": "user", "content": "x"}], max_tokens=-1)
        raise AssertionError("a negative max_tokens was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.body["param"] == "max_tokens", e.body
    print("openai check: ok")


if __name__ == "__main__":
    main()
