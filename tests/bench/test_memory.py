"""bench/memory.py runs each phase of both variants in a fresh process and records each stage's
anonymous memory and the round's peak, per image size and batch size."""

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def run(out, size, batch, *more):
    proc = subprocess.run([sys.executable, "-m", "bench.memory", "--image-size", str(size), "--batch-size", str(batch),
                           "--steps", "1", "--out", str(out), *more], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_memory_bench_records_every_stage_of_both_variants_and_keeps_other_sizes(tmp_path):
    out = tmp_path / "memory.json"
    proc = run(out, 16, 4)
    assert "finetune checkpointing: preload" in proc.stdout and f"wrote {out} (16px-batch4)" in proc.stdout
    run(out, 24, 2, "--env", "MALLOC_ARENA_MAX=1", "--label", "one-arena")  # a second size, another allocator set-up, joins
    result = json.loads(out.read_text())
    assert set(result["configs"]) == {"16px-batch4", "24px-batch2-one-arena"}
    labelled = result["configs"]["24px-batch2-one-arena"]
    assert labelled["env"] == ["MALLOC_ARENA_MAX=1"]
    assert all(r["allocator_env"].get("MALLOC_ARENA_MAX") == "1" for phases in labelled["mb"].values() for r in phases.values())
    config = result["configs"]["16px-batch4"]
    assert (config["image_size"], config["batch_size"], config["steps"]) == (16, 4, 1)
    assert set(config["mb"]) == {"plain", "checkpointing"}
    from fedssl_flower.warm_exec import PRELOAD

    for variant, phases in config["mb"].items():
        assert set(phases) == {"ssl", "finetune"}, variant
        for phase, r in phases.items():
            assert list(r["imports"]) == list(PRELOAD), (variant, phase)
            stages = [r["start"], *r["imports"].values(), r["app_modules"], r["model"]]
            assert all(0 < s for s in stages) and r["imports"]["torch"] > r["start"], (variant, phase)  # torch's import is visible
            assert r["round_seconds"] > 0 and r["step_seconds"] > 0 and r["round_peak"] >= max(r["model"], r["after_round"]) - 1, (variant, phase)


def test_memory_bench_refuses_sizes_it_cannot_run_and_a_library_that_is_not_there(tmp_path):
    for args, error in ((["--batch-size", "1"], "--batch-size >= 2"), (["--env", "MALLOC_ARENA_MAX"], "expected KEY=VALUE"),
                        (["--env", f"LD_PRELOAD={tmp_path}/none.so"], "no such library")):
        proc = subprocess.run([sys.executable, "-m", "bench.memory", *args, "--out", str(tmp_path / "m.json")],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and error in proc.stderr and not (tmp_path / "m.json").exists(), args
