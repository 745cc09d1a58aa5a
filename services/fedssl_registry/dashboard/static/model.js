// One registered model: versions with lineage, tags, metrics and aliases; for the selected
// version, per-class precision/recall/F1 and the confusion matrix as a heat map. A generation
// model instead shows its lineage metrics over versions (one per round) and a gallery of the
// selected version's images, GALLERY_COUNT per class, drawn by :generate.

import { api, ApiError } from "./api.js";
import { heatMap, lineChart, PALETTE } from "./charts.js";
import { bytes, clear, empty, h, int, isNum, kv, num, pct, section, syntheticBadge, table, taskBadge, when } from "./dom.js";

const PER_CLASS = ["precision", "recall", "f1"];
const GALLERY_COUNT = 8;
// Generator metrics shown first when a version's lineage has them (names.GENERATIVE_SCORES, the
// hospitals' scores of the round's generator); any other number in lineage.metrics follows, in name order.
const GENERATOR_METRICS = ["fid", "gen_precision", "gen_recall", "memorisation_too_close_fraction", "memorisation_too_close_fraction_pixels",
  "memorisation_distance_ratio", "generator_loss", "discriminator_loss"];
const MAX_METRIC_COLUMNS = 5;

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
  const scores = current && model.task !== "generation" ? await scoresOf(current) : null;
  return { model, versions, selected, scores };
}

/** The scalar lineage metrics of a generator's versions: the known ones first, then the rest. */
function generatorMetricKeys(versions) {
  const seen = new Set();
  for (const v of versions) for (const [k, x] of Object.entries(v.lineage?.metrics || {})) if (isNum(x)) seen.add(k);
  return [...GENERATOR_METRICS.filter((k) => seen.has(k)), ...[...seen].filter((k) => !GENERATOR_METRICS.includes(k)).sort()];
}

function versionRow(model, v, selected, metricKeys) {
  const lin = v.lineage || {};
  const m = lin.metrics || {};
  const scores = metricKeys
    ? metricKeys.map((k) => h("td", { class: "num", "data-metric": k, text: num(m[k]) }))
    : [h("td", { class: "num", text: pct(m.balanced_accuracy) }), h("td", { class: "num", text: num(m.macro_auc) })];
  const href = `/dashboard/models/${encodeURIComponent(model.name)}?version=${v.version}`;
  return h("tr", { "data-version": v.version, class: v.version === selected ? "selected" : null },
    h("td", {}, h("a", { href, text: `v${v.version}` })),
    h("td", {}, v.aliases.map((a) => h("span", { class: ["chip", a === "production" && "chip-prod"], text: a }))),
    h("td", { class: "nowrap", text: when(v.created_at) }),
    h("td", {}, lin.run_id ? h("a", { class: "mono", href: `/dashboard/runs/${encodeURIComponent(lin.run_id)}`, text: lin.run_id }) : "–",
      lin.phase ? h("div", { class: "small muted", text: `${lin.phase} round ${lin.round ?? "?"}` }) : null),
    h("td", { class: "small", text: (lin.hospitals || []).join(", ") || "–" }),
    scores,
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
    h("div", { class: "fact" }, h("div", { class: "fact-label", text: "test images" }), h("div", { class: "fact-value", text: int(m.test_examples) })),
    // hospital-batchnorm: each hospital scored it as :predict?hospital= serves it (its own statistics and label mix)
    isNum(m.served_balanced_accuracy) ? h("div", { class: "fact", "data-fact": "served_balanced_accuracy",
      title: "Each hospital scored this classifier on its held-out images as :predict?hospital= serves it: with its own "
        + "BatchNorm statistics and label mix. A caller that names no hospital gets the balanced accuracy beside it." },
    h("div", { class: "fact-label", text: "balanced accuracy, hospital named" }),
    h("div", { class: "fact-value", text: `${pct(m.served_balanced_accuracy)} · AUC ${num(m.served_macro_auc)}` })) : null);
  const info = versionInfo(v);
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

/** What a version is: aliases, when, which run and round, hospitals, data, tags, hash. */
function versionInfo(v) {
  const lin = v.lineage || {};
  return kv([
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
}

/**
 * GALLERY_COUNT images of each class from version `v`, one :generate request per class, drawn
 * when the section is rendered (not on every poll); the seed input draws another set. The
 * grid's data-done says how many classes have answered (images or an error).
 */
function gallery(model, v) {
  const classes = model.input_spec?.class_names || [];
  const grid = h("div", { class: "gallery", id: "gallery", "data-version": v.version });
  const seed = h("input", { type: "number", min: 0, step: 1, value: 0, class: "seed-input", id: "gallery-seed", "aria-label": "seed" });
  const draw = h("button", { type: "button", class: "btn btn-small", id: "gallery-draw", text: "Draw" });
  const fill = async () => {
    const s = Math.max(0, Math.floor(Number(seed.value) || 0));
    seed.value = s;
    draw.disabled = true;
    grid.dataset.done = "0";
    grid.dataset.seed = String(s);
    const rows = classes.map((c, i) => {
      const images = h("div", { class: "gallery-images" }, h("span", { class: "muted small", text: "drawing…" }));
      grid.append(h("div", { class: "gallery-row", "data-class": c }, h("div", { class: "gallery-label", title: `class ${i}`, text: c }), images));
      return [c, i, images];
    });
    await Promise.all(rows.map(async ([c, i, images]) => {
      try {
        const res = await api.generate(model.name, v.version, i, GALLERY_COUNT, s);
        clear(images).append(...res.images.map((im) => h("img", { class: "gallery-img", src: `data:image/png;base64,${im.png_base64}`,
          width: model.input_spec.image_size, height: model.input_spec.image_size, "data-index": im.index,
          alt: `${c}, seed ${s}, image ${im.index + 1} of ${GALLERY_COUNT}`, title: `${c} · seed ${s} · #${im.index}` })));
      } catch (err) {
        clear(images).append(h("p", { class: "error-text", text: `HTTP ${err.status || "error"}: ${err.message}` }));
      }
      grid.dataset.done = String(Number(grid.dataset.done) + 1);
    }));
    draw.disabled = false;
  };
  draw.addEventListener("click", () => { clear(grid); fill(); });
  fill();
  return section(`Samples · v${v.version}`, { id: "samples", "data-version": v.version,
    tools: [h("label", { for: "gallery-seed", class: "small muted", text: "seed " }), seed, draw] },
  h("p", { class: "small muted", text: `${GALLERY_COUNT} images per class from POST /v1/models/${model.name}:generate; the same seed draws the same images.` }),
  classes.length ? grid : empty("This model names no classes (input_spec.class_names)."));
}

function generatorDetail(model, versions, v, metricKeys) {
  const ordered = versions.slice().sort((a, b) => a.version - b.version);
  const charts = metricKeys.map((k, i) => lineChart({
    id: k, title: k.replaceAll("_", " "), xLabels: ordered.map((x) => `v${x.version}`), format: (x) => x.toFixed(3),
    series: [{ name: model.name, color: PALETTE[i % PALETTE.length], width: 2.5, values: ordered.map((x) => (isNum(x.lineage?.metrics?.[k]) ? x.lineage.metrics[k] : null)) }],
  }));
  return [
    section(`Version ${v.version}`, { id: "version", "data-version": v.version },
      v.synthetic_data ? h("div", { class: "banner-synthetic", "data-synthetic-banner": "" }, h("strong", { text: "SYNTHETIC DATA. " }),
        h("span", { text: "This generator was trained on synthetic images." })) : null,
      versionInfo(v)),
    gallery(model, v),
    section("Lineage metrics over versions", { id: "lineage-metrics" },
      charts.length ? [h("p", { class: "small muted note-spaced", text: "One point per registered version, oldest first: each is the generator "
        + "of one generative round (Run (lineage) in the table above), scored as its lineage.metrics record." }), h("div", { class: "chart-grid" }, charts)]
        : empty("No version recorded numeric metrics in its lineage (lineage.metrics).")),
  ];
}

export function render({ model, versions, selected, scores }) {
  const spec = model.input_spec || {};
  const current = versions.find((v) => v.version === selected);
  const generator = model.task === "generation";
  const allMetricKeys = generator ? generatorMetricKeys(versions) : null; // charts: all; the table: the first few
  const metricKeys = generator ? allMetricKeys.slice(0, MAX_METRIC_COLUMNS) : null;
  const scoreHeads = generator ? metricKeys.map((k) => k.replaceAll("_", " ")) : ["Balanced acc.", "Macro AUC"];
  return h("div", { class: "model-page", "data-model": model.name, "data-task": model.task },
    h("div", { class: "page-head" },
      h("p", { class: "crumbs" }, h("a", { href: "/dashboard/#models", text: "Models" }), " / model"),
      h("h1", {}, h("span", { class: "mono", text: model.name }), " ", taskBadge(model.task)),
      model.description ? h("p", { class: "muted", text: model.description }) : null,
      h("div", { class: "facts" },
        h("div", { class: "fact" }, h("div", { class: "fact-label", text: "architecture" }), h("div", { class: "fact-value", text: model.architecture })),
        generator
          ? h("div", { class: "fact" }, h("div", { class: "fact-label", text: "draws" }), h("div", { class: "fact-value", text: `${spec.image_size ?? "?"} px RGB · latent ${spec.z_dim ?? "?"}` }))
          : h("div", { class: "fact" }, h("div", { class: "fact-label", text: "input" }), h("div", { class: "fact-value", text: `${spec.image_size ?? "?"} px RGB` + (spec.test_time_augmentation === "dihedral" ? " · 8 views (flips, turns)" : "") })),
        h("div", { class: "fact" }, h("div", { class: "fact-label", text: "versions" }), h("div", { class: "fact-value", text: int(versions.length) })),
        h("div", { class: "fact" }, h("div", { class: "fact-label", text: "aliases" }),
          h("div", { class: "fact-value" }, Object.entries(model.aliases || {}).map(([a, n]) => h("span", { class: ["chip", a === "production" && "chip-prod"], text: `${a} → v${n}` })))),
        spec.class_names?.length ? h("div", { class: "fact" }, h("div", { class: "fact-label", text: "classes" }),
          h("div", { class: "fact-value small", text: spec.class_names.join(", ") })) : null)),
    section("Versions", { id: "versions" },
      versions.length
        ? table(["Version", "Aliases", "Created", "Run (lineage)", "Hospitals", ...scoreHeads, "Data", "Tags", "Size"],
          versions.slice().reverse().map((v) => versionRow(model, v, selected, metricKeys)), { class: "versions-table" })
        : empty("No versions uploaded yet.")),
    current ? (generator ? generatorDetail(model, versions, current, allMetricKeys) : versionDetail(model, current, scores)) : null);
}
