// One registered model: versions with lineage, tags, metrics and aliases; for the selected
// version, per-class precision/recall/F1 and the confusion matrix as a heat map.

import { api, ApiError } from "./api.js";
import { heatMap } from "./charts.js";
import { badge, bytes, empty, h, int, isNum, kv, num, pct, section, syntheticBadge, table, when } from "./dom.js";

const PER_CLASS = ["precision", "recall", "f1"];

export const title = (data) => `Model ${data.model.name}`;

export function poll() {
  return "slow"; // a run in progress adds versions
}

/** The version the page shows: ?version=N, else the production alias, else the latest. */
function selectedVersion(model, versions, wanted) {
  const n = Number(wanted);
  if (wanted && versions.some((v) => v.version === n)) return n;
  if (model.aliases?.production) return model.aliases.production;
  return versions.length ? versions[versions.length - 1].version : null;
}

/**
 * Per-class scores and the confusion matrix of a version: from its lineage metrics when the
 * uploader put them there, else from the aggregated record of the run round that produced it.
 */
async function scoresOf(version) {
  const lin = version.lineage || {};
  const metrics = lin.metrics || {};
  if (Array.isArray(metrics.confusion_matrix)) return { source: "lineage", metrics };
  if (!lin.run_id || !lin.phase || !isNum(lin.round)) return null;
  try {
    const rounds = await api.rounds(lin.run_id);
    const rd = rounds.find((r) => r.phase === lin.phase && r.round === lin.round);
    return rd ? { source: "run", metrics: rd.aggregated || {}, hospitals: Object.keys(rd.hospitals || {}).sort() } : null;
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) return null; // the run was never recorded here
    throw err;
  }
}

export async function load({ name, version }) {
  const [model, versions] = await Promise.all([api.model(name), api.versions(name)]);
  const selected = selectedVersion(model, versions, version);
  const current = versions.find((v) => v.version === selected) || null;
  const scores = current ? await scoresOf(current) : null;
  return { model, versions, selected, scores };
}

function versionRow(model, v, selected) {
  const lin = v.lineage || {};
  const m = lin.metrics || {};
  const href = `/dashboard/models/${encodeURIComponent(model.name)}?version=${v.version}`;
  return h("tr", { "data-version": v.version, class: v.version === selected ? "selected" : null },
    h("td", {}, h("a", { href, text: `v${v.version}` })),
    h("td", {}, v.aliases.map((a) => h("span", { class: ["chip", a === "production" && "chip-prod"], text: a }))),
    h("td", { class: "nowrap", text: when(v.created_at) }),
    h("td", {}, lin.run_id ? h("a", { class: "mono", href: `/dashboard/runs/${encodeURIComponent(lin.run_id)}`, text: lin.run_id }) : "–",
      lin.phase ? h("div", { class: "small muted", text: `${lin.phase} round ${lin.round ?? "?"}` }) : null),
    h("td", { class: "small", text: (lin.hospitals || []).join(", ") || "–" }),
    h("td", { class: "num", text: pct(m.balanced_accuracy) }),
    h("td", { class: "num", text: num(m.macro_auc) }),
    h("td", {}, v.synthetic_data ? syntheticBadge() : h("span", { text: v.data_source || "–" })),
    h("td", { class: "small" }, Object.entries(v.tags || {}).map(([k, val]) => h("span", { class: "tag", text: `${k}=${val}` }))),
    h("td", { class: "num", text: bytes(v.size_bytes) }));
}

function perClass(classes, metrics) {
  const cm = metrics.confusion_matrix || [];
  const rows = classes.map((c, i) => {
    const support = Array.isArray(cm[i]) ? cm[i].reduce((a, b) => a + b, 0) : null;
    return h("tr", { "data-class": c },
      h("td", { text: c }),
      PER_CLASS.map((k) => h("td", { class: "num", "data-metric": k, text: num(metrics[k]?.[i]) })),
      h("td", { class: "num", "data-metric": "support", text: int(support) }));
  });
  return table(["Class", "Precision", "Recall", "F1", "Test images"], rows, { class: "per-class-table" });
}

function versionDetail(model, v, scores) {
  const classes = model.input_spec?.class_names || [];
  const lin = v.lineage || {};
  const m = { ...(lin.metrics || {}), ...(scores?.metrics || {}) };
  const probe = model.task !== "classification" && lin.phase === "ssl";
  const summary = h("div", { class: "facts" },
    ["balanced_accuracy", "macro_auc", "accuracy"].map((k) => h("div", { class: "fact", "data-fact": k },
      h("div", { class: "fact-label", text: k.replace("_", " ") }), h("div", { class: "fact-value", text: k === "macro_auc" ? num(m[k]) : pct(m[k]) }))),
    h("div", { class: "fact" }, h("div", { class: "fact-label", text: "test images" }), h("div", { class: "fact-value", text: int(m.test_examples) })));
  const info = kv([
    ["Aliases", v.aliases.length ? v.aliases.join(", ") : "none"],
    ["Created", when(v.created_at)],
    ["Run", lin.run_id ? h("a", { class: "mono", href: `/dashboard/runs/${encodeURIComponent(lin.run_id)}`, text: lin.run_id }) : "–"],
    ["Phase / round", lin.phase ? `${lin.phase} / ${lin.round}` : "–"],
    ["Hospitals", (lin.hospitals || []).join(", ") || "–"],
    lin.local_only ? ["Local-only", [`trained by ${lin.hospital} on its own images alone, beside `,
      lin.global_model?.name ? h("a", { class: "mono", href: `/dashboard/models/${encodeURIComponent(lin.global_model.name)}?version=${lin.global_model.version}`,
        text: `${lin.global_model.name} v${lin.global_model.version}` }) : "the global model"]] : null,
    ["Data", v.synthetic_data ? [syntheticBadge(), ` ${v.data_source || ""}`] : v.data_source || "–"],
    ["Tags", Object.keys(v.tags || {}).length ? Object.entries(v.tags).map(([k, val]) => h("span", { class: "tag", text: `${k}=${val}` })) : "none"],
    ["SHA-256", h("span", { class: "mono small", text: v.sha256 })],
  ]);
  const hasCm = Array.isArray(m.confusion_matrix) && m.confusion_matrix.length === classes.length && classes.length > 0;
  const what = model.task === "classification" ? "this classifier"
    : probe ? "linear probe on this encoder" : "the classifier trained on this encoder";
  const scoresBlock = hasCm
    ? h("div", { class: "chart-grid chart-grid-wide" },
      h("div", {}, h("h3", { text: `Per-class scores (${what}, ${lin.local_only ? lin.scored_on || "its hospital's own held-out images" : "pooled test sets of all hospitals"})` }),
        perClass(classes, m)),
      heatMap({ id: "confusion_matrix", title: `Confusion matrix · ${model.name} v${v.version}`, labels: classes, matrix: m.confusion_matrix }))
    : empty("No per-class scores were recorded for this version (its run round is not in this registry).");
  const actions = model.task === "classification"
    ? h("a", { class: "btn", href: `/dashboard/try?model=${encodeURIComponent(model.name)}&version=${v.version}`, text: `Try v${v.version} on an image` }) : null;
  return section(`Version ${v.version}`, { id: "version", "data-version": v.version, tools: actions },
    v.synthetic_data ? h("div", { class: "banner-synthetic", "data-synthetic-banner": "" }, h("strong", { text: "SYNTHETIC DATA. " }),
      h("span", { text: "This version was trained on synthetic images; do not use it on patients." })) : null,
    summary, info, scoresBlock);
}

export function render({ model, versions, selected, scores }) {
  const spec = model.input_spec || {};
  const current = versions.find((v) => v.version === selected);
  return h("div", { class: "model-page", "data-model": model.name },
    h("div", { class: "page-head" },
      h("p", { class: "crumbs" }, h("a", { href: "/dashboard/#models", text: "Models" }), " / model"),
      h("h1", {}, h("span", { class: "mono", text: model.name }), " ", badge(model.task, model.task === "classification" ? "task-clf" : "task-emb")),
      model.description ? h("p", { class: "muted", text: model.description }) : null,
      h("div", { class: "facts" },
        h("div", { class: "fact" }, h("div", { class: "fact-label", text: "architecture" }), h("div", { class: "fact-value", text: model.architecture })),
        h("div", { class: "fact" }, h("div", { class: "fact-label", text: "input" }), h("div", { class: "fact-value", text: `${spec.image_size ?? "?"} px RGB` + (spec.test_time_augmentation === "dihedral" ? " · 8 views (flips, turns)" : "") })),
        h("div", { class: "fact" }, h("div", { class: "fact-label", text: "versions" }), h("div", { class: "fact-value", text: int(versions.length) })),
        h("div", { class: "fact" }, h("div", { class: "fact-label", text: "aliases" }),
          h("div", { class: "fact-value" }, Object.entries(model.aliases || {}).map(([a, n]) => h("span", { class: ["chip", a === "production" && "chip-prod"], text: `${a} → v${n}` })))),
        spec.class_names?.length ? h("div", { class: "fact" }, h("div", { class: "fact-label", text: "classes" }),
          h("div", { class: "fact-value small", text: spec.class_names.join(", ") })) : null)),
    section("Versions", { id: "versions" },
      versions.length
        ? table(["Version", "Aliases", "Created", "Run (lineage)", "Hospitals", "Balanced acc.", "Macro AUC", "Data", "Tags", "Size"],
          versions.slice().reverse().map((v) => versionRow(model, v, selected)), { class: "versions-table" })
        : empty("No versions uploaded yet.")),
    current ? versionDetail(model, current, scores) : null);
}
