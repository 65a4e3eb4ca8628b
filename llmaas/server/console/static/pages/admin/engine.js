import { api, say, start } from "../../js/api.js";
import { count, el, micros, table, usd } from "../../js/format.js";

let previous = null;

function figure(label, value, extra) {
  return el("div", {}, el("div", { class: "label" }, label), el("div", { class: "figure" }, value), extra || null);
}

async function refresh() {
  const now = await api("/console/api/admin/engine");
  const container = document.getElementById("models");
  container.replaceChildren();
  for (const [name, m] of Object.entries(now.models)) {
    const rate = (field) => {
      if (!previous || !previous.models[name]) return "—";
      const seconds = now.time - previous.time;
      return seconds > 0 ? ((m[field] - previous.models[name][field]) / seconds).toFixed(1) : "—";
    };
    const used = m.kv_blocks_used || 0, total = m.kv_blocks_total || 0;
    const kv = total ? el("meter", { min: 0, max: total, value: used, "aria-label": `KV cache use of ${name}` }) : null;
    container.append(el("section", { class: "card", "aria-label": `Engine of ${name}` },
      el("h2", {}, name, m.loaded ? "" : " (loading)"),
      el("div", { class: "grid" },
        figure("Running sequences", count(m.running ?? 0)),
        figure("Waiting sequences", count(m.waiting ?? 0)),
        figure("KV cache in use", total ? `${((100 * used) / total).toFixed(1)}% (${count(used)} / ${count(total)} blocks)` : "—", kv),
        figure("Prefix-cache hit rate", m.prefix_cache_hit_rate === undefined ? "—" : `${(100 * m.prefix_cache_hit_rate).toFixed(1)}%`),
        figure("Output tokens/s", rate("completion_tokens_total")),
        figure("Prompt tokens/s", rate("prompt_tokens_total")),
        figure("Preemptions", count(m.preemptions ?? 0)),
        figure("Tokens served", `${count(m.prompt_tokens_total)} in (${count(m.cached_tokens_total)} cached) / ${count(m.completion_tokens_total)} out`))));
  }
  const rows = Object.entries(now.plans).sort().map(([plan, p]) => [plan, count(p.requests), usd(micros(p.held_usd))]);
  document.getElementById("plans").replaceChildren(rows.length
    ? table("Admitted requests by plan", [{ label: "Plan" }, { label: "Requests", num: true }, { label: "Held", num: true }], rows)
    : el("p", { class: "muted" }, "No request is running or waiting."));
  document.getElementById("at").textContent = `As of ${now.at.replace("T", " ").slice(0, 19)} UTC; tokens/s over the last interval (counted as requests finish).`;
  previous = now;
}

start(async () => {
  await refresh();
  const live = document.getElementById("live");
  setInterval(() => { if (live.checked) refresh().catch((e) => say(e.message, true)); }, 2000);
});
