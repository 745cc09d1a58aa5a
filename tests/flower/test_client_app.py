"""The hospital's handlers called as Flower calls them: a ClientApp, a Message, a Context
(the process around them is covered by the integration tests)."""

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedssl_core import names
from fedssl_core.models import FedSSLModel
from fedssl_flower import client_app, records

RUN_CONFIG = {"arch": "resnet18", "pretrained": False, "image-size": 32, "batch-size": 16, "local-steps": 2,
              "ssl-rounds": 0, "finetune-rounds": 3, "local-baseline": True, "keep-optimizer-state": True}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What Flower's ClientApp process sets before it builds Messages."""
    for key, value in {"_run_id": 3, "_node_id": 1, "_task_id": 1}.items():
        monkeypatch.setattr(TaskIdentity, key, value)


def message(state, message_type, **config):
    content = RecordDict({records.WEIGHTS: records.to_array_record(records.state_arrays(state)),
                          records.CONFIG: records.config_record(config)})
    return Message(content, dst_node_id=1, message_type=message_type, group_id="test")


def hospital_context(tmp_path, ham10000_dir, run_config=RUN_CONFIG, max_images=80, hospital="h", **node_config):
    """A hospital's Context as its SuperNode builds it: real HAM10000 images, its own cache, one thread."""
    return Context(run_id=3, node_id=1, state=RecordDict(), run_config=run_config, node_config={
        "hospital": hospital, "ssl-task": "rotation", "data-path": str(ham10000_dir), "max-images": max_images,
        "cache-dir": str(tmp_path / "cache"), "threads": 1, **node_config})


def reply_state(reply):
    return {k: torch.from_numpy(v.copy()) for k, v in records.from_array_record(reply.content[records.WEIGHTS]).items()}


def test_a_train_message_scores_the_global_model_it_brings_before_training(tmp_path, ham10000_dir):
    """One exchange per round: the train message of round r carries round r-1's global model,
    and the hospital's reply scores exactly that model (the same scores an evaluate message
    with it gets), then the update trained from it."""
    ctx = hospital_context(tmp_path, ham10000_dir)
    torch.manual_seed(0)
    initial = FedSSLModel("resnet18", num_classes=len(names.HAM10000_CLASSES)).state_dict()

    first = client_app.app(message(initial, MessageType.TRAIN, phase="finetune", round=1), ctx)
    assert not first.has_error(), first.error
    assert records.EVAL_METRICS not in first.content  # round 1: no previous global model to score
    assert records.METRICS in first.content and records.LOCAL_METRICS in first.content

    global_1 = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in reply_state(first).items()}
    second = client_app.app(message(global_1, MessageType.TRAIN, phase="finetune", round=2, **{
        "evaluate-phase": "finetune", "evaluate-round": 1}), ctx)
    assert not second.has_error(), second.error
    scored = records.from_metric_record(second.content[records.EVAL_METRICS], len(names.HAM10000_CLASSES))
    assert scored[names.M_TEST_EXAMPLES] > 0 and 0 <= scored[names.M_BALANCED_ACCURACY] <= 1
    assert records.LOCAL_EVAL_METRICS in second.content  # the local-only baseline trained in round 1
    trained = reply_state(second)
    assert any(not torch.equal(trained[k], global_1[k]) for k in trained if trained[k].is_floating_point())

    alone = client_app.app(message(global_1, MessageType.EVALUATE, phase="finetune", round=1, **{
        "evaluate-phase": "finetune", "evaluate-round": 1}), ctx)
    assert not alone.has_error(), alone.error
    again = records.from_metric_record(alone.content[records.EVAL_METRICS], len(names.HAM10000_CLASSES))
    for key in (names.M_CONFUSION_MATRIX, names.M_TEST_EXAMPLES):
        assert again[key] == scored[key]
    assert abs(again["loss"] - scored["loss"]) < 1e-5


@pytest.mark.parametrize("share,travels", [
    ("encoder", {names.GROUP_ENCODER}),
    ("encoder-and-heads", {names.GROUP_ENCODER, names.GROUP_PROJECTION_HEAD, names.GROUP_ROTATION_HEAD}),
])
def test_an_ssl_reply_carries_the_shared_groups_and_heads_of_other_tasks_go_back_unchanged(tmp_path, ham10000_dir, share, travels):
    """share=encoder-and-heads: a rotation hospital trains the global rotation head it got and
    returns the SimCLR projection head as it came; share=encoder: its head stays home."""
    ctx = hospital_context(tmp_path, ham10000_dir, {**RUN_CONFIG, "ssl-rounds": 1, "share": share}, max_images=40)
    torch.manual_seed(0)
    initial = FedSSLModel("resnet18", num_classes=len(names.HAM10000_CLASSES)).state_dict()
    sent = {k: v for k, v in initial.items() if k.split(".")[0] in travels}
    content = RecordDict({records.WEIGHTS: records.to_array_record(records.state_arrays(sent)),
                          records.CONFIG: records.config_record({"phase": "ssl", "round": 1})})
    reply = client_app.app(Message(content, dst_node_id=1, message_type=MessageType.TRAIN, group_id="test"), ctx)
    assert not reply.has_error(), reply.error
    got = reply_state(reply)
    assert {k.split(".")[0] for k in got} == travels
    for group in travels:
        keys = [k for k in got if k.startswith(f"{group}.") and got[k].is_floating_point()]
        changed = any(not torch.equal(got[k], initial[k]) for k in keys)
        assert changed == (group in (names.GROUP_ENCODER, names.GROUP_ROTATION_HEAD)), group


def test_a_micle_hospital_trains_on_pairs_of_its_lesions_and_reports_its_own_loss(tmp_path, ham10000_dir):
    """ssl-task=micle on HAM10000: the lesion ids of the metadata pair the images, the encoder
    moves, and the round's metrics carry the MICLe loss under its own key."""
    ctx = hospital_context(tmp_path, ham10000_dir, {**RUN_CONFIG, "ssl-rounds": 1}, max_images=40, **{"ssl-task": "micle"})
    torch.manual_seed(0)
    initial = FedSSLModel("resnet18", num_classes=len(names.HAM10000_CLASSES)).state_dict()
    encoder = {k: v for k, v in initial.items() if k.startswith(f"{names.GROUP_ENCODER}.")}
    reply = client_app.app(message(encoder, MessageType.TRAIN, phase="ssl", round=1), ctx)
    assert not reply.has_error(), reply.error
    got = reply_state(reply)
    assert any(not torch.equal(got[k], initial[k]) for k in got if got[k].is_floating_point())
    metrics = dict(reply.content[records.METRICS])
    assert metrics[names.ssl_loss_key(names.SSL_MICLE)] == metrics[names.M_LOSS] > 0


def test_a_micle_hospital_without_lesion_ids_fails_at_start_up_naming_what_it_needs(tmp_path, ham10000_dir):
    ctx = hospital_context(tmp_path, ham10000_dir, {**RUN_CONFIG, "ssl-rounds": 1}, hospital="folders",
                           **{"ssl-task": "micle", "data-source": "synthetic", "synthetic-images": 40})
    with pytest.raises(client_app.ConfigError, match=r"hospital folders: ssl-task=micle pairs images of the same lesion or "
                                                     r"patient, and none of its \d+ training images shares its lesion"):
        client_app.app(Message(RecordDict(), dst_node_id=1, message_type="query", group_id="test"), ctx)
