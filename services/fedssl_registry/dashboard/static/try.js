// Try it: upload a JPEG/PNG, see the production model's prediction and, side by side, the
// predictions of other chosen versions (of any registered classifier) on the same image. When
// the run behind the chosen global version registered its hospitals' local-only classifiers
// (register-local-models), those are ticked too: one image, the global model and every
// hospital's own model. A hospital of the federation can ask as itself: the global versions
// that carry their hospitals' label counts (lineage.label_counts) then answer with that
// hospital's own label mix (`:predict?hospital=`).

import { api } from "./api.js";
import { clear, empty, h, s, section } from "./dom.js";

const IMAGE_TYPES = ["image/jpeg", "image/png"];

export const title = () => "Try it";

export function poll() {
  return null; // the page holds the user's choices; it is never re-rendered under them
}

/** A hospital's local-only classifier version (register-local-models): its lineage says so. */
const isLocal = (v) => v?.lineage?.local_only === true;
const hospitalOf = (v) => v.lineage?.hospital || v.tags?.hospital || "?";
/** The hospitals a global classifier version can serve their own label mix (lineage.label_counts). */
const servedHospitals = (v) => (isLocal(v) ? [] : Object.keys(v?.lineage?.label_counts || {}));

export async function load() {
  const models = (await api.models()).filter((m) => m.task === "classification");
  const versions = await Promise.all(models.map((m) => api.versions(m.name)));
  const all = models.map((m, i) => ({ ...m, versionList: versions[i], local: versions[i].some(isLocal) }));
  // Global classifiers first, then the hospitals' own models by name.
  all.sort((a, b) => Number(a.local) - Number(b.local) || a.name.localeCompare(b.name));
  return { models: all };
}

/** The run of the first ticked global version: its hospitals' local-only models join it. */
function withLocalModels(models, chosen, runId) {
  let run = runId;
  if (!run) {
    for (const m of models) for (const v of m.versionList) if (!isLocal(v) && chosen.has(`${m.name}@${v.version}`) && v.lineage?.run_id) run ||= v.lineage.run_id;
  }
  if (!run) return;
  for (const m of models) for (const v of m.versionList) if (isLocal(v) && v.lineage.run_id === run) chosen.add(`${m.name}@${v.version}`);
}

/** Which (model, version) pairs start ticked: the URL's choice, else the first production
 * version; with either, the local-only models its run registered (`run=` names the run). */
function initialChoice(models, args) {
  const chosen = new Set();
  const wanted = models.find((m) => m.name === args.model);
  if (wanted) {
    if (wanted.aliases?.production) chosen.add(`${wanted.name}@${wanted.aliases.production}`);
    for (const n of (args.versions || []).map(Number)) {
      if (wanted.versionList.some((v) => v.version === n)) chosen.add(`${wanted.name}@${n}`);
    }
  }
  if (!chosen.size) {
    for (const m of models) {
      const v = m.aliases?.production || m.latest_version;
      if (v) { chosen.add(`${m.name}@${v}`); break; }
    }
  }
  withLocalModels(models, chosen, args.run);
  return chosen;
}

function versionLabel(v) {
  const lin = v.lineage || {};
  const parts = [`v${v.version}`];
  if (v.aliases?.length) parts.push(v.aliases.join(", "));
  if (lin.phase) parts.push(`${lin.phase} round ${lin.round}`);
  if (lin.run_id) parts.push(`run ${lin.run_id}`);
  return parts.join(" · ");
}

function probabilityBars(probabilities, label) {
  const entries = Object.entries(probabilities).sort((a, b) => b[1] - a[1]);
  // Room on the left for the longest class name (about 6.6 px a character at the tick size).
  const longest = Math.max(...entries.map(([cls]) => cls.length), 4);
  const rowH = 22, L = Math.min(Math.max(64, Math.round(longest * 6.6) + 12), 170), R = 58, W = L + 238 + R;
  const root = s("svg", { viewBox: `0 0 ${W} ${entries.length * rowH + 4}`, class: "prob-svg", role: "img", "aria-label": "class probabilities" });
  entries.forEach(([cls, p], i) => {
    const y = 2 + i * rowH;
    const g = s("g", { class: ["prob", cls === label && "prob-top"], "data-class": cls, "data-p": p });
    g.append(s("text", { x: L - 8, y: y + 14, "text-anchor": "end", class: "tick", text: cls }));
    g.append(s("rect", { x: L, y: y + 3, width: W - L - R, height: rowH - 8, rx: 3, class: "prob-track" }));
    g.append(s("rect", { x: L, y: y + 3, width: Math.max((W - L - R) * p, 0.5), height: rowH - 8, rx: 3, class: "prob-fill" }));
    g.append(s("text", { x: W - R + 6, y: y + 14, class: "tick", text: `${(p * 100).toFixed(1)}%` }));
    root.append(g);
  });
  return root;
}

function resultCard(model, version, result, error, asking) {
  const local = isLocal(version);
  const card = h("article", { class: ["result", error && "result-error", local && "result-local"], "data-model": model.name, "data-version": version.version,
    "data-kind": local ? "local" : "global", "data-hospital": local ? hospitalOf(version) : null },
    h("p", { class: "result-kind small", text: local ? `${hospitalOf(version)}'s own model (local-only)` : "global (federated) model" }),
    h("header", {}, h("span", { class: "mono", text: model.name }), " ", h("strong", { text: `v${version.version}` }),
      version.aliases.map((a) => h("span", { class: ["chip", a === "production" && "chip-prod"], text: a }))));
  if (error) {
    card.append(h("p", { class: "error-text", text: `HTTP ${error.status || "error"}: ${error.message}` }));
    return card;
  }
  const top = result.probabilities[result.label];
  if (result.hospital) {
    const ownStats = (version.lineage?.hospital_batchnorm || []).includes(result.hospital);
    card.append(h("p", { class: "small result-hospital", "data-hospital": result.hospital,
      text: `with ${result.hospital}'s own label mix${ownStats ? " and BatchNorm statistics" : ""}` }));
  } else if (asking && !local) {
    card.append(h("p", { class: "small muted result-hospital", text: `this version carries no label counts for ${asking}: the federation's label mix` }));
  }
  card.append(
    h("div", { class: "prediction" }, h("span", { class: "muted", text: "predicted " }),
      h("span", { class: "pred-label", "data-label": result.label, text: result.label }),
      h("span", { class: "pred-p", text: ` ${(top * 100).toFixed(1)}%` })),
    probabilityBars(result.probabilities, result.label));
  return card;
}

export function render({ models }, args) {
  if (!models.length) {
    return h("div", {}, h("h1", { text: "Try it" }), empty("No classification model is registered yet: run a federated fine-tune first."));
  }
  const chosen = initialChoice(models, args);
  let file = null;

  const preview = h("div", { class: "preview" }, h("span", { class: "muted", text: "No image chosen" }));
  const input = h("input", { type: "file", id: "image-input", accept: IMAGE_TYPES.join(","), class: "file-input" });
  const drop = h("label", { class: "dropzone", for: "image-input" },
    h("strong", { text: "Choose a JPEG or PNG" }), h("span", { class: "muted", text: " or drop it here" }));
  const results = h("div", { class: "results", "aria-live": "polite" },
    empty("Choose an image and press Predict: each ticked version answers side by side."));
  const status = h("p", { class: "muted small try-status" });
  const button = h("button", { type: "button", class: "btn btn-primary", id: "predict", disabled: true, text: "Predict" });
  const hospitalSelect = h("select", { id: "hospital-select" });
  const hospitalHint = h("span", { class: "small muted" });
  let asking = args.hospital || "";
  hospitalSelect.addEventListener("change", () => { asking = hospitalSelect.value; });

  const setFile = (f) => {
    if (!f) return;
    file = f;
    clear(preview).append(h("img", { src: URL.createObjectURL(f), alt: "the chosen image" }),
      h("p", { class: "small muted", text: `${f.name} · ${(f.size / 1024).toFixed(0)} KB` }));
    if (!IMAGE_TYPES.includes(f.type)) status.textContent = `${f.type || "unknown type"}: the registry accepts JPEG and PNG only and will refuse it.`;
    else status.textContent = "";
    refresh();
  };
  input.addEventListener("change", () => setFile(input.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("drag"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("drag"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("drag"); setFile(e.dataTransfer.files[0]); });

  const picks = models.map((m) => h("fieldset", { class: ["pick", m.local && "pick-local"] },
    h("legend", {}, h("span", { class: "mono", text: m.name }), m.local ? h("span", { class: "chip", text: "local-only" }) : null),
    m.versionList.slice().reverse().map((v) => {
      const key = `${m.name}@${v.version}`;
      const box = h("input", { type: "checkbox", value: key, checked: chosen.has(key), "data-model": m.name, "data-version": v.version });
      box.addEventListener("change", () => { if (box.checked) chosen.add(key); else chosen.delete(key); refresh(); });
      return h("label", { class: "pick-row" }, box, h("span", { text: versionLabel(v) }), v.synthetic_data ? h("span", { class: "badge badge-synthetic", text: "SYNTHETIC" }) : null);
    })));

  /** The select offers the hospitals any ticked global version can serve; a choice no ticked
   * version serves any more falls back to none. */
  function refreshHospitals() {
    const offered = new Set();
    for (const m of models) for (const v of m.versionList) if (chosen.has(`${m.name}@${v.version}`)) servedHospitals(v).forEach((x) => offered.add(x));
    if (!offered.has(asking)) asking = "";
    clear(hospitalSelect).append(h("option", { value: "", text: "none: the federation's label mix" }),
      ...[...offered].sort().map((x) => h("option", { value: x, text: x, selected: x === asking })));
    hospitalSelect.value = asking;
    hospitalSelect.disabled = !offered.size;
    hospitalHint.textContent = offered.size ? "" : "No ticked version carries its hospitals' label counts (they come with balanced-softmax fine-tuning).";
  }

  function refresh() {
    button.disabled = !file || !chosen.size;
    refreshHospitals();
  }

  button.addEventListener("click", async () => {
    if (!file || !chosen.size) return;
    button.disabled = true;
    status.textContent = `Asking ${chosen.size} model version${chosen.size === 1 ? "" : "s"}…`;
    clear(results);
    delete results.dataset.done; // set again when every answer is in
    const targets = [];
    for (const m of models) for (const v of m.versionList.slice().reverse()) if (chosen.has(`${m.name}@${v.version}`)) targets.push([m, v]);
    // Global models first, production first among them (what the service answers without a
    // version); then the hospitals' own models by hospital.
    const rank = ([, v]) => (isLocal(v) ? 2 : v.aliases.includes("production") ? 0 : 1);
    targets.sort((a, b) => rank(a) - rank(b) || (isLocal(a[1]) ? hospitalOf(a[1]).localeCompare(hospitalOf(b[1])) : 0));
    const outcomes = await Promise.all(targets.map(async ([m, v]) => {
      const as = asking && servedHospitals(v).includes(asking) ? asking : undefined;
      try { return [m, v, await api.predict(m.name, v.version, file, as), null]; } catch (err) { return [m, v, null, err]; }
    }));
    for (const [m, v, res, err] of outcomes) results.append(resultCard(m, v, res, err, asking));
    const labels = new Set(outcomes.filter((o) => o[2]).map((o) => o[2].label));
    const failed = outcomes.filter((o) => o[3]).length;
    const globalAnswer = outcomes.find((o) => o[2] && !isLocal(o[1]));
    const locals = outcomes.filter((o) => o[2] && isLocal(o[1]));
    status.textContent = failed ? `${failed} of ${outcomes.length} requests were refused.`
      : globalAnswer && locals.length
        ? `The global model says ${globalAnswer[2].label}; ${locals.filter((o) => o[2].label === globalAnswer[2].label).length} of `
          + `${locals.length} hospitals' own models agree (${locals.map((o) => `${hospitalOf(o[1])}: ${o[2].label}`).join(", ")}).`
        : outcomes.length > 1 ? (labels.size === 1 ? `All ${outcomes.length} versions agree: ${[...labels][0]}.` : `The versions disagree: ${[...labels].join(" vs ")}.`)
          : "Done.";
    results.dataset.done = String(outcomes.length);
    refresh();
  });

  refreshHospitals();
  return h("div", { class: "try-page" },
    h("div", { class: "page-head" }, h("h1", { text: "Try it" }),
      h("p", { class: "muted", text: "Upload an image of the kind the model was trained on; the registry's classifier versions predict its class. Research use only: not a diagnosis." })),
    h("div", { class: "try-grid" },
      h("section", { class: "card" }, h("h2", { text: "1. Image" }), input, drop, preview),
      h("section", { class: "card" }, h("h2", { text: "2. Model versions" }),
        h("p", { class: "small muted", text: "Production is ticked, with each hospital's own (local-only) model when its run registered them "
          + "(register-local-models; off by default, they are the hospitals' property). Tick other versions to compare them on the same image." }), picks,
        h("label", { class: "hospital-pick", for: "hospital-select" }, h("span", { text: "Asking as hospital " }), hospitalSelect, hospitalHint),
        h("div", { class: "actions" }, button), status)),
    section("Predictions", { id: "predictions" }, results));
}
