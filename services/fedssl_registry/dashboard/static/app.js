// Dashboard entry point: token handling, routing on the URL path, polling, error display.

import { ApiError, getToken, setToken } from "./api.js";
import { clear, h } from "./dom.js";
import * as overview from "./overview.js";
import * as run from "./run.js";
import * as model from "./model.js";
import * as tryit from "./try.js";

const meta = (name) => document.querySelector(`meta[name="${name}"]`)?.content || "";
const READ_AUTH = meta("fedssl-read-auth") === "true";
const OPEN_WRITES = meta("fedssl-open-writes") === "true";
const PREFIX = "/dashboard";
const FAST_POLL_MS = 3000; // while a run is in progress
const SLOW_POLL_MS = 15000; // otherwise: new runs and versions still show up

const main = document.getElementById("main");
const notice = document.getElementById("notice");
const live = document.getElementById("live");

function route() {
  const path = decodeURIComponent(location.pathname.replace(/\/+$/, "")).slice(PREFIX.length);
  const params = new URLSearchParams(location.search);
  let m;
  if (path === "" || path === "/runs" || path === "/models") return { page: overview, nav: "runs", args: {} };
  if ((m = path.match(/^\/runs\/([^/]+)$/))) return { page: run, nav: "runs", args: { runId: m[1] } };
  if ((m = path.match(/^\/models\/([^/]+)$/))) return { page: model, nav: "runs", args: { name: m[1], version: params.get("version") } };
  if (path === "/try") return { page: tryit, nav: "try", args: { model: params.get("model"), versions: params.getAll("version"), run: params.get("run"), hospital: params.get("hospital") } };
  return { page: null, nav: "", args: {} };
}

// ------------------------------------------------------------------ token and access
function renderAccess() {
  const access = document.getElementById("access");
  clear(access);
  access.append(h("span", { class: ["badge", READ_AUTH ? "badge-lock" : "badge-open"],
    title: READ_AUTH ? "FEDSSL_REGISTRY_READ_AUTH is on: reading needs the token" : "reads are open on this registry",
    text: READ_AUTH ? "reads need a token" : "reads open" }));
  if (OPEN_WRITES) access.append(h("span", { class: "badge badge-warn", title: "the registry runs without a token (development mode)", text: "dev mode: no token" }));
  if (getToken()) access.append(h("span", { class: "badge badge-token", text: "token set" }));
}

function showTokenPanel(show) {
  const panel = document.getElementById("token-panel");
  panel.hidden = !show;
  if (show) document.getElementById("token-input").focus();
}

function wireToken() {
  document.getElementById("token-button").addEventListener("click", () => showTokenPanel(document.getElementById("token-panel").hidden));
  const input = document.getElementById("token-input");
  const save = () => {
    setToken(input.value.trim());
    input.value = "";
    showTokenPanel(false);
    renderAccess();
    start();
  };
  document.getElementById("token-save").addEventListener("click", save);
  input.addEventListener("keydown", (e) => { if (e.key === "Enter") save(); });
  document.getElementById("token-forget").addEventListener("click", () => {
    setToken("");
    input.value = "";
    renderAccess();
    start();
  });
}

// ------------------------------------------------------------------ notices
function showNotice(kind, title, detail) {
  clear(notice);
  notice.className = `notice notice-${kind}`;
  notice.dataset.kind = kind;
  notice.append(h("strong", { text: title }), detail ? h("span", { text: ` ${detail}` }) : null);
  notice.hidden = false;
}

function hideNotice() {
  notice.hidden = true;
  delete notice.dataset.kind;
  clear(notice);
}

/** Show an error; a 401 also clears the page, so no data is left on screen. */
function fail(err) {
  if (err instanceof ApiError && err.status === 401) {
    clear(main).append(h("div", { class: "refused", "data-refused": "401" },
      h("h1", { text: "Token required" }),
      h("p", { text: "The registry refused to read (HTTP 401). Enter the registry token with the Token button; it stays in this tab only." })));
    showNotice("auth", "401 Unauthorized:", err.message);
    showTokenPanel(true);
    setLive(null);
    return;
  }
  if (err instanceof ApiError && err.status === 404) {
    clear(main).append(h("h1", { text: "Not found" }), h("p", {}, h("a", { href: `${PREFIX}/`, text: "Back to runs and models" })));
    showNotice("missing", "HTTP 404:", err.message);
    setLive(null);
  } else if (err instanceof ApiError) {
    showNotice("error", `HTTP ${err.status || "error"}:`, err.message);
  } else {
    showNotice("error", "Dashboard error:", err && err.message ? err.message : String(err));
    console.error(err);
  }
}

// ------------------------------------------------------------------ polling
let generation = 0; // bumps on every (re)start so stale timers and fetches stop
let timer = null;

function setLive(fast) {
  if (fast === null) { live.hidden = true; return; }
  live.hidden = false;
  live.className = fast ? "live live-on" : "live";
  live.textContent = `${fast ? "live" : "auto-refresh"} · updated ${new Date().toLocaleTimeString("en-GB")}`;
}

async function start() {
  const gen = ++generation;
  clearTimeout(timer);
  const { page, nav, args } = route();
  for (const a of document.querySelectorAll(".mainnav a")) a.classList.toggle("active", a.dataset.nav === nav);
  if (!page) {
    clear(main).append(h("h1", { text: "Page not found" }), h("p", {}, h("a", { href: `${PREFIX}/`, text: "Back to runs and models" })));
    return;
  }
  let lastKey = null;
  const tick = async () => {
    try {
      const data = await page.load(args);
      if (gen !== generation) return;
      hideNotice();
      const key = JSON.stringify(data);
      if (key !== lastKey) {
        const scrollY = window.scrollY;
        const view = page.render(data, args);
        if (gen !== generation) return;
        clear(main).append(view);
        if (lastKey !== null) window.scrollTo(0, scrollY);
        lastKey = key;
        document.title = `${page.title(data, args)} · fedssl`;
        main.dataset.rendered = String(Number(main.dataset.rendered || 0) + 1);
      }
      const poll = page.poll ? page.poll(data) : null;
      if (poll === null) { setLive(null); return; }
      setLive(poll === "fast");
      timer = setTimeout(tick, poll === "fast" ? FAST_POLL_MS : SLOW_POLL_MS);
    } catch (err) {
      if (gen !== generation) return;
      fail(err);
      if (!(err instanceof ApiError && (err.status === 401 || err.status === 404))) timer = setTimeout(tick, SLOW_POLL_MS);
    }
  };
  await tick();
}

renderAccess();
wireToken();
start();
