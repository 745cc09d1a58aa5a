"""The web dashboard in a real headless Chromium against a real registry filled by a real
federated run (registry + SuperLink + a SimCLR and a rotation hospital on HAM10000 images,
1 SSL + 2 fine-tune rounds at 32 px).

While the run is in progress a browser tab watches its page: the page must follow the run
(status, rounds) without a reload. The other tests then read the finished run's records:
runs, curves, hospitals, models with the confusion-matrix heat map, an image upload, the
401 path with read auth on, a synthetic run's banner and escaping of hostile names, and the
layout at a laptop and a wide width.

Screenshots of every page land in the test's temp dir; with FEDSSL_UPDATE_SCREENSHOTS=1
they are also copied to docs/screenshots/ (scripts/dashboard-screenshots.py does that).
For quick iteration on the front end, FEDSSL_DASHBOARD_REGISTRY_DIR=<a registry data dir
from an earlier run> skips the federated run (and the live-update test).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from fedssl_core import names
from fedssl_registry import dashboard
from tests.conftest import REPO_ROOT
from tests.registry import cdp
from tests.support import processes as P

pytestmark = [pytest.mark.browser, pytest.mark.integration]

SCREENSHOTS = REPO_ROOT / "docs" / "screenshots"
REUSE_ENV = "FEDSSL_DASHBOARD_REGISTRY_DIR"
LAPTOP, WIDE = (1280, 860), (2000, 1100)
TASKS = P.FEDERATION_TASKS
HOSPITALS = sorted(f"hospital-{t}" for t in TASKS)
CLASSES = list(names.HAM10000_CLASSES)
RENDERED = "Number(document.getElementById('main').dataset.rendered || 0) > 0"


@dataclass
class Federation:
    cluster: P.Cluster
    registry: P.Registry
    run_id: str
    run: dict
    rounds: list[dict]
    image: Path
    live: dict | None  # what the watching tab saw while the run was in progress
    shots: Path


def _snapshot(tab: cdp.Tab) -> dict:
    return tab.eval("""({
        status: document.querySelector('.run-page')?.dataset.status || null,
        rounds: document.querySelectorAll('.rounds-table tbody tr').length,
        points: document.querySelectorAll('[data-chart="balanced_accuracy"] circle.pt').length,
        renders: Number(document.getElementById('main').dataset.rendered || 0),
        marker: window.__sameDocument || null,
        live: document.getElementById('live').textContent,
    })""")


def _watch(browser: cdp.Browser, registry: P.Registry, running) -> dict | None:
    """Open the run's page as soon as the run exists and record what it shows until the
    submitter returns; the page is never reloaded."""
    with registry.client() as http:
        while not running.done():
            runs = http.get("/v1/runs").json()["runs"]
            if runs:
                break
            time.sleep(0.5)
        else:
            return None
    run_id = runs[0]["run_id"]
    tab = browser.tab(*LAPTOP)
    tab.goto(f"{registry.url}/dashboard/runs/{run_id}")
    tab.wait_for(RENDERED)
    tab.eval("window.__sameDocument = 'never reloaded'")
    seen = [_snapshot(tab)]
    while not running.done():
        browser.pump(1.0)
        snap = _snapshot(tab)
        if (snap["status"], snap["rounds"]) != (seen[-1]["status"], seen[-1]["rounds"]):
            seen.append(snap)
    return {"tab": tab, "run_id": run_id, "seen": seen}


# One SSL and two fine-tune rounds: two classifier versions to compare on "Try it". The
# round timeout bounds a lost hospital reply (see _federate) to minutes instead of 30.
RUN_CONFIG = ("ssl-rounds=1", "finetune-rounds=2", "image-size=32", "probe-epochs=2", "round-timeout=240", "local-steps=2",
              "batch-size=32", "arch=\"resnet18\"", "pretrained=false", "hospital-batchnorm=true")
ATTEMPTS = 2


def _federate(c: P.Cluster, work: Path, ham10000_dir: Path, browser: cdp.Browser):
    """A registry + SuperLink + two hospitals and one run, watched live from a browser tab.
    Returns (registry, what the tab saw, the submitter's result)."""
    registry = P.start_registry(c, work / "registry")
    _, port = P.start_superlink(c, registry=registry)
    for i, task in enumerate(TASKS):
        P.start_supernode(c, port, f"node-{task}", P.node_config(
            hospital=f"hospital-{task}", **{"ssl-task": task, "data-path": str(ham10000_dir), "partition-id": i,
                                            "num-partitions": 2, "max-images": 100, "cache-dir": str(work / "cache")}))
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(P.submit, port, work, *RUN_CONFIG, timeout=600)
        live = _watch(browser, registry, running)
        return registry, live, running.result()


@pytest.fixture(scope="module")
def federation(tmp_path_factory, ham10000_dir, browser):
    work = tmp_path_factory.mktemp("dashboard")
    with ExitStack() as stack:
        live = None
        if os.environ.get(REUSE_ENV):
            c = stack.enter_context(P.cluster(work))
            shutil.copytree(os.environ[REUSE_ENV], work / "registry")
            registry = P.start_registry(c, work / "registry")
        else:
            # The dashboard needs a real run's records, not a test of Flower's transport: on a
            # loaded machine Flower 1.41 can lose a hospital's reply (its ClientApp's
            # push-task-output times out, the SuperNode then answers a stale message) and the
            # run fails. One fresh federation is retried then, loudly.
            for attempt in range(1, ATTEMPTS + 1):
                attempt_dir = work / f"attempt-{attempt}"
                attempt_dir.mkdir()
                c = stack.enter_context(P.cluster(attempt_dir))
                registry, live, result = _federate(c, attempt_dir, ham10000_dir, browser)
                if result.returncode == 0:
                    break
                failure = f"federated run attempt {attempt} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
                if attempt == ATTEMPTS:
                    pytest.fail(failure + c.logs())
                warnings.warn(failure, stacklevel=1)
                if live:
                    live["tab"].send("Page.close")
                c.close()
        with registry.client() as http:
            (run,) = [r for r in http.get("/v1/runs").json()["runs"] if r["status"] == "succeeded"][:1]
            rounds = http.get(f"/v1/runs/{run['run_id']}/rounds").json()["rounds"]
        image = sorted((ham10000_dir / "HAM10000_images_part_1").glob("*.jpg"))[0]
        yield Federation(c, registry, run["run_id"], run, rounds, image, live, work / "screenshots")


@pytest.fixture(scope="module")
def page(browser):
    return browser.tab(*LAPTOP)


@pytest.fixture
def tab(page):
    """The shared laptop-width tab, with its error log emptied for this test."""
    page.resize(*LAPTOP)
    page.errors.clear()
    yield page
    page.browser.pump(0.2)
    assert page.errors == [], f"the page logged errors (CSP violation, exception, failed request): {page.errors}"


def shoot(tab: cdp.Tab, fed: Federation, name: str) -> Path:
    tab.browser.pump(0.3)  # let the last frame paint
    path = tab.screenshot(fed.shots / name)
    if os.environ.get("FEDSSL_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SCREENSHOTS / name)
    assert path.stat().st_size > 10_000
    return path


def open_page(tab: cdp.Tab, fed: Federation, path: str, ready: str) -> None:
    tab.goto(fed.registry.url + path)
    tab.wait_for(f"({RENDERED}) && ({ready})")


def chart_points(tab: cdp.Tab, chart: str) -> dict[str, dict[str, float]]:
    """{series name: {x label: value}} of one line chart as drawn."""
    return tab.eval(f"""Object.fromEntries([...document.querySelectorAll('[data-chart="{chart}"] g.series')].map(
        g => [g.dataset.series, Object.fromEntries([...g.querySelectorAll('circle.pt')].map(c => [c.dataset.x, Number(c.dataset.value)]))]))""")


def recorded(rounds: list[dict], key: str, hospital: str | None = None) -> dict[str, float]:
    """{x label: value} of one metric in the round records; a hospital that did not report
    it (a reply lost under load) has no point, exactly as the chart must show."""
    out = {}
    for r in rounds:
        m = r["aggregated"] if hospital is None else r["hospitals"].get(hospital, {})
        if isinstance(m.get(key), (int, float)):
            out[label(r)] = m[key]
    return out


def rnd(fed: Federation, phase: str, number: int) -> dict:
    return next(r for r in fed.rounds if r["phase"] == phase and r["round"] == number)


def label(r: dict) -> str:
    return f"{'SSL' if r['phase'] == 'ssl' else 'FT'} {r['round']}"


def rounds_text(run: dict) -> str:
    p, d = run["planned_rounds"], run["rounds_done"]
    return f"SSL {d['ssl']}/{p['ssl']} · fine-tune {d['finetune']}/{p['finetune']}"


# ---------------------------------------------------------------------- HTTP level
def test_root_redirects_and_every_dashboard_response_has_a_strict_csp(federation):
    url = federation.registry.url
    resp = httpx.get(url + "/", follow_redirects=False)
    assert resp.status_code == 307 and resp.headers["location"] == "/dashboard/"
    for path in ("/dashboard/", f"/dashboard/runs/{federation.run_id}", "/dashboard/models/x", "/dashboard/try"):
        resp = httpx.get(url + path)
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
        csp = resp.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
        assert resp.headers["x-content-type-options"] == "nosniff"
        # No inline script or style the CSP would have to allow; no third-party origin.
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", resp.text) and " style=" not in resp.text
        assert not re.search(r"(src|href)=\"(https?:)?//", resp.text)
    for name in ("app.js", "charts.js", "style.css"):
        resp = httpx.get(f"{url}/dashboard/static/{name}")
        assert resp.status_code == 200 and "content-security-policy" in resp.headers
    assert httpx.get(url + "/dashboard/static/app.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(url + "/dashboard/static/style.css").headers["content-type"].startswith("text/css")
    for bad in ("missing.js", "..%2f__init__.py", "%2e%2e%2fdashboard%2f__init__.py"):
        resp = httpx.get(f"{url}/dashboard/static/{bad}")
        assert resp.status_code == 404 and "error" in resp.json()


def test_the_front_end_only_reads():
    """Nothing on the dashboard can change the registry: its code sends no PUT/PATCH/DELETE,
    its two POSTs are :predict and :generate (reads under the registry's auth), and it never
    writes HTML from strings (all data goes through text nodes)."""
    code = "\n".join(p.read_text() for p in sorted(dashboard.STATIC_DIR.glob("*.js")))
    assert not re.search(r"""method:\s*["'](PUT|PATCH|DELETE)""", code)
    assert re.findall(r"""method:\s*["'](\w+)""", code) == ["POST", "POST"]
    assert re.findall(r"""request\(`/v1/models/\$\{enc\(name\)\}:(\w+)\$\{query\}`, \{ method: ["']POST""", code) == ["predict", "generate"]
    without_comments = re.sub(r"//[^\n]*|/\*.*?\*/", "", code, flags=re.S)
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function", without_comments)


# ---------------------------------------------------------------------- pages
def test_overview_lists_the_run_and_the_models(federation, tab):
    fed = federation
    open_page(tab, fed, "/dashboard/", f"document.querySelector('tr[data-run=\"{fed.run_id}\"]')")
    row = tab.text(f'tr[data-run="{fed.run_id}"]')
    assert "succeeded" in row and rounds_text(fed.run) in row and "ham10000" in row
    assert all(h in row for h in HOSPITALS)
    assert tab.count(f'tr[data-run="{fed.run_id}"] .badge-synthetic') == 0 and tab.count("[data-synthetic-banner]") == 0
    with fed.registry.client() as http:
        models = {m["name"]: m for m in http.get("/v1/models").json()["models"]}
    for name in (names.CLASSIFIER_MODEL, names.ENCODER_MODEL):
        assert f"production → v{models[name]['aliases']['production']}" in tab.text(f'tr[data-model="{name}"]')
    assert tab.text("#access") == "reads open"
    shoot(tab, fed, "overview.png")


def test_run_page_draws_curves_hospitals_and_rounds_from_the_records(federation, tab):
    fed = federation
    open_page(tab, fed, f"/dashboard/runs/{fed.run_id}", "document.querySelector('[data-chart=\"bytes\"]')")
    head = tab.text(".page-head")
    assert fed.run_id in head and "succeeded" in head and rounds_text(fed.run) in head
    ssl = [r for r in fed.rounds if r["phase"] == "ssl"]
    ft = [r for r in fed.rounds if r["phase"] == "finetune"]

    # SSL loss per task: one hospital per task (so its curve is the task's), one point per SSL round.
    for task in TASKS:
        key, h = names.ssl_loss_key(task), f"hospital-{task}"
        assert chart_points(tab, key) == {h: pytest.approx(recorded(ssl, key, h))}
    # Fine-tune loss: aggregated + each hospital, one point per fine-tune round.
    pts = chart_points(tab, "finetune_loss")
    assert sorted(pts) == sorted(["aggregated", *HOSPITALS])
    assert pts["aggregated"] == pytest.approx(recorded(ft, "finetune_loss"))
    for h in HOSPITALS:
        assert pts[h] == pytest.approx(recorded(ft, "finetune_loss", h))
    # Balanced accuracy and macro AUC over every round, aggregated and per hospital.
    for key in (names.M_BALANCED_ACCURACY, names.M_MACRO_AUC):
        pts = chart_points(tab, key)
        assert sorted(pts) == sorted(["aggregated", *HOSPITALS])
        assert pts["aggregated"] == pytest.approx(recorded(fed.rounds, key)) and len(pts["aggregated"]) == len(fed.rounds)
        for h in HOSPITALS:
            assert pts[h] == pytest.approx(recorded(fed.rounds, key, h))
    # Bytes exchanged: a sent and a received bar per round.
    bars = tab.eval("""[...document.querySelectorAll('[data-chart="bytes"] rect.bar')].map(b => Number(b.dataset.value))""")
    assert sorted(bars) == sorted(r[k] for r in fed.rounds for k in ("bytes_sent", "bytes_received"))

    # Hospitals: images per class and label skew from the run record.
    run = fed.run
    pooled = {c: sum(run["hospitals"][h]["class_counts"].get(c, 0) for h in HOSPITALS) for c in CLASSES}
    for h in HOSPITALS:
        counts = run["hospitals"][h]["class_counts"]
        shown = tab.eval(f"""Object.fromEntries([...document.querySelectorAll('.hospitals-table tr[data-hospital="{h}"] td[data-class]')]
            .map(td => [td.dataset.class, Number(td.textContent.replace(/,/g, ''))]))""")
        assert shown == {c: counts.get(c, 0) for c in CLASSES}
        n, m = sum(counts.values()), sum(pooled.values())
        skew = 0.5 * sum(abs(counts.get(c, 0) / n - pooled[c] / m) for c in CLASSES)
        assert tab.text(f'.hospitals-table tr[data-hospital="{h}"] td[data-col="skew"]') == f"{skew:.2f}"
        assert tab.text(f'.hospitals-table tr[data-hospital="{h}"] td[data-col="train"]') == str(run["hospitals"][h]["train_examples"])
    assert tab.count('[data-chart="class_distribution"] .dist-row') == len(HOSPITALS) + 1
    # Global model next to each hospital's local-only model, after the last round.
    last = next(r for r in reversed(fed.rounds)
                if any(names.LOCAL_ONLY_PREFIX + names.M_BALANCED_ACCURACY in m for m in r["hospitals"].values()))
    assert tab.eval("document.querySelector('.compare').dataset.round") == label(last)
    for h in HOSPITALS:
        for key in (names.M_BALANCED_ACCURACY, names.M_MACRO_AUC):
            cells = tab.eval(f"""[...document.querySelectorAll('.compare-table tr[data-hospital="{h}"] td[data-metric="{key}"]')]
                .map(td => td.dataset.model + '=' + td.textContent)""")
            m = last["hospitals"].get(h, {})
            shown = [m.get(key), m.get(names.LOCAL_ONLY_PREFIX + key)]
            assert cells == [f"{who}={'–' if v is None else f'{v:.3f}'}" for who, v in zip(("global", "local"), shown)]
    bars = [last["hospitals"].get(h, {}).get(p + names.M_BALANCED_ACCURACY) for h in HOSPITALS for p in ("", names.LOCAL_ONLY_PREFIX)]
    assert tab.count('[data-chart="global_vs_local"] rect.bar') == sum(v is not None for v in bars)
    assert tab.eval("[...document.querySelectorAll('.rounds-table tbody tr')].map(r => r.dataset.round)") == [label(r) for r in fed.rounds]
    shoot(tab, fed, "run.png")


def test_an_unknown_run_or_model_shows_the_registrys_404(federation, tab):
    for path, message in (("/dashboard/runs/no-such-run", "run 'no-such-run' not found"),
                          ("/dashboard/models/no-such-model", "no-such-model")):
        tab.goto(federation.registry.url + path)
        tab.wait_for("document.getElementById('notice').dataset.kind === 'missing'")
        assert "HTTP 404" in tab.text("#notice") and message in tab.text("#notice")
        assert tab.text("#main h1") == "Not found"
    tab.errors = [e for e in tab.errors if "404" not in e]  # Chromium logs the refused fetches themselves


def test_run_page_follows_a_run_in_progress_without_a_reload(federation):
    if federation.live is None:
        pytest.skip(f"{REUSE_ENV} reuses finished records: no run was in progress")
    live = federation.live
    tab, seen = live["tab"], live["seen"]
    assert seen[0]["status"] == "running", seen
    assert "live" in seen[0]["live"]
    # The same document saw the rounds arrive one by one, then the final status.
    final = tab.wait_for("""(() => { const s = document.querySelector('.run-page')?.dataset.status;
        return s === 'succeeded' && document.querySelectorAll('.rounds-table tbody tr').length === 3 && s; })()""", timeout=20)
    assert final == "succeeded"
    snap = _snapshot(tab)
    drawn = sum(len(recorded(federation.rounds, names.M_BALANCED_ACCURACY, h)) for h in [None, *HOSPITALS])
    assert snap["marker"] == "never reloaded" and snap["points"] == drawn
    counts = [s["rounds"] for s in seen]
    assert counts == sorted(counts) and counts[0] < 3 and len(set(counts)) >= 2, seen
    assert snap["renders"] >= len(seen)
    assert tab.errors == []


def test_model_page_shows_versions_per_class_scores_and_the_confusion_heat_map(federation, tab):
    fed = federation
    open_page(tab, fed, f"/dashboard/models/{names.CLASSIFIER_MODEL}", "document.querySelector('svg.heatmap-svg')")
    assert tab.eval("[...document.querySelectorAll('.versions-table tbody tr')].map(r => r.dataset.version)") == ["2", "1"]
    assert "production" in tab.text('.versions-table tr[data-version="2"]')
    assert fed.run_id in tab.text('.versions-table tr[data-version="2"]')
    assert tab.eval("document.getElementById('version').dataset.version") == "2"  # production is shown first
    # the run's default test-time augmentation reached the registered classifier's input_spec
    assert "32 px RGB · 8 views (flips, turns)" in tab.text(".facts")
    for version, r in ((2, rnd(fed, "finetune", 2)), (1, rnd(fed, "finetune", 1))):
        if version == 1:
            open_page(tab, fed, f"/dashboard/models/{names.CLASSIFIER_MODEL}?version=1",
                      "document.getElementById('version')?.dataset.version === '1' && document.querySelector('svg.heatmap-svg')")
        agg = r["aggregated"]
        table = tab.eval("""[...document.querySelectorAll('.per-class-table tbody tr')].map(tr => [tr.dataset.class,
            ...[...tr.querySelectorAll('td[data-metric]')].map(td => td.textContent)])""")
        assert table == [[c, f"{agg['precision'][i]:.3f}", f"{agg['recall'][i]:.3f}", f"{agg['f1'][i]:.3f}",
                          str(sum(agg["confusion_matrix"][i]))] for i, c in enumerate(CLASSES)]
        cells = tab.eval("""[...document.querySelectorAll('svg.heatmap-svg rect.cell')].map(c => [Number(c.dataset.row), Number(c.dataset.col), Number(c.dataset.value)])""")
        assert len(cells) == len(CLASSES) ** 2
        assert cells == [[i, j, agg["confusion_matrix"][i][j]] for i in range(len(CLASSES)) for j in range(len(CLASSES))]
        # the final classifier was also scored as served to each hospital naming itself (hospital-batchnorm)
        served = '[data-fact="served_balanced_accuracy"] .fact-value'
        if version == 2:
            assert tab.text(served) == f"{agg['served_balanced_accuracy'] * 100:.1f}% · AUC {agg['served_macro_auc']:.3f}"
        else:
            assert tab.count(served) == 0 and "served_balanced_accuracy" not in agg
        if version == 2:
            shoot(tab, fed, "model.png")


def test_try_it_predicts_an_uploaded_image_with_production_and_another_version(federation, tab):
    fed = federation
    open_page(tab, fed, f"/dashboard/try?model={names.CLASSIFIER_MODEL}&version=1", "document.getElementById('predict')")
    assert tab.eval("[...document.querySelectorAll('.pick input:checked')].map(b => b.dataset.version)") == ["2", "1"]
    assert tab.eval("document.getElementById('predict').disabled") is True
    tab.set_files("#image-input", [fed.image])
    tab.wait_for("!document.getElementById('predict').disabled && document.querySelector('.preview img')")
    tab.click("#predict")
    tab.wait_for("document.querySelector('.results').dataset.done === '2'", timeout=60)
    cards = tab.eval("""[...document.querySelectorAll('.results article.result')].map(a => ({
        version: Number(a.dataset.version), label: a.querySelector('.pred-label')?.dataset.label,
        probs: Object.fromEntries([...a.querySelectorAll('g.prob')].map(g => [g.dataset.class, Number(g.dataset.p)])),
        production: !!a.querySelector('.chip-prod')}))""")
    assert [c["version"] for c in cards] == [2, 1] and cards[0]["production"]
    with fed.registry.client() as http:
        for card in cards:
            expected = http.post(f"/v1/models/{names.CLASSIFIER_MODEL}:predict?version={card['version']}",
                                 files={"file": (fed.image.name, fed.image.read_bytes(), "image/jpeg")}).json()
            assert card["label"] in CLASSES and card["label"] == expected["label"]
            assert card["probs"] == pytest.approx(expected["probabilities"], abs=1e-6)
            assert sum(card["probs"].values()) == pytest.approx(1.0, abs=1e-4)
    assert "versions" in tab.text(".try-status")
    shoot(tab, fed, "try.png")


def test_try_it_asks_as_a_hospital_of_the_federation_and_gets_its_label_mix(federation, tab):
    """The run fine-tuned with balanced softmax, so its classifier versions carry their hospitals'
    label counts (lineage.label_counts, as the start-up audits counted them): the Try page offers those
    hospitals, and asking as one answers as `:predict?hospital=` does, which is not what the
    federation's label mix gives."""
    fed = federation
    with fed.registry.client() as http:
        versions = http.get(f"/v1/models/{names.CLASSIFIER_MODEL}/versions").json()["versions"]
    audited = {h: [fed.run["hospitals"][h]["class_counts"].get(c, 0) for c in CLASSES] for h in HOSPITALS}
    assert [v["lineage"]["label_counts"] for v in versions] == [audited] * len(versions)
    asking = HOSPITALS[-1]
    open_page(tab, fed, f"/dashboard/try?model={names.CLASSIFIER_MODEL}&hospital={asking}", "document.getElementById('hospital-select')")
    assert tab.eval("[...document.querySelectorAll('#hospital-select option')].map(o => o.value)") == ["", *HOSPITALS]
    assert tab.eval("document.getElementById('hospital-select').value") == asking
    tab.set_files("#image-input", [fed.image])
    tab.wait_for("!document.getElementById('predict').disabled && document.querySelector('.preview img')")
    tab.click("#predict")
    tab.wait_for("document.querySelector('.results').dataset.done === '1'", timeout=60)
    card = tab.eval("""(() => { const a = document.querySelector('.results article.result'); return {
        version: Number(a.dataset.version), hospital: a.querySelector('.result-hospital')?.dataset.hospital,
        says: a.querySelector('.result-hospital')?.textContent,
        probs: Object.fromEntries([...a.querySelectorAll('g.prob')].map(g => [g.dataset.class, Number(g.dataset.p)]))}; })()""")
    with fed.registry.client() as http:
        files = {"file": (fed.image.name, fed.image.read_bytes(), "image/jpeg")}
        as_hospital = http.post(f"/v1/models/{names.CLASSIFIER_MODEL}:predict?version={card['version']}&hospital={asking}", files=files).json()
        federation_mix = http.post(f"/v1/models/{names.CLASSIFIER_MODEL}:predict?version={card['version']}", files=files).json()
    assert card["hospital"] == as_hospital["hospital"] == asking
    # the production version is the final round's, which carries every hospital's BatchNorm statistics (hospital-batchnorm)
    assert versions[-1]["lineage"]["hospital_batchnorm"] == HOSPITALS and "hospital_batchnorm" not in versions[0]["lineage"]
    assert card["says"] == f"with {asking}'s own label mix and BatchNorm statistics"
    assert card["probs"] == pytest.approx(as_hospital["probabilities"], abs=1e-6)
    assert card["probs"] != pytest.approx(federation_mix["probabilities"], abs=1e-3)

    # back to none: the same page answers with the federation's label mix
    tab.eval("(() => { const s = document.getElementById('hospital-select'); s.value = ''; s.dispatchEvent(new Event('change')); })()")
    tab.click("#predict")
    tab.wait_for("document.querySelector('.results').dataset.done === '1'", timeout=60)
    assert tab.count(".result-hospital") == 0
    probs = tab.eval("Object.fromEntries([...document.querySelectorAll('.results g.prob')].map(g => [g.dataset.class, Number(g.dataset.p)]))")
    assert probs == pytest.approx(federation_mix["probabilities"], abs=1e-6)


def test_with_read_auth_the_dashboard_shows_the_401_and_no_data_until_the_token_is_given(federation, browser):
    fed = federation
    secured = P.start_registry(fed.cluster, fed.registry.data_dir, token=fed.registry.token, read_auth="true")
    tab = browser.tab(*LAPTOP)  # a new origin: no token in its sessionStorage
    try:
        assert httpx.get(secured.url + "/v1/runs").status_code == 401
        tab.goto(secured.url + "/dashboard/")
        tab.wait_for("document.getElementById('notice').dataset.kind === 'auth'")
        assert "401 Unauthorized: missing bearer token" in tab.text("#notice")
        assert tab.count("[data-refused]") == 1 and tab.count("tr[data-run]") == 0 and tab.count("table") == 0
        assert fed.run_id not in tab.text("body")
        assert tab.text("#access") == "reads need a token"
        assert tab.eval("!document.getElementById('token-panel').hidden")
        shoot(tab, fed, "read-auth-401.png")

        tab.type_into("#token-input", "not-the-token")
        tab.click("#token-save")
        tab.wait_for("document.getElementById('notice').textContent.includes('invalid bearer token')")
        assert tab.count("tr[data-run]") == 0 and fed.run_id not in tab.text("#main")

        tab.type_into("#token-input", fed.registry.token)
        tab.click("#token-save")
        tab.wait_for(f"document.querySelector('tr[data-run=\"{fed.run_id}\"]')")
        assert tab.eval("document.getElementById('notice').hidden") and "token set" in tab.text("#access")

        # Every page asks the registry again: a forgotten token means 401 and an empty page.
        tab.click("#token-forget")
        tab.wait_for("document.getElementById('notice').dataset.kind === 'auth'")
        tab.goto(f"{secured.url}/dashboard/models/{names.CLASSIFIER_MODEL}")
        tab.wait_for("document.getElementById('notice').dataset.kind === 'auth'")
        assert tab.count("svg.heatmap-svg") == 0 and tab.count("[data-refused]") == 1
        assert all("401" in e for e in tab.errors), tab.errors  # only the refused requests, logged by Chromium
    finally:
        tab.send("Page.close")
        secured.proc.kill()


def test_layout_fits_a_laptop_and_a_wide_screen(federation, tab):
    fed = federation
    pages = {
        "/dashboard/": "document.querySelector('tr[data-run]')",
        f"/dashboard/runs/{fed.run_id}": "document.querySelector('[data-chart=\"bytes\"]')",
        f"/dashboard/models/{names.CLASSIFIER_MODEL}": "document.querySelector('svg.heatmap-svg')",
        "/dashboard/try": "document.getElementById('predict')",
    }
    for width, height in (LAPTOP, WIDE):
        tab.resize(width, height)
        for path, ready in pages.items():
            open_page(tab, fed, path, ready)
            overflow = tab.eval("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{path} at {width}px overflows horizontally by {overflow}px"
            small = tab.eval("""[...document.querySelectorAll('figure.chart > svg')].filter(s => s.getBoundingClientRect().width < 250).length""")
            assert small == 0, f"{path} at {width}px squeezes charts below 250px"
    open_page(tab, fed, f"/dashboard/runs/{fed.run_id}", "document.querySelector('[data-chart=\"bytes\"]')")
    tops = tab.eval("""[...document.querySelectorAll('#curves figure.chart')].map(f => Math.round(f.getBoundingClientRect().top))""")
    assert len(set(tops)) <= 2, "at 2000px the six curve charts sit in at most two rows"
    shoot(tab, fed, "run-wide.png")


def test_a_synthetic_run_is_marked_unmistakably_and_hostile_names_stay_text(federation, tab):
    """Written last: it adds a run to the shared registry. The record is the real run's,
    re-posted as the aggregator would for a synthetic-data run whose hospital has a
    hostile name (node config is free text)."""
    fed = federation
    hostile = '<img src=x onerror="window.__pwned=1">'
    body = {k: v for k, v in fed.run.items() if k not in ("run_id", "rounds_done", "rounds_total", "created_at", "updated_at")}
    started = datetime.now(timezone.utc) - timedelta(seconds=95)
    body.update(status="running", phase="ssl", synthetic_data=True, data_source="synthetic", started_at=started.isoformat(), finished_at=None,
                hospitals={hostile: {**fed.run["hospitals"][HOSPITALS[0]], "data_source": "synthetic"}})
    ssl1 = rnd(fed, "ssl", 1)
    task_loss = names.ssl_loss_key(fed.run["hospitals"][HOSPITALS[0]]["ssl_task"])
    aggregated = {k: v for k, v in ssl1["aggregated"].items() if not k.startswith(names.M_SSL_LOSS) or k == task_loss}
    round_body = {**ssl1, "aggregated": aggregated, "hospitals": {hostile: ssl1["hospitals"][HOSPITALS[0]]}, "examples": {hostile: 1},
                  "refused_hospitals": {hostile: "tensor encoder.fc.weight holds NaN or infinite values"}}
    with fed.registry.client() as http:
        assert http.put("/v1/runs/synthetic-demo", json=body).status_code == 200
        assert http.post("/v1/runs/synthetic-demo/rounds", json=round_body).status_code == 201

    open_page(tab, fed, "/dashboard/", "document.querySelector('tr[data-run=\"synthetic-demo\"]')")
    assert tab.text('tr[data-run="synthetic-demo"] .badge-synthetic') == "SYNTHETIC DATA"
    assert tab.count(f'tr[data-run="{fed.run_id}"] .badge-synthetic') == 0
    assert "Synthetic data" in tab.text("[data-synthetic-banner]")

    open_page(tab, fed, "/dashboard/runs/synthetic-demo", "document.querySelector('[data-chart=\"bytes\"]')")
    banner = tab.eval("(() => { const b = document.querySelector('[data-synthetic-banner]'); const r = b.getBoundingClientRect(); "
                      "return {text: b.textContent, top: r.top, height: r.height}; })()")
    assert "SYNTHETIC DATA" in banner["text"] and banner["height"] > 20 and banner["top"] < 400  # above the fold
    assert hostile in tab.text(".hospitals-table")
    refused = tab.text("[data-refused]")  # the aggregator's refusal, its hospital name as text
    assert refused.startswith("Update refused (SSL 1):") and hostile in refused and refused.endswith("holds NaN or infinite values")
    assert tab.eval("window.__pwned === undefined && document.querySelectorAll('img[src=\"x\"]').length === 0")
    assert tab.eval(f"""[...document.querySelectorAll('[data-chart="balanced_accuracy"] g.series')].some(g => g.dataset.series === {json.dumps(hostile)})""")
    shoot(tab, fed, "run-synthetic.png")


def test_a_private_run_shows_the_epsilon_spent(federation, tab):
    """A dp=central-fixed run's records, as the aggregator posts them (the real run's, with a
    `privacy` entry per round): the header says the epsilon spent of the budget, the rounds
    table has a column of it and a chart draws it against the budget."""
    fed = federation
    body = {k: v for k, v in fed.run.items() if k not in ("run_id", "rounds_done", "rounds_total", "created_at", "updated_at")}
    body["config"] = {**fed.run["config"], "dp": "central-fixed", "dp-max-epsilon": 10.0}
    spent = [4.7285, 7.0774]  # Flower's RDP accountant, noise multiplier 1, delta 1e-5, after 1 and 2 rounds
    with fed.registry.client() as http:
        assert http.put("/v1/runs/private-demo", json=body).status_code == 200
        for i, (phase, number) in enumerate((("ssl", 1), ("finetune", 1))):
            privacy = {"mechanism": "central-fixed", "epsilon": spent[i], "delta": 1e-5, "round_epsilon": spent[i] - (spent[i - 1] if i else 0),
                       "releases": i + 1, "noise_multiplier": 1.0, "clipping_norm": 1.0}
            assert http.post("/v1/runs/private-demo/rounds", json={**rnd(fed, phase, number), "privacy": privacy}).status_code == 201
    open_page(tab, fed, "/dashboard/runs/private-demo", "document.querySelector('[data-chart=\"epsilon\"]')")
    assert tab.text('[data-fact="epsilon"] .fact-value') == "7.08 of 10 at δ=0.00001 · 2 round(s)"
    assert tab.eval("[...document.querySelectorAll('.rounds-table td[data-col=\"epsilon\"]')].map(td => td.textContent)") == ["4.729", "7.077"]
    assert tab.eval("""[...document.querySelectorAll('[data-chart="epsilon"] g.series')].map(g => g.dataset.series)""") \
        == ["ε spent", "budget (dp-max-epsilon)"]
    open_page(tab, fed, f"/dashboard/runs/{fed.run_id}", "document.querySelector('[data-chart=\"bytes\"]')")
    assert tab.count('[data-fact="epsilon"]') == 0 and tab.count('[data-chart="epsilon"]') == 0  # dp=off: nothing about it
