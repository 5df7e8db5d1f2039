"""Images from a teacher alone (DeepInversion): the BN-statistics loss against NumPy, determinism, and that the
optimisation moves a batch's statistics towards the ones the teacher recorded."""
import numpy as np
import pytest

from edge_kd import datafree
from edge_kd.errors import UserError
from edge_kd.keras import keras, tf

layers = keras.layers


def _bn_teacher(seed=0):
    """conv → BN → ReLU → conv → BN → ReLU → GAP → logits, its BN moving statistics set to known values."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1))
    x = layers.Conv2D(4, 3, padding="same", name="c1")(inp)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU()(x)
    x = layers.Conv2D(6, 3, padding="same", name="c2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.ReLU()(x)
    out = layers.Dense(3, name="logits")(layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    rng = np.random.default_rng(seed)
    for name, c in (("bn1", 4), ("bn2", 6)):
        bn = model.get_layer(name)
        bn.moving_mean.assign(rng.normal(0.0, 0.2, c).astype(np.float32))
        bn.moving_variance.assign(rng.uniform(0.02, 0.1, c).astype(np.float32))
    return model


def _reference(model, x):
    """The loss in NumPy: the BN inputs computed layer by layer (conv as a sum over the 3×3 window)."""
    def conv(a, layer):
        k, b = (w.numpy() for w in layer.weights)
        p = np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))
        out = np.zeros(a.shape[:3] + (k.shape[-1],))
        for i in range(3):
            for j in range(3):
                out += p[:, i:i + a.shape[1], j:j + a.shape[2]] @ k[i, j]
        return out + b

    def bn(a, layer):
        g, beta, m, v = (w.numpy() for w in layer.weights)
        return np.maximum(g * (a - m) / np.sqrt(v + layer.epsilon) + beta, 0)

    total, a = 0.0, x.astype(np.float64)
    for c, b in (("c1", "bn1"), ("c2", "bn2")):
        a = conv(a, model.get_layer(c))
        layer = model.get_layer(b)
        total += np.linalg.norm(a.mean((0, 1, 2)) - layer.moving_mean.numpy())
        total += np.linalg.norm(a.var((0, 1, 2)) - layer.moving_variance.numpy())
        a = bn(a, layer)
    return total


def test_bn_statistics_loss_matches_numpy_and_the_layers_are_restored():
    model = _bn_teacher()
    x = np.random.default_rng(1).uniform(0, 1, (5, 8, 8, 1)).astype(np.float32)
    bn = datafree.batchnorm_layers(model)
    assert [layer.name for layer in bn] == ["bn1", "bn2"]
    with datafree.recording(bn) as seen:
        model(x, training=False)
    assert [layer.name for layer, _ in seen] == ["bn1", "bn2"]
    np.testing.assert_allclose(float(datafree.bn_statistics_loss(seen)), _reference(model, x), rtol=1e-5)
    with datafree.recording(bn) as again:
        pass
    model(x, training=False)
    assert again == []  # outside the block nothing is recorded


def test_the_bn_layers_of_a_nested_model_are_found():
    inner = _bn_teacher()
    inp = keras.Input((8, 8, 1))
    outer = keras.Model(inp, inner(inp))
    assert [layer.name for layer in datafree.batchnorm_layers(outer)] == ["bn1", "bn2"]


def _config(**kw):
    return datafree.InversionConfig(**{"steps": 30, "learning_rate": 0.1, "jitter": 1, **kw})


def test_synthesis_is_the_same_for_a_seed_and_moves_the_statistics_towards_the_recorded_ones():
    model = _bn_teacher()
    labels = datafree.balanced_labels(12, 3, seed=0)
    images = datafree.Inverter(model, (8, 8, 1), config=_config()).synthesize(labels, seed=3)
    assert images.dtype == np.uint8 and images.shape == (12, 8, 8, 1)
    again = datafree.Inverter(model, (8, 8, 1), config=_config()).synthesize(labels, seed=3)
    np.testing.assert_array_equal(images, again)
    other = datafree.Inverter(model, (8, 8, 1), config=_config()).synthesize(labels, seed=4)
    assert not np.array_equal(images, other)
    noise = np.random.default_rng(0).integers(0, 256, images.shape).astype(np.float32) / 255
    assert _reference(model, images.astype(np.float32) / 255) < 0.5 * _reference(model, noise)


def test_a_teacher_without_batch_normalization_is_refused_with_the_reason():
    inp = keras.Input((8, 8, 1))
    model = keras.Model(inp, layers.Dense(3)(layers.Flatten()(inp)))
    with pytest.raises(UserError, match="no BatchNormalization layer: DeepInversion matches the statistics"):
        datafree.Inverter(model, (8, 8, 1))


def test_balanced_labels_hold_every_class_equally_and_depend_on_the_seed():
    labels = datafree.balanced_labels(23, 10, seed=0)
    counts = np.bincount(labels, minlength=10)
    assert counts.sum() == 23 and set(counts) == {2, 3} and (counts == 3).sum() == 3
    assert not np.array_equal(labels, datafree.balanced_labels(23, 10, seed=1))


def test_the_adaptive_term_adds_its_weight_times_one_minus_the_js_divergence():
    teacher = _bn_teacher(0)
    inp = keras.Input((8, 8, 1))
    student = keras.Model(inp, layers.Dense(3)(layers.Flatten()(inp)))
    x = np.random.default_rng(2).uniform(0, 1, (6, 8, 8, 1)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
    inv = datafree.Inverter(teacher, (8, 8, 1), config=_config())
    plain, adaptive = inv.losses(x, labels), inv.losses(x, labels, student, adaptive=0.5)

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(teacher(x).numpy().astype(np.float64)), softmax(student(x).numpy().astype(np.float64))
    m = (p + q) / 2
    js = np.mean(0.5 * (p * np.log(p / m)).sum(-1) + 0.5 * (q * np.log(q / m)).sum(-1))
    assert "js" not in plain and float(adaptive["js"]) == pytest.approx(js, rel=1e-4)
    assert float(adaptive["total"]) == pytest.approx(float(plain["total"]) + 0.5 * (1 - js), rel=1e-5)


def _companion(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1))
    return keras.Model(inp, layers.Dense(3)(layers.Flatten()(inp)))


def _synthesizer(**config):
    cfg = datafree.GeneratorConfig(**{"latent": 8, "rounds": 1, "student_steps": 1, **config})
    return datafree.AdversarialSynthesizer(_bn_teacher(), _companion(), (8, 8, 1), 3, config=cfg, batch_size=16,
                                           seed=5)


def test_the_generator_is_the_same_for_a_seed_and_resumes_where_it_stopped():
    straight = _synthesizer()
    straight.train(5)
    labels = datafree.balanced_labels(12, 3, seed=0)
    images = straight.sample(labels, seed=1)
    assert images.dtype == np.uint8 and images.shape == (12, 8, 8, 1)
    stopped = _synthesizer()
    stopped.train(3)
    state = stopped.state()
    resumed = _synthesizer()  # a new process: fresh models and optimizers, then the saved state
    resumed.restore(state)
    resumed.train(2)
    np.testing.assert_allclose(resumed.sample(labels, seed=1), images, atol=1)  # (uint8 rounding of equal floats)
    assert not np.array_equal(straight.sample(labels, seed=2), images)


def test_both_syntheses_report_to_the_callback_every_report_every_steps_and_at_the_last(monkeypatch):
    monkeypatch.setattr(datafree, "REPORT_EVERY", 2)
    seen = []

    def report(step, terms):  # the step, and the terms that came as Python floats
        seen.append((step, {k for k, v in terms.items() if isinstance(v, float)}))

    labels = datafree.balanced_labels(6, 3, seed=0)
    datafree.Inverter(_bn_teacher(), (8, 8, 1), config=_config(steps=5)).synthesize(labels, seed=0, callback=report)
    assert [step for step, _ in seen] == [2, 4, 5] and all({"ce", "bn", "total"} <= k for _, k in seen)
    seen.clear()
    s = _synthesizer()
    s.train(1)
    s.train(3, callback=report)  # its iterations 2-4 in all: reported after its 2nd (step 3) and its last (4)
    assert [step for step, _ in seen] == [3, 4] and all({"ce", "bn", "gap", "student_l1"} <= k for _, k in seen)


def test_training_the_generator_moves_its_statistics_towards_the_recorded_ones():
    s = _synthesizer(learning_rate=1e-2, adversarial=0.0, diversity=0.0)  # the BN-statistics loss alone
    labels = datafree.balanced_labels(16, 3, seed=0)
    before = _reference(s.teacher, s.sample(labels, seed=1).astype(np.float32) / 255)
    s.train(60)
    after = _reference(s.teacher, s.sample(labels, seed=1).astype(np.float32) / 255)
    assert after < 0.5 * before


def test_the_adversarial_term_pulls_the_generator_to_where_student_and_teacher_differ():
    """The same generator steps raise the teacher-student gap on a fixed batch of noise more with the adversarial
    term weighted than without it."""
    gaps = []
    for weight in (0.0, 50.0):
        s = _synthesizer(adversarial=weight, bn_weight=0.0, diversity=0.0, learning_rate=5e-2)
        z, y = s._draw(tf.constant(0), tf.constant(0))

        def gap():
            x = s._inputs(s.generator([z, y], training=True))
            return float(np.mean(np.abs(s.teacher(x, training=False) - s.student(x, training=False))))

        start = gap()
        for i in range(5):
            s._g_step(tf.constant(i, tf.int32))
        gaps.append(gap() - start)
    assert gaps[1] > gaps[0]


def test_the_generator_is_as_wide_as_its_filters_say():
    g = datafree.build_generator((10, 10, 1), 3, latent=8, seed=0, filters=(6, 4))
    convs = [layer.filters for layer in g.layers if isinstance(layer, layers.Conv2D)]
    assert convs == [6, 4, 1] and g.output_shape == (None, 10, 10, 1)  # 12 × 12 cropped to 10 × 10
    assert next(layer for layer in g.layers if isinstance(layer, layers.Reshape)).target_shape == (3, 3, 6)
    s = _synthesizer(filters=[5, 2])  # the synthesizer builds the generator its config asks for
    assert [layer.filters for layer in s.generator.layers if isinstance(layer, layers.Conv2D)] == [5, 2, 1]


def test_the_generator_draws_whole_batches_whatever_the_count():
    s = _synthesizer()
    labels = datafree.balanced_labels(17, 3, seed=0)  # a batch of 16 and one more
    images = s.sample(labels, seed=1)
    assert images.shape == (17, 8, 8, 1)
    # the 17th image is made in a full batch (the first 15 classes again beside it), not alone
    alone = np.round(255.0 * s.generator([tf.random.stateless_normal((32, 8), [1, 1])[16:17], labels[16:17]],
                                         training=True).numpy()).astype(np.uint8)
    assert not np.array_equal(images[16:], alone)


def test_mode_seeking_is_the_mean_image_over_noise_distance_of_the_same_class_pairs(rng):
    images, noise = rng.random((6, 4, 4, 1)).astype(np.float32), rng.normal(size=(6, 3)).astype(np.float32)
    labels = np.array([0, 1, 0, 2, 0, 1], np.int32)
    ratios = [np.mean(np.abs(images[i] - images[j])) / np.mean(np.abs(noise[i] - noise[j]))
              for i in range(6) for j in range(6) if i != j and labels[i] == labels[j]]
    assert len(ratios) == 8  # class 0: 3 × 2 ordered pairs, class 1: 2, class 2: none
    got = float(datafree.mode_seeking(tf.constant(images), tf.constant(noise), tf.constant(labels)))
    assert got == pytest.approx(np.mean(ratios), rel=1e-5)
    assert float(datafree.mode_seeking(tf.constant(images), tf.constant(noise), tf.range(6))) == 0.0  # no pair


def test_the_diversity_term_spreads_the_images_of_a_class():
    """The same generator steps leave one class's images (one noise batch) further apart with the diversity term
    weighted than without it, and the step reports the term."""
    spread = []
    for weight in (0.0, 20.0):
        s = _synthesizer(diversity=weight, adversarial=0.0, learning_rate=5e-2)
        for i in range(8):
            terms = s._g_step(tf.constant(i, tf.int32))
        assert ("diversity" in terms) == (weight > 0)
        x = s.sample(np.zeros(16, np.int32), seed=3).astype(np.float32) / 255
        spread.append(float(x.std(0).mean()))
    assert spread[1] > 1.5 * spread[0], spread


_ONE_PROCESS = """
import hashlib, sys
from edge_kd.datafree import AdversarialSynthesizer
from pipelines import recipe, run_data, run_models
from pipelines.context import Context
ctx = Context(recipe.load("fashion_mnist_datafree"), sys.argv[1], "test")
info, g = run_data.load(ctx).info, ctx.recipe.stages.synthesize.generator
s = AdversarialSynthesizer(run_models.teacher(ctx), run_models.build_student(ctx), info.input_shape, info.num_classes,
                           info.input_scale, info.input_offset, config=g, batch_size=128, seed=0)
s.train(4)
print(hashlib.sha256(b"".join(w.numpy().tobytes() for w in s.generator.weights)).hexdigest())
"""


@pytest.mark.slow
def test_the_generator_for_the_shipped_resnet_teacher_is_the_same_in_every_process(tmp_path):
    """With Grappler optimising the compiled step, 4 iterations at batch 128 against builtin:fashion_mnist left other
    generator weights in each of three processes (measured); datafree.exact_graphs makes them bit for bit equal."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    digests = {subprocess.run([sys.executable, "-c", _ONE_PROCESS, str(tmp_path)], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip().splitlines()[-1] for _ in range(2)}
    assert len(digests) == 1, digests


def test_exact_graphs_turns_grappler_off_inside_and_restores_what_was_set():
    assert not tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)
    with datafree.exact_graphs():
        assert tf.config.optimizer.get_experimental_options()["disable_meta_optimizer"]
    assert not tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)
