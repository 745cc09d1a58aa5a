"""The one preprocessing (`fedssl_core.preprocessing`): hospitals and the registry give the same
tensor for the same real file; every image mode and shape fedssl accepts; clear errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedssl_core import names
from fedssl_core.preprocessing import RESAMPLE, ImageDecodeError, load_image, normalize
from fedssl_flower.data.decode import decode_all
from fedssl_flower.ssl import transforms
from fedssl_registry.inference.repository import LoadedModel

SIZE = 48


@pytest.fixture(scope="module")
def jpegs(ham10000_dir) -> list[Path]:
    return sorted((ham10000_dir / "HAM10000_images_part_1").glob("*.jpg"))[:3]


@pytest.fixture(scope="module")
def photo(jpegs) -> Image.Image:
    """A real HAM10000 lesion (200x150 RGB)."""
    with Image.open(jpegs[0]) as img:
        return img.convert("RGB")


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def registry_model(size: int, mean=names.IMAGENET_MEAN, std=names.IMAGENET_STD) -> LoadedModel:
    """The registry's view of a model version, as far as `:predict`'s preprocessing reads it."""
    spec = {"image_size": size, "class_names": [], "mean": list(mean), "std": list(std)}
    return LoadedModel("m", 1, names.TASK_CLASSIFICATION, spec, module=None, batcher=None)  # type: ignore[arg-type]


# --- the same file, both sides -----------------------------------------------------------


@pytest.mark.parametrize("stats", [(names.IMAGENET_MEAN, names.IMAGENET_STD), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))],
                         ids=["imagenet", "unit"])
def test_hospital_and_predict_give_identical_tensors_for_a_real_jpeg(jpegs, stats):
    mean, std = stats
    images, kept, skipped = decode_all(jpegs, SIZE, workers=2)  # the hospital's data loading
    assert skipped == [] and kept.tolist() == [0, 1, 2]
    hospital = transforms.normalize(torch.from_numpy(images), mean, std)  # what training.py calls
    model = registry_model(SIZE, mean, std)
    for i, path in enumerate(jpegs):
        served = torch.from_numpy(model.preprocess(path.read_bytes()))  # what :predict calls
        assert served.shape == (1, 3, SIZE, SIZE) and served.dtype == torch.float32
        assert torch.equal(hospital[i : i + 1], served), path.name


def test_normalize_numpy_and_torch_are_bit_identical():
    pixels = np.random.default_rng(0).integers(0, 256, (4, 3, 9, 7), dtype=np.uint8)
    for mean, std in ((names.IMAGENET_MEAN, names.IMAGENET_STD), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), ((0.1, 0.2, 0.3), (0.9, 0.8, 0.7))):
        t = normalize(torch.from_numpy(pixels), mean, std)
        n = normalize(pixels, mean, std)
        assert isinstance(n, np.ndarray) and n.dtype == np.float32 and t.dtype == torch.float32
        assert torch.equal(t, torch.from_numpy(n))
        assert torch.equal(normalize(torch.from_numpy(pixels[0]), mean, std), t[0])  # (3, H, W) as well
    expected = (pixels[0, 1, 0, 0] / 255.0 - 0.2) / 0.8
    assert normalize(pixels, (0.1, 0.2, 0.3), (0.9, 0.8, 0.7))[0, 1, 0, 0] == pytest.approx(expected, rel=1e-6)
    assert transforms.normalize is normalize


@pytest.mark.parametrize(("pixels", "kwargs", "error"), [
    (np.zeros((1, 3, 4, 4), np.float32), {}, "normalize takes uint8 pixels, got float32"),
    (torch.zeros(1, 4, 4, 4, dtype=torch.uint8), {}, r"normalize takes pixels of shape \(N, 3, H, W\) or \(3, H, W\), got \(1, 4, 4, 4\)"),
    (np.zeros((3, 4, 4), np.uint8), {"mean": (0.5, 0.5)}, r"mean must be 3 numbers \(one per RGB channel\), got 2: \[0.5, 0.5\]"),
    (np.zeros((3, 4, 4), np.uint8), {"std": (0.5, 0.0, 0.5)}, r"std must be positive per channel, got \[0.5, 0.0, 0.5\]"),
])
def test_normalize_refuses_what_it_cannot_normalise(pixels, kwargs, error):
    with pytest.raises(ValueError, match=error):
        normalize(pixels, **kwargs)


# --- geometry: shorter side → size, centre crop -------------------------------------------


def test_path_and_bytes_decode_alike_for_odd_and_even_sizes(jpegs):
    for size in (1, 7, 33, SIZE, 224):
        x = load_image(jpegs[0], size)
        assert x.shape == (3, size, size) and x.dtype == np.uint8
        assert np.array_equal(x, load_image(jpegs[0].read_bytes(), size))
        assert np.array_equal(x, load_image(str(jpegs[0]), size))


def test_the_centre_square_is_kept_not_squashed(photo):
    """An image with red margins: the output is its central square; the margins only touch the
    outermost columns (through the resampling filter), never the inside. A squash would
    mix them into every column."""
    centre = photo.crop((25, 0, 175, 150))  # 150 x 150
    wide = Image.new("RGB", (300, 150), (255, 0, 0))
    wide.paste(centre, (75, 0))
    got, expected = load_image(encode(wide), 50), load_image(encode(centre), 50)
    assert np.abs(got[:, :, 1:-1].astype(int) - expected[:, :, 1:-1]).max() <= 1  # filter weights differ in the last bit
    assert (got[0, :, 0] > expected[0, :, 0]).mean() > 0.9  # the red margin reaches the outer columns only
    tall = Image.new("RGB", (150, 300), (255, 0, 0))
    tall.paste(centre, (0, 75))
    assert np.abs(load_image(encode(tall), 50)[:, 1:-1].astype(int) - expected[:, 1:-1]).max() <= 1


def test_rotating_the_file_rotates_the_tensor(photo):
    """No aspect-ratio squash: a lesion turned by 90 degrees comes out turned, not restretched
    (a squashed 200x150 image made 90-degree rotations guessable from the stretch)."""
    upright = load_image(encode(photo), SIZE).astype(int)
    turned = load_image(encode(photo.transpose(Image.Transpose.ROTATE_90)), SIZE).astype(int)
    assert np.abs(np.rot90(upright, 1, axes=(1, 2)) - turned).max() <= 1  # Pillow rounds between its two passes


def test_small_images_are_upscaled_and_odd_shapes_work(photo):
    for w, h in ((13, 7), (7, 13), (1, 1), (201, 151)):
        x = load_image(encode(photo.resize((w, h))), SIZE)
        assert x.shape == (3, SIZE, SIZE)
    one = load_image(encode(Image.new("RGB", (1, 1), (10, 200, 30))), 5)
    assert one[:, 0, 0].tolist() == [10, 200, 30] and (one == one[:, :1, :1]).all()


def test_jpeg_draft_only_speeds_up(photo):
    """A JPEG decoded at reduced scale by libjpeg gives nearly what the full decode gives."""
    big = photo.resize((800, 600), Image.Resampling.BICUBIC)
    data = encode(big, "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as img:  # the reference: full decode, same geometry
        full = np.asarray(img.convert("RGB").resize((32, 32), RESAMPLE, box=(100, 0, 700, 600))).transpose(2, 0, 1)
    fast = load_image(data, 32)
    assert np.abs(fast.astype(int) - full).mean() < 1.5
    assert np.array_equal(fast, load_image(data, 32))  # deterministic


# --- modes -------------------------------------------------------------------------------


def test_grayscale_becomes_three_equal_channels(photo):
    gray = photo.convert("L")
    for data in (encode(gray), encode(gray, "JPEG", quality=95)):
        x = load_image(data, SIZE)
        assert np.array_equal(x[0], x[1]) and np.array_equal(x[1], x[2])
    expected = np.asarray(gray.resize((SIZE, SIZE), RESAMPLE, box=(25, 0, 175, 150)))
    assert np.array_equal(load_image(encode(gray), SIZE)[0], expected)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_black(photo, mode):
    """Left half opaque, right half transparent: the left is the image, the right is black."""
    alpha = Image.new("L", photo.size, 255)
    alpha.paste(0, (100, 0, 200, 150))
    if mode == "P":
        img = photo.convert("P")  # palette with one transparent index, as tRNS
        pal = np.asarray(img).copy()
        pal[:, 100:] = 255
        img = Image.fromarray(pal, "P")
        img.putpalette(photo.convert("P").getpalette())
        img.info["transparency"] = 255
        data = encode(img, transparency=255)
        opaque = load_image(encode(img.convert("RGB")), 30)
    else:
        base = photo if mode == "RGBA" else photo.convert("L")
        img = base.convert(mode)
        img.putalpha(alpha)
        data = encode(img)
        opaque = load_image(encode(base), 30)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == mode
    x = load_image(data, 30)
    # output column j samples source x = 25 + 5 * (j + 0.5); the filter reaches 5 pixels
    assert np.array_equal(x[:, :, :14], opaque[:, :, :14])
    assert (x[:, :, 16:] == 0).all()


def test_16_bit_grayscale_is_scaled_by_its_range_not_clipped(photo):
    g = np.asarray(photo.convert("L")).astype(np.int64)
    wide = (g * 200 + 300).astype(np.uint16)  # up to 51300: Pillow's convert("L") would clip it to 255
    data = encode(Image.fromarray(wide))
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "I;16"
    x = load_image(data, SIZE)
    stretched = np.rint((g - g.min()) * 255.0 / (g.max() - g.min())).astype(np.uint8)
    expected = load_image(encode(Image.fromarray(stretched, "L")), SIZE)
    assert np.abs(x.astype(int) - expected).max() <= 1
    assert 40 < x.mean() < 220  # neither clipped to white nor crushed to black
    flat = load_image(encode(Image.fromarray(np.full((20, 30), 4000, np.uint16))), 8)
    assert (flat == 0).all()


def test_cmyk_jpeg_is_converted_to_rgb(photo):
    data = encode(photo.convert("CMYK"), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "CMYK"
    x = load_image(data, SIZE).astype(int)
    assert np.abs(x - load_image(encode(photo), SIZE)).mean() < 2


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_orientation_is_applied(photo, orientation):
    """The file stores the pixels turned and says so in EXIF; the tensor is upright."""
    stored = photo.transpose({6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    x = load_image(encode(stored, "JPEG", quality=95, exif=exif), SIZE).astype(int)
    upright = load_image(encode(photo, "JPEG", quality=95), SIZE).astype(int)
    errors = [np.abs(np.rot90(upright, k, axes=(1, 2)) - x).mean() for k in range(4)]
    assert errors[0] < 2 and errors[0] * 5 < min(errors[1:]), errors


# --- errors ------------------------------------------------------------------------------


def test_a_truncated_file_is_a_clear_error(jpegs, photo, tmp_path):
    data = jpegs[0].read_bytes()
    with pytest.raises(ImageDecodeError, match=r"^not a decodable JPEG or PNG image: image file is truncated"):
        load_image(data[: len(data) // 2], SIZE)
    png = encode(photo)
    with pytest.raises(ImageDecodeError, match=r"^not a decodable JPEG or PNG image: "):
        load_image(png[: len(png) // 2], SIZE)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    images, kept, skipped = decode_all([jpegs[0], cut], SIZE, workers=1)  # a hospital skips it, saying why
    assert kept.tolist() == [0] and len(skipped) == 1 and skipped[0].startswith(f"{cut}: not a decodable JPEG or PNG image")


@pytest.mark.parametrize(("source", "kwargs", "kind", "error"), [
    (b"GIF89a\x01\x00\x01\x00", {}, ImageDecodeError,
     r"^not a decodable JPEG or PNG image: unrecognised or damaged JPEG/PNG header \(first bytes b'GIF89a\\x01\\x00'\)$"),
    (b"", {}, ImageDecodeError, r"unrecognised or damaged JPEG/PNG header \(first bytes b''\)"),
    ("png:100x100", {"max_pixels": 5000}, ImageDecodeError, r"^image is 100x100 pixels; at most 5000 pixels are accepted$"),
    # issue 17, item 3: a 6,300 x 6,300 PNG (39.7 MP) was decoded whole, 158 MB (760 MB if RGBA)
    ("png:4100x4000", {}, ImageDecodeError, r"^PNG image is 4100x4000 pixels; at most 16000000 pixels are accepted for PNG, "
                                             r"which is decoded at full size \(JPEG: 40000000\); send a smaller image or a JPEG$"),
    ("png:10x10", {"size": 0}, ValueError, r"^image size must be a positive integer, got 0$"),
    (12, {}, TypeError, r"^load_image takes the image's bytes or a file path, got int$"),
    ("missing", {}, FileNotFoundError, r"No such file or directory"),
])
def test_bad_input_is_a_clear_error(tmp_path, source, kwargs, kind, error):
    if isinstance(source, str) and source.startswith("png:"):
        w, h = map(int, source[4:].split("x"))
        source = encode(Image.new("RGB", (w, h)))
    elif source == "missing":
        source = tmp_path / "missing.jpg"
    with pytest.raises(kind, match=error):
        load_image(source, **{"size": SIZE, **kwargs})


def test_a_jpeg_as_large_as_a_dslr_photo_is_accepted():
    """JPEG keeps the 40 MP limit: libjpeg decodes it at 1/8 scale, a few MB for a 24 MP photo."""
    flat = Image.new("RGB", (6000, 4000), (200, 120, 90))
    assert (load_image(encode(flat, "JPEG", quality=90), SIZE).astype(int) - [[[200]], [[120]], [[90]]]).__abs__().max() <= 2


def _full_size_reference(img: Image.Image, size: int) -> np.ndarray:
    """What `load_image` computed before PNGs were reduced early: composite onto black (or
    scale 16-bit by its range) at full size, then one antialiased resample of the centre square."""
    if img.mode == "I;16":
        v = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.rint((v - v.min()) * 255.0 / (v.max() - v.min())).astype(np.uint8), "L").convert("RGB")
    elif img.mode == "RGBA":
        img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img).convert("RGB")
    w, h = img.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return np.asarray(img.resize((size, size), RESAMPLE, box=box)).transpose(2, 0, 1)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "I;16"])
def test_a_large_png_reduced_early_gives_the_full_size_pixels(photo, mode):
    """Issue 17, item 3: a large PNG is box-averaged (integer factor) right after decoding, so
    alpha compositing and 16-bit scaling no longer run at full size; the tensor stays what the
    full-size computation gives, to within a few levels (a box then a bilinear filter is not
    quite one bilinear filter)."""
    big = photo.resize((1600, 1200), Image.Resampling.BICUBIC)
    if mode == "RGBA":  # soft edge: opaque left, a ramp, transparent right
        ramp = np.clip((1100 - np.arange(1600)) / 600, 0, 1)
        big.putalpha(Image.fromarray(np.rint(np.tile(ramp * 255, (1200, 1))).astype(np.uint8), "L"))
    elif mode == "I;16":
        big = Image.fromarray((np.asarray(big.convert("L")).astype(np.uint16) * 200 + 300))
    data = encode(big)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == mode
    size = 32  # 1200 // 64: reduced by 18 before anything else
    diff = np.abs(load_image(data, size).astype(int) - _full_size_reference(big, size))
    assert diff.mean() < 0.5 and diff.max() <= 4, (diff.mean(), diff.max())


@pytest.mark.parametrize("orientation", [6, 3])
def test_a_large_png_is_turned_upright_before_it_is_reduced(photo, orientation):
    """The reduction keeps the centred square of the upright picture, so a PNG whose EXIF
    says it is turned gives the tensor of the upright one."""
    upright = photo.resize((1600, 1200), Image.Resampling.BICUBIC)
    stored = upright.transpose({6: Image.Transpose.ROTATE_90, 3: Image.Transpose.ROTATE_180}[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    size = 32
    diff = np.abs(load_image(encode(stored, exif=exif), size).astype(int) - load_image(encode(upright), size))
    assert diff.mean() < 0.5 and diff.max() <= 4, (diff.mean(), diff.max())
