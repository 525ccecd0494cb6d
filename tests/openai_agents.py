#!/usr/bin/env python3
"""The agents' API through the official `openai` Python client, against a served SmolLM2:
structured outputs (`chat.completions.parse` with Pydantic, a `json_schema` checked with
`jsonschema`), tool calls (named, streamed and not), a two-turn agent loop with a tool
result, logprobs (chat and completions, streamed and not), and the 400s for bad agent fields.

Usage: openai_agents.py BASE_URL. The server must serve `smollm2` and `smollm2-small` (the same
file with max_context = 256, for the tools-over-context check)."""
import json
import sys

import jsonschema
import openai
from pydantic import BaseModel, Field

base = sys.argv[1].rstrip("/") + "/v1"
client = openai.OpenAI(base_url=base, api_key="unused-in-open-mode")
passed = 0


def check(name):
    def wrap(f):
        global passed
        f()
        passed += 1
        print(f"ok: {name}")
        return f

    return wrap


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=150)
    city: str


@check("chat.completions.parse with a Pydantic model returns a parsed object")
def _():
    for seed in range(3):
        completion = client.chat.completions.parse(
            model="smollm2",
            messages=[{"role": "user", "content": "Invent a person living in a big city."}],
            response_format=Person,
            temperature=0.8 if seed else 0,
            seed=seed,
            max_tokens=80,
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", choice
        person = choice.message.parsed
        assert isinstance(person, Person), choice.message
        assert 0 <= person.age <= 150


WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}

REPORT_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
        "draft": {"type": "boolean"},
    },
    "required": ["title", "tags", "score", "draft"],
    "additionalProperties": False,
}


@check("a json_schema response validates, streamed and not")
def _():
    response_format = {"type": "json_schema", "json_schema": {"name": "report", "schema": REPORT_SCHEMA, "strict": True}}
    messages = [{"role": "user", "content": "Write a short report about the sea as JSON."}]
    chat = client.chat.completions.create(
        model="smollm2", messages=messages, response_format=response_format, temperature=0, max_tokens=120
    )
    text = chat.choices[0].message.content
    jsonschema.validate(json.loads(text), REPORT_SCHEMA)
    stream = client.chat.completions.create(
        model="smollm2", messages=messages, response_format=response_format, temperature=0, max_tokens=120, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == text, (streamed, text)
    obj = client.chat.completions.create(
        model="smollm2", messages=messages, response_format={"type": "json_object"}, temperature=0, max_tokens=120
    )
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": WEATHER_SCHEMA,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Get the current time in a timezone",
            "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]},
        },
    },
]


def check_calls(calls):
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function"
        assert call.function.name == "get_weather", call
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_SCHEMA)
        assert call.id


@check("a named tool_choice returns tool_calls that parse, streamed and not")
def _():
    messages = [{"role": "user", "content": "What's the weather like in Paris today?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    chat = client.chat.completions.create(
        model="smollm2", messages=messages, tools=TOOLS, tool_choice=named, temperature=0, max_tokens=100
    )
    choice = chat.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert not choice.message.content, choice.message
    check_calls(choice.message.tool_calls)

    stream = client.chat.completions.create(
        model="smollm2", messages=messages, tools=TOOLS, tool_choice=named, temperature=0, max_tokens=100, stream=True
    )
    calls, finish = {}, None
    for chunk in stream:
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = d.id or entry["id"]
                if d.function and d.function.name:
                    entry["name"] += d.function.name
                if d.function and d.function.arguments:
                    entry["arguments"] += d.function.arguments
            finish = c.finish_reason or finish
    assert finish == "tool_calls", finish
    assert [(v["name"], v["arguments"]) for v in calls.values()] == [
        (t.function.name, t.function.arguments) for t in choice.message.tool_calls
    ], (calls, choice.message.tool_calls)

    required = client.chat.completions.create(
        model="smollm2", messages=messages, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=100
    )
    assert required.choices[0].finish_reason == "tool_calls"
    assert required.choices[0].message.tool_calls


@check("an agent loop: a tool call, its result sent back, and the answer")
def _():
    messages = [{"role": "user", "content": "What's the weather like in Paris today?"}]
    first = client.chat.completions.create(
        model="smollm2", messages=messages, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=100
    )
    message = first.choices[0].message
    check_calls(message.tool_calls)
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls:
        args = json.loads(call.function.arguments)
        messages.append(
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"city": args["city"], "temperature": 18, "sky": "sunny"})}
        )
    second = client.chat.completions.create(model="smollm2", messages=messages, tools=TOOLS, temperature=0, max_tokens=100)
    choice = second.choices[0]
    # The model may answer or call again; either way the protocol holds.
    if choice.finish_reason == "tool_calls":
        assert choice.message.tool_calls
    else:
        assert choice.finish_reason in ("stop", "length"), choice
        assert choice.message.content, choice.message
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


@check("logprobs: top-1 equals the sampled token under greedy, streamed equals non-streamed")
def _():
    messages = [{"role": "user", "content": "Name three colours."}]
    chat = client.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert content and len(content) <= chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token, entry
        assert abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-5, entry
        assert entry.logprob <= 0
    assert "".join(e.token for e in content) == chat.choices[0].message.content
    stream = client.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3, stream=True
    )
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    completion = client.completions.create(model="smollm2", prompt="The sky is", max_tokens=6, temperature=0, logprobs=2)
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert max(top.values()) == logprob and top[token] == logprob, (token, logprob, top)


def bad_request(param, **kwargs):
    try:
        client.chat.completions.create(model=kwargs.pop("model", "smollm2"), max_tokens=8, **kwargs)
    except openai.BadRequestError as e:
        assert e.body and e.body.get("param") == param, (param, e.body)
        return e
    raise AssertionError(f"accepted a bad {param}")


@check("bad agent fields get a 400 naming the parameter")
def _():
    hi = [{"role": "user", "content": "hi"}]
    bad_request("tool_choice", messages=hi, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    bad_request("response_format", messages=hi, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": "a string"}})
    bad_request(
        "response_format",
        messages=hi,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?<=a)b"}}},
    )
    bad_request("top_logprobs", messages=hi, logprobs=True, top_logprobs=21)
    bad_request("tools[0].type", messages=hi, tools=[{"type": "retrieval", "function": {"name": "x"}}])
    big = [
        {"type": "function", "function": {"name": f"tool_{i}", "description": "Looks things up. " * 20, "parameters": {"type": "object"}}}
        for i in range(4)
    ]
    e = bad_request("tools", model="smollm2-small", messages=hi, tools=big)
    assert "tools" in e.body["message"], e.body
    for kwargs, param in [({"echo": True, "logprobs": 1}, "echo"), ({"logprobs": 21}, "logprobs")]:
        try:
            client.completions.create(model="smollm2", prompt="hi", max_tokens=4, **kwargs)
            raise AssertionError(f"accepted a bad {param}")
        except openai.BadRequestError as e:
            assert e.body and e.body.get("param") == param, (param, e.body)


print(f"{passed} passed, 0 failed")
