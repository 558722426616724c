"""The official OpenAI Python SDK against Switchyard, unchanged but for the base URL.

Run by tests/sdk.rs with the base URL as the first argument; exits non-zero on any mismatch.
"""
import sys

import openai
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key="sk-unused", max_retries=0)

reply = client.chat.completions.create(
    model="m", messages=[{"role": "user", "content": "hello sdk"}]
)
assert reply.choices[0].message.content == "hello sdk", reply
assert reply.usage.total_tokens > 0

parts, usage = [], None
for chunk in client.chat.completions.create(
    model="m",
    stream=True,
    stream_options={"include_usage": True},
    messages=[{"role": "user", "content": "stream via the sdk"}],
):
    if chunk.choices:
        parts.append(chunk.choices[0].delta.content or "")
    if chunk.usage:
        usage = chunk.usage
assert "".join(parts) == "stream via the sdk", parts
assert usage is not None and usage.completion_tokens > 0

tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
for model in ("m", "claude"):
    calls = {}
    for chunk in client.chat.completions.create(
        model=model, stream=True, tools=tools,
        messages=[{"role": "user", "content": "Rome"}],
    ):
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            if tc.function and tc.function.name:
                call["name"] += tc.function.name
            if tc.function and tc.function.arguments:
                call["arguments"] += tc.function.arguments
    assert calls == {0: {"name": "get_weather", "arguments": '{"city":"Rome"}'}}, (model, calls)

claude = client.chat.completions.create(
    model="claude", messages=[{"role": "user", "content": "hi claude"}]
)
assert claude.choices[0].message.content == "hi claude", claude

emb = client.embeddings.create(model="m", input=["a", "b"])  # the SDK asks for base64
assert [d.index for d in emb.data] == [0, 1] and len(emb.data[0].embedding) == 8

assert sorted(m.id for m in client.models.list()) == ["claude", "m"]

try:
    client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("expected 404")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e

try:
    client.chat.completions.create(model="m", messages=[])
    raise AssertionError("expected 400")
except openai.BadRequestError as e:
    assert e.param == "messages", e

print("openai sdk: ok")
