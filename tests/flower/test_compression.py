import numpy as np
import pytest

from fedssl_flower.compression import decode_arrays, encode_arrays, nbytes
from fedssl_flower.errors import ConfigError


def arrays():
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(64, 32)).astype(np.float32), "b": rng.normal(size=64).astype(np.float32),
            "bn.num_batches_tracked": np.array(7, dtype=np.int64)}


@pytest.mark.parametrize("encoding,ratio,tol", [("none", 1.0, 0.0), ("fp16", 0.5, 1e-3), ("int8", 0.25, 0.02)])
def test_round_trip_size_and_error(encoding, ratio, tol):
    a = arrays()
    enc = encode_arrays(a, encoding)
    dec = decode_arrays(enc, encoding)
    assert set(dec) == set(a)
    floats = a["w"].nbytes + a["b"].nbytes
    assert nbytes({k: v for k, v in enc.items() if k != "bn.num_batches_tracked"}) <= floats * ratio + 16
    for k in ("w", "b"):
        assert dec[k].dtype == np.float32
        assert np.abs(dec[k] - a[k]).max() <= tol * np.abs(a[k]).max() + 1e-7
    assert dec["bn.num_batches_tracked"] == 7 and dec["bn.num_batches_tracked"].dtype == np.int64


def test_unknown_encoding():
    with pytest.raises(ConfigError, match="unknown update-encoding 'zip'"):
        encode_arrays(arrays(), "zip")


@pytest.mark.parametrize("encoding", ["none", "fp16", "int8"])
def test_weights_travel_as_one_packed_array(encoding):
    """One Flower Array per message, whatever the number of tensors: Flower moves each Array
    (and each 5 MB chunk) through the SuperLink as an object of its own."""
    from flwr.app import Array, ArrayRecord

    from fedssl_flower import records

    a = arrays()
    record = records.to_array_record(a, encoding)
    assert list(record.keys()) == [records.PACKED]
    back = records.from_array_record(record, encoding)
    assert set(back) == set(a) and back["bn.num_batches_tracked"] == 7 and back["w"].shape == (64, 32)
    assert np.array_equal(back["w"], decode_arrays(encode_arrays(a, encoding), encoding)["w"])
    foreign = ArrayRecord()
    foreign["w"] = Array(a["w"])
    with pytest.raises(ValueError, match=r"weights record with arrays \['w'\]; expected one 'packed' array"):
        records.from_array_record(foreign)
