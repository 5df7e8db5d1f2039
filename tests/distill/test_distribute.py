"""The Distiller under tf.distribute (two logical CPU devices) and under mixed precision, against one float32 device."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edge_kd.distill import Distiller, losses
from edge_kd.keras import keras, tf
from tests.conftest import subclassed_model

# Run in a fresh process: logical devices can only be set up before TensorFlow first touches the CPU.
SCRIPT = textwrap.dedent("""
    import json, sys
    from edge_kd.keras import keras, tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np
    from edge_kd.augment import AugmentConfig, Augmenter
    from edge_kd.distill import Distiller, losses

    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 6, 6, 1)).astype(np.float32)   # 80 = 32 + 32 + 16: a short last batch
    y = rng.integers(0, 3, 80)

    def pair():
        keras.utils.set_random_seed(1)
        student = keras.Sequential([keras.layers.Input((6, 6, 1)), keras.layers.Flatten(),
                                    keras.layers.Dense(16, activation="relu", name="hidden"), keras.layers.Dense(3)])
        teacher = keras.Sequential([keras.layers.Input((6, 6, 1)), keras.layers.Flatten(name="tflat"),
                                    keras.layers.Dense(3)])
        return student, teacher

    def train(strategy, augment=None, n=80, keras3_teacher=False, **kw):
        with strategy.scope():
            student, teacher = pair()
            if keras3_teacher:  # the same teacher as a Keras 3 model, which the Distiller rebuilds in the scope
                from edge_kd import keras3
                teacher = keras3.to_keras3(teacher, "teacher")
            d = Distiller(student, teacher, terms=[losses.get("hinton", temperature=2.0, weight=0.5)],
                          hard_weight=0.5, augment=augment, **kw)
            d.compile(optimizer=keras.optimizers.SGD(0.5))
        h = d.fit(tf.data.Dataset.from_tensor_slices((x[:n], y[:n])).batch(32), epochs=3, verbose=0)
        return student, {k: [float(v) for v in vs] for k, vs in h.history.items()}

    out = {}
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out["replicas"] = mirrored.num_replicas_in_sync
    one, h1 = train(tf.distribute.OneDeviceStrategy("/cpu:0"))
    two, h2 = train(mirrored)
    _, init_teacher = pair()
    init, _ = pair()
    out["max_weight_diff"] = max(float(np.max(np.abs(a.numpy() - b.numpy()))) for a, b in zip(one.weights, two.weights))
    two_k3, _ = train(mirrored, keras3_teacher=True)
    out["keras3_teacher_diff"] = max(float(np.max(np.abs(a.numpy() - b.numpy())))
                                     for a, b in zip(two.weights, two_k3.weights))
    out["moved"] = max(float(np.max(np.abs(a.numpy() - b.numpy()))) for a, b in zip(one.weights, init.weights))
    out["history_one"], out["history_two"] = h1, h2
    _, ha = train(mirrored, augment=Augmenter(AugmentConfig(translate=1, mixup=0.2), seed=0))
    out["augmented_loss"] = ha["loss"]
    _, h65 = train(mirrored, n=65)   # the last batch holds one example: one replica gets none
    _, h65_one = train(tf.distribute.OneDeviceStrategy("/cpu:0"), n=65)
    out["short_loss"], out["short_loss_one"] = h65["loss"], h65_one["loss"]
    for name, kw in (("mean_teacher", {}), ("crd", {})):
        try:
            with mirrored.scope():
                s, t = pair()
                if name == "mean_teacher":
                    Distiller(s, ema_decay=0.9, terms=[losses.get("hinton", temperature=2.0, weight=0.5)])
                else:
                    Distiller(s, t, terms=[losses.get("crd", bank_size=16, student_layer="hidden",
                                                      teacher_layer="tflat", dim=4)])
            out[name] = "accepted"
        except ValueError as e:
            out[name] = str(e)
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def distributed():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_two_replicas_train_the_student_the_one_device_run_does(distributed):
    assert distributed["replicas"] == 2
    assert distributed["moved"] > 0.05  # three epochs of SGD at 0.5 move the weights well away from the start
    # Each replica scales its mean loss by its share of the global batch (16/32 and, in the short last
    # batch, 8/16): the summed gradient is the global batch's. Without it the step would be twice as long.
    assert distributed["max_weight_diff"] < 1e-5
    assert distributed["keras3_teacher_diff"] == 0  # a Keras 3 teacher distils as its tf_keras twin does


def test_metrics_aggregate_across_replicas(distributed):
    one, two = distributed["history_one"], distributed["history_two"]
    assert set(one) == set(two) == {"loss", "student_loss", "hinton", "accuracy"}
    for k in one:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-6)


def test_augmented_distributed_training_runs_and_per_step_state_is_refused(distributed):
    assert all(np.isfinite(distributed["augmented_loss"]))
    # a replica with no examples weighs nothing: the loss stays finite and equals the one-device run's
    np.testing.assert_allclose(distributed["short_loss"], distributed["short_loss_one"], rtol=1e-5)
    assert "mean teacher" in distributed["mean_teacher"] and "training.strategy: none" in distributed["mean_teacher"]
    assert "memory bank" in distributed["crd"] and "bank_size: 0" in distributed["crd"]


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_terms_agree_with_float32_and_float16s_loss_is_scaled(policy):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 6, 6, 1)).astype(np.float32)
    y = rng.integers(0, 3, 64)

    def pair():
        keras.utils.set_random_seed(2)
        student = keras.Sequential([keras.layers.Input((6, 6, 1)), keras.layers.Flatten(),
                                    keras.layers.Dense(16, activation="relu", name="hidden"), keras.layers.Dense(3)])
        teacher = keras.Sequential([keras.layers.Input((6, 6, 1)), keras.layers.Flatten(),
                                    keras.layers.Dense(8, activation="relu", name="feat"), keras.layers.Dense(3)])
        return student, teacher

    def terms():
        return [losses.get("hinton", temperature=4.0, weight=0.5), losses.get("dkd", weight=0.5),
                losses.get("rkd", student_layer="hidden", teacher_layer="feat", weight=1.0)]

    s32, t32 = pair()
    ref = Distiller(s32, t32, terms=terms(), hard_weight=0.3)
    _, _, total32, hard32, values32, _ = ref._compute_losses(tf.constant(x), tf.constant(y), training=False)
    keras.mixed_precision.set_global_policy(policy)
    try:
        s16, t16 = pair()
        assert s16.layers[-1].compute_dtype == policy.removeprefix("mixed_")
        d = Distiller(s16, t16, terms=terms(), hard_weight=0.3)
        student, _, total16, hard16, values16, _ = d._compute_losses(tf.constant(x), tf.constant(y), training=False)
        assert student["logits"].dtype == tf.float32 and all(v.dtype == tf.float32 for v in values16)
        for a, b in zip([total32, hard32, *values32], [total16, hard16, *values16]):
            np.testing.assert_allclose(float(b), float(a), rtol=2e-2, atol=2e-3)
        d.compile(optimizer=keras.optimizers.Adam(1e-2))
        # bfloat16 has float32's exponent range: its gradients need no scaling
        assert isinstance(d.optimizer, keras.mixed_precision.LossScaleOptimizer) == (policy == "mixed_float16")
        before = [w.numpy().copy() for w in s16.trainable_weights]
        h = d.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(32), epochs=1, verbose=0)
        assert np.isfinite(h.history["loss"][0])
        assert any(np.max(np.abs(a - b.numpy())) > 0 for a, b in zip(before, s16.trainable_weights))
        # a Keras 3 teacher (float32, as a file saved without mixed precision) under the policy: the same losses as
        # the float32 tf_keras teacher it was copied from
        from edge_kd import keras3
        totals = []
        for teacher in (t32, keras3.to_keras3(t32, "teacher")):
            s16, _ = pair()
            _, _, total, *_ = Distiller(s16, teacher, terms=terms(), hard_weight=0.3)._compute_losses(
                tf.constant(x), tf.constant(y), training=False)
            totals.append(float(total))
        assert totals[0] == totals[1]
    finally:
        keras.mixed_precision.set_global_policy("float32")


# The pipeline's stages under MirroredStrategy over two logical CPU devices, run as a command: the one-process
# reference of tests/pipelines/test_multiworker.py (test_the_pipeline_trains_under_mirrored_strategy_on_two_devices).


def test_mixed_policy_takes_the_fast_16_bit_type_of_the_host():
    from edge_kd.mixed import mixed_policy

    assert mixed_policy(False, gpu=True)[0] is None
    assert mixed_policy("bfloat16", gpu=False, cpu_flags=frozenset())[0] == "mixed_bfloat16"  # asked for: as asked
    assert mixed_policy("float16", gpu=False, cpu_flags=frozenset())[0] == "mixed_float16"
    assert mixed_policy(True, gpu=True, cpu_flags=frozenset({"amx_bf16"}))[0] == "mixed_float16"
    assert mixed_policy(True, gpu=False, cpu_flags=frozenset({"avx512f", "avx512_bf16"})) == (
        "mixed_bfloat16", "a CPU with avx512_bf16")
    policy, why = mixed_policy(True, gpu=False, cpu_flags=frozenset({"avx2", "avx512f"}))
    assert policy is None and "no native bfloat16" in why


def test_a_copy_computing_in_bfloat16_keeps_the_weights_and_gives_float32_outputs_close_to_float32s():
    from edge_kd.train import computing_in, float32_copy

    keras.utils.set_random_seed(5)
    inner = keras.Sequential([keras.layers.Conv2D(8, 3, padding="same", name="c2"), keras.layers.BatchNormalization(
        name="bn2"), keras.layers.ReLU(name="r2")], name="block")
    inp = keras.Input((8, 8, 3), name="image")
    h = keras.layers.ReLU(name="r1")(keras.layers.BatchNormalization(name="bn1")(keras.layers.Conv2D(
        8, 3, padding="same", name="c1")(inp)))
    out = keras.layers.Dense(4, name="logits")(keras.layers.GlobalAveragePooling2D(name="gap")(inner(h)))
    model = keras.Model(inp, out)
    x = np.random.default_rng(0).uniform(0, 1, (32, 8, 8, 3)).astype(np.float32)
    model(x, training=True)  # moving statistics away from their initial values
    want = model(x, training=False).numpy()

    low = computing_in(model, "mixed_bfloat16")
    policies = {l.name: l.dtype_policy.name for l in low.layers} | {
        l.name: l.dtype_policy.name for l in low.get_layer("block").layers}
    assert policies["c1"] == policies["bn1"] == policies["c2"] == policies["gap"] == "mixed_bfloat16"
    assert policies["logits"] == "float32" and low.output.dtype == tf.float32
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), low.get_weights()))
    got = low(x, training=False).numpy()
    assert not np.array_equal(got, want)  # it does compute in bfloat16 (8 bits of mantissa)
    np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())
    assert computing_in(low, "mixed_bfloat16") is low and float32_copy(model) is model
    back = float32_copy(low)
    assert {l.dtype_policy.name for l in back.layers} == {"float32"}
    np.testing.assert_allclose(back(x, training=False).numpy(), want, rtol=1e-5, atol=1e-6)


def test_a_bfloat16_copy_gives_float32_outputs_from_a_nested_head_an_op_layer_and_refuses_a_subclassed_model():
    from edge_kd.train import computing_in

    keras.utils.set_random_seed(6)
    base = keras.Sequential([keras.layers.Input((4, 4, 2)), keras.layers.Conv2D(4, 3, name="conv"),
                             keras.layers.Flatten(name="flat"), keras.layers.Dense(3, activation="softmax",
                                                                                     name="probs")], name="base")
    inp = keras.Input((4, 4, 2))
    nested = keras.Model(inp, base(inp))  # the output is a nested model's: its own last layer stays float32
    op = keras.Model(inp, tf.nn.softmax(keras.layers.Dense(3, name="dense")(keras.layers.Flatten()(inp))))
    x = np.random.default_rng(2).uniform(0, 1, (8, 4, 4, 2)).astype(np.float32)
    for model in (nested, op):
        low = computing_in(model, "mixed_bfloat16")
        assert low.output.dtype == tf.float32
        got = low(x).numpy()
        np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-3 if model is nested else 2e-2)
        np.testing.assert_allclose(got, model(x).numpy(), atol=0.02)
    inner = computing_in(nested, "mixed_bfloat16").get_layer("base")
    assert inner.get_layer("conv").compute_dtype == "bfloat16" and inner.get_layer("probs").compute_dtype == "float32"

    sub = subclassed_model(5, 3)
    assert computing_in(sub, "float32") is sub  # float32 already: nothing to rebuild
    with pytest.raises(NotImplementedError, match="not a Functional or Sequential"):
        computing_in(sub, "mixed_bfloat16")


def test_what_true_takes_on_the_host_is_part_of_the_stages_keys(tmp_path, monkeypatch):
    from edge_kd import mixed
    from pipelines import recipe as recipe_mod, run_keys
    from pipelines.context import Context

    def key(setting, policy=None):
        monkeypatch.setattr(mixed, "mixed_policy", lambda *a, **k: (policy, "test"))
        r = recipe_mod.apply_overrides(recipe_mod.load(), [f"training.mixed_precision={setting}",
                                                           "data.limit_train=64", "data.limit_test=32"])
        return run_keys.training_key(Context(r, tmp_path / "run", command="test"))["training"]["mixed_precision"]

    assert key("false") is False and key("bfloat16") == "bfloat16"  # as given: the keys of earlier runs hold
    assert key("true", "mixed_bfloat16") == "true: mixed_bfloat16" != key("true", None) == "true: float32"


def test_under_bfloat16_the_teacher_trains_in_it_and_is_exported_and_measured_in_float32(tmp_path, capsys):
    from pipelines import recipe as recipe_mod, run_models, run_training
    from pipelines.context import Context

    r = recipe_mod.apply_overrides(recipe_mod.load(), ["training.mixed_precision=bfloat16", "data.limit_train=64",
                                                       "data.limit_test=32"])
    ctx = Context(r, tmp_path / "run", command="test")

    def policies(model):
        return set().union(*(policies(l) if isinstance(l, keras.Model) else {l.dtype_policy.name}
                             for l in model.layers))

    with run_training.scope(ctx, ctx.stages["distill"]):
        distill = run_training.distiller(ctx, run_models.build_student(ctx), "distill")
    with run_training.scope(ctx, ctx.stages["prune"]):  # the student in float32, the teacher still in bfloat16
        prune = run_training.distiller(ctx, run_models.build_student(ctx), "prune")
    assert "distill: mixed precision (mixed_bfloat16" in capsys.readouterr().out
    assert "mixed_bfloat16" in policies(distill.student) and policies(prune.student) == {"float32"}
    for d in (distill, prune):
        assert "mixed_bfloat16" in policies(d.teachers[0]) and d.teachers[0].output.dtype == tf.float32
    assert prune.teachers[0] is distill.teachers[0]
    assert policies(run_models.teacher(ctx)) == {"float32"}  # what the export and the benchmark read
    x = run_training.run_data.load(ctx).normalise(np.random.default_rng(1).uniform(
        0, 255, (16, *ctx.loaded.data.info.input_shape)).astype(np.float32))
    np.testing.assert_allclose(distill.teachers[0](x).numpy(), run_models.teacher(ctx)(x).numpy(), atol=0.25)


@pytest.mark.heavy  # mixed precision's terms against float32: the test above, in the default run
@pytest.mark.parametrize("setting, policy", [("float16", "mixed_float16"), ("bfloat16", "mixed_bfloat16")])
def test_the_pipeline_trains_in_mixed_precision_and_saves_and_exports_float32(setting, policy, tmp_path, capsys):
    from edge_kd.bench.compat import runtime
    from pipelines import recipe as recipe_mod
    from pipelines.run import run

    r = recipe_mod.apply_overrides(recipe_mod.load(), [
        f"training.mixed_precision={setting}", "data.limit_train=320", "data.limit_test=128", "stages.distill.epochs=1",
        "prune=false", "qat=false", "export.variants=[fp32, int8]", "bundle=false", "benchmark.threads=[1]",
        "benchmark.min_seconds=0.05", "benchmark.warmup_seconds=0.01", "benchmark.rounds=3",
        "benchmark.layer_error_samples=16"])
    run_dir = run(r, out=tmp_path)
    printed = capsys.readouterr().out
    assert printed.count(f"mixed precision ({policy}") == 2  # distill and baseline
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after each stage
    for stage, file in (("distill", "student.keras"), ("baseline", "baseline.keras")):
        saved = keras.models.load_model(run_dir / stage / file, compile=False)
        assert {layer.dtype_policy.name for layer in saved.layers} == {"float32"}
    assert "CAST" not in runtime(run_dir / "tflite" / "student-fp32.tflite")["ops"]  # no float16 compute exported
    models = {m["name"]: m for m in json.loads((run_dir / "results.json").read_text())["models"]}
    assert models["student"]["accuracy"] == pytest.approx(models["student-fp32"]["accuracy"], abs=0.01)
    history = json.loads((run_dir / "distill" / "history.json").read_text())
    assert all(np.isfinite(history["loss"]))
    assert f"precision {policy}" in (run_dir / "report.md").read_text()  # the report says what it trained in
