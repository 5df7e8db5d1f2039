"""Augmentation: deterministic for a seed, what the teacher sees, MixUp/CutMix against NumPy, the teacher cache."""
import numpy as np
import pytest

from edge_kd.augment import AugmentConfig, Augmenter, cutmix_box, mix
from edge_kd.distill import Distiller, losses
from edge_kd.errors import UserError
from edge_kd.keras import keras, tf


def _images(n=8, seed=0):
    return np.random.default_rng(seed).random((n, 12, 10, 1), dtype=np.float32)


def test_same_seed_and_step_give_the_same_view_and_others_differ():
    cfg = AugmentConfig(translate=2, flip=True, rotate=10.0, zoom=0.1, mixup=0.4, cutmix=1.0)
    x = tf.constant(_images())
    a, (pa, la) = Augmenter(cfg, seed=3)(x, 5)
    b, (pb, lb) = Augmenter(cfg, seed=3)(x, 5)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(pa.numpy(), pb.numpy())
    assert float(la) == float(lb)
    assert not np.array_equal(a.numpy(), Augmenter(cfg, seed=3)(x, 6)[0].numpy())
    assert not np.array_equal(a.numpy(), Augmenter(cfg, seed=4)(x, 5)[0].numpy())


def test_translation_is_pad_and_crop_with_whole_pixels():
    """Every view of a whole-pixel shift is the image shifted by (dy, dx) in [-2, 2], the rest black."""
    x = _images(16)
    out = Augmenter(AugmentConfig(translate=2), seed=0).view(tf.constant(x), tf.constant([1, 2], tf.int64)).numpy()
    h, w = x.shape[1:3]
    shifts = []
    for img, view in zip(x, out):
        padded = np.pad(img, ((2, 2), (2, 2), (0, 0)))
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if np.array_equal(view, padded[2 - dy:2 - dy + h, 2 - dx:2 - dx + w])]
        assert found, "a view that is no pad-and-crop of its image"
        shifts.append(found[0])
    assert len(set(shifts)) > 3  # the shifts are drawn per image


def test_flip_mirrors_about_the_vertical_axis():
    x = _images(32)
    out = Augmenter(AugmentConfig(flip=True), seed=0).view(tf.constant(x), tf.constant([0, 0], tf.int64)).numpy()
    flipped = [np.array_equal(v, i[:, ::-1]) for i, v in zip(x, out)]
    kept = [np.array_equal(v, i) for i, v in zip(x, out)]
    assert all(f or k for f, k in zip(flipped, kept)) and 4 < sum(flipped) < 28


def test_rotation_by_a_small_angle_moves_pixels_but_keeps_the_centre():
    x = np.zeros((4, 11, 11, 1), np.float32)
    x[:, 5, :, 0] = 1.0  # a horizontal bar through the centre
    out = Augmenter(AugmentConfig(rotate=30.0), seed=0).view(tf.constant(x), tf.constant([0, 1], tf.int64)).numpy()
    assert np.allclose(out[:, 5, 5, 0], 1.0, atol=1e-5)
    assert not np.allclose(out, x, atol=1e-3)


def test_mixup_mixes_images_labels_and_soft_targets_as_numpy_does():
    aug = Augmenter(AugmentConfig(mixup=0.4), seed=1)
    x = _images(6)
    y = np.arange(6) % 3
    soft = np.random.default_rng(2).random((6, 3)).astype(np.float32)
    mixed, (perm, lam) = aug(tf.constant(x), 7)
    perm, lam = perm.numpy(), float(lam)
    assert sorted(perm) == list(range(6)) and 0.0 <= lam <= 1.0
    np.testing.assert_allclose(mixed.numpy(), lam * x + (1 - lam) * x[perm], rtol=1e-6, atol=1e-6)
    onehot = np.eye(3, dtype=np.float32)[y]
    np.testing.assert_allclose(mix(tf.constant(onehot), perm, lam).numpy(), lam * onehot + (1 - lam) * onehot[perm],
                               rtol=1e-6)
    np.testing.assert_allclose(mix(tf.constant(soft), perm, lam).numpy(), lam * soft + (1 - lam) * soft[perm],
                               rtol=1e-6)


def test_cutmix_pastes_one_box_and_lambda_is_its_complement():
    aug = Augmenter(AugmentConfig(cutmix=1.0), seed=5)
    x = _images(6)
    for step in range(5):
        mixed, (perm, lam) = aug(tf.constant(x), step)
        perm, lam, mixed = perm.numpy(), float(lam), mixed.numpy()
        from_other = np.all(mixed == x[perm], axis=(0, 3)) & np.any(x != x[perm], axis=(0, 3))
        rows, cols = np.nonzero(from_other)
        area = 0 if rows.size == 0 else (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        reference = x.copy()
        if rows.size:
            reference[:, rows.min():rows.max() + 1, cols.min():cols.max() + 1] = \
                x[perm][:, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        np.testing.assert_array_equal(mixed, reference)
        assert lam == pytest.approx(1 - area / (12 * 10), abs=1e-6)


def test_cutmix_box_is_clipped_to_the_image():
    for seed in range(20):
        top, left, bh, bw = (int(v) for v in cutmix_box(12, 10, tf.constant(0.2), tf.constant([seed, 0], tf.int64)))
        assert 0 <= top and top + bh <= 12 and 0 <= left and left + bw <= 10


def test_config_refuses_bad_values_in_one_line():
    with pytest.raises(UserError, match=r"augment.zoom"):
        AugmentConfig(zoom=1.5)
    with pytest.raises(UserError, match=r"augment.translate"):
        AugmentConfig(translate=-1)


class _Recorder(keras.layers.Layer):
    """Passes its input through and keeps the last batch it saw (eagerly)."""

    def call(self, x):
        self.seen = x
        return x


def _recording_teacher():
    inp = keras.Input((12, 10, 1))
    rec = _Recorder(name="recorder")
    out = keras.layers.Dense(3, name="logits")(keras.layers.Flatten()(rec(inp)))
    return keras.Model(inp, out), rec


def _student():
    inp = keras.Input((12, 10, 1))
    keras.utils.set_random_seed(0)
    return keras.Model(inp, keras.layers.Dense(3, name="logits")(keras.layers.Flatten()(inp)))


@pytest.mark.parametrize("consistent", [True, False])
def test_the_teacher_sees_the_students_pixels_unless_the_view_is_fixed(consistent):
    teacher, rec = _recording_teacher()
    student = _student()
    seen_by_student = []
    orig = student.call

    def record(x, *a, **k):
        seen_by_student.append(x)
        return orig(x, *a, **k)

    student.call = record
    aug = Augmenter(AugmentConfig(translate=2, flip=True, mixup=0.5), seed=0)
    d = Distiller(student, teacher, terms=[losses.get("hinton", weight=1.0)], augment=aug, consistent=consistent)
    d.compile(optimizer=keras.optimizers.SGD(0.0), run_eagerly=True)
    x = _images(8)
    y = np.arange(8) % 3
    seen_by_student.clear()
    d.train_step((tf.constant(x), tf.constant(y)))
    view = seen_by_student[-1].numpy()
    assert not np.allclose(view, x)  # it was augmented
    np.testing.assert_array_equal(rec.seen.numpy(), view if consistent else x)


def test_the_cached_teacher_loss_equals_the_uncached_one_and_no_teacher_runs():
    teacher, rec = _recording_teacher()
    x, y = _images(8), np.arange(8) % 3
    cfg = AugmentConfig(translate=1, mixup=0.4, cutmix=0.4)

    def one_step(cached):
        d = Distiller(_student(), teacher, terms=[losses.get("hinton", weight=0.7, temperature=2.0),
                                                  losses.get("dkd", weight=0.3)],
                      hard_weight=0.5, augment=Augmenter(cfg, seed=9), consistent=False)
        d.compile(optimizer=keras.optimizers.SGD(0.0), run_eagerly=True)
        inputs = tf.constant(x)
        if cached:
            inputs = {"image": inputs, "teacher_logits": d.teacher_logits(inputs)}
        rec.seen = None
        logs = d.train_step((inputs, tf.constant(y)))
        return {k: float(v) for k, v in logs.items()}, rec.seen

    plain, seen = one_step(False)
    assert seen is not None
    cached, seen = one_step(True)
    assert seen is None  # the teacher did not run in the step
    assert cached == pytest.approx(plain, rel=1e-6, abs=1e-7)


def test_a_cached_run_trains_from_the_dataset_without_calling_the_teacher(mnist):
    from edge_kd import data, train

    calls = []

    class Counting(keras.layers.Layer):
        def call(self, x):
            calls.append(1)  # traced: one entry per trace of a function that runs the teacher
            return x

    inp = keras.Input((28, 28, 1))
    teacher = keras.Model(inp, keras.layers.Dense(10)(keras.layers.Flatten()(Counting()(inp))))
    b = data.load("mnist", limit_train=600, limit_test=100)
    student = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
    d = Distiller(student, teacher, [losses.get("hinton", weight=0.5)], hard_weight=0.5, consistent=False,
                  augment=Augmenter(AugmentConfig(translate=2), 0))
    cache = {s: np.concatenate([d.teacher_logits(tf.constant(b.arrays(s)[0][i:i + 256])).numpy()
                                for i in range(0, len(b.arrays(s)[0]), 256)]) for s in ("train", "val")}
    calls.clear()
    train.fit(d, b.dataset("train", 64, shuffle=True, teacher_logits=cache["train"]), 1, 1e-3,
              validation=b.dataset("val", teacher_logits=cache["val"]), verbose=0)
    assert calls == []


def test_augmentation_never_enters_the_exported_model(tmp_path):
    from edge_kd import train
    from edge_kd.export import tflite

    def ops_of(augment):
        keras.utils.set_random_seed(0)
        student = keras.Sequential([keras.Input((12, 10, 1), name="image"), keras.layers.Conv2D(4, 3),
                                    keras.layers.Flatten(), keras.layers.Dense(3, name="logits")])
        ds = tf.data.Dataset.from_tensor_slices((_images(32), np.arange(32) % 3)).batch(8)
        train.fit(Distiller(student, augment=augment), ds, 1, 1e-3, verbose=0)
        path = tmp_path / f"{augment is not None}.tflite"
        path.write_bytes(tflite.convert(student, "fp32"))
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(model_path=str(path))
        return sorted(d["op_name"] for d in interp._get_ops_details())

    full = Augmenter(AugmentConfig(translate=2, flip=True, rotate=10.0, zoom=0.1, mixup=0.2, cutmix=0.2), 0)
    assert ops_of(full) == ops_of(None)
