"""The official `openai` Python SDK, unchanged, against Keel.

Run by the Rust test `keel::cli sdk::*` with KEEL_BASE_URL and KEEL_API_KEY set, against
a `keel serve` whose model `default` routes to a `keel mock-llm` started with the script
tests/sdk/script.json (replies cycle: text, then a tool call). Exits non-zero on the first
failed check and prints what it checked.
"""
import json
import os
import sys

import openai
from openai import OpenAI

BASE = os.environ["KEEL_BASE_URL"]
KEY = os.environ["KEEL_API_KEY"]
client = OpenAI(base_url=BASE, api_key=KEY, max_retries=0)
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
passed = []


def check(name, ok, detail=""):
    if not ok:
        print(f"FAILED {name}: {detail}")
        print(f"{len(passed)} passed, 1 failed")
        sys.exit(1)
    passed.append(name)
    print(f"ok {name}")


# 1. Whole answer: scripted text.
r = client.chat.completions.create(model="default", messages=USER)
check("chat text", r.choices[0].message.content == "It is sunny in Paris.", r)
check("chat model is the route", r.model == "default", r.model)
check("chat usage", r.usage is not None and r.usage.total_tokens > 0, r.usage)

# 2. Whole answer: scripted tool call.
r = client.chat.completions.create(model="default", messages=USER, tools=TOOLS)
call = r.choices[0].message.tool_calls[0]
check("tool call name", call.function.name == "get_weather", call)
check("tool call arguments", json.loads(call.function.arguments) == {"city": "Paris"}, call.function.arguments)
check("tool call finish", r.choices[0].finish_reason == "tool_calls", r.choices[0].finish_reason)

# 3. The tool result goes back (the request must be accepted as OpenAI shapes it).
followup = USER + [
    {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "sunny"})},
]
stream = client.chat.completions.create(model="default", messages=followup, tools=TOOLS, stream=True,
                                        stream_options={"include_usage": True})
text, usage = "", None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage:
        usage = chunk.usage
check("stream text", text == "It is sunny in Paris.", text)
check("stream usage", usage is not None and usage.completion_tokens > 0, usage)

# 4. Streamed tool call, reassembled from deltas.
stream = client.chat.completions.create(model="default", messages=USER, tools=TOOLS, stream=True)
name, args, finish = "", "", None
for chunk in stream:
    for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
        name += tc.function.name or ""
        args += tc.function.arguments or ""
    if chunk.choices and chunk.choices[0].finish_reason:
        finish = chunk.choices[0].finish_reason
check("stream tool call", name == "get_weather" and json.loads(args) == {"city": "Paris"}, (name, args))
check("stream tool finish", finish == "tool_calls", finish)

# 5. Embeddings (the SDK asks for base64 and decodes it).
e = client.embeddings.create(model="default", input=["hello", "world"])
check("embeddings count", len(e.data) == 2, e)
check("embeddings vectors", len(e.data[0].embedding) == 8 and e.data[0].embedding != e.data[1].embedding, e.data[0])
check("embeddings usage", e.usage.prompt_tokens == 2, e.usage)

# 6. Models, and errors as the SDK's typed exceptions.
ids = [m.id for m in client.models.list()]
check("models", "default" in ids, ids)
try:
    client.chat.completions.create(model="no-such-model", messages=USER)
    check("unknown model is 404", False, "no error")
except openai.NotFoundError as e:
    check("unknown model is 404", "available" in str(e), str(e))
try:
    OpenAI(base_url=BASE, api_key="keel_" + "x" * 43, max_retries=0).models.list()
    check("bad key is 401", False, "no error")
except openai.AuthenticationError:
    check("bad key is 401", True)

print(f"{len(passed)} passed, 0 failed")
