// Small SVG charts: line chart, grouped bar chart, confusion-matrix heat map, stacked
// distribution bars. Each returns a <figure data-chart="id"> whose marks carry classes
// (series/pt, bar, cell, seg) so tests and screen readers can find them.

import { h, s, isNum } from "./dom.js";

export const INK = "#111827";
const GRID = "#e5e7eb";
const AXIS = "#6b7280";
export const PALETTE = ["#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2", "#65a30d", "#dc2626", "#4b5563", "#ca8a04"];
export const CLASS_PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];

function niceStep(span, count) {
  const raw = span / Math.max(count, 1);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / mag;
  return (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 2.5 ? 2.5 : norm <= 5 ? 5 : 10) * mag;
}

/** [lo, hi, ticks] covering the values (or the fixed domain), with round tick values. */
function scale(values, domain, tickCount = 5) {
  let lo;
  let hi;
  if (domain) [lo, hi] = domain;
  else {
    const v = values.filter(isNum);
    lo = v.length ? Math.min(...v) : 0;
    hi = v.length ? Math.max(...v) : 1;
    if (lo >= 0 && lo < hi * 0.35) lo = 0; // anchor at zero when the data nearly reaches it
    if (lo === hi) { lo -= Math.abs(lo) * 0.1 || 0.5; hi += Math.abs(hi) * 0.1 || 0.5; }
  }
  const step = niceStep(hi - lo, tickCount);
  if (!domain) { lo = Math.floor(lo / step) * step; hi = Math.ceil(hi / step) * step; }
  const ticks = [];
  for (let t = lo; t <= hi + step * 1e-6; t += step) ticks.push(Number(t.toPrecision(12)));
  return [lo, hi, ticks];
}

/** A label cut to `max` characters (the full text stays in the mark's <title>). */
export function clip(text, max = 22) {
  const t = String(text);
  return t.length > max ? `${t.slice(0, max - 1)}…` : t;
}

function legend(items) {
  return h("ul", { class: "legend" }, items.map((it) => h("li", {},
    s("svg", { width: 22, height: 10, viewBox: "0 0 22 10", "aria-hidden": "true" },
      it.bar
        ? s("rect", { x: 3, y: 0, width: 16, height: 10, rx: 2, fill: it.color })
        : s("line", { x1: 1, y1: 5, x2: 21, y2: 5, stroke: it.color, "stroke-width": it.width || 2.5, "stroke-dasharray": it.dash || null })),
    h("span", { text: it.name }))));
}

function figure(id, title, svgEl, extra, caption) {
  return h("figure", { class: "chart", "data-chart": id },
    h("figcaption", { class: "chart-title", text: title }),
    svgEl, extra,
    caption ? h("p", { class: "chart-note", text: caption }) : null);
}

/** Tick labels with just enough decimals to tell neighbouring ticks apart. */
function tickFormatter(ticks) {
  const step = ticks.length > 1 ? Math.abs(ticks[1] - ticks[0]) : 1;
  const decimals = Math.min(Math.max(0, -Math.floor(Math.log10(step) + 1e-9)), 6);
  return (v) => v.toFixed(decimals);
}

function yAxis(g, ticks, y, left, right, format) {
  format = format || tickFormatter(ticks);
  for (const t of ticks) {
    const yy = y(t);
    g.append(s("line", { x1: left, x2: right, y1: yy, y2: yy, stroke: GRID, "stroke-width": 1 }));
    g.append(s("text", { x: left - 6, y: yy + 4, "text-anchor": "end", class: "tick", text: format(t) }));
  }
}

/**
 * Line chart. series: [{name, values (one per x label, null = missing), color, width, dash}].
 * divider: index of the first x of a new phase (draws a vertical rule there).
 */
export function lineChart({ id, title, xLabels, series, format = (v) => String(v), tickFormat, domain, divider, caption }) {
  const W = 560, H = 260, L = 52, R = 14, T = 14, B = 36;
  const [lo, hi, ticks] = scale(series.flatMap((x) => x.values), domain);
  const n = xLabels.length;
  const x = (i) => (n <= 1 ? (L + W - R) / 2 : L + ((W - L - R) * i) / (n - 1));
  const y = (v) => T + (H - T - B) * (1 - (v - lo) / (hi - lo || 1));
  const root = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart-svg", role: "img", "aria-label": title });
  const grid = s("g", { class: "axes" });
  yAxis(grid, ticks, y, L, W - R, tickFormat);
  xLabels.forEach((label, i) => grid.append(s("text", { x: x(i), y: H - B + 18, "text-anchor": "middle", class: "tick", text: label })));
  if (isNum(divider) && divider > 0 && divider < n) {
    const xd = (x(divider - 1) + x(divider)) / 2;
    grid.append(s("line", { x1: xd, x2: xd, y1: T, y2: H - B, stroke: AXIS, "stroke-dasharray": "3 4", class: "divider" }));
  }
  root.append(grid);
  for (const ser of series) {
    const g = s("g", { class: "series", "data-series": ser.name });
    const pts = ser.values.map((v, i) => (isNum(v) ? [x(i), y(v), v, i] : null)).filter(Boolean);
    if (pts.length >= 2) {
      const d = pts.map(([px, py], k) => `${k ? "L" : "M"}${px.toFixed(1)},${py.toFixed(1)}`).join(" ");
      g.append(s("path", { d, fill: "none", stroke: ser.color, "stroke-width": ser.width || 2, "stroke-dasharray": ser.dash || null,
        "stroke-linejoin": "round", "stroke-linecap": "round", class: "series-line" }));
    }
    for (const [px, py, v, i] of pts) {
      g.append(s("circle", { cx: px, cy: py, r: ser.width > 2.5 ? 4 : 3.2, fill: ser.dash ? "#fff" : ser.color, stroke: ser.color,
        "stroke-width": 1.5, class: "pt", "data-x": xLabels[i], "data-value": v },
      s("title", { text: `${ser.name} · ${xLabels[i]}: ${format(v)}` })));
    }
    root.append(g);
  }
  if (!series.some((ser) => ser.values.some(isNum))) {
    root.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "no-data", text: "no data yet" }));
  }
  return figure(id, title, root, legend(series), caption);
}

/** Grouped vertical bars. groups: [{name, color, values (one per category)}]. */
export function barChart({ id, title, categories, groups, format = (v) => String(v), tickFormat, domain, labels = true, caption }) {
  const W = 560, H = 260, L = 64, R = 14, T = 14, B = 40;
  const [lo, hi, ticks] = scale([0, ...groups.flatMap((g) => g.values)], domain);
  const y = (v) => T + (H - T - B) * (1 - (v - lo) / (hi - lo || 1));
  const band = (W - L - R) / Math.max(categories.length, 1);
  const inner = band * 0.74;
  const bw = Math.min(inner / Math.max(groups.length, 1), 46);
  const root = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart-svg", role: "img", "aria-label": title });
  const axes = s("g", { class: "axes" });
  yAxis(axes, ticks, y, L, W - R, tickFormat);
  const maxChars = Math.max(6, Math.floor(band / 6.5));
  categories.forEach((c, i) => axes.append(s("text", { x: L + band * (i + 0.5), y: H - B + 18, "text-anchor": "middle", class: "tick", text: clip(c, maxChars) },
    s("title", { text: c }))));
  root.append(axes);
  groups.forEach((g, gi) => {
    const gg = s("g", { class: "bar-group", "data-group": g.name });
    g.values.forEach((v, i) => {
      if (!isNum(v)) return;
      const x0 = L + band * (i + 0.5) - (bw * groups.length) / 2 + bw * gi;
      const top = y(Math.max(v, lo));
      gg.append(s("rect", { x: x0 + 1, y: top, width: Math.max(bw - 2, 1), height: Math.max(y(lo) - top, 0.5), rx: 2, fill: g.color,
        class: "bar", "data-category": categories[i], "data-value": v },
      s("title", { text: `${g.name} · ${categories[i]}: ${format(v)}` })));
      // Values on the bars: small bars (a fine-tune round's few KB next to SSL's MB) stay readable.
      if (labels && bw >= 22) {
        gg.append(s("text", { x: x0 + bw / 2, y: top - 4, "text-anchor": "middle", class: "bar-label", text: format(v) }));
      }
    });
    root.append(gg);
  });
  return figure(id, title, root, legend(groups.map((g) => ({ ...g, bar: true }))), caption);
}

function mix(a, b, t) {
  const p = (c) => [1, 3, 5].map((k) => parseInt(c.slice(k, k + 2), 16));
  const [ca, cb] = [p(a), p(b)];
  return `#${ca.map((v, k) => Math.round(v + (cb[k] - v) * t).toString(16).padStart(2, "0")).join("")}`;
}

/**
 * Confusion-matrix heat map: rows = true class, columns = predicted class. Colour = share
 * of the row (recall of that true class), so rare classes are as readable as common ones.
 */
export function heatMap({ id, title, labels, matrix, caption }) {
  const n = labels.length;
  const cell = n > 10 ? 34 : 46;
  const L = 78, T = 40, R = 10, B = 10;
  const W = L + cell * n + R, H = T + cell * n + B + 22;
  const root = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "heatmap-svg", role: "img", "aria-label": title });
  root.append(s("text", { x: L + (cell * n) / 2, y: 13, "text-anchor": "middle", class: "axis-title", text: "predicted class" }));
  root.append(s("text", { x: 12, y: T + (cell * n) / 2, "text-anchor": "middle", class: "axis-title",
    transform: `rotate(-90 12 ${T + (cell * n) / 2})`, text: "true class" }));
  labels.forEach((lab, j) => root.append(s("text", { x: L + cell * (j + 0.5), y: T - 8, "text-anchor": "middle", class: "tick", text: lab })));
  matrix.forEach((row, i) => {
    const total = row.reduce((a, b) => a + (isNum(b) ? b : 0), 0);
    root.append(s("text", { x: L - 8, y: T + cell * (i + 0.5) + 4, "text-anchor": "end", class: "tick", text: labels[i] }));
    row.forEach((v, j) => {
      const share = total ? v / total : 0;
      const g = s("g", {});
      g.append(s("rect", { x: L + cell * j, y: T + cell * i, width: cell - 2, height: cell - 2, rx: 3,
        fill: total ? mix("#f1f5f9", i === j ? "#047857" : "#b91c1c", Math.sqrt(share)) : "#f8fafc",
        stroke: i === j ? "#94a3b8" : "none", class: "cell", "data-row": i, "data-col": j, "data-value": v },
      s("title", { text: `true ${labels[i]}, predicted ${labels[j]}: ${v}${total ? ` (${(share * 100).toFixed(0)}% of ${labels[i]})` : ""}` })));
      g.append(s("text", { x: L + cell * j + (cell - 2) / 2, y: T + cell * i + (cell - 2) / 2 + 5, "text-anchor": "middle",
        class: ["cell-text", Math.sqrt(share) > 0.55 && "cell-text-dark"], text: String(v) }));
      root.append(g);
    });
  });
  root.append(s("text", { x: L, y: H - 6, class: "chart-note-svg",
    text: "colour: share of the true class's test images; diagonal = correct" }));
  return figure(id, title, root, null, caption);
}

/** 100% stacked horizontal bars: one per row (hospital), one segment per class. */
export function distributionBars({ id, title, classes, rows, caption }) {
  const W = 560, rowH = 26, L = 150, R = 60, T = 6;
  const H = T + rows.length * (rowH + 10) + 4;
  const root = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart-svg", role: "img", "aria-label": title });
  rows.forEach((row, r) => {
    const y0 = T + r * (rowH + 10);
    const total = classes.reduce((a, c) => a + (row.counts[c] || 0), 0);
    const g = s("g", { class: "dist-row", "data-row": row.name });
    g.append(s("text", { x: L - 8, y: y0 + rowH / 2 + 4, "text-anchor": "end", class: "tick", text: clip(row.name) }, s("title", { text: row.name })));
    let x0 = L;
    classes.forEach((c, k) => {
      const v = row.counts[c] || 0;
      const w = total ? ((W - L - R) * v) / total : 0;
      if (w > 0) {
        g.append(s("rect", { x: x0, y: y0, width: w, height: rowH, fill: CLASS_PALETTE[k % CLASS_PALETTE.length], class: "seg",
          "data-class": c, "data-value": v }, s("title", { text: `${row.name} · ${c}: ${v} of ${total} (${((v / total) * 100).toFixed(1)}%)` })));
        if (w > 26) g.append(s("text", { x: x0 + w / 2, y: y0 + rowH / 2 + 4, "text-anchor": "middle", class: "seg-text", text: String(v) }));
      }
      x0 += w;
    });
    g.append(s("text", { x: W - R + 6, y: y0 + rowH / 2 + 4, class: "tick", text: `n=${total}` }));
    root.append(g);
  });
  const items = classes.map((c, k) => ({ name: c, color: CLASS_PALETTE[k % CLASS_PALETTE.length], bar: true }));
  return figure(id, title, root, legend(items), caption);
}
