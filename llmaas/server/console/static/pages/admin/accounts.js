import { api, say, start } from "../../js/api.js";
import { count, el, micros, table, usd, when } from "../../js/format.js";

let plans = [];
const RESERVED = "admin";

function figure(label, value) {
  return el("div", {}, el("div", { class: "label" }, label), el("div", { class: "figure" }, value));
}

async function detail(name) {
  const [money, holds] = await Promise.all([
    api(`/admin/credits/${encodeURIComponent(name)}`),
    api(`/console/api/admin/holds?account=${encodeURIComponent(name)}`),
  ]);
  const section = document.getElementById("detail");
  section.hidden = false;
  document.getElementById("detail-head").textContent = `Account ${name}`;
  document.getElementById("detail-balance").replaceChildren(
    figure("Available", usd(micros(money.available_usd))), figure("Credit", usd(micros(money.credit_usd))),
    figure("Held", usd(micros(money.held_usd))), figure("Overdraft", usd(micros(money.overdraft_usd))));
  const rows = holds.data.map((h) => [h.request_id, h.model, usd(micros(h.amount_usd)), h.owner || "—",
    when(h.created_at), when(h.expires_at), h.expired ? "expired" : "open"]);
  const columns = [{ label: "Request" }, { label: "Model" }, { label: "Held", num: true }, { label: "Replica" },
    { label: "Since" }, { label: "Deadline" }, { label: "State" }];
  document.getElementById("detail-holds").replaceChildren(
    rows.length ? table(`Open holds of ${name}`, columns, rows) : el("p", { class: "muted" }, "No open holds."));
  section.focus();
}

function planPicker(id, current) {
  return el("select", { id, "aria-label": "Plan" },
    plans.map((p) => el("option", { value: p.name, selected: p.name === current }, p.name)));
}

async function list() {
  const accounts = (await api("/admin/accounts")).data.filter((a) => a.name !== RESERVED);
  for (const select of document.querySelectorAll("select.accounts")) {
    const keep = select.value;
    select.replaceChildren(...accounts.map((a) => el("option", { value: a.name, selected: a.name === keep }, a.name)));
  }
  const rows = accounts.map((a) => {
    const picker = planPicker(`plan-${a.id}`, a.plan);
    picker.setAttribute("aria-label", `Plan of ${a.name}`);
    const change = el("button", { type: "button", class: "secondary", "aria-label": `Change plan of ${a.name}`,
      onclick: () => setPlan(a.name, picker.value) }, "Change");
    const open = el("button", { type: "button", class: "secondary", "aria-label": `Balance and holds of ${a.name}`,
      onclick: () => detail(a.name).catch((e) => say(e.message, true)) }, "Details");
    return [a.name, el("span", { class: "row" }, picker, change), usd(micros(a.available_usd)), when(a.created_at), open];
  });
  const columns = [{ label: "Account" }, { label: "Plan" }, { label: "Available", num: true }, { label: "Created" },
    { label: "" }];
  document.getElementById("accounts").replaceChildren(table(`${count(accounts.length)} accounts`, columns, rows));
}

async function setPlan(name, plan) {
  try {
    await api(`/admin/accounts/${encodeURIComponent(name)}/plan`, { method: "POST", body: { plan } });
    say(`${name} is now on the ${plan} plan.`);
    await list();
  } catch (error) {
    say(error.message, true);
  }
}

start(async () => {
  plans = (await api("/console/api/admin/plans")).data;
  for (const select of document.querySelectorAll("select.plans")) {
    select.replaceChildren(...plans.map((p) => el("option", { value: p.name }, p.name)));
  }
  document.getElementById("create").addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = document.getElementById("new-name").value.trim();
    try {
      await api("/admin/accounts", { method: "POST", body: {
        name, plan: document.getElementById("new-plan").value, free_grant: document.getElementById("new-grant").checked,
      } });
      event.target.reset();
      say(`Created account ${name}.`);
      await list();
    } catch (error) {
      say(error.message, true);
    }
  });
  document.getElementById("credit").addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = document.getElementById("credit-account").value;
    const kind = document.getElementById("credit-kind").value;
    const days = document.getElementById("credit-days").value;
    const body = { amount_usd: document.getElementById("credit-amount").value.trim(),
      note: document.getElementById("credit-note").value.trim() || null };
    if (kind === "grant" && days) body.expires_in_days = Number(days);
    try {
      const done = await api(`/admin/credits/${encodeURIComponent(name)}/${kind}`, { method: "POST", body });
      say(`Added ${usd(micros(done.amount_usd))} to ${name}: available now ${usd(micros(done.available_usd))}.`);
      document.getElementById("credit-amount").value = "";
      await list();
    } catch (error) {
      say(error.message, true);
    }
  });
  await list();
});
