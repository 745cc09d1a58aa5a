"""A hospital's private models between rounds: files in its state directory, one set per run and hospital."""

import torch
from flwr.app import Context, RecordDict

from fedssl_flower import client_app, records
from fedssl_flower.config import RunConfig


def context(tmp_path, hospital, run_id=7, **extra):
    cfg = {"hospital": hospital, "ssl-task": "simclr", "cache-dir": str(tmp_path / "cache"), **extra}
    return Context(run_id=run_id, node_id=1, node_config=cfg, state=RecordDict(), run_config={})


def test_hospitals_sharing_a_cache_dir_keep_separate_models(tmp_path):
    a, b = context(tmp_path, "hospital-a"), context(tmp_path, "hospital b/..")
    pa, pb = client_app._state_path(a, records.STATE_MODEL), client_app._state_path(b, records.STATE_MODEL)
    assert pa != pb and pa.parent.parent == pb.parent.parent == tmp_path / "cache" / "state" / "run-7"
    assert pb.parent.name == "hospital_b_.."  # one path component
    for name in ("..", ".", "../../etc"):  # a hospital name cannot escape its folder
        p = client_app._state_path(context(tmp_path, name), records.STATE_MODEL)
        assert p.resolve().is_relative_to((tmp_path / "cache" / "state" / "run-7").resolve()) and p.parent.name not in ("..", ".")
    assert client_app._state_path(context(tmp_path, "hospital-a", run_id=8), records.STATE_MODEL) != pa


def test_state_dir_overrides_the_default(tmp_path):
    ctx = context(tmp_path, "h", **{"state-dir": str(tmp_path / "private")})
    assert client_app._state_path(ctx, records.STATE_LOCAL_ONLY).is_relative_to(tmp_path / "private")


def test_a_kept_model_comes_back_exactly_and_a_new_one_starts_from_the_seed(tmp_path):
    cfg = RunConfig(arch="resnet18", pretrained=False, seed=3)
    ctx = context(tmp_path, "h")
    fresh = client_app._model(ctx, records.STATE_MODEL, cfg, num_classes=4)
    assert not client_app._has_model(ctx, records.STATE_MODEL)
    again = client_app._model(ctx, records.STATE_MODEL, cfg, num_classes=4)
    assert all(torch.equal(x, y) for x, y in zip(fresh.state_dict().values(), again.state_dict().values()))
    with torch.no_grad():
        fresh.classifier.weight.add_(1.0)
    client_app._keep(ctx, records.STATE_MODEL, fresh)
    loaded = client_app._model(ctx, records.STATE_MODEL, cfg, num_classes=4)
    assert torch.equal(loaded.classifier.weight, fresh.classifier.weight)
    assert not any(p.name.startswith(".") for p in client_app._state_path(ctx, records.STATE_MODEL).parent.iterdir())


def test_kept_optimizer_moments_come_back_from_the_state_directory_for_fine_tuning_only(tmp_path):
    from fedssl_core import names

    ctx = context(tmp_path, "h")
    keep = RunConfig(arch="resnet18", keep_optimizer_state=True)
    assert client_app._moments(ctx, records.STATE_OPTIMIZER, RunConfig(arch="resnet18", keep_optimizer_state=False), names.PHASE_FINETUNE) is None
    assert client_app._moments(ctx, records.STATE_OPTIMIZER, keep, names.PHASE_SSL) is None
    first = client_app._moments(ctx, records.STATE_OPTIMIZER, keep, names.PHASE_FINETUNE)
    assert first == {"adamw": None}  # nothing kept yet: a fresh optimizer
    first["adamw"] = {"0.step": torch.tensor(12.0), "0.exp_avg": torch.randn(4, 3), "0.exp_avg_sq": torch.rand(4, 3)}
    client_app._keep_moments(ctx, records.STATE_OPTIMIZER, first)
    again = client_app._moments(ctx, records.STATE_OPTIMIZER, keep, names.PHASE_FINETUNE)
    assert set(again["adamw"]) == set(first["adamw"])
    assert all(torch.equal(again["adamw"][k], v) for k, v in first["adamw"].items())
    assert client_app._state_path(ctx, records.STATE_OPTIMIZER) != client_app._state_path(ctx, records.STATE_LOCAL_ONLY_OPTIMIZER)
