"""./deploy-local.sh end to end, as a user runs it: up (train across two hospitals on real
HAM10000 images, then serve), the printed curl, status, down (stops exactly what it started)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, free_port

pytestmark = pytest.mark.integration
SCRIPT = REPO_ROOT / "deploy-local.sh"


def env_for(home: Path, superlink_port: int, registry_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDSSL_", "FLWR_", "KAGGLE_"))}
    env.update(FEDSSL_HOME=str(home), FEDSSL_SUPERLINK_PORT=str(superlink_port), FEDSSL_REGISTRY_PORT=str(registry_port),
               KAGGLE_CONFIG_DIR=str(home / "no-kaggle"))
    return env


def script(env, *args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def pids(home: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in (home / "pids").glob("*.pid")}


def stop_everything(env: dict[str, str], home: Path) -> None:
    """`deploy-local.sh down`, then SIGKILL to whatever it left (belt and braces: a test never
    leaves a process behind)."""
    script(env, "down", timeout=120)
    for pid in pids(home).values():
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, ham10000_dir):
    home = tmp_path_factory.mktemp("fedssl-home")
    env = env_for(home, free_port(), free_port())
    up = script(env, "up", "--hospitals", "2", "--rounds", "1", "--finetune-rounds", "1", "--image-size", "32", "--local-steps", "2",
                "--ssl-tasks", "simclr,rotation",
                "--data", str(ham10000_dir), "--max-images", "120", "--round-timeout", "240")
    try:
        yield home, env, up
    finally:
        stop_everything(env, home)


def test_up_trains_across_hospitals_and_shows_progress(deployed):
    home, _, up = deployed
    out = up.stdout + up.stderr
    assert up.returncode == 0, out[-6000:]
    assert "starting SuperNode hospital-1 (ssl-task=simclr" in out and "starting SuperNode hospital-2 (ssl-task=rotation" in out
    assert "1 SSL + 1 fine-tune rounds of 2 local steps at 32 px on 2 hospitals (ham10000 data, at most 120 images each)" in out
    assert re.search(r"phase=ssl round=1/1 hospitals=2 loss=\d", out)
    assert re.search(r"phase=finetune round=1/1 hospitals=2 loss=\d+\.\d+ balanced_accuracy=\d", out)
    assert "registered fedssl-classifier version 1 as 'production'" in out
    (run_dir,) = (home / "runs").iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "succeeded"


def test_training_processes_stop_and_the_registry_keeps_serving(deployed):
    home, _, up = deployed
    assert up.returncode == 0
    running = {name for name, pid in pids(home).items() if alive(pid)}
    assert running == {"registry"}


def test_the_printed_curl_classifies_a_real_image(deployed):
    home, _, up = deployed
    (line,) = [ln.strip() for ln in up.stdout.splitlines() if ln.strip().startswith("curl ") and ":predict" in ln]
    r = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["model"] == "fedssl-classifier" and body["version"] == 1
    assert body["label"] in body["probabilities"] and len(body["probabilities"]) == 7
    assert abs(sum(body["probabilities"].values()) - 1.0) < 1e-4
    assert str(home / "registry.token") in line  # the token stays in its file, never on the screen
    assert (home / "registry.token").stat().st_mode & 0o077 == 0


def test_status_lists_what_runs(deployed):
    home, env, _ = deployed
    r = script(env, "status", timeout=60)
    assert r.returncode == 0
    assert re.search(r"running\s+registry \(pid \d+\)", r.stdout)
    assert re.search(r"registry: http://127\.0\.0\.1:\d+", r.stdout)


def test_bad_arguments_are_refused_with_what_was_expected(deployed):
    _, env, _ = deployed
    cases = [
        (["up", "--hospitals", "0"], "--hospitals must be a whole number >= 1, got '0'"),
        (["up", "--image-size", "8"], "--image-size must be a whole number >= 16, got '8'"),
        (["up", "--data", "/nonexistent/ham"], "--data /nonexistent/ham: no such folder; expected the Kaggle HAM10000 layout, "
                                               "PATH/<hospital>/<class>/<image> or PATH/<class>/<image>"),
        (["up", "--data", "synthetic", "--label-map", "a=b"], "--partition, --label-map and --class-names apply to real data"),
        (["up", "--dirichlet-alpha", "0.3"], "--dirichlet-alpha needs --partition dirichlet"),
        (["up", "--partition", "dirichlet", "--dirichlet-alpha", "x"], "--dirichlet-alpha must be a number > 0, got 'x'"),
        (["up", "--frobnicate"], "unknown option '--frobnicate'"),
        (["up", "--preset", "fast"], "--preset must be default, quality or generate, got 'fast'"),
        (["up", "--local-steps", "0"], "--local-steps must be a whole number >= 1, got '0'"),
        (["up", "--preset", "generate", "--image-size", "96"], "--preset generate: --image-size must be 32 or 64"),
        (["up", "--preset", "generate", "--finetune-rounds", "2"], "--finetune-rounds and --local-steps apply to diagnosis runs"),
        (["up", "--ssl-tasks", "simclr,jigsaw"], "--ssl-tasks: unknown SSL task 'jigsaw'"),
        (["restart"], "unknown command 'restart' (expected up, status, down or --kind)"),
    ]
    for args, message in cases:
        r = script(env, *args, timeout=300)
        assert r.returncode != 0, (args, r.stdout)
        assert message in r.stderr, (args, r.stderr)


def test_down_stops_exactly_what_up_started(tmp_path, deployed):
    home, env, _ = deployed
    before = pids(home)
    # An unrelated process in its own session must survive `down`.
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        r = script(env, "down", timeout=120)
        assert r.returncode == 0, r.stderr
        assert "stopping registry" in r.stdout
        assert not any(alive(pid) for pid in before.values())
        assert pids(home) == {}
        assert bystander.poll() is None
        again = script(env, "down", timeout=60)
        assert "nothing to stop" in again.stdout
    finally:
        bystander.kill()


def test_a_failed_run_exits_non_zero_with_the_server_error(tmp_path, ham10000_dir):
    # A HAM10000 copy with no rows is refused before anything starts, by the layout check.
    empty = tmp_path / "ham-empty"
    empty.mkdir()
    header = (ham10000_dir / "HAM10000_metadata.csv").read_text().splitlines()[0]
    (empty / "HAM10000_metadata.csv").write_text(header + "\n")
    env = env_for(tmp_path / "home", free_port(), free_port())
    r = script(env, "up", "--hospitals", "1", "--data", str(empty), timeout=300)
    assert r.returncode != 0 and f"--data {empty} cannot be federated as it is" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "home" / "pids").exists() or pids(tmp_path / "home") == {}
    # One hospital whose images all fail to decode: the ServerApp's start-up audit fails the run.
    for cls in ("a", "b"):
        (tmp_path / "unreadable" / cls).mkdir(parents=True)
        (tmp_path / "unreadable" / cls / "x.jpg").write_bytes(b"not a jpeg")
    try:
        r = script(env, "up", "--hospitals", "1", "--rounds", "1", "--finetune-rounds", "0", "--image-size", "32",
                   "--data", str(tmp_path / "unreadable"), timeout=600)
        out = r.stdout + r.stderr
        assert r.returncode != 0, out[-4000:]
        assert "the federated run failed" in out
        assert "FAILED" in out and "hospital(s) failed at start-up" in out, out[-4000:]
    finally:
        script(env, "down", timeout=120)


def test_without_a_dataset_auto_stops_before_installing_anything(tmp_path):
    # A checkout with no data beside it, no FEDSSL_DATA and no Kaggle credentials: never fake images on its own.
    repo = tmp_path / "checkout"
    repo.mkdir()
    (repo / "deploy-local.sh").write_bytes(SCRIPT.read_bytes())
    env = env_for(tmp_path / "home", free_port(), free_port())
    env["HOME"] = str(tmp_path / "home")
    r = subprocess.run(["bash", str(repo / "deploy-local.sh")], env=env, capture_output=True, text=True, timeout=120, cwd=repo)
    assert r.returncode != 0
    assert f"no HAM10000 found: --data auto looked at $FEDSSL_DATA (unset), {repo}/data/ham10000, {repo}/../shared/data/ham10000" in r.stderr
    assert "or ask for fake images with --data synthetic" in r.stderr
    assert not (repo / ".venv").exists() and not (tmp_path / "home").exists()  # nothing installed, nothing started


@pytest.mark.parametrize("data, words", [
    ("kaggle:brain-tumor-mri-dataset", ["--data kaggle:brain-tumor-mri-dataset: expected kaggle:OWNER/DATASET[/SUB/PATH]",
                                        "kaggle:masoudnickparvar/brain-tumor-mri-dataset/Training"]),
    ("kaggle:masoud nickparvar/x", ["expected kaggle:OWNER/DATASET[/SUB/PATH] as in the dataset's Kaggle URL"]),
    ("kaggle:masoudnickparvar/brain-tumor-mri-dataset/Training",
     ["masoudnickparvar/brain-tumor-mri-dataset is not in {repo}/data/kaggle/masoudnickparvar/brain-tumor-mri-dataset",
      "no Kaggle credentials to download it: set KAGGLE_USERNAME and KAGGLE_KEY"]),
])
def test_a_kaggle_dataset_that_cannot_be_had_stops_before_installing_anything(tmp_path, data, words):
    repo = tmp_path / "checkout"
    repo.mkdir()
    (repo / "deploy-local.sh").write_bytes(SCRIPT.read_bytes())
    env = env_for(tmp_path / "home", free_port(), free_port())
    env["HOME"] = str(tmp_path / "home")
    env.pop("KAGGLE_USERNAME", None), env.pop("KAGGLE_KEY", None), env.pop("KAGGLE_CONFIG_DIR", None)
    r = subprocess.run(["bash", str(repo / "deploy-local.sh"), "up", "--data", data], env=env, capture_output=True,
                       text=True, timeout=120, cwd=repo)
    assert r.returncode != 0
    for w in words:
        assert w.format(repo=repo) in r.stderr, r.stderr
    assert not (repo / ".venv").exists() and not (tmp_path / "home").exists()  # nothing installed, nothing started


@pytest.mark.parametrize("entries,message", [
    ("strategy=fedadam bogus", "--run-config entry 'bogus' is not KEY=VALUE with a kebab-case key and a value"),
    ("Strategy=krum", "--run-config entry 'Strategy=krum' is not KEY=VALUE"),
    ("strategy=", "--run-config entry 'strategy=' is not KEY=VALUE"),
    ("strateg=fedadam", "--run-config key 'strateg' is not a run config key of the app (pyproject.toml [tool.flwr.app.config])"),
    (" ", "--run-config needs at least one KEY=VALUE"),
])
def test_a_malformed_run_config_stops_before_anything_starts(tmp_path, entries, message):
    home = tmp_path / "home"
    r = script(env_for(home, free_port(), free_port()), "up", "--run-config", entries, timeout=60)
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert not (home / "pids").exists()  # nothing was started
