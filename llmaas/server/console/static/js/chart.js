// Stacked bar charts drawn as SVG by hand. Each bar carries its numbers as data-* attributes and a
// <title>, and every chart has a table beside it: the table is the accessible reading of the chart.

const SVG = "http://www.w3.org/2000/svg";
export const PALETTE = ["#1f5fbf", "#d9822b", "#2f9e63", "#9c3fbf", "#c23b3b", "#3a9fb3", "#7a6a2f", "#5b6475"];

function node(tag, attributes = {}, text) {
  const n = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attributes)) n.setAttribute(k, v);
  if (text !== undefined) n.textContent = text;
  return n;
}

// labels: x positions (days); series: [{name, values: [number per label]}]; format: value -> text.
export function stackedBars(container, { labels, series, format, title }) {
  container.replaceChildren();
  // Drawn at the container's own width, so that its text stays readable on a phone.
  const width = Math.max(300, Math.round(container.clientWidth || 720)), height = 260;
  const left = 78, bottom = 36, top = 12, right = 10;
  const totals = labels.map((_, i) => series.reduce((sum, s) => sum + (s.values[i] || 0), 0));
  if (!totals.some((t) => t > 0)) {
    const empty = document.createElement("p");
    empty.className = "muted";
    empty.textContent = `${title}: nothing in this range.`;
    container.append(empty);
    return;
  }
  const max = Math.max(...totals);
  const svg = node("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title });
  svg.append(node("title", {}, title));
  const plotH = height - top - bottom, plotW = width - left - right;
  for (let k = 0; k <= 4; k++) {
    const y = top + plotH - (plotH * k) / 4;
    svg.append(node("line", { x1: left, x2: width - right, y1: y, y2: y, stroke: "#d8dde6" }));
    svg.append(node("text", { x: left - 6, y: y + 4, "text-anchor": "end", "font-size": 11, fill: "#5b6475" },
      format((max * k) / 4)));
  }
  const step = plotW / Math.max(1, labels.length);
  const barW = Math.max(2, Math.min(40, step * 0.7));
  labels.forEach((label, i) => {
    let y = top + plotH;
    const x = left + step * i + (step - barW) / 2;
    series.forEach((s, j) => {
      const value = s.values[i] || 0;
      if (!value) return;
      const h = (plotH * value) / max;
      y -= h;
      const bar = node("rect", {
        x, y, width: barW, height: Math.max(h, 0.5), fill: PALETTE[j % PALETTE.length],
        "data-label": label, "data-series": s.name, "data-value": value,
      });
      bar.append(node("title", {}, `${label} · ${s.name}: ${format(value)}`));
      svg.append(bar);
    });
    const every = Math.ceil(labels.length / Math.max(2, Math.floor(plotW / 60)));
    if (i % every === 0) {
      svg.append(node("text", { x: x + barW / 2, y: height - bottom + 16, "text-anchor": "middle", "font-size": 11,
        fill: "#5b6475" }, label.slice(5)));
    }
  });
  container.append(svg);
  const legend = document.createElement("div");
  legend.className = "legend";
  series.forEach((s, j) => {
    const item = document.createElement("span");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = PALETTE[j % PALETTE.length];
    item.append(swatch, s.name);
    legend.append(item);
  });
  container.append(legend);
}
