// One federated run: status, training curves per round, hospitals (data and scores), rounds.

import { api } from "./api.js";
import { barChart, distributionBars, INK, lineChart, PALETTE } from "./charts.js";
import { bytes, duration, empty, h, int, isNum, kv, num, pct, s, section, statusBadge, syntheticBadge, table, when } from "./dom.js";
import { isSynthetic, roundsText, runDuration } from "./overview.js";

const LOCAL = "local_only_";
const SSL_TASKS = ["simclr", "rotation", "micle"];  // fedssl_core.names.SSL_TASKS

export const title = (data) => `Run ${data.run.run_id}`;

export async function load({ runId }) {
  const [run, rounds] = await Promise.all([api.run(runId), api.rounds(runId)]);
  return { run, rounds };
}

export function poll({ run }) {
  return run.status === "running" ? "fast" : "slow";
}

const PHASE_LABELS = { ssl: "SSL", finetune: "FT", generate: "GEN" };
const roundLabel = (rd) => `${PHASE_LABELS[rd.phase] || rd.phase} ${rd.round}`;

export function hospitalNames(run, rounds) {
  const all = new Set(Object.keys(run.hospitals || {}));
  for (const rd of rounds) for (const name of Object.keys(rd.hospitals || {})) all.add(name);
  return [...all].sort();
}

function colours(names) {
  return Object.fromEntries(names.map((n, i) => [n, PALETTE[i % PALETTE.length]]));
}

const metricOf = (obj, key) => (obj && isNum(obj[key]) ? obj[key] : null);

// Differential privacy (run config dp): each round's record carries the privacy spent up to it.
const isPrivate = (run, rounds) => (run.config?.dp && run.config.dp !== "off") || rounds.some((r) => r.privacy);
const epsilonOf = (rd) => metricOf(rd.privacy, "epsilon");

/** "ε spent" of the run: the newest release's epsilon at its delta, and the budget. */
function privacyText(run, rounds) {
  const last = rounds.filter((r) => isNum(epsilonOf(r))).reduce((a, r) => (!a || r.privacy.releases > a.privacy.releases ? r : a), null);
  const budget = run.config?.["dp-max-epsilon"];
  const cap = isNum(budget) && budget > 0 ? ` of ${budget}` : " (no cap)";
  if (!last) return `none yet${cap}`;
  return `${num(last.privacy.epsilon, 2)}${cap} at δ=${last.privacy.delta} · ${last.privacy.releases} round(s)`;
}

// ------------------------------------------------------------------ header
function header(run, rounds) {
  const planned = Object.values(run.planned_rounds || {}).reduce((a, b) => a + (b || 0), 0);
  const done = rounds.length;
  const share = planned ? Math.min(done / planned, 1) : 0;
  // An SVG bar, so its width needs no inline style (CSP).
  const progress = h("div", { class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": planned, "aria-valuenow": done },
    s("svg", { viewBox: "0 0 100 6", preserveAspectRatio: "none", class: "progress-svg" },
      s("rect", { x: 0, y: 0, width: 100 * share, height: 6, class: `progress-fill status-fill-${run.status}` })));
  const hospitals = Object.keys(run.hospitals || {}).sort();
  const cfg = run.config || {};
  return h("div", { class: "page-head" },
    h("p", { class: "crumbs" }, h("a", { href: "/dashboard/", text: "Runs" }), " / run"),
    h("h1", {}, h("span", { class: "mono", text: run.run_id }), " ", statusBadge(run.status), isSynthetic(run) ? [" ", syntheticBadge()] : null),
    h("div", { class: "facts" },
      fact("Phase", run.phase || "–", "phase"),
      fact("Rounds done / planned", roundsText(run) || "–", "rounds"),
      fact("Duration", `${runDuration(run)}${run.status === "running" ? " so far" : ""}`, "duration"),
      fact("Hospitals", String(hospitals.length), "hospital-count"),
      fact("Data source", run.data_source || "–", "data-source"),
      fact("Model", `${cfg.arch || "?"} · ${cfg["image-size"] || "?"} px · ${cfg["finetune-mode"] || "?"} fine-tune`, "model"),
      isPrivate(run, rounds) ? fact(`ε spent (${cfg.dp || "dp"})`, privacyText(run, rounds), "epsilon") : null),
    progress,
    h("p", { class: "muted small" },
      `Started ${when(run.started_at)}`, run.finished_at ? ` · finished ${when(run.finished_at)}` : "",
      ` · hospitals: `, hospitals.map((x, i) => [i ? ", " : "", h("span", { class: "hospital-name", text: x })])));
}

/** A hospital's colour key (an SVG circle: its colour comes from data, CSP allows no inline style). */
function dot(colour) {
  return s("svg", { viewBox: "0 0 10 10", class: "dot-svg", "aria-hidden": "true" }, s("circle", { cx: 5, cy: 5, r: 5, fill: colour }));
}

function fact(label, value, key) {
  return h("div", { class: "fact", "data-fact": key }, h("div", { class: "fact-label", text: label }), h("div", { class: "fact-value", text: value }));
}

function alerts(run, rounds) {
  const out = [];
  if (isSynthetic(run)) {
    out.push(h("div", { class: "banner-synthetic", "data-synthetic-banner": "" },
      h("strong", { text: "SYNTHETIC DATA. " }),
      h("span", { text: "This run was trained on synthetic images, not on patient data. Its scores and models say nothing about real patients." })));
  }
  if (run.status === "failed" && run.error) out.push(h("div", { class: "alert alert-error" }, h("strong", { text: "Run failed: " }), h("span", { class: "mono", text: run.error })));
  for (const w of run.warnings || []) out.push(h("div", { class: "alert alert-warn" }, h("strong", { text: "Warning: " }), h("span", { text: w })));
  // Updates the aggregator refused before aggregation (not the shared model, NaN/Inf): never averaged.
  for (const rd of rounds) {
    for (const [name, why] of Object.entries(rd.refused_hospitals || {})) {
      out.push(h("div", { class: "alert alert-warn", "data-refused": name },
        h("strong", { text: `Update refused (${roundLabel(rd)}): ` }), h("span", { class: "hospital-name", text: name }), h("span", { text: ` · ${why}` })));
    }
  }
  return out;
}

// ------------------------------------------------------------------ curves
// A generative run (task=generate): the GAN's losses, and what each hospital measured of the
// round's generator on its own held-out images (names.GENERATIVE_SCORES), beside its local-only GAN.
const GENERATIVE_CURVES = [
  ["fid", "Fréchet distance (lower is better)", null, true],
  ["gen_precision", "Precision (realism)", [0, 1], false],
  ["gen_recall", "Recall (coverage)", [0, 1], false],
  ["memorisation_too_close_fraction_pixels", "Too close to a training image (pixels)", [0, 1], false],
];

function generativeCurves(rounds, names, colour) {
  const xLabels = rounds.map(roundLabel);
  const charts = [lineChart({
    id: "gan_loss", title: "GAN losses (hinge, mean over hospitals)", xLabels, format: (v) => v.toFixed(3),
    series: [
      { name: "discriminator", color: INK, width: 3, values: rounds.map((r) => metricOf(r.aggregated, "discriminator_loss")) },
      { name: "generator", color: "#2563eb", width: 3, values: rounds.map((r) => metricOf(r.aggregated, "generator_loss")) },
    ],
  })];
  for (const [key, title, domain, local] of GENERATIVE_CURVES) {
    charts.push(lineChart({
      id: key, title: `${title} · held-out images`, xLabels, domain, format: (v) => (domain ? v.toFixed(2) : v.toFixed(0)),
      series: [
        { name: "aggregated", color: INK, width: 3, values: rounds.map((r) => metricOf(r.aggregated, key)) },
        ...(local ? [{ name: "local-only GANs (mean)", color: "#a3a3a3", width: 3, values: rounds.map((r) => metricOf(r.aggregated, LOCAL + key)) }] : []),
        ...names.map((n) => ({ name: n, color: colour[n], values: rounds.map((r) => metricOf(r.hospitals?.[n], key)) })),
      ],
      caption: key === "fid" ? "ImageNet EfficientNet-Lite0 features; compare runs at equal gan-eval-samples only." : null,
    }));
  }
  return charts;
}

function curves(run, rounds, names, colour) {
  if (run.config?.task === "generate" || rounds.some((r) => r.phase === "generate")) {
    const gen = rounds.filter((r) => r.phase === "generate");
    return section("Training curves", { id: "curves" },
      gen.length ? null : empty("No round has finished yet; curves appear as rounds complete."),
      h("div", { class: "chart-grid" }, generativeCurves(gen, names, colour)));
  }
  const ssl = rounds.filter((r) => r.phase === "ssl");
  const ft = rounds.filter((r) => r.phase === "finetune");
  const charts = [];
  const tasks = SSL_TASKS.filter((t) => Object.values(run.hospitals || {}).some((x) => x.ssl_task === t)
    || ssl.some((r) => isNum(r.aggregated?.[`ssl_loss_${t}`])));
  for (const task of tasks) {
    const key = `ssl_loss_${task}`;
    const members = names.filter((n) => run.hospitals?.[n]?.ssl_task === task || ssl.some((r) => isNum(r.hospitals?.[n]?.[key])));
    // With one hospital on a task its curve *is* the task's mean: draw it once.
    const mean = members.length === 1 ? [] : [{ name: `all ${task} hospitals`, color: INK, width: 3, values: ssl.map((r) => metricOf(r.aggregated, key)) }];
    charts.push(lineChart({
      id: key, title: `SSL loss · ${task}`, xLabels: ssl.map(roundLabel), format: (v) => v.toFixed(3),
      series: [...mean, ...members.map((n) => ({ name: n, color: colour[n], values: ssl.map((r) => metricOf(r.hospitals?.[n], key)) }))],
      caption: !ssl.length ? "no SSL round finished yet" : members.length === 1 ? `${members[0]} is the only hospital running ${task}.` : null,
    }));
  }
  charts.push(lineChart({
    id: "finetune_loss", title: "Fine-tune loss", xLabels: ft.map(roundLabel), format: (v) => v.toFixed(2),
    series: [
      { name: "aggregated", color: INK, width: 3, values: ft.map((r) => metricOf(r.aggregated, "finetune_loss")) },
      ...names.map((n) => ({ name: n, color: colour[n], values: ft.map((r) => metricOf(r.hospitals?.[n], "finetune_loss")) })),
    ],
    caption: ft.length ? null : "no fine-tune round finished yet",
  }));
  const firstFt = rounds.findIndex((r) => r.phase === "finetune");
  for (const [key, label] of [["balanced_accuracy", "Balanced accuracy"], ["macro_auc", "Macro AUC"]]) {
    charts.push(lineChart({
      id: key, title: `${label} (held-out test sets)`, xLabels: rounds.map(roundLabel), domain: [0, 1], format: (v) => v.toFixed(2),
      divider: firstFt > 0 ? firstFt : null,
      series: [
        { name: "aggregated", color: INK, width: 3, values: rounds.map((r) => metricOf(r.aggregated, key)) },
        ...names.map((n) => ({ name: n, color: colour[n], values: rounds.map((r) => metricOf(r.hospitals?.[n], key)) })),
      ],
      caption: ssl.length ? "SSL rounds: linear probe on the shared encoder; FT rounds: the federated classifier." : null,
    }));
  }
  if (isPrivate(run, rounds)) {
    const budget = run.config?.["dp-max-epsilon"];
    charts.push(lineChart({
      id: "epsilon", title: "Privacy spent (ε, client-level, in total)", xLabels: rounds.map(roundLabel), format: (v) => v.toFixed(2),
      divider: firstFt > 0 ? firstFt : null,
      series: [
        { name: "ε spent", color: INK, width: 3, values: rounds.map(epsilonOf) },
        ...(isNum(budget) && budget > 0 ? [{ name: "budget (dp-max-epsilon)", color: "#dc2626", values: rounds.map(() => budget) }] : []),
      ],
      caption: "Flower's RDP accountant, every hospital in every round (no sampling amplification); δ as configured (dp-delta).",
    }));
  }
  charts.push(barChart({
    id: "bytes", title: "Bytes exchanged per round", categories: rounds.map(roundLabel), format: bytes, tickFormat: bytes,
    groups: [
      { name: "sent to hospitals", color: "#2563eb", values: rounds.map((r) => (isNum(r.bytes_sent) ? r.bytes_sent : null)) },
      { name: "received from hospitals", color: "#f59e0b", values: rounds.map((r) => (isNum(r.bytes_received) ? r.bytes_received : null)) },
    ],
  }));
  return section("Training curves", { id: "curves" },
    rounds.length ? null : empty("No round has finished yet; curves appear as rounds complete."),
    h("div", { class: "chart-grid" }, charts));
}

// ------------------------------------------------------------------ hospitals
/** Total-variation distance between a hospital's class distribution and the pooled one. */
export function labelSkew(counts, pooled, classes) {
  const n = classes.reduce((a, c) => a + (counts[c] || 0), 0);
  const m = classes.reduce((a, c) => a + (pooled[c] || 0), 0);
  if (!n || !m) return null;
  return 0.5 * classes.reduce((a, c) => a + Math.abs((counts[c] || 0) / n - (pooled[c] || 0) / m), 0);
}

function hospitalsSection(run, rounds, names, colour) {
  const info = run.hospitals || {};
  const classes = run.class_names?.length ? run.class_names
    : [...new Set(Object.values(info).flatMap((x) => Object.keys(x.class_counts || {})))];
  const pooled = {};
  for (const n of names) for (const c of classes) pooled[c] = (pooled[c] || 0) + (info[n]?.class_counts?.[c] || 0);

  const rows = names.map((n) => {
    const x = info[n] || {};
    const counts = x.class_counts || {};
    const skew = labelSkew(counts, pooled, classes);
    const part = x.partition || {};
    return h("tr", { "data-hospital": n },
      h("td", {}, dot(colour[n]), h("span", { class: "hospital-name", text: n })),
      h("td", { text: x.ssl_task || "–" }),
      h("td", {}, x.data_source === "synthetic" ? syntheticBadge() : h("span", { text: x.data_source || "–" })),
      h("td", { class: "small", text: part.partition_by ? `${part.partition_by} ${(part.partition_id ?? "?")}/${part.num_partitions ?? "?"}` : "–" }),
      h("td", { class: "num", "data-col": "train", text: int(x.train_examples) }),
      h("td", { class: "num", "data-col": "test", text: int(x.test_examples) }),
      classes.map((c) => h("td", { class: ["num", !counts[c] && "zero"], "data-class": c, text: int(counts[c] || 0),
        title: `${c}: ${counts[c] || 0} training / ${x.test_class_counts?.[c] ?? "?"} test images` })),
      h("td", { class: "num", "data-col": "skew", title: "total-variation distance to the pooled class distribution (0 = same mix, 1 = disjoint)", text: num(skew, 2) }));
  });
  const datasetTable = table(["Hospital", "SSL task", "Data", "Partition", "Train", "Test", ...classes, "Label skew"], rows, { class: "hospitals-table" });
  const note = h("p", { class: "chart-note note-spaced", text: "Class columns: training images per class (hover for the test split)." });
  const dist = distributionBars({
    id: "class_distribution", title: "Training images per class", classes,
    rows: [...names.map((n) => ({ name: n, counts: info[n]?.class_counts || {} })), { name: "all hospitals", counts: pooled }],
    caption: "Label skew = total-variation distance between a hospital's class mix and the pooled mix.",
  });

  return section("Hospitals", { id: "hospitals" },
    names.length ? [datasetTable, note, h("div", { class: "chart-grid chart-grid-wide" }, dist, globalVsLocal(run, rounds, names))] : empty("No hospital has joined yet."));
}

/** The hospitals' registered local-only classifiers (register-local-models): a link to each, or why there is none. */
function localModels(run, names) {
  if (!run.local_models) return null;
  return h("div", { class: "local-models note-spaced" },
    h("h3", { text: "Hospitals' own models in the registry" }),
    h("ul", { class: "plain-list" }, names.map((n) => {
      const entry = run.local_models[n];
      return h("li", { "data-hospital": n }, h("span", { class: "hospital-name", text: n }), " → ",
        !entry ? h("span", { class: "muted", text: "none sent" })
          : !entry.model ? h("span", { class: "error-text", text: `not registered: ${entry.error || "?"}` })
            : h("a", { class: "mono", href: `/dashboard/models/${encodeURIComponent(entry.model)}?version=${entry.version}`, text: `${entry.model} v${entry.version}` }));
    })));
}

function globalVsLocalGenerator(rounds, names) {
  const latest = [...rounds].reverse().find((r) => names.some((n) => isNum(r.hospitals?.[n]?.fid)));
  if (!latest) return h("div", { class: "chart" }, empty("Per-hospital scores appear after the first evaluated round."));
  return barChart({
    id: "global_vs_local", title: `Fréchet distance: global generator vs each hospital's local-only GAN (after ${roundLabel(latest)}; lower is better)`,
    categories: names, format: (v) => v.toFixed(0),
    groups: [
      { name: "global (federated) generator", color: INK, values: names.map((n) => metricOf(latest.hospitals?.[n], "fid")) },
      { name: "local-only generator", color: "#a3a3a3", values: names.map((n) => metricOf(latest.hospitals?.[n], `${LOCAL}fid`)) },
    ],
    caption: "Each hospital draws images from both generators and compares them with its own held-out images.",
  });
}

function globalVsLocal(run, rounds, names) {
  if (run.config?.task === "generate") return globalVsLocalGenerator(rounds, names);
  const latest = [...rounds].reverse().find((r) => names.some((n) => isNum(r.hospitals?.[n]?.[`${LOCAL}balanced_accuracy`])))
    || [...rounds].reverse().find((r) => names.some((n) => isNum(r.hospitals?.[n]?.balanced_accuracy)));
  if (!latest) return h("div", { class: "chart" }, empty("Per-hospital scores appear after the first evaluated round."));
  const metrics = [["balanced_accuracy", "Balanced accuracy"], ["macro_auc", "Macro AUC"]];
  const rows = names.map((n) => {
    const m = latest.hospitals?.[n] || {};
    return h("tr", { "data-hospital": n },
      h("td", { class: "hospital-name", text: n }),
      metrics.map(([k]) => {
        const g = metricOf(m, k);
        const l = metricOf(m, LOCAL + k);
        const d = isNum(g) && isNum(l) ? g - l : null;
        return [
          h("td", { class: "num", "data-metric": k, "data-model": "global", text: num(g) }),
          h("td", { class: "num", "data-metric": k, "data-model": "local", text: num(l) }),
          h("td", { class: ["num", "delta", isNum(d) && (d > 0 ? "up" : d < 0 ? "down" : "")], text: isNum(d) ? `${d > 0 ? "+" : ""}${d.toFixed(3)}` : "–" }),
        ];
      }));
  });
  const head = h("tr", {}, h("th", { rowspan: 2, text: "Hospital" }), metrics.map(([, label]) => h("th", { colspan: 3, class: "group", text: label })));
  const sub = h("tr", {}, metrics.map(() => [h("th", { text: "global" }), h("th", { text: "local-only" }), h("th", { text: "Δ" })]));
  const tbl = h("div", { class: "table-wrap" }, h("table", { class: "compare-table" }, h("thead", {}, head, sub), h("tbody", {}, rows)));
  const chart = barChart({
    id: "global_vs_local", title: `Balanced accuracy: global model vs each hospital's local-only model (after ${roundLabel(latest)})`,
    categories: names, domain: [0, 1], format: (v) => v.toFixed(2),
    groups: [
      { name: "global (federated) model", color: INK, values: names.map((n) => metricOf(latest.hospitals?.[n], "balanced_accuracy")) },
      { name: "local-only model", color: "#a3a3a3", values: names.map((n) => metricOf(latest.hospitals?.[n], `${LOCAL}balanced_accuracy`)) },
    ],
    caption: "Each hospital scores both models on its own held-out test images. The local-only model stays at its hospital "
      + "unless the run registers it (register-local-models).",
  });
  const registered = Object.values(run.local_models || {}).find((e) => e.model && e.global_model?.name);
  const tryIt = registered
    ? h("p", { class: "note-spaced" }, h("a", {
      class: "btn", id: "try-local", text: "Score one image with the global model and every hospital's own model",
      href: `/dashboard/try?model=${encodeURIComponent(registered.global_model.name)}&version=${encodeURIComponent(registered.global_model.version)}`
        + `&run=${encodeURIComponent(run.run_id)}` }))
    : null;
  return h("div", { class: "compare", "data-round": roundLabel(latest) }, chart, tbl, localModels(run, names), tryIt);
}

// ------------------------------------------------------------------ rounds
function roundsSection(run, rounds) {
  const csv = h("button", { type: "button", class: "btn btn-small", text: "Download CSV" });
  csv.addEventListener("click", async () => {
    try {
      const blob = await api.roundsCsv(run.run_id);
      const a = h("a", { href: URL.createObjectURL(blob), download: `${run.run_id}-rounds.csv` });
      document.body.append(a);
      a.click();
      a.remove();
    } catch (err) {
      csv.textContent = `CSV: ${err.message}`;
    }
  });
  const dp = isPrivate(run, rounds);
  const rows = rounds.map((r) => {
    const a = r.aggregated || {};
    return h("tr", { "data-round": roundLabel(r) },
      h("td", { text: roundLabel(r) }),
      h("td", { class: "num", text: int(Object.keys(r.hospitals || {}).length) }),
      h("td", { class: "num", text: int(a.examples) }),
      h("td", { class: "num", text: int(a.test_examples) }),
      h("td", { class: "num", text: num(r.phase === "ssl" ? a.loss : a.finetune_loss) }),
      h("td", { class: "num", text: pct(a.balanced_accuracy) }),
      h("td", { class: "num", text: num(a.macro_auc) }),
      h("td", { class: "num", text: duration(r.duration_seconds) }),
      h("td", { class: "num", text: bytes(r.bytes_sent) }),
      h("td", { class: "num", text: bytes(r.bytes_received) }),
      dp ? h("td", { class: "num", "data-col": "epsilon", text: num(epsilonOf(r), 3),
        title: r.privacy ? `+${num(r.privacy.round_epsilon, 3)} this round at δ=${r.privacy.delta}; noise multiplier ${r.privacy.noise_multiplier}, clipping norm ${r.privacy.clipping_norm}${r.privacy.next_clipping_norm != null ? ` (next round's ${num(r.privacy.next_clipping_norm, 4)})` : ""}` : null }) : null);
  });
  return section("Rounds", { id: "rounds", tools: csv },
    rounds.length ? table(["Round", "Hospitals", "Train examples", "Test examples", "Loss", "Balanced acc.", "Macro AUC", "Duration", "Sent", "Received", ...(dp ? ["ε spent"] : [])], rows, { class: "rounds-table" })
      : empty("No round has finished yet."),
    configList(run));
}

function configList(run) {
  const cfg = run.config || {};
  const keys = Object.keys(cfg).sort();
  if (!keys.length) return null;
  return h("details", { class: "config" }, h("summary", { text: "Run configuration" }),
    kv(keys.map((k) => [k, h("span", { class: "mono", text: JSON.stringify(cfg[k]) })])));
}

export function render({ run, rounds }) {
  const names = hospitalNames(run, rounds);
  const colour = colours(names);
  return h("div", { class: "run-page", "data-run": run.run_id, "data-status": run.status },
    header(run, rounds),
    alerts(run, rounds),
    h("nav", { class: "subnav", "aria-label": "Run sections" },
      [["#curves", "Training curves"], ["#hospitals", "Hospitals"], ["#rounds", "Rounds"]].map(([href, text]) => h("a", { href, text }))),
    curves(run, rounds, names, colour),
    hospitalsSection(run, rounds, names, colour),
    roundsSection(run, rounds));
}
