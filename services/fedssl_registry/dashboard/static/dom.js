// DOM building and formatting helpers.
//
// Every piece of registry data reaches the page through text nodes or attribute values set
// here (never innerHTML), so hospital names, tags and error messages are always rendered
// as text, whatever characters they contain.

const SVG_NS = "http://www.w3.org/2000/svg";

function apply(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") el.textContent = String(value);
    else if (key === "class") el.setAttribute("class", Array.isArray(value) ? value.filter(Boolean).join(" ") : value);
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "style") throw new Error("inline styles are not allowed by the dashboard's CSP");
    else el.setAttribute(key, value === true ? "" : String(value));
  }
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** An HTML element: h("a", {href, class, text}, ...children). */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  apply(el, attrs);
  append(el, children);
  return el;
}

/** An SVG element, same signature as h(). */
export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  apply(el, attrs);
  append(el, children);
  return el;
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

// ------------------------------------------------------------------ formatting
export const isNum = (v) => typeof v === "number" && Number.isFinite(v);

export function num(v, digits = 3) {
  return isNum(v) ? v.toFixed(digits) : "–";
}

export function pct(v, digits = 1) {
  return isNum(v) ? `${(v * 100).toFixed(digits)}%` : "–";
}

export function int(v) {
  return isNum(v) ? Math.round(v).toLocaleString("en-US") : "–";
}

export function bytes(v) {
  if (!isNum(v)) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let x = v;
  while (Math.abs(x) >= 1000 && i < units.length - 1) { x /= 1000; i += 1; }
  return `${x.toFixed(x >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
}

export function duration(seconds) {
  if (!isNum(seconds) || seconds < 0) return "–";
  const s = Math.round(seconds);
  const hrs = Math.floor(s / 3600);
  const min = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  if (hrs) return `${hrs} h ${min} min`;
  if (min) return `${min} min ${sec} s`;
  return `${sec} s`;
}

/** An ISO 8601 time as "YYYY-MM-DD HH:MM:SS UTC" (hospitals sit in different time zones). */
export function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

export function seconds(fromIso, toIso) {
  const a = Date.parse(fromIso || "");
  const b = toIso ? Date.parse(toIso) : Date.now();
  return Number.isNaN(a) || Number.isNaN(b) ? null : (b - a) / 1000;
}

// ------------------------------------------------------------------ small widgets
export function badge(text, kind = "") {
  return h("span", { class: ["badge", kind && `badge-${kind}`], text });
}

const TASK_BADGES = { classification: "task-clf", embedding: "task-emb", generation: "task-gen" };

/** A registered model's task (names.MODEL_TASKS), each in its own colour. */
export function taskBadge(task) {
  return badge(task, TASK_BADGES[task] || "task-emb");
}

export function statusBadge(status) {
  return h("span", { class: ["badge", `status-${status || "unknown"}`], "data-status": status || "", text: status || "unknown" });
}

export function syntheticBadge() {
  return h("span", { class: "badge badge-synthetic", title: "trained on synthetic images, not on patient data", text: "SYNTHETIC DATA" });
}

/** A card with a heading; attrs.tools (nodes) sit at the right of the heading. */
export function section(title, attrs, ...children) {
  const { tools, ...rest } = attrs || {};
  const head = tools ? h("div", { class: "card-head" }, h("h2", { text: title }), h("div", { class: "section-tools" }, tools)) : h("h2", { text: title });
  return h("section", { class: "card", ...rest }, head, ...children);
}

export function table(headers, rows, attrs = {}) {
  return h("div", { class: "table-wrap" },
    h("table", attrs,
      h("thead", {}, h("tr", {}, headers.map((x) => (x instanceof Node ? h("th", {}, x) : h("th", { text: x }))))),
      h("tbody", {}, rows)));
}

export function kv(pairs) {
  return h("dl", { class: "kv" }, pairs.filter(Boolean).map(([k, v]) => [h("dt", { text: k }), h("dd", {}, v)]));
}

export function empty(text) {
  return h("p", { class: "empty", text });
}
