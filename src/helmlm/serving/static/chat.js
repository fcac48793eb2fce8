// The page of `helmlm serve`: a chat over the server's own /v1/chat/completions, streamed as server-sent events.
// The history lives in the page (the API is stateless); Stop aborts the request, and the server then stops
// generating for it. No dependencies: it ships inside the package and needs no network beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
let conversation = [];  // [{role, content}] so far, without the system message
let model = null;
let controller = null;  // the AbortController of the reply being streamed

function setState(state) {  // "loading" | "ready" | "streaming" | "offline"; tests wait on it too
  document.body.dataset.state = state;
  $("send").disabled = state !== "ready";
  $("stop").disabled = state !== "streaming";
}

function notice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;  // text, never HTML: a reply cannot inject markup
  $("log").append(div);
  div.scrollIntoView({block: "end"});
  return div;
}

function number(id, parse) {
  const raw = $(id).value.trim();
  const value = parse(raw);
  if (raw === "" || !Number.isFinite(value)) throw new Error(`${id} must be a number`);
  return value;
}

function request(messages) {
  const body = {
    model, messages, stream: true,
    temperature: number("temperature", parseFloat),
    top_p: number("top_p", parseFloat),
    max_tokens: number("max_tokens", (s) => parseInt(s, 10)),
  };
  if ($("seed").value.trim() !== "") body.seed = number("seed", (s) => parseInt(s, 10));
  return body;
}

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api_key").value;
  if (key) {
    h.Authorization = `Bearer ${key}`;
    sessionStorage.setItem("helmlm-api-key", key);
  }
  return h;
}

// The `data:` payloads of a server-sent event stream (blank-line separated events; comment lines such as pings
// are skipped). A "\r" at the end of a read may be half of "\r\n", so it waits for the next read.
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    pending += value;
    const hold = pending.endsWith("\r") ? 1 : 0;
    const blocks = pending.slice(0, pending.length - hold).replace(/\r\n?/g, "\n").split("\n\n");
    pending = blocks.pop() + pending.slice(pending.length - hold);
    for (const block of blocks) {
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
      if (data.length) yield data.join("\n");
    }
  }
}

async function errorMessage(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `the server answered HTTP ${response.status}`;
  }
}

async function send(text) {
  let body;
  try {
    const system = $("system").value.trim();
    body = request([...(system ? [{role: "system", content: system}] : []), ...conversation, {role: "user", content: text}]);
  } catch (err) {
    notice(err.message);
    return;
  }
  notice("");
  const turns = conversation;  // "New chat" while this streams starts a new array; this reply stays in the old one
  turns.push({role: "user", content: text});
  bubble("user", text);
  const reply = bubble("assistant", "");
  reply.classList.add("streaming");
  setState("streaming");
  controller = new AbortController();
  const started = performance.now();
  let content = "", finish = null, usage = null;
  try {
    const response = await fetch("v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(body),
                                                          signal: controller.signal});
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const data of events(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (choice.delta.content) {
        content += choice.delta.content;
        reply.textContent = content;
        reply.scrollIntoView({block: "end"});
      }
      finish = choice.finish_reason || finish;
      usage = chunk.usage || usage;
    }
    turns.push({role: "assistant", content});
  } catch (err) {
    if (err.name === "AbortError") {  // Stop: keep what came, as the terminal chat does
      finish = "stopped";
      turns.push({role: "assistant", content});
    } else {
      turns.pop();  // the message did not get an answer: it can be sent again
      reply.classList.add("error");
      reply.textContent = err.message;
      finish = "error";
    }
  } finally {
    controller = null;
    reply.classList.remove("streaming");
    reply.dataset.finish = finish || "stop";
    const stats = document.createElement("div");
    stats.className = "stats";
    const seconds = (performance.now() - started) / 1000;
    stats.textContent = usage
      ? `${usage.completion_tokens} tokens · ${(usage.completion_tokens / seconds).toFixed(1)} tokens/s · ${finish}`
      : finish;
    reply.after(stats);
    setState("ready");
  }
}

async function start() {
  setState("loading");
  try {
    const health = await (await fetch("health")).json();
    model = health.model;
    $("model").textContent = model;
    document.title = `${model} · helmlm`;
    $("context").textContent = health.context ? `context ${health.context} tokens` : "";
    $("key-row").hidden = !health.auth;
    $("api_key").value = sessionStorage.getItem("helmlm-api-key") || "";
    setState("ready");
  } catch (err) {
    notice(`cannot reach the server: ${err.message}`);
    setState("offline");
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || document.body.dataset.state !== "ready") return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation = [];
  $("log").replaceChildren();
  notice("");
});
start();
