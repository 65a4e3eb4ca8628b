// Money stays exact: the APIs give decimal USD strings (six places) and the console adds them up as
// integers of micro-USD, never as floating-point dollars.

export function micros(usd) {
  if (typeof usd === "number") return Math.round(usd * 1e6); // the API's JSON numbers (usage.cost, costs)
  const text = String(usd).trim();
  const negative = text.startsWith("-");
  const [whole, fraction = ""] = text.replace(/^[-+]/, "").split(".");
  const value = Number(whole) * 1e6 + Number((fraction + "000000").slice(0, 6));
  return negative ? -value : value;
}

export function usd(microUsd, places = 6) {
  const negative = microUsd < 0;
  const abs = Math.abs(microUsd);
  const whole = Math.floor(abs / 1e6);
  const fraction = String(abs % 1e6).padStart(6, "0").slice(0, places);
  return (negative ? "-$" : "$") + whole.toLocaleString("en-US") + (places ? "." + fraction : "");
}

export function count(n) {
  return Number(n).toLocaleString("en-US");
}

export function day(epochSeconds) {
  return new Date(epochSeconds * 1000).toISOString().slice(0, 10);
}

export function when(iso) {
  return iso ? iso.replace("T", " ").replace(/\.\d+Z$|Z$/, " UTC") : "never";
}

// Builds an element: el("td", {class: "num"}, "12"). Text is always set as text, never parsed as HTML.
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// A table: columns [{label, num?}], rows of cell values (text or nodes), an optional footer row.
export function table(caption, columns, rows, footer) {
  const head = el("tr", {}, columns.map((c) => el("th", { scope: "col", class: c.num ? "num" : null }, c.label)));
  const line = (cells) => el("tr", {}, cells.map((v, i) => el("td", { class: columns[i].num ? "num" : null }, v)));
  return el("div", { class: "table-wrap" },
    el("table", {},
      el("caption", { class: "muted", style: null }, caption),
      el("thead", {}, head),
      el("tbody", {}, rows.map(line)),
      footer ? el("tfoot", {}, line(footer)) : null));
}

const DAY_S = 86400;

// A range of whole UTC days picked with two <input type=date>: the last 7 days to start with.
export class DayRange {
  constructor(fromId, toId) {
    this.from = document.getElementById(fromId);
    this.to = document.getElementById(toId);
    const today = new Date();
    this.to.value = today.toISOString().slice(0, 10);
    this.from.value = new Date(today.getTime() - 6 * DAY_S * 1000).toISOString().slice(0, 10);
  }

  // [start, end) in epoch seconds, the `to` day included; throws when `from` is after `to`.
  bounds() {
    const start = Date.parse(this.from.value + "T00:00:00Z") / 1000;
    const end = Date.parse(this.to.value + "T00:00:00Z") / 1000 + DAY_S;
    if (!(end > start)) throw new Error("'From' must be on or before 'To'.");
    return [start, end];
  }
}
