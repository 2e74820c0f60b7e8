// Drives a running sluice with the official `openai` Node SDK, as a user would: a
// streamed chat, and streamed tool calls read both chunk by chunk and through the SDK's
// own stream helper.
// usage: node openai_node.mjs BASE_URL API_KEY MODEL   (prints OK on success)
import assert from "node:assert/strict";
import OpenAI from "openai";

const [base, apiKey, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `${base}/v1`, apiKey, maxRetries: 0 });

let text = "";
for await (const chunk of await client.chat.completions.create({
  model, messages: [{ role: "user", content: "Name three colors." }],
  max_tokens: 12, temperature: 0, stream: true,
})) {
  text += chunk.choices[0]?.delta?.content ?? "";
}
assert.ok(text.length > 0, "streamed text");

const tools = [{
  type: "function",
  function: {
    name: "get_weather", description: "Current weather in a city",
    parameters: { type: "object", properties: { city: { type: "string" } },
                  required: ["city"], additionalProperties: false },
  },
}];
const ask = {
  model, messages: [{ role: "user", content: "What is the weather in Paris?" }],
  tools, tool_choice: "required", parallel_tool_calls: false, max_tokens: 60, temperature: 0,
};

// Chunk by chunk: the id and name arrive first, the arguments in pieces.
const calls = [];
let finish = null;
let pieces = 0;
for await (const chunk of await client.chat.completions.create({ ...ask, stream: true })) {
  const choice = chunk.choices[0];
  if (!choice) continue;
  for (const d of choice.delta?.tool_calls ?? []) {
    if (d.id) {
      assert.equal(d.index, calls.length);
      assert.equal(d.type, "function");
      calls.push({ id: d.id, name: d.function.name, arguments: d.function.arguments ?? "" });
    } else {
      calls[d.index].arguments += d.function.arguments;
      pieces += 1;
    }
  }
  finish = choice.finish_reason ?? finish;
}
assert.equal(finish, "tool_calls");
assert.equal(calls.length, 1);
assert.equal(calls[0].name, "get_weather");
assert.equal(typeof JSON.parse(calls[0].arguments).city, "string");
assert.ok(pieces > 1, `arguments in pieces (${pieces})`);

// The SDK's stream helper assembles the same call.
const runner = client.chat.completions.stream(ask);
const done = await runner.finalChatCompletion();
const call = done.choices[0].message.tool_calls[0];
assert.equal(call.function.name, "get_weather");
assert.equal(call.function.arguments, calls[0].arguments);
assert.equal(done.choices[0].finish_reason, "tool_calls");
console.log("OK");
