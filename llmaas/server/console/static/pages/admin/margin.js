import { api, query, say, start } from "../../js/api.js";
import { stackedBars } from "../../js/chart.js";
import { DayRange, count, day, el, micros, table, usd } from "../../js/format.js";


function show(body) {
  const rates = Object.entries(body.rates);
  document.getElementById("rates").replaceChildren(rates.length
    ? table(`At $${body.usd_per_hour} per hour`, [{ label: "Model" }, { label: "Bench" }, { label: "Concurrency", num: true },
      { label: "Output tok/s", num: true }, { label: "Cost / 1M input", num: true }, { label: "Cost / 1M output", num: true }],
    rates.map(([model, r]) => [model, r.bench.split("/").pop(), String(r.concurrency), r.output_tok_per_s.toFixed(1),
      usd(micros(r.input_cost_usd_per_1m)), usd(micros(r.output_cost_usd_per_1m))]))
    : el("p", { class: "muted" }, "No machine cost: give a price per hour and a bench result (llmaas serve " +
      "--usd-per-hour 0.10 --cost-bench bench.json); revenue is shown alone."));
  const days = body.days.map(day);
  const sumBy = (field) => days.map((d) => body.data.filter((r) => day(r.day) === d && r[field] !== null)
    .reduce((s, r) => s + micros(r[field]), 0));
  // Priced and never at a loss: each day's bar is its revenue, split into machine cost and margin.
  const machine = sumBy("machine_usd"), margin = sumBy("margin_usd");
  const split = body.data.length > 0 && body.data.every((r) => r.machine_usd !== null) && margin.every((m) => m >= 0);
  stackedBars(document.getElementById("chart"), {
    labels: days, format: (v) => usd(Math.round(v)),
    title: split ? "Revenue per day: machine cost and margin" : "Revenue per day",
    series: split ? [{ name: "machine cost", values: machine }, { name: "margin", values: margin }]
      : [{ name: "revenue", values: sumBy("revenue_usd") }],
  });
  const pct = (r) => (r.margin_usd === null || micros(r.revenue_usd) === 0 ? "—"
    : `${((100 * micros(r.margin_usd)) / micros(r.revenue_usd)).toFixed(1)}%`);
  const rows = body.data.map((r) => [day(r.day), r.model, count(r.requests), count(r.input_tokens),
    count(r.input_cached_tokens), count(r.output_tokens), usd(micros(r.revenue_usd)),
    r.machine_usd === null ? "—" : usd(micros(r.machine_usd)), r.margin_usd === null ? "—" : usd(micros(r.margin_usd)),
    pct(r)]);
  const total = (field) => body.data.reduce((s, r) => s + (r[field] === null ? 0 : micros(r[field])), 0);
  const priced = body.data.every((r) => r.machine_usd !== null);
  const columns = [{ label: "Day" }, { label: "Model" }, { label: "Requests", num: true }, { label: "Input", num: true },
    { label: "Cached", num: true }, { label: "Output", num: true }, { label: "Revenue", num: true },
    { label: "Machine cost", num: true }, { label: "Margin", num: true }, { label: "Margin %", num: true }];
  const footer = ["Total", "", count(body.data.reduce((s, r) => s + r.requests, 0)), "", "", "",
    usd(total("revenue_usd")), priced ? usd(total("machine_usd")) : "—", priced ? usd(total("margin_usd")) : "—", ""];
  document.getElementById("table").replaceChildren(table("Revenue, machine cost and margin", columns, rows, footer));
}

start(async () => {
  const range = new DayRange("from", "to");
  const perHour = document.getElementById("per-hour");
  const load = async () => {
    const [start, end] = range.bounds();
    const body = await api(`/console/api/admin/margin?${query({ start_time: start, end_time: end,
      usd_per_hour: perHour.value.trim() || null })}`);
    if (!perHour.value && body.usd_per_hour) perHour.placeholder = body.usd_per_hour;
    show(body);
    say(`${body.data.length} ${body.data.length === 1 ? "row" : "rows"}.`);
  };
  document.getElementById("range").addEventListener("submit", (event) => {
    event.preventDefault();
    load().catch((error) => say(error.message, true));
  });
  await load();
});
