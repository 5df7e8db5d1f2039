"""Size, parameter, MAC and sparsity counts checked against hand-computed numbers and NumPy."""
import gzip

import numpy as np
import pytest

from edge_kd.bench.stats import (count_macs, count_params, file_sizes, keras_accuracy, mean_std,
                                  tflite_weight_sparsity)
from edge_kd.errors import UserError
from edge_kd.export.tflite import convert
from edge_kd.fileio import write_bytes
from edge_kd.keras import keras, tf
from tests.conftest import subclassed_model


def test_file_sizes_match_python_gzip(tmp_path, rng):
    data = bytes(rng.integers(0, 4, size=50_000, dtype=np.uint8))  # compressible, not trivially
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    size, gz = file_sizes(path)
    assert size == 50_000
    assert gz == len(gzip.compress(data, compresslevel=9))
    assert gz < size


def _mac_model():
    L = keras.layers
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3)(inp)                                      # 6×6×4 out, 3·3·3 each: 3888
    x = L.BatchNormalization()(x)                                # 0 MACs, 4×4 weights (2 non-trainable)
    x = L.Conv2D(4, 3, padding="same", groups=2)(x)              # 6×6×4 out, 3·3·(4/2) each: 2592
    x = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2)(x)  # 6×6×8 out, 3·3 each: 2592
    x = L.SeparableConv2D(6, 3)(x)                               # dw 4·4·8·9 = 1152 + pw 4·4·8·6 = 768
    x = L.Conv2DTranspose(2, 2, strides=2)(x)                    # 4·4·6 in × 2·2·2: 768
    x = L.Dense(5)(x)                                            # on rank 4: 8·8 positions × 2·5: 640
    x = L.Flatten()(x)                                           # 320
    x = L.Dense(10, activation="relu")(x)                        # 320·10: 3200
    shared = L.Dense(10)
    x = shared(shared(x))                                        # called twice: 2 × 100
    inner = keras.Sequential([L.Input((10,)), L.Dense(7), L.Reshape((7, 1)), L.TimeDistributed(L.Dense(3))])
    x = inner(x)                                                 # 70 + 7 positions × 1·3 = 91
    return keras.Model(inp, x)


MAC_HAND = 3888 + 2592 + 2592 + 1152 + 768 + 768 + 640 + 3200 + 200 + 91
PARAMS_HAND = (
    (3 * 3 * 3 * 4 + 4)          # conv
    + 4 * 4                      # batch norm: gamma, beta, moving mean, moving variance
    + (3 * 3 * 2 * 4 + 4)        # grouped conv
    + (3 * 3 * 4 * 2 + 8)        # depthwise
    + (3 * 3 * 8 + 8 * 6 + 6)    # separable
    + (2 * 2 * 2 * 6 + 2)        # transpose
    + (2 * 5 + 5)                # dense on rank 4
    + (320 * 10 + 10)            # dense
    + (10 * 10 + 10)             # shared dense, counted once
    + (10 * 7 + 7) + (1 * 3 + 3)  # inner model
)


def test_count_macs_matches_hand_numbers():
    assert count_macs(_mac_model()) == MAC_HAND


def test_count_params_matches_hand_numbers():
    model = _mac_model()
    assert count_params(model) == PARAMS_HAND == model.count_params()


def test_count_macs_sees_through_sequential_and_rejects_subclassed():
    model = keras.Sequential([keras.layers.Input((5, 5, 1)), keras.layers.Conv2D(2, 3), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    assert count_macs(model) == 3 * 3 * 2 * 9 + 18 * 3

    sub = subclassed_model(3, 2)
    with pytest.raises(UserError, match="Sequential or Functional"):
        count_macs(sub)


@pytest.fixture(scope="module")
def half_zero_model():
    tf.keras.utils.set_random_seed(5)
    model = keras.Sequential([
        keras.layers.Input((6, 6, 2)),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.Flatten(),                       # 4·4·8 = 128
        keras.layers.Dense(16, activation="relu"),    # 128×16 = 2048 weights: half of them zeroed below
        keras.layers.Dense(3),
    ])
    rng = np.random.default_rng(5)
    dense = model.layers[2]
    kernel, bias = dense.get_weights()
    # Non-zero weights far from 0 so int8 rounding cannot add zeros; exactly half set to 0.
    values = rng.choice([-1.0, 1.0], size=kernel.size) * rng.uniform(0.5, 1.0, size=kernel.size)
    values[rng.permutation(kernel.size)[: kernel.size // 2]] = 0.0
    dense.set_weights([values.reshape(kernel.shape).astype(np.float32), bias])
    # Ten tiny conv weights: non-zero as floats, but int8 rounds them onto the zero point.
    conv = model.layers[0]
    conv_kernel, conv_bias = conv.get_weights()
    conv_kernel.reshape(-1)[rng.permutation(conv_kernel.size)[:10]] = 1e-4
    conv.set_weights([conv_kernel, conv_bias])
    x = rng.normal(size=(32, 6, 6, 2)).astype(np.float32)
    return model, x


def _int8_zero_count(w: np.ndarray, channel_axis: int) -> int:
    """Reference: symmetric per-output-channel int8 quantization of ``w`` done in NumPy."""
    axes = tuple(a for a in range(w.ndim) if a != channel_axis)
    scale = np.abs(w).max(axis=axes, keepdims=True) / 127.0
    return int(np.count_nonzero(np.round(w / scale) == 0))


@pytest.mark.parametrize("variant", ["fp32", "fp16", "dynamic", "int8"])
def test_weight_sparsity_sees_the_zeroed_half(half_zero_model, tmp_path, variant):
    model, x = half_zero_model
    path = write_bytes(tmp_path / f"m-{variant}.tflite", convert(model, variant, representative=x))
    result = tflite_weight_sparsity(path)
    by_size = {v["size"]: v for v in result["layers"].values()}
    assert sorted(by_size) == [16 * 3, 3 * 3 * 2 * 8, 128 * 16]  # conv kernel and both dense kernels
    assert by_size[2048]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert by_size[2048]["zeros"] == 1024

    conv_w, last_w = model.layers[0].get_weights()[0], model.layers[3].get_weights()[0]
    if variant == "int8":
        expected_conv = _int8_zero_count(conv_w, 3)
        expected_last = _int8_zero_count(last_w, 1)
    else:
        expected_conv = int(np.count_nonzero(conv_w == 0))
        expected_last = int(np.count_nonzero(last_w == 0))
    assert by_size[3 * 3 * 2 * 8]["zeros"] == expected_conv == (10 if variant == "int8" else 0)
    assert by_size[16 * 3]["zeros"] == expected_last
    total = 1024 + expected_conv + expected_last
    assert result["overall"] == pytest.approx(total / (144 + 48 + 2048))


def test_mean_std_is_the_sample_std_and_zero_for_one_value():
    mean, std = mean_std([0.9, 0.91, 0.95])
    assert mean == pytest.approx(np.mean([0.9, 0.91, 0.95]))
    assert std == pytest.approx(np.std([0.9, 0.91, 0.95], ddof=1))
    assert mean_std([0.5]) == (0.5, 0.0)


def test_keras_accuracy_is_the_share_of_argmax_hits():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Lambda(lambda t: t)])
    x = np.array([[1, 0, 0], [0, 2, 0], [0, 0, 3], [5, 0, 0]], np.float32)
    assert keras_accuracy(model, x, np.array([0, 1, 0, 0])) == 0.75


def test_code_version_names_the_checkout_commit_and_none_outside_a_checkout(tmp_path):
    import re
    import shutil

    from edge_kd.bench import stats

    version = stats.code_version()
    if shutil.which("git") is None or version is None:
        pytest.skip("no git, or this tree is not a git checkout")
    assert re.fullmatch(r"[0-9a-f]{12}(\+changes)?", version), version
    assert stats.code_version(tmp_path) is None


def test_code_version_flags_changed_code_but_not_a_rewritten_results_file(tmp_path):
    import shutil
    import subprocess

    from edge_kd.bench import stats

    if shutil.which("git") is None:
        pytest.skip("no git")

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / stats.RESULTS_DIR).mkdir(parents=True)
    (tmp_path / stats.RESULTS_DIR / "r.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    clean = stats.code_version(tmp_path)
    assert clean and "+" not in clean
    (tmp_path / stats.RESULTS_DIR / "r.json").write_text('{"rows": [1]}')  # what a benchmark writes after a seed
    assert stats.code_version(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2")
    assert stats.code_version(tmp_path) == clean + "+changes"
