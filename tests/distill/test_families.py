"""Every distillation family inside the Distiller: training a tiny student, plain and pruning-/QAT-wrapped,
several teachers, the mean teacher, mutual learning, and the epoch clock that warm-ups read.

The terms' values are checked against NumPy in test_losses/test_hints/test_relational/test_soft_targets.
"""
import numpy as np
import pytest

import models
from edge_kd.tfmot import prune, qat
from edge_kd.distill import Distiller, adapt_teacher, losses
from edge_kd.keras import keras, tf
from .np_reference import np_ce, np_kl, np_log_softmax

BATCH = 32

# Each family as a recipe would name it, with layers of the cnn models below.
FAMILIES = {
    "hinton": {"temperature": 4.0},
    "fitnet": {"student_layer": "block2_relu", "teacher_layer": "block2_relu"},
    "at": {"pairs": [["block1_relu", "block1_relu"], ["block2_relu", "block2_relu"]]},
    "rkd": {"student_layer": "flatten", "teacher_layer": "flatten", "distance_weight": 1.0, "angle_weight": 2.0},
    "crd": {"student_layer": "flatten", "teacher_layer": "flatten", "dim": 16, "bank_size": 64},
    "dkd": {"warmup_epochs": 0.0, "beta": 2.0},
    "virtual_teacher": {},
}


@pytest.fixture(scope="module")
def small(mnist):
    """540 training and 200 validation images of the shared MNIST slice (19 steps an epoch at batch 32)."""
    (x, y), val, _ = mnist
    return (x[:540], y[:540]), val


def _student(seed=1):
    keras.utils.set_random_seed(seed)
    return models.build("cnn", (28, 28, 1), 10, filters=(4, 8))


def _term(name):
    return losses.get(name, weight=1.0, **FAMILIES[name])


def _fit(d, small, epochs, callbacks=(), lr=3e-3):
    (x, y), (xv, yv) = small
    d.compile(optimizer=keras.optimizers.Adam(lr))
    return d.fit(x, y, batch_size=BATCH, epochs=epochs, validation_data=(xv, yv), verbose=0,
                 callbacks=list(callbacks)).history


def _term_value(d, small):
    """The Distiller's term values on the validation images (test_step's figures, no training)."""
    _, (xv, yv) = small
    student, teachers, _, _, values, _ = d._compute_losses(tf.constant(xv), tf.constant(yv), training=False)
    return [float(v) for v in values]


def test_every_family_is_registered():
    assert set(FAMILIES) <= set(losses.available())


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_trains_a_tiny_student(name, small, teacher):
    term = _term(name)
    d = Distiller(_student(), None if not term.needs_teacher else teacher, terms=[term], hard_weight=0.5)
    own_before = [v.numpy().copy() for v in term.trainable_variables]  # built when the Distiller was made
    teacher_before = [w.copy() for w in teacher.get_weights()]
    before = _term_value(d, small)[0]
    history = _fit(d, small, epochs=4)
    after = _term_value(d, small)[0]
    assert np.isfinite(history["loss"]).all()
    assert after < before, f"{name}: {before} -> {after}"
    assert history["val_accuracy"][-1] > 0.6
    # the term's own variables (adapters, heads) trained; the teacher did not move
    assert len(own_before) == {"fitnet": 2, "crd": 4}.get(name, 0)  # fitnet's 1×1 conv; crd's two dense heads
    for v, b in zip(term.trainable_variables, own_before):
        assert not np.array_equal(v.numpy(), b), f"{name}: {v.name} did not train"
    assert all(np.array_equal(a, b) for a, b in zip(teacher.get_weights(), teacher_before))
    assert not teacher.trainable


@pytest.mark.parametrize("wrap", ["pruned", "qat"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_trains_a_pruning_or_qat_wrapped_student(name, wrap, small, teacher):
    (x, _), _ = small
    steps = int(np.ceil(len(x) / BATCH))
    student = _student()
    callbacks = []
    if wrap == "pruned":
        cfg = prune.PruneConfig(target_sparsity=0.5, schedule="constant", frequency=1, end_step=steps)
        student = prune.prune(student, cfg, total_steps=steps)
        callbacks = prune.callbacks()
    else:
        student = qat.quantize(student)
    term = _term(name)
    d = Distiller(student, None if not term.needs_teacher else teacher, terms=[term], hard_weight=0.5)
    history = _fit(d, small, epochs=1, callbacks=callbacks, lr=1e-2)  # one short epoch: a brisk rate
    assert np.isfinite(history["loss"]).all() and np.isfinite(history[name]).all()
    assert history["val_accuracy"][-1] > 0.2  # above chance after one epoch of 17 steps (measured: 0.37 to 0.74)
    if wrap == "pruned":
        kernel = prune.strip(student).get_layer("block2_conv").kernel.numpy()
        assert np.mean(kernel == 0) == pytest.approx(0.5, abs=0.02)


# -- several teachers ----------------------------------------------------------------------------
def _fixed_logits_model(logits):
    """A model of (B, 1) row indices that returns row i of ``logits`` exactly (an embedding lookup)."""
    inp = keras.Input((1,), dtype="int32")
    emb = keras.layers.Embedding(len(logits), logits.shape[1])
    model = keras.Model(inp, keras.layers.Flatten()(emb(inp)))
    emb.set_weights([logits.astype(np.float32)])
    return model


@pytest.mark.parametrize("combine", ["fixed", "confidence"])
def test_several_teachers_combine_by_fixed_weights_or_per_example_confidence(combine):
    r = np.random.default_rng(7)
    B, K, T = 12, 5, 3.0
    s, t1, t2 = (r.normal(size=(B, K)) * 2 for _ in range(3))
    y = r.integers(0, K, size=B)
    d = Distiller(_fixed_logits_model(s), [_fixed_logits_model(t1), _fixed_logits_model(t2)],
                  terms=[losses.get("hinton", temperature=T)], teacher_weights=[1.0, 3.0], combine=combine)
    x = tf.constant(np.arange(B).reshape(B, 1), tf.int32)
    _, _, _, _, values, _ = d._compute_losses(x, tf.constant(y), training=False)
    h1, h2 = T * T * np_kl(t1, s, T), T * T * np_kl(t2, s, T)
    if combine == "fixed":
        expected = 0.25 * h1.mean() + 0.75 * h2.mean()
    else:
        ce = np.stack([-np_log_softmax(t)[np.arange(B), y] for t in (t1, t2)])
        w = np.exp(-ce) / np.exp(-ce).sum(0)
        expected = (w[0] * h1 + w[1] * h2).mean()
    np.testing.assert_allclose(float(values[0]), expected, rtol=1e-5)


def test_a_feature_term_reads_the_first_teacher_and_a_logit_term_all(small, teacher):
    (x, y), _ = small
    other = _student(seed=9)
    terms = lambda: [losses.get("hinton", temperature=4.0), _term("at")]  # noqa: E731
    both = Distiller(_student(), [teacher, other], terms=terms(), teacher_weights=[0.5, 0.5])
    first = Distiller(_student(), teacher, terms=terms())
    second = Distiller(_student(), other, terms=terms())
    xb, yb = tf.constant(x[:64]), tf.constant(y[:64])
    v_both, v_first, v_second = (d._compute_losses(xb, yb, training=False)[4] for d in (both, first, second))
    np.testing.assert_allclose(float(v_both[0]), 0.5 * float(v_first[0]) + 0.5 * float(v_second[0]), rtol=1e-5)
    np.testing.assert_allclose(float(v_both[1]), float(v_first[1]), rtol=1e-6)


def test_teachers_of_other_architectures_input_sizes_and_heads_train_a_student(small, teacher):
    """A logits cnn at 28×28 and a softmax-headed MLP at 32×32 (adapted) teach one student by confidence."""
    (x, y), _ = small
    keras.utils.set_random_seed(3)
    inp = keras.Input((32, 32, 1))
    h = keras.layers.Flatten()(inp)
    h = keras.layers.Dense(64, activation="relu")(h)
    big = keras.Model(inp, keras.layers.Dense(10, activation="softmax")(h))
    big.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    big.fit(tf.image.resize(x, (32, 32)).numpy(), y, batch_size=BATCH, epochs=3, verbose=0)
    adapted, info = adapt_teacher(big, (28, 28, 1), 10, data_scale=1 / 255, data_offset=0.0, sample=x[:32])
    assert info["head"] == "softmax" and tuple(info["input_shape"])[:2] == (32, 32)
    d = Distiller(_student(), [teacher, adapted], terms=[losses.get("hinton", temperature=4.0, weight=0.7)],
                  hard_weight=0.3, combine="confidence")
    history = _fit(d, small, epochs=3)
    assert history["hinton"][-1] < history["hinton"][0]
    assert history["val_accuracy"][-1] > 0.6


def test_one_source_of_knowledge_and_valid_teacher_weights(teacher):
    hint = [losses.get("hinton")]
    with pytest.raises(ValueError, match="one source"):
        Distiller(_student(), teacher, terms=hint, ema_decay=0.9)
    with pytest.raises(ValueError, match="teacher_weights"):
        Distiller(_student(), [teacher, teacher], terms=hint, teacher_weights=[1.0])
    with pytest.raises(ValueError, match="need a teacher"):
        Distiller(_student(), terms=hint)
    with pytest.raises(ValueError, match="only terms on logits"):
        Distiller(_student(), terms=[_term("at")], peers=[_student(seed=2)])
    Distiller(_student(), terms=[losses.get("virtual_teacher")])  # needs none


# -- mean teacher ---------------------------------------------------------------------------------
@pytest.mark.parametrize("wrap", ["plain", "pruned"])
def test_mean_teacher_is_the_exponential_moving_average_of_the_student(wrap, small):
    (x, y), _ = small
    student = _student()
    callbacks = []
    if wrap == "pruned":
        cfg = prune.PruneConfig(target_sparsity=0.5, schedule="constant", frequency=1, end_step=10)
        student = prune.prune(student, cfg, total_steps=10)
        callbacks = prune.callbacks()
    decay = 0.9
    d = Distiller(student, terms=[losses.get("hinton", temperature=2.0)], ema_decay=decay)
    mean = d.teacher
    assert mean is not student and not mean.trainable
    for a, b in zip(mean.get_weights(), student.get_weights()):
        np.testing.assert_array_equal(a, b)
    trainable = {id(v) for v in student.trainable_variables}
    previous = [w.numpy().copy() for w in mean.weights]
    d.compile(optimizer=keras.optimizers.Adam(1e-2))
    d.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, epochs=1, verbose=0, callbacks=callbacks)
    for m, s, p in zip(mean.weights, student.weights, previous):
        expected = decay * p + (1 - decay) * s.numpy() if id(s) in trainable else s.numpy()
        if wrap == "pruned" and id(s) in trainable:
            # the mean teacher carries the student's masks, so its pruned weights are zero too
            expected = np.where(s.numpy() == 0, 0.0, expected)
        np.testing.assert_allclose(m.numpy(), expected, rtol=1e-5, atol=1e-7)
    history = _fit(d, small, epochs=3, callbacks=callbacks)
    assert history["val_accuracy"][-1] > (0.6 if wrap == "plain" else 0.5)  # chance: 0.1


# -- online mutual learning -----------------------------------------------------------------------
def test_mutual_learning_trains_student_and_peers_each_from_the_others(small):
    (x, y), _ = small
    student, peer = _student(seed=1), _student(seed=2)
    T = 1.0
    d = Distiller(student, terms=[losses.get("hinton", temperature=T)], hard_weight=1.0, peers=[peer])
    xb, yb = x[:64], y[:64]
    s_dict, _, total, hard, values, peer_total = d._compute_losses(tf.constant(xb), tf.constant(yb), training=False)
    s, p = student(xb).numpy(), peer(xb).numpy()
    np.testing.assert_allclose(float(total), np_ce(yb, s) + T * T * np_kl(p, s, T).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(peer_total), np_ce(yb, p) + T * T * np_kl(s, p, T).mean(), rtol=1e-5)
    # the student's objective sends no gradient into the peer
    with tf.GradientTape() as tape:
        _, _, total, _, _, _ = d._compute_losses(tf.constant(xb), tf.constant(yb), training=True)
    assert all(g is None for g in tape.gradient(total, peer.trainable_variables))

    peer_before = [w.copy() for w in peer.get_weights()]
    history = _fit(d, small, epochs=3)
    assert "peer_loss" in history and history["peer_loss"][-1] < history["peer_loss"][0]
    assert history["val_accuracy"][-1] > 0.6
    assert any(not np.array_equal(a, b) for a, b in zip(peer_before, peer.get_weights()))


# -- the epoch clock ------------------------------------------------------------------------------
class _EpochProbe(losses.LossTerm):
    """Reports the epoch the Distiller passes to terms (weight 0: it does not train anything)."""

    name = "epoch_probe"
    needs_teacher = False

    def __call__(self, student, teacher, y):
        return student["epoch"]


def test_terms_see_the_fractional_epoch_of_each_training_step(small):
    (x, y), _ = small
    n = 60
    d = Distiller(_student(), terms=[_EpochProbe(weight=0.0)])
    d.compile(optimizer="adam")
    history = d.fit(x[:n], y[:n], batch_size=10, epochs=3, verbose=0, shuffle=False).history
    # 6 steps per epoch, the term sees e + i/6 at step i; the metric is the per-sample mean over the epoch.
    np.testing.assert_allclose(history["epoch_probe"], [e + 2.5 / 6 for e in range(3)], rtol=1e-6)
