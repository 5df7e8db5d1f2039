"""Data sources: built-in MNIST, .npz files, image folders, tfds names; and the bundle's pipelines."""
import os

import numpy as np
import pytest
from PIL import Image

from edge_kd import data
from edge_kd.errors import UserError


def _user_error(source, *words, **kw):
    with pytest.raises(UserError) as info:
        data.load(source, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def _expected_val_sizes(y, fraction):
    """Stratified hold-out reference: round(fraction · count) images of each class."""
    return {int(c): int(round(n * fraction)) for c, n in zip(*np.unique(y, return_counts=True))}


# --- built-in MNIST -------------------------------------------------------------------------------------


def test_builtin_mnist_shapes_dtypes_and_stratified_val():
    b = data.load("mnist", limit_train=1000, limit_test=300, val_fraction=0.2, seed=5)
    assert b.info.name == "mnist" and b.info.num_classes == 10 and b.info.input_shape == (28, 28, 1)
    assert b.info.class_names == tuple(str(i) for i in range(10))
    assert (b.info.input_scale, b.info.input_offset) == (1 / 255, 0.0)
    assert b.x_train.dtype == np.uint8 and b.y_train.dtype == np.int64
    assert b.x_test.shape == (300, 28, 28, 1) and b.y_test.shape == (300,)
    assert len(b.x_train) + len(b.x_val) == 1000
    assert b.x_val.shape[1:] == (28, 28, 1) and len(b.y_val) == len(b.x_val)
    y_all = np.concatenate([b.y_train, b.y_val])
    val_counts = dict(zip(*np.unique(b.y_val, return_counts=True)))
    assert {int(c): int(n) for c, n in val_counts.items()} == _expected_val_sizes(y_all, 0.2)
    # No image is in both train and val.
    train_keys = {x.tobytes() for x in b.x_train}
    assert not any(x.tobytes() in train_keys for x in b.x_val)
    assert set(np.unique(b.y_train)) == set(range(10))
    # Same seed, same split; another seed, another one.
    again = data.load("mnist", limit_train=1000, limit_test=300, val_fraction=0.2, seed=5)
    np.testing.assert_array_equal(again.x_val, b.x_val)
    other = data.load("mnist", limit_train=1000, limit_test=300, val_fraction=0.2, seed=6)
    assert not np.array_equal(other.x_val, b.x_val)


def test_builtin_mnist_limits_are_a_subset_of_the_full_set():
    full = np.load(data.BUILTIN["mnist"])
    b = data.load("mnist", limit_train=200, limit_test=50, val_fraction=0.0)
    assert len(b.x_val) == 0 and b.x_train.shape == (200, 28, 28, 1)
    full_keys = {x.tobytes(): int(y) for x, y in zip(full["x_test"], full["y_test"])}
    for x, y in zip(b.x_test[..., 0], b.y_test):
        assert full_keys[x.tobytes()] == y


def test_real_mnist_matches_the_builtin_copy():
    from tests.conftest import shared_npz

    real = np.load(shared_npz("mnist.npz"))
    b = data.load(str(shared_npz("mnist.npz")), limit_test=100, val_fraction=0.1)
    assert b.info.input_shape == (28, 28, 1) and b.info.num_classes == 10
    assert len(b.x_train) + len(b.x_val) == len(real["x_train"])
    assert b.x_val.shape[0] == sum(_expected_val_sizes(real["y_train"], 0.1).values())


def test_normalise_and_arrays_map_255_to_one():
    b = data.load("mnist", limit_train=100, limit_test=20)
    x = np.array([[0, 51, 255]], np.uint8)
    out = b.normalise(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 0.2, 1.0]], rtol=1e-7)
    assert out[0, 2] == np.float32(1.0)
    xv, yv = b.arrays("val")
    assert xv.dtype == np.float32 and yv.dtype == np.int64
    np.testing.assert_allclose(xv, b.x_val.astype(np.float64) / 255.0, atol=1e-7)
    assert 0.0 <= xv.min() and xv.max() <= 1.0
    with pytest.raises(ValueError, match="split"):
        b.arrays("validation")


def test_dataset_yields_normalised_float32_batches():
    b = data.load("mnist", limit_train=300, limit_test=70)
    batches = list(b.dataset("test", batch_size=32))
    assert [len(x) for x, _ in batches] == [32, 32, 6]
    x = np.concatenate([xb.numpy() for xb, _ in batches])
    y = np.concatenate([yb.numpy() for _, yb in batches])
    assert x.dtype == np.float32 and x.shape == (70, 28, 28, 1)
    np.testing.assert_allclose(x, b.x_test.astype(np.float32) / np.float32(255), rtol=1e-6)
    np.testing.assert_array_equal(y, b.y_test)
    # A shuffled pipeline holds the same pairs in another order.
    xs, ys = zip(*[(xb.numpy(), yb.numpy()) for xb, yb in b.dataset("train", batch_size=64, shuffle=True, seed=1)])
    xs, ys = np.concatenate(xs), np.concatenate(ys)
    xn, yn = b.arrays("train")
    assert not np.array_equal(ys, yn)
    order_s, order_n = np.lexsort(xs.reshape(len(xs), -1).T), np.lexsort(xn.reshape(len(xn), -1).T)
    np.testing.assert_array_equal(xs[order_s], xn[order_n])
    np.testing.assert_array_equal(ys[order_s], yn[order_n])


def test_val_fraction_out_of_range_is_a_user_error():
    _user_error("mnist", "val_fraction", val_fraction=1.0)
    _user_error("mnist", "val_fraction", val_fraction=-0.1)


# --- .npz files -------------------------------------------------------------------------------------------


def _arrays(rng, n_train=60, n_test=20, shape=(8, 8), classes=3):
    return {"x_train": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
            "y_train": np.arange(n_train) % classes,
            "x_test": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
            "y_test": np.arange(n_test) % classes}


def test_npz_uint8_nhw(tmp_path, rng):
    arrays = _arrays(rng)
    path = tmp_path / "digits.npz"
    np.savez(path, **arrays, class_names=np.array(["a", "b", "c"]))
    b = data.load(str(path), val_fraction=0.1)
    assert b.info.name == "digits" and b.info.num_classes == 3 and b.info.input_shape == (8, 8, 1)
    assert b.info.class_names == ("a", "b", "c")
    assert b.x_train.dtype == np.uint8 and len(b.x_train) == 54 and len(b.x_val) == 6
    assert np.bincount(b.y_val).tolist() == [2, 2, 2]
    np.testing.assert_array_equal(b.x_test[..., 0], arrays["x_test"])
    np.testing.assert_array_equal(b.y_test, arrays["y_test"])
    # Train and val together are exactly the file's training set, in order.
    mask = np.ones(60, bool)
    kept = [i for i, x in enumerate(arrays["x_train"]) if any(np.array_equal(x, v[..., 0]) for v in b.x_val)]
    mask[kept] = False
    np.testing.assert_array_equal(b.x_train[..., 0], arrays["x_train"][mask])


def test_an_npz_is_read_once_while_it_is_unchanged_and_again_once_it_changes(tmp_path, rng):
    path = tmp_path / "digits.npz"
    np.savez(path, **_arrays(rng))
    a, b = data.load(str(path), val_fraction=0.1), data.load(str(path), val_fraction=0.1)
    assert np.shares_memory(a.x_test, b.x_test)  # one read, shared: so it cannot be written to
    with pytest.raises(ValueError):
        a.x_test[0] = 0
    assert a.content_digest() == b.content_digest()
    changed = _arrays(rng)
    np.savez(path, **changed)
    os.utime(path, ns=(1, 1))  # another modification time, whatever the clock's resolution
    c = data.load(str(path), val_fraction=0.1)
    np.testing.assert_array_equal(c.x_test[..., 0], changed["x_test"])
    assert c.content_digest() != a.content_digest()


def test_npz_float_nhwc_in_unit_range_and_column_labels(tmp_path, rng):
    raw = rng.integers(0, 256, (40, 6, 6, 3)).astype(np.uint8)
    path = tmp_path / "rgb.npz"
    np.savez(path, x_train=raw.astype(np.float32) / 255.0, y_train=(np.arange(40) % 4)[:, None],
             x_test=raw[:10].astype(np.float64) / 255.0, y_test=(np.arange(10) % 4).astype(np.float32)[:, None])
    b = data.load(str(path), val_fraction=0.0)
    assert b.info.input_shape == (6, 6, 3) and b.info.num_classes == 4
    assert b.x_train.dtype == np.uint8 and b.y_train.dtype == np.int64 and b.y_train.shape == (40,)
    np.testing.assert_array_equal(b.x_train, raw)  # pixels / 255 come back as the same uint8 pixels
    np.testing.assert_array_equal(b.x_test, raw[:10])
    np.testing.assert_array_equal(b.y_test, np.arange(10) % 4)


def test_npz_float_pixels_in_0_255_are_kept(tmp_path, rng):
    raw = rng.integers(0, 256, (20, 5, 5)).astype(np.uint8)
    raw[0, 0, 0] = 255
    path = tmp_path / "f.npz"
    np.savez(path, x_train=raw.astype(np.float32), y_train=np.arange(20) % 2, x_test=raw.astype(np.float32),
             y_test=np.arange(20) % 2)
    np.testing.assert_array_equal(data.load(str(path), val_fraction=0).x_train[..., 0], raw)


def test_npz_errors_are_one_line(tmp_path, rng):
    arrays = _arrays(rng)
    no_key = tmp_path / "nokey.npz"
    np.savez(no_key, **{k: v for k, v in arrays.items() if k != "y_test"})
    _user_error(str(no_key), "y_test", "nokey.npz")

    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(rng.bytes(1000))
    _user_error(str(corrupt), "corrupt.npz")

    _user_error(str(tmp_path / "absent.npz"), "not found", "absent.npz")

    bad_labels = tmp_path / "labels.npz"
    np.savez(bad_labels, **{**arrays, "y_train": np.linspace(0, 2, 60)})
    _user_error(str(bad_labels), "labels", "integers")

    text_labels = tmp_path / "text.npz"
    np.savez(text_labels, **{**arrays, "y_test": np.array(["x"] * 20)})
    _user_error(str(text_labels), "labels")

    negative = tmp_path / "negative.npz"
    np.savez(negative, **{**arrays, "y_train": arrays["y_train"] - 1})
    _user_error(str(negative), "labels")

    wrong_count = tmp_path / "count.npz"
    np.savez(wrong_count, **{**arrays, "y_train": arrays["y_train"][:-1]})
    _user_error(str(wrong_count), "labels", "60")

    sizes = tmp_path / "sizes.npz"
    np.savez(sizes, **{**arrays, "x_test": rng.integers(0, 256, (20, 9, 9), dtype=np.uint8)})
    _user_error(str(sizes), "x_test")

    one_class = tmp_path / "one.npz"
    np.savez(one_class, **{**arrays, "y_train": np.zeros(60, int), "y_test": np.zeros(20, int)})
    _user_error(str(one_class), "fewer than 2 classes")

    other = tmp_path / "notes.txt"
    other.write_text("hello")
    _user_error(str(other), "neither")


# --- image folders ----------------------------------------------------------------------------------------


def _write_images(folder, classes, per_class, size=(10, 12), mode="L", rng=None):
    """Writes PNGs under folder/<class>/ and returns {class: [uint8 arrays]} in file-name order."""
    rng = rng or np.random.default_rng(0)
    out = {}
    for cls in classes:
        (folder / cls).mkdir(parents=True)
        out[cls] = []
        for i in range(per_class):
            shape = (size[0], size[1]) if mode == "L" else (size[0], size[1], 3)
            a = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(a, mode).save(folder / cls / f"{i:03d}.png")
            out[cls].append(a)
    return out


def test_image_folder_grayscale_with_held_out_test(tmp_path):
    written = _write_images(tmp_path, ["cat", "dog", "eel"], per_class=10)
    b = data.load(str(tmp_path), val_fraction=0.0, test_fraction=0.2)
    assert b.info.class_names == ("cat", "dog", "eel") and b.info.num_classes == 3
    assert b.info.input_shape == (10, 12, 1)
    assert b.raw("train").shape == (24, 10, 12, 1) and b.raw("test").shape == (6, 10, 12, 1)
    assert np.bincount(b.y_test).tolist() == [2, 2, 2]
    # Every image came back with its own label, pixel for pixel.
    expected = {a.tobytes(): i for i, cls in enumerate(["cat", "dog", "eel"]) for a in written[cls]}
    for x, y in zip(np.concatenate([b.raw("train"), b.raw("test")]), np.concatenate([b.y_train, b.y_test])):
        assert expected.pop(x[..., 0].tobytes()) == y
    assert not expected


def test_image_folder_train_test_layout_rgb(tmp_path):
    rng = np.random.default_rng(1)
    tr = _write_images(tmp_path / "train", ["a", "b"], per_class=5, mode="RGB", rng=rng)
    te = _write_images(tmp_path / "test", ["a", "b"], per_class=2, mode="RGB", rng=rng)
    b = data.load(str(tmp_path), val_fraction=0.0)
    assert b.info.input_shape == (10, 12, 3) and b.info.class_names == ("a", "b")
    np.testing.assert_array_equal(b.raw("train"), np.stack(tr["a"] + tr["b"]))
    np.testing.assert_array_equal(b.y_train, [0] * 5 + [1] * 5)
    np.testing.assert_array_equal(b.raw("test"), np.stack(te["a"] + te["b"]))


def test_image_folder_mixed_modes_become_rgb(tmp_path):
    _write_images(tmp_path, ["a"], per_class=3, mode="L")
    _write_images(tmp_path, ["b"], per_class=3, mode="RGB")
    b = data.load(str(tmp_path), val_fraction=0.0, test_fraction=0.34)
    assert b.info.input_shape == (10, 12, 3)
    gray = b.raw("train")[b.y_train == 0]
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])  # L → RGB repeats the channel


def test_image_folder_sizes_must_agree_unless_image_size_given(tmp_path):
    _write_images(tmp_path, ["a"], per_class=3, size=(10, 12))
    _write_images(tmp_path, ["b"], per_class=3, size=(14, 9))
    _user_error(str(tmp_path), "image-size", val_fraction=0.0)
    b = data.load(str(tmp_path), image_size=(16, 8), val_fraction=0.0, test_fraction=0.34)
    assert b.info.input_shape == (16, 8, 1) and b.raw("train").shape[1:] == (16, 8, 1)
    # Resizing is TensorFlow's antialiased bicubic, rounded to uint8, as documented.
    from edge_kd.keras import tf

    png = np.asarray(Image.open(tmp_path / "b" / "000.png"))[..., None].astype(np.float32)
    first_b = np.clip(np.round(tf.image.resize(png, (16, 8), method="bicubic", antialias=True).numpy()), 0, 255)
    all_x = np.concatenate([b.raw("train"), b.raw("test")])
    assert any(np.array_equal(x, first_b.astype(np.uint8)) for x in all_x)


def test_train_and_test_folders_must_agree_in_size_unless_image_size_given(tmp_path):
    _write_images(tmp_path / "train", ["a", "b"], per_class=2, size=(10, 12))
    _write_images(tmp_path / "test", ["a", "b"], per_class=2, size=(12, 10))
    _user_error(str(tmp_path), "train/", "test/", "image-size", val_fraction=0.0)
    b = data.load(str(tmp_path), image_size=(6, 6), val_fraction=0.0)
    assert b.raw("train").shape == (4, 6, 6, 1) and b.raw("test").shape == (4, 6, 6, 1)


def test_image_folder_errors(tmp_path):
    _write_images(tmp_path / "one", ["only"], per_class=2)
    _user_error(str(tmp_path / "one"), "at least 2")

    _write_images(tmp_path / "bad", ["a", "b"], per_class=3)
    (tmp_path / "bad" / "b" / "broken.png").write_bytes(b"not a png at all")
    _user_error(str(tmp_path / "bad"), "cannot read image", "broken.png")

    _write_images(tmp_path / "empty", ["a"], per_class=2)
    (tmp_path / "empty" / "b").mkdir()
    _user_error(str(tmp_path / "empty"), "class 'b' has no images")

    _write_images(tmp_path / "split" / "train", ["a", "b"], per_class=2)
    _write_images(tmp_path / "split" / "test", ["a", "c"], per_class=2)
    _user_error(str(tmp_path / "split"), "differ")


# --- streamed sources: image folders and tfds read images when asked --------------------------------------


def _streamed_folder(tmp_path, per_class=12):
    written = _write_images(tmp_path / "imgs", ["a", "b", "c"], per_class=per_class, mode="RGB")
    return written, data.load(str(tmp_path / "imgs"), val_fraction=0.25, test_fraction=0.25, seed=3)


def test_an_image_folder_is_streamed_and_load_reads_no_pixels(tmp_path):
    written, b = _streamed_folder(tmp_path)
    assert b.streamed and not data.load("mnist", limit_train=50, limit_test=10).streamed
    assert isinstance(b.x_train, data.ImageFiles) and b.x_train.shape == (b.count("train"), 10, 12, 3)
    # Rewrite every file after loading: what the bundle gives is what is on disk now, so load held no pixels
    rng = np.random.default_rng(9)
    now = {}
    for cls in written:
        for i in range(len(written[cls])):
            a = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
            Image.fromarray(a, "RGB").save(tmp_path / "imgs" / cls / f"{i:03d}.png")
            now[a.tobytes()] = "abc".index(cls)
    for split in ("train", "val", "test"):
        for x, y in zip(b.raw(split), b.labels(split)):
            assert now[x.tobytes()] == y


def test_streamed_splits_give_the_same_images_every_way_they_are_read(tmp_path):
    _, b = _streamed_folder(tmp_path)
    x, y = b.raw("train"), b.labels("train")
    # in order, a batch at a time
    got = list(b.batches("train", 5))
    np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), b.normalise(x))
    np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), y)
    # at chosen positions, in the order asked
    pick = np.array([7, 0, 3, 3])
    np.testing.assert_array_equal(b.raw("train", pick), x[pick])
    xs, ys = b.arrays("train", pick)
    np.testing.assert_array_equal(xs, b.normalise(x[pick]))
    np.testing.assert_array_equal(ys, y[pick])
    assert b.raw("train", []).shape == (0, 10, 12, 3)
    np.testing.assert_array_equal(b.first("train", 3)[0], b.normalise(x[:3]))
    assert len(b.first("train", 10_000)[1]) == len(y)  # no more than the split holds
    with pytest.raises(TypeError):
        b.x_train[0]  # a store is not pixels


def test_a_streamed_training_pipeline_shuffles_by_seed_and_carries_each_images_cached_logits(tmp_path):
    _, b = _streamed_folder(tmp_path)
    x, y = b.raw("train"), b.labels("train")
    key = {im.tobytes(): i for i, im in enumerate(x)}
    logits = np.arange(len(y), dtype=np.float32)[:, None, None] * np.ones((1, 1, 3), np.float32)

    def epoch(seed):
        order = []
        for inputs, labels in b.dataset("train", 4, shuffle=True, seed=seed, teacher_logits=logits):
            images = np.rint((inputs["image"].numpy() - b.info.input_offset) / b.info.input_scale).astype(np.uint8)
            for im, row, label in zip(images, inputs["teacher_logits"].numpy(), labels.numpy()):
                pos = key[im.tobytes()]
                assert row[0, 0] == pos and label == y[pos]  # every image with its own row and label
                order.append(pos)
        return order

    first = epoch(0)
    assert sorted(first) == list(range(len(y))) and first != sorted(first)
    assert epoch(0) == first and epoch(1) != first
    batches = list(b.dataset("train", 4, drop_remainder=True))
    assert all(len(lab) == 4 for _, lab in batches) and len(batches) == len(y) // 4


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_every_image_format_streams_with_its_pixels(tmp_path, mode):
    # TensorFlow decodes PNG and JPEG; PIL the formats whose channel conversions TensorFlow does not all make
    # (grey BMP and GIF, 32-bit BMP), WebP, and TIFF, which it cannot read at all
    rng = np.random.default_rng(2)
    pixels = {}
    formats = ["png", "bmp", "tif"] if mode == "L" else ["png", "bmp", "tif", "webp"]  # WebP has no grey
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i, fmt in enumerate(formats):
            a = rng.integers(0, 256, (6, 5) if mode == "L" else (6, 5, 3), dtype=np.uint8)
            Image.fromarray(a, mode).save(tmp_path / cls / f"{i}.{fmt}", **({"lossless": True} if fmt == "webp" else {}))
            pixels[a.tobytes()] = cls
    b = data.load(str(tmp_path), val_fraction=0.0, test_fraction=0.4)
    assert b.info.input_shape == (6, 5, 1 if mode == "L" else 3)
    got = np.concatenate([b.raw("train"), b.raw("test")])
    for x, y in zip(got, np.concatenate([b.labels("train"), b.labels("test")])):
        assert "ab"[y] == pixels.pop((x[..., 0] if mode == "L" else x).tobytes())
    assert not pixels
    # the same through the training pipeline
    assert sum(len(lab) for _, lab in b.dataset("train", 3, shuffle=True)) == b.count("train")


# --- tfds -------------------------------------------------------------------------------------------------


def test_tfds_dataset_goes_through_the_real_download_and_prepare(tmp_path, monkeypatch):
    import importlib_resources  # noqa: F401  (tfds imports it while preparing; requirements.txt pins it)

    from tests import tfds_tiny

    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))  # read when data.load asks, not when tfds was imported
    b = data.load(f"tfds:{tfds_tiny.NAME}", val_fraction=0.25)
    # prepared on disk by the builder, as a downloaded dataset would be
    prepared = tmp_path / tfds_tiny.NAME / "1.0.0"
    assert (prepared / "dataset_info.json").is_file()
    assert sorted(p.name.split(".")[0] for p in prepared.glob("*.tfrecord*")) == [
        f"{tfds_tiny.NAME}-test", f"{tfds_tiny.NAME}-train"]
    assert b.info.name == tfds_tiny.NAME and b.info.input_shape == (12, 12, 1)
    assert b.info.class_names == tuple(tfds_tiny.CLASSES) and b.info.num_classes == 3
    assert len(b.y_train) + len(b.y_val) == tfds_tiny.SIZES["train"] and len(b.y_val) == 15
    # every image comes back with its label (tfds shuffles the order): as sorted (label, pixels) pairs
    x_test, y_test = tfds_tiny.expected("test")

    def pairs(x, y):
        return sorted((int(label), img.tobytes()) for img, label in zip(x, y))

    assert pairs(b.raw("test"), b.y_test) == pairs(x_test, y_test)
    # streamed from the prepared records: train and val hold the train split between them, and a
    # shuffled epoch gives each of its images once, with its label
    assert b.streamed and isinstance(b.x_val, data.TfdsImages)
    x_train, y_train = tfds_tiny.expected("train")
    assert sorted(pairs(b.raw("train"), b.y_train) + pairs(b.raw("val"), b.y_val)) == pairs(x_train, y_train)
    shuffled = [(im, lab) for xs, ys in b.dataset("train", 8, shuffle=True, seed=0) for im, lab in zip(xs.numpy(), ys.numpy())]
    as_raw = np.rint(np.stack([im for im, _ in shuffled]) * 255).astype(np.uint8)
    assert pairs(as_raw, [lab for _, lab in shuffled]) == pairs(b.raw("train"), b.y_train)
    # training needs its length (steps per epoch), which the positions' filter would hide
    from edge_kd import train
    from edge_kd.distill import Distiller
    from edge_kd.keras import keras

    ds = b.dataset("train", 8, shuffle=True)
    assert len(ds) == -(-b.count("train") // 8)
    student = keras.Sequential([keras.Input((12, 12, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
    history = train.fit(Distiller(student), ds, 1, 1e-2, validation=b.dataset("val", 8), verbose=0)
    assert len(history["loss"]) == 1
    assert b.raw("train").dtype == np.uint8 and b.y_train.dtype == np.int64
    # a second load reads the prepared files: same images, and a resize on the way
    sized = data.load(f"tfds:{tfds_tiny.NAME}", val_fraction=0.25, image_size=(16, 16))
    assert sized.info.input_shape == (16, 16, 1) and sized.raw("train").dtype == np.uint8 and len(sized.y_test) == 24
    assert b.source_digest == sized.source_digest  # the same dataset and version


def test_unknown_tfds_name_is_a_user_error():
    pytest.importorskip("tensorflow_datasets")
    _user_error("tfds:no_such_dataset_xyz", "no_such_dataset_xyz")


def test_unknown_source_is_a_user_error(tmp_path):
    msg = _user_error("imagenet-ish", "not found", "mnist")
    assert "tfds:" in msg


def _no_network(monkeypatch, tmp_path):
    """Every HTTP(S) request goes through a proxy on a closed local port: no network, whatever the machine has."""
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))  # nothing prepared there


def test_tfds_without_network_is_a_one_line_user_error_at_once(monkeypatch, tmp_path):
    import tensorflow_datasets as tfds

    _no_network(monkeypatch, tmp_path)
    called = []
    real = tfds.builder

    def builder(name, **kw):
        b = real(name, **kw)
        monkeypatch.setattr(b, "download_and_prepare", lambda *a, **k: called.append(1))
        return b

    monkeypatch.setattr(tfds, "builder", builder)
    with pytest.raises(UserError) as exc:
        data.load("tfds:mnist")  # a real builder: its download hosts are known, and none answers
    message = str(exc.value)
    assert "\n" not in message and not called  # refused before tfds' own retries (minutes) begin
    assert "cannot download tfds dataset 'mnist'" in message and "storage.googleapis.com cannot be reached" in message
    assert "TFDS_DATA_DIR" in message


def test_a_tfds_download_that_fails_midway_is_a_one_line_user_error(monkeypatch):
    import tensorflow_datasets as tfds

    builder = tfds.builder("mnist")

    def no_network(*args, **kwargs):
        raise ConnectionError("Failed to establish a new connection: [Errno 101] Network is unreachable")

    monkeypatch.setattr(builder, "download_and_prepare", no_network)
    monkeypatch.setattr(builder, "is_prepared", lambda: True)  # the hosts answered; the transfer itself failed
    monkeypatch.setattr(tfds, "builder", lambda name, **kw: builder)
    with pytest.raises(UserError) as exc:
        data.load("tfds:mnist")
    message = str(exc.value)
    assert "\n" not in message
    assert "cannot get tfds dataset 'mnist'" in message and "Network is unreachable" in message
