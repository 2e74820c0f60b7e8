"""Drives a running sluice with the official `openai` Python SDK, as a user would.

usage: openai_sdk.py BASE_URL API_KEY MODEL   (prints OK on success; any failure raises)
"""
import sys

import openai

base, key, model = sys.argv[1:4]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
messages = [{"role": "user", "content": "Name three colors."}]

assert model in [m.id for m in client.models.list().data]
one = client.models.retrieve(model)
assert one.id == model and one.object == "model", one
try:
    client.models.retrieve("no-such-model")
    raise AssertionError("an unknown model was retrieved")
except openai.NotFoundError as e:
    assert e.status_code == 404 and e.code == "model_not_found", e

whole = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
assert whole.object == "chat.completion"
answer = whole.choices[0].message.content
assert answer and whole.choices[0].finish_reason in ("stop", "length")
# OpenAI's schema: `refusal` is in every message (null when the model did not refuse).
assert "refusal" in whole.choices[0].message.model_fields_set, whole.choices[0].message
assert whole.choices[0].message.refusal is None
assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0

# Structured output: the SDK's `parse` with a Pydantic model sends a strict json_schema
# and parses the reply into the model.
from typing import Literal

import pydantic


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=16)
    kind: Literal["cat", "dog", "fish"]
    age: int = pydantic.Field(ge=0, le=30)


parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
parsed = parse(
    model=model, messages=[{"role": "user", "content": "Describe a pet."}],
    response_format=Pet, max_tokens=60, temperature=0,
)
pet = parsed.choices[0].message.parsed
assert isinstance(pet, Pet), parsed
assert parsed.choices[0].finish_reason == "stop", parsed

# Tools: a required call, the tool's result, then the final answer.
import json

tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}]
ask = [{"role": "user", "content": "What is the weather in Paris?"}]
first = client.chat.completions.create(
    model=model, messages=ask, tools=tools, tool_choice="required",
    parallel_tool_calls=False, max_tokens=60, temperature=0,
)
assert first.choices[0].finish_reason == "tool_calls", first
call = first.choices[0].message.tool_calls[0]
assert call.type == "function" and call.function.name == "get_weather" and call.id, call
assert isinstance(json.loads(call.function.arguments)["city"], str), call
history = ask + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function",
         "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21, "sky": "clear"})},
]
final = client.chat.completions.create(model=model, messages=history, tools=tools, max_tokens=40, temperature=0)
assert final.choices[0].message.content, final
assert final.choices[0].finish_reason in ("stop", "length"), final

# The Responses API: plain, streamed, continued, retrieved, structured, with tools.
r = client.responses.create(model=model, input="Name three colors.", max_output_tokens=12, temperature=0)
assert r.object == "response" and r.status in ("completed", "incomplete") and r.output_text, r
events = list(client.responses.create(
    model=model, input="Name three colors.", max_output_tokens=12, temperature=0, stream=True))
kinds = [e.type for e in events]
assert kinds[:2] == ["response.created", "response.in_progress"], kinds
assert kinds[-1] in ("response.completed", "response.incomplete"), kinds
assert [e.sequence_number for e in events] == list(range(len(events)))
assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
r2 = client.responses.create(model=model, input="And three more?", previous_response_id=r.id,
                             max_output_tokens=8, temperature=0)
assert r2.usage.input_tokens > r.usage.input_tokens + r.usage.output_tokens, (r.usage, r2.usage)
assert client.responses.retrieve(r.id).output_text == r.output_text
pet_r = client.responses.parse(model=model, input="Describe a pet.", text_format=Pet,
                               max_output_tokens=60, temperature=0)
assert isinstance(pet_r.output_parsed, Pet), pet_r
rtools = [{"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": tools[0]["function"]["parameters"], "strict": True}]
r4 = client.responses.create(model=model, input="What is the weather in Paris?", tools=rtools,
                             tool_choice="required", parallel_tool_calls=False,
                             max_output_tokens=60, temperature=0)
fc = [o for o in r4.output if o.type == "function_call"][0]
assert fc.name == "get_weather" and isinstance(json.loads(fc.arguments)["city"], str), r4
r5 = client.responses.create(model=model, previous_response_id=r4.id, tools=rtools,
                             input=[{"type": "function_call_output", "call_id": fc.call_id, "output": "21C, clear"}],
                             max_output_tokens=30, temperature=0)
assert r5.output_text, r5

text, usage = "", None
for chunk in client.chat.completions.create(
    model=model, messages=messages, max_tokens=12, temperature=0,
    stream=True, stream_options={"include_usage": True},
):
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage:
        usage = chunk.usage
assert text == answer, (text, answer)
assert usage.completion_tokens == whole.usage.completion_tokens

done = client.completions.create(model=model, prompt="The capital of France is", max_tokens=6, temperature=0)
assert done.choices[0].text and done.usage.completion_tokens == 6
streamed = "".join(
    c.choices[0].text
    for c in client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True
    )
    if c.choices
)
assert streamed == done.choices[0].text, (streamed, done.choices[0].text)

try:
    openai.OpenAI(base_url=base + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401 and e.code == "invalid_api_key", e

try:
    client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404 and e.code == "model_not_found", e

try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=2, temperature=7)
    raise AssertionError("temperature 7 was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and e.param == "temperature", e

print("OK")
