import { api, say, start } from "../js/api.js";
import { count, el, micros, table, usd, when } from "../js/format.js";

function figure(label, value, id) {
  return el("div", {}, el("div", { class: "label" }, label), el("div", { class: "figure", id }, value));
}

start(async () => {
  const account = await api("/console/api/account");
  const b = account.balance;
  document.getElementById("balance").replaceChildren(
    figure("Available", usd(micros(b.available_usd)), "available"),
    figure("Credit left", usd(micros(b.credit_usd))),
    figure("Held by running requests", usd(micros(b.held_usd))),
    figure("Overdraft", usd(micros(b.overdraft_usd))),
  );
  const p = account.plan;
  document.getElementById("plan").replaceChildren(
    figure("Plan", p.name, "plan-name"),
    figure("Requests per minute", count(p.requests_per_minute)),
    figure("Tokens per minute", count(p.tokens_per_minute)),
    figure("Priority", p.priority),
    figure("Sequences per request", count(p.max_sequences_per_request)),
    figure("Tokens in flight", count(p.max_tokens_in_flight)),
  );
  const rows = account.credits.map((c) => [
    c.kind === "grant" ? "free grant" : "top-up", usd(micros(c.amount_usd)), usd(micros(c.remaining_usd)),
    when(c.created_at), c.kind === "grant" ? when(c.expires_at) : "never",
    c.usable ? "in use" : c.remaining_usd === "0.000000" ? "spent" : "expired",
  ]);
  const columns = [
    { label: "Kind" }, { label: "Amount", num: true }, { label: "Left", num: true }, { label: "Added" },
    { label: "Expires" }, { label: "State" },
  ];
  document.getElementById("credits").replaceChildren(table(`Credits of ${account.account}`, columns, rows));
  say(`Account ${account.account}.`);
});
