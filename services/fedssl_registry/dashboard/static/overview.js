// Overview: every federated run and every registered model.

import { api } from "./api.js";
import { duration, empty, h, int, seconds, section, statusBadge, syntheticBadge, table, taskBadge, when } from "./dom.js";

export const title = () => "Runs and models";

export async function load() {
  const [runs, models] = await Promise.all([api.runs(), api.models()]);
  return { runs, models };
}

export function poll({ runs }) {
  return runs.some((r) => r.status === "running") ? "fast" : "slow";
}

export function isSynthetic(run) {
  return Boolean(run.synthetic_data) || Object.values(run.hospitals || {}).some((x) => x && x.data_source === "synthetic");
}

export function roundsText(run) {
  const planned = run.planned_rounds || {};
  const done = run.rounds_done || {};
  return [["ssl", "SSL"], ["finetune", "fine-tune"], ["generate", "generate"]]
    .filter(([p]) => planned[p] || done[p])
    .map(([p, label]) => `${label} ${done[p] || 0}/${planned[p] ?? "?"}`)
    .join(" · ");
}

export function runDuration(run) {
  return duration(seconds(run.started_at || run.created_at, run.status === "running" ? null : run.finished_at || run.updated_at));
}

function runRow(run) {
  const hospitals = Object.keys(run.hospitals || {}).sort();
  const synthetic = isSynthetic(run);
  return h("tr", { "data-run": run.run_id, class: synthetic ? "row-synthetic" : null },
    h("td", {}, h("a", { href: `/dashboard/runs/${encodeURIComponent(run.run_id)}`, class: "mono", text: run.run_id })),
    h("td", {}, statusBadge(run.status)),
    h("td", { text: run.phase || "–" }),
    h("td", { class: "rounds", text: roundsText(run) }),
    h("td", { text: runDuration(run) }),
    h("td", { class: "hospitals" }, hospitals.length ? hospitals.map((x) => h("span", { class: "chip", text: x })) : "–"),
    h("td", { class: "data-source" }, synthetic ? syntheticBadge() : null, h("span", { text: ` ${run.data_source || "–"}` })),
    h("td", { class: "nowrap", text: when(run.started_at || run.created_at) }));
}

function modelRow(m) {
  const spec = m.input_spec || {};
  const lineageHint = m.task === "classification" ? `${(spec.class_names || []).length} classes`
    : m.task === "generation" ? `draws ${(spec.class_names || []).length} classes` : "embedding";
  return h("tr", { "data-model": m.name },
    h("td", {}, h("a", { href: `/dashboard/models/${encodeURIComponent(m.name)}`, class: "mono", text: m.name }),
      m.description ? h("div", { class: "muted small", text: m.description }) : null),
    h("td", {}, taskBadge(m.task)),
    h("td", { text: m.architecture }),
    h("td", { text: `${lineageHint} · ${spec.image_size ?? "?"} px` }),
    h("td", { text: int(m.versions) }),
    h("td", { text: m.latest_version ? `v${m.latest_version}` : "–" }),
    h("td", {}, Object.entries(m.aliases || {}).map(([a, v]) => h("span", { class: ["chip", a === "production" && "chip-prod"], text: `${a} → v${v}` }))),
    h("td", {}, m.task === "classification" && m.latest_version
      ? h("a", { class: "btn btn-small", href: `/dashboard/try?model=${encodeURIComponent(m.name)}`, text: "Try it" }) : null));
}

export function render({ runs, models }) {
  const running = runs.filter((r) => r.status === "running").length;
  const head = h("div", { class: "page-head" },
    h("h1", { text: "Federated runs and models" }),
    h("p", { class: "muted", text: `${runs.length} run${runs.length === 1 ? "" : "s"}${running ? ` (${running} in progress)` : ""} · ${models.length} registered model${models.length === 1 ? "" : "s"}` }));
  const synth = runs.filter(isSynthetic);
  return h("div", {},
    head,
    synth.length ? h("div", { class: "banner-synthetic", "data-synthetic-banner": "" },
      h("strong", { text: "Synthetic data: " }),
      h("span", { text: `${synth.length} run${synth.length === 1 ? " was" : "s were"} trained on synthetic images (marked SYNTHETIC DATA below). Their models say nothing about real patients.` })) : null,
    section("Runs", { id: "runs" },
      runs.length
        ? table(["Run", "Status", "Phase", "Rounds done / planned", "Duration", "Hospitals", "Data", "Started"], runs.map(runRow), { class: "runs-table" })
        : empty("No federated runs yet: the aggregator records a run here when it starts (FEDSSL_REGISTRY_URL on the SuperLink).")),
    section("Models", { id: "models" },
      models.length
        ? table(["Model", "Task", "Architecture", "Input", "Versions", "Latest", "Aliases", ""], models.map(modelRow), { class: "models-table" })
        : empty("No models registered yet.")));
}

