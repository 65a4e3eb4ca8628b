import { ApiError, api, say, send, start } from "../js/api.js";
import { count, el, micros, usd } from "../js/format.js";
import { events } from "../js/sse.js";

const history = [];
let running = null; // the AbortController of the reply being streamed

function bubble(role, text) {
  const body = el("div", { class: "text" }, text);
  const meta = el("div", { class: "meta" });
  const node = el("article", { class: `msg ${role}`, "aria-label": role === "user" ? "You" : "Assistant" },
    el("div", { class: "who-said" }, role === "user" ? "You" : "Assistant"), body, meta);
  document.getElementById("chat").append(node);
  return { node, body, meta };
}

function settings() {
  const body = {
    model: document.getElementById("model").value,
    temperature: Number(document.getElementById("temperature").value),
    max_tokens: Number(document.getElementById("max-tokens").value),
    stream: true,
    stream_options: { include_usage: true },
  };
  if (document.getElementById("json-mode").checked) body.response_format = { type: "json_object" };
  const system = document.getElementById("system").value.trim();
  body.messages = [...(system ? [{ role: "system", content: system }] : []), ...history];
  return body;
}

async function reply(message) {
  history.push({ role: "user", content: message });
  bubble("user", message);
  const out = bubble("assistant", "");
  out.node.setAttribute("aria-busy", "true");
  const began = performance.now();
  let first = null, usage = null, text = "", finish = null, requestId = null;
  running = new AbortController();
  try {
    const response = await send("/v1/chat/completions", { method: "POST", body: settings(), signal: running.signal });
    if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
    requestId = response.headers.get("x-request-id");
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) {
          if (first === null) first = performance.now();
          text += choice.delta.content;
          out.body.textContent = text;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      if (chunk.usage) usage = chunk.usage;
    }
    history.push({ role: "assistant", content: text });
  } catch (error) {
    history.pop();
    out.meta.append(el("span", { class: "bad" }, error.name === "AbortError" ? "stopped" : error.message));
    if (error.name !== "AbortError") throw error;
  } finally {
    running = null;
    out.node.removeAttribute("aria-busy");
  }
  const total = performance.now() - began;
  const facts = [];
  if (usage) {
    const cached = (usage.prompt_tokens_details || {}).cached_tokens || 0;
    facts.push(["prompt", `${count(usage.prompt_tokens)} prompt tokens`], ["cached", `${count(cached)} cached`],
      ["completion", `${count(usage.completion_tokens)} completion tokens`]);
    if (usage.cost !== undefined) facts.push(["cost", `cost ${usd(micros(usage.cost))}`]);
  }
  if (first !== null) facts.push(["ttft", `first token ${(first - began).toFixed(0)} ms`]);
  facts.push(["latency", `total ${(total / 1000).toFixed(2)} s`]);
  if (finish) facts.push(["finish", `finish: ${finish}`]);
  if (requestId) facts.push(["request", `request ${requestId}`]);
  out.meta.append(...facts.map(([name, text]) => el("span", { "data-fact": name }, text)));
}

start(async () => {
  const models = (await api("/v1/models")).data;
  const picker = document.getElementById("model");
  picker.replaceChildren(...models.map((m) => el("option", { value: m.id }, m.id)));
  const compose = document.getElementById("compose");
  const message = document.getElementById("message");
  const sendButton = document.getElementById("send"), stop = document.getElementById("stop");
  compose.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = message.value.trim();
    if (!text || running) return;
    message.value = "";
    sendButton.disabled = true;
    stop.disabled = false;
    say("Streaming…");
    try {
      await reply(text);
      say("Reply complete.");
    } catch (error) {
      say(error.message, true);
    } finally {
      sendButton.disabled = false;
      stop.disabled = true;
      message.focus();
    }
  });
  message.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) compose.requestSubmit();
  });
  stop.addEventListener("click", () => running && running.abort());
  document.getElementById("clear").addEventListener("click", () => {
    history.length = 0;
    document.getElementById("chat").replaceChildren();
    say("New conversation.");
    message.focus();
  });
  message.focus();
  say(models.length ? "" : "No model is served.", !models.length);
});
