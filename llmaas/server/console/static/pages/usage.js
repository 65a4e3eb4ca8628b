import { api, query, say, start } from "../js/api.js";
import { stackedBars } from "../js/chart.js";
import { DayRange, count, day, el, micros, table, usd } from "../js/format.js";

let rows = [];

// Every page of one organization report (31 daily buckets a page).
async function report(kind, start, end) {
  const buckets = [];
  let page = null;
  do {
    const params = { start_time: start, end_time: end, bucket_width: "1d", group_by: "model", limit: 31, page };
    const body = await api(`/v1/organization/${kind}?${query(params)}`);
    buckets.push(...body.data);
    page = body.has_more ? body.next_page : null;
  } while (page);
  return buckets;
}

async function load(start, end) {
  const [usage, costs] = await Promise.all([report("usage/completions", start, end), report("costs", start, end)]);
  const byKey = new Map();
  const line = (bucket, model) => {
    const key = `${bucket.start_time}|${model}`;
    if (!byKey.has(key)) {
      byKey.set(key, { day: day(bucket.start_time), model, requests: 0, prompt: 0, cached: 0, completion: 0, cost: 0 });
    }
    return byKey.get(key);
  };
  for (const bucket of usage) {
    for (const r of bucket.results) {
      const row = line(bucket, r.model);
      row.requests += r.num_model_requests;
      row.prompt += r.input_tokens;
      row.cached += r.input_cached_tokens;
      row.completion += r.output_tokens;
    }
  }
  for (const bucket of costs) for (const r of bucket.results) line(bucket, r.line_item).cost += micros(r.amount.value);
  return { days: usage.map((b) => day(b.start_time)), rows: [...byKey.values()] };
}

function draw(days, measure) {
  const models = [...new Set(rows.map((r) => r.model))].sort();
  const value = (r) => (measure === "cost" ? r.cost : r.prompt + r.completion);
  const series = models.map((model) => ({
    name: model,
    values: days.map((d) => rows.filter((r) => r.day === d && r.model === model).reduce((s, r) => s + value(r), 0)),
  }));
  const format = measure === "cost" ? (v) => usd(Math.round(v)) : (v) => count(Math.round(v));
  const title = measure === "cost" ? "Spend per day by model (USD)" : "Tokens per day by model";
  stackedBars(document.getElementById("chart"), { labels: days, series, format, title });
  const columns = [
    { label: "Day" }, { label: "Model" }, { label: "Requests", num: true }, { label: "Prompt tokens", num: true },
    { label: "Cached tokens", num: true }, { label: "Completion tokens", num: true }, { label: "Cost", num: true },
  ];
  const body = rows.map((r) => [r.day, r.model, count(r.requests), count(r.prompt), count(r.cached),
    count(r.completion), usd(r.cost)]);
  const sum = (f) => rows.reduce((s, r) => s + r[f], 0);
  const total = ["Total", "", count(sum("requests")), count(sum("prompt")), count(sum("cached")),
    count(sum("completion")), usd(sum("cost"))];
  document.getElementById("table").replaceChildren(table("Usage by day and model", columns, body, total));
}

function csv() {
  const head = "day,model,requests,prompt_tokens,cached_tokens,completion_tokens,cost_usd";
  const quote = (s) => (/[",\n]/.test(s) ? `"${s.replaceAll('"', '""')}"` : s);
  const lines = rows.map((r) => [r.day, quote(r.model), r.requests, r.prompt, r.cached, r.completion,
    usd(r.cost).replace("$", "").replaceAll(",", "")].join(","));
  const link = el("a", {
    href: URL.createObjectURL(new Blob([[head, ...lines].join("\n") + "\n"], { type: "text/csv" })),
    download: "llmaas-usage.csv",
  });
  document.body.append(link);
  link.click();
  link.remove();
}

start(async () => {
  const range = new DayRange("from", "to");
  const measure = document.getElementById("measure");
  let days = [];
  const show = async () => {
    const [start, end] = range.bounds();
    say("Loading…");
    const loaded = await load(start, end);
    rows = loaded.rows;
    days = loaded.days;
    draw(days, measure.value);
    say(`${rows.length} ${rows.length === 1 ? "row" : "rows"} from ${range.from.value} to ${range.to.value}.`);
  };
  document.getElementById("range").addEventListener("submit", (event) => {
    event.preventDefault();
    show().catch((error) => say(error.message, true));
  });
  measure.addEventListener("change", () => draw(days, measure.value));
  document.getElementById("csv").addEventListener("click", csv);
  await show();
});
