import { api, say, start } from "../../js/api.js";
import { el, micros, table, usd, when } from "../../js/format.js";

async function list() {
  const versions = (await api("/admin/prices")).data;
  const now = new Date().toISOString();
  const byModel = new Map();
  for (const v of versions) {
    if (!byModel.has(v.model)) byModel.set(v.model, []);
    byModel.get(v.model).push(v);
  }
  const container = document.getElementById("prices");
  container.replaceChildren();
  for (const [model, list] of [...byModel.entries()].sort()) {
    list.sort((a, b) => b.effective_from.localeCompare(a.effective_from));
    const inForce = list.find((v) => v.effective_from <= now);
    const rows = list.map((v) => [String(v.id), when(v.effective_from), usd(micros(v.input_usd_per_1m)),
      usd(micros(v.cached_input_usd_per_1m)), usd(micros(v.output_usd_per_1m)),
      v === inForce ? "in force" : v.effective_from > now ? "scheduled" : "past"]);
    const columns = [{ label: "Version" }, { label: "Effective from" }, { label: "Input / 1M", num: true },
      { label: "Cached input / 1M", num: true }, { label: "Output / 1M", num: true }, { label: "State" }];
    container.append(el("h2", {}, model), table(`Price versions of ${model}, newest first`, columns, rows));
  }
}

start(async () => {
  const models = (await api("/v1/models").catch(() => ({ data: [] }))).data;
  document.getElementById("served").replaceChildren(...models.map((m) => el("option", { value: m.id })));
  document.getElementById("set").addEventListener("submit", async (event) => {
    event.preventDefault();
    const from = document.getElementById("price-from").value;
    const body = {
      model: document.getElementById("price-model").value.trim(),
      input: document.getElementById("price-input").value.trim(),
      cached_input: document.getElementById("price-cached").value.trim(),
      output: document.getElementById("price-output").value.trim(),
      effective_from: from ? from + "Z" : null,
    };
    try {
      const made = await api("/admin/prices", { method: "POST", body });
      say(`Price version ${made.id} for ${made.model} from ${when(made.effective_from)}.`);
      event.target.reset();
      await list();
    } catch (error) {
      say(error.message, true);
    }
  });
  await list();
});
