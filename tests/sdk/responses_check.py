"""The official OpenAI Python SDK's Responses and Conversations clients against Switchyard.

Run by tests/sdk.rs with the base URL as the first argument and the mock's base URL as the
second; exits non-zero on any mismatch.
"""
import asyncio
import json
import sys
import time
import urllib.request

import openai
from openai import AsyncOpenAI, OpenAI

BASE, MOCK = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=BASE, api_key="sk-unused", max_retries=0)


def mock_messages():
    """The messages of the last chat request the mock upstream received."""
    with urllib.request.urlopen(MOCK + "/last-request") as r:
        return json.load(r)["messages"]


# create, retrieve, output_text
first = client.responses.create(model="m", input="hello responses", instructions="be brief")
assert first.status == "completed", first
assert first.output_text == "hello responses", first
assert first.id.startswith("resp_") and first.output[0].id.startswith("msg_")
assert first.usage.input_tokens > 0 and first.usage.total_tokens >= first.usage.output_tokens
assert client.responses.retrieve(first.id).output_text == "hello responses"

# previous_response_id: the model sees the earlier turn, not its instructions
second = client.responses.create(model="m", input="and again", previous_response_id=first.id)
assert second.previous_response_id == first.id
seen = [(m["role"], m["content"]) for m in mock_messages()]
assert seen == [
    ("user", "hello responses"),
    ("assistant", "hello responses"),
    ("user", "and again"),
], seen

items = client.responses.input_items.list(second.id)
assert [i.type for i in items.data] == ["message"], items
assert items.data[0].content[0].text == "and again"

# the stream helper: events in order, a final response
with client.responses.stream(model="m", input="stream through the helper") as stream:
    kinds = [event.type for event in stream]
    final = stream.get_final_response()
assert final.output_text == "stream through the helper", final
assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
assert "response.output_text.delta" in kinds

# a stored response's events, replayed for the helper (and resumed after a number)
with client.responses.stream(response_id=final.id) as stream:
    assert stream.get_final_response().output_text == "stream through the helper"
with client.responses.stream(response_id=final.id, starting_after=2) as stream:
    resumed = [event.sequence_number for event in stream]
assert resumed and resumed[0] == 3, resumed

# raw create(stream=True): sequence numbers strictly increase
numbers = [e.sequence_number for e in client.responses.create(model="m", input="raw", stream=True)]
assert numbers == list(range(len(numbers))), numbers

# store=False: answered, not retrievable
unstored = client.responses.create(model="m", input="forget me", store=False)
try:
    client.responses.retrieve(unstored.id)
    raise AssertionError("expected 404")
except openai.NotFoundError:
    pass

# function calls: a round trip through the client
tools = [{"type": "function", "name": "get_weather", "strict": True, "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}},
    "required": ["city"], "additionalProperties": False}}]
call_turn = client.responses.create(model="m", input="Rome", tools=tools)
calls = [o for o in call_turn.output if o.type == "function_call"]
assert len(calls) == 1 and calls[0].name == "get_weather", call_turn.output
assert json.loads(calls[0].arguments) == {"city": "Rome"}
answer = client.responses.create(
    model="m", previous_response_id=call_turn.id, tools=tools,
    input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}],
)
assert answer.output_text.startswith("Here is what the tools returned"), answer
sent = mock_messages()
assert sent[-2]["tool_calls"][0]["id"] == calls[0].call_id and sent[-1]["content"] == "sunny", sent

with client.responses.stream(model="m", input="Oslo", tools=tools) as stream:
    for _ in stream:
        pass
    streamed = stream.get_final_response()
fc = [o for o in streamed.output if o.type == "function_call"]
assert fc and json.loads(fc[0].arguments) == {"city": "Oslo"}, streamed.output

# Anthropic behind the same API
claude = client.responses.create(model="claude", input="hi claude")
assert claude.output_text == "hi claude", claude

# conversations: create, turns, items in both orders, paging, update, delete
conv = client.conversations.create(
    metadata={"topic": "sdk"}, items=[{"role": "user", "content": "remember: blue"}]
)
assert conv.object == "conversation" and conv.metadata == {"topic": "sdk"}
client.responses.create(model="m", input="turn one", conversation=conv.id)
client.responses.create(model="m", input="turn two", conversation={"id": conv.id})
asc = client.conversations.items.list(conv.id, order="asc", limit=100)
texts = [i.content[0].text for i in asc.data]
assert texts == ["remember: blue", "turn one", "turn one", "turn two", "turn two"], texts
assert any(m["content"] == "remember: blue" for m in mock_messages())
paged = [i.id for i in client.conversations.items.list(conv.id, limit=2)]  # auto-paging
assert paged == [i.id for i in reversed(asc.data)], paged
added = client.conversations.items.create(conv.id, items=[{"role": "user", "content": "extra"}])
assert added.data[0].content[0].text == "extra"
got = client.conversations.items.retrieve(added.data[0].id, conversation_id=conv.id)
assert got.id == added.data[0].id
after_delete = client.conversations.items.delete(added.data[0].id, conversation_id=conv.id)
assert after_delete.id == conv.id
updated = client.conversations.update(conv.id, metadata={"topic": "changed"})
assert client.conversations.retrieve(conv.id).metadata == {"topic": "changed"} == updated.metadata
deleted = client.conversations.delete(conv.id)
assert deleted.deleted and deleted.object == "conversation.deleted"
try:
    client.conversations.retrieve(conv.id)
    raise AssertionError("expected 404")
except openai.NotFoundError:
    pass

# both history sources at once: OpenAI's 400
try:
    client.responses.create(model="m", input="x", previous_response_id=first.id, conversation="conv_x1")
    raise AssertionError("expected 400")
except openai.BadRequestError:
    pass

# counting and deleting
count = client.responses.input_tokens.count(model="m", input="count these words please")
assert count.input_tokens > 0, count
client.responses.delete(first.id)
try:
    client.responses.retrieve(first.id)
    raise AssertionError("expected 404")
except openai.NotFoundError:
    pass


# an MCP server's tools (the mock's own, over streamable HTTP), in OpenAI's hosted-tool
# shape: listed, the call waiting for approval, then approved and run
mcp = {"type": "mcp", "server_label": "mock", "server_url": MOCK + "/mcp", "allowed_tools": ["echo"]}
asked = client.responses.create(model="m", input="mcp hello", tools=[mcp])
assert [item.type for item in asked.output] == ["mcp_list_tools", "mcp_approval_request"], asked
assert [t.name for t in asked.output[0].tools] == ["echo"], asked.output[0]
approval = asked.output[1]
assert approval.server_label == "mock" and approval.name == "echo", approval
ran = client.responses.create(
    model="m",
    previous_response_id=asked.id,
    tools=[mcp],
    input=[{"type": "mcp_approval_response", "approval_request_id": approval.id, "approve": True}],
)
call = ran.output[0]
assert call.type == "mcp_call" and call.output == "mcp hello" and call.error is None, call
assert ran.output_text == "Here is what the tools returned about: mcp hello", ran

# Background: queued at once, run by a worker, read back with retrieve; cancel on a
# finished one returns it unchanged.
queued = client.responses.create(model="m", input="background hello", background=True)
assert queued.background is True and queued.status in ("queued", "in_progress"), queued
for _ in range(400):
    done = client.responses.retrieve(queued.id)
    if done.status not in ("queued", "in_progress"):
        break
    time.sleep(0.025)
assert done.status == "completed" and done.output_text == "background hello", done
assert client.responses.cancel(queued.id).status == "completed"

# A streamed background response: read two events, drop the stream, resume after the
# last one seen with retrieve(stream=True, starting_after=...).
first = client.responses.create(
    model="m", input="resume me please", background=True, stream=True
)
seen = [next(iter(first)), next(iter(first))]
first.close()
rid = seen[0].response.id
rest = list(
    client.responses.retrieve(rid, stream=True, starting_after=seen[-1].sequence_number)
)
numbers = [e.sequence_number for e in seen + rest]
assert numbers == list(range(len(numbers))), numbers
assert rest[-1].type == "response.completed", rest[-1]
assert rest[-1].response.output_text == "resume me please", rest[-1]

# Files and batches: an upload through the SDK's multipart, a batch over it, the output
# file read back.
lines = "\n".join(
    json.dumps({"custom_id": f"c{n}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "m", "messages": [{"role": "user", "content": f"batch {n}"}]}})
    for n in range(3)
)
uploaded = client.files.create(file=("in.jsonl", lines.encode()), purpose="batch")
assert uploaded.purpose == "batch" and uploaded.bytes == len(lines.encode()), uploaded
assert client.files.retrieve(uploaded.id).filename == "in.jsonl"
assert client.files.content(uploaded.id).text == lines
assert uploaded.id in [f.id for f in client.files.list(purpose="batch")]
batch = client.batches.create(
    input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
)
for _ in range(400):
    batch = client.batches.retrieve(batch.id)
    if batch.status in ("completed", "failed", "expired", "cancelled"):
        break
    time.sleep(0.025)
assert batch.status == "completed", batch
assert batch.request_counts.completed == 3 and batch.request_counts.failed == 0, batch
out = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
assert [o["custom_id"] for o in out] == ["c0", "c1", "c2"], out
assert out[1]["response"]["body"]["choices"][0]["message"]["content"] == "batch 1", out
assert batch.id in [b.id for b in client.batches.list()]
assert client.files.delete(uploaded.id).deleted is True

# WebSocket mode: two responses in sequence on one connection.
with client.responses.connect() as connection:
    for text in ("socket hello", "socket again"):
        connection.response.create(model="m", input=text)
        for event in connection:
            if event.type == "response.completed":
                assert event.response.output_text == text, event
                break
            assert event.type != "error", event


async def async_client():
    aclient = AsyncOpenAI(base_url=BASE, api_key="sk-unused", max_retries=0)
    done = await aclient.responses.create(model="m", input="async hello")
    assert done.output_text == "async hello", done
    async with aclient.responses.stream(model="m", input="async stream") as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_response()
    assert final.output_text == "async stream", final


asyncio.run(async_client())
print("openai sdk responses: ok")
