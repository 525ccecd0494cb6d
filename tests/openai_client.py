#!/usr/bin/env python3
"""The official `openai` Python client against a served SmolLM2: list models, chat without and
with streaming, and completions. Usage: openai_client.py BASE_URL (e.g. http://127.0.0.1:8080)."""
import sys

import openai

base = sys.argv[1].rstrip("/") + "/v1"
client = openai.OpenAI(base_url=base, api_key="unused-in-open-mode")

models = [m.id for m in client.models.list()]
assert "smollm2" in models, models

messages = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
chat = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=32, temperature=0)
answer = chat.choices[0].message.content
assert "Paris" in answer, answer
assert chat.choices[0].finish_reason == "stop", chat.choices[0].finish_reason
assert chat.usage.completion_tokens > 0 and chat.usage.prompt_tokens > 0, chat.usage

stream = client.chat.completions.create(
    model="smollm2", messages=messages, max_tokens=32, temperature=0, stream=True,
    stream_options={"include_usage": True},
)
parts, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            parts.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
streamed = "".join(parts)
assert streamed == answer, (streamed, answer)
assert finish == "stop" and usage is not None and usage.completion_tokens == chat.usage.completion_tokens

completion = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=8, temperature=0)
assert completion.choices[0].finish_reason == "length"
assert completion.usage.completion_tokens == 8
assert len(completion.choices[0].text) > 0

try:
    client.chat.completions.create(model="nope", messages=messages)
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert "smollm2" in str(e), e

print(f"openai client: {len(models)} models; chat {answer!r}; stream equal; completion {completion.choices[0].text!r}")
print("4 passed, 0 failed")
