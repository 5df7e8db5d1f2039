"""BiT-HyperRule (edge_kd.bit): the branch each dataset size and image size takes, the schedule, the zero head."""
import numpy as np
import pytest

from edge_kd import bit
from pipelines import run_models


@pytest.mark.parametrize("images, branch, supports, mixup", [
    (1, "under 20k", (100, 200, 300, 400, 500), 0.0),
    (19_999, "under 20k", (100, 200, 300, 400, 500), 0.0),
    (20_000, "20k to 500k", (500, 3000, 6000, 9000, 10_000), 0.1),
    (499_999, "20k to 500k", (500, 3000, 6000, 9000, 10_000), 0.1),
    (500_000, "500k and more", (500, 6000, 12_000, 18_000, 20_000), 0.1),
])
def test_the_schedule_and_mixup_branch_on_each_side_of_each_threshold(images, branch, supports, mixup):
    r = bit.rule(images, (32, 32), batch_size=512)
    assert (r.branch, r.supports, r.mixup, r.steps) == (branch, supports, mixup, supports[-1])
    assert r.learning_rate == pytest.approx(0.003)
    assert f"{images:,} training images" in r.why["schedule"] and f"{mixup:g}" in r.why["mixup"]


@pytest.mark.parametrize("size, resolution", [((32, 32), (160, 128)), ((95, 96), (160, 128)), ((96, 96), (512, 480)),
                                              ((64, 200), (512, 480)), ((224, 224), (512, 480))])
def test_the_resolution_branch_on_each_side_of_96_squared(size, resolution):
    r = bit.rule(5000, size, batch_size=64)
    assert r.resolution == resolution and f"crop {resolution[1]}" in r.why["resolution"]


def test_another_batch_sees_the_rules_images_at_a_linearly_scaled_rate_and_overrides_are_said():
    r = bit.rule(5000, (32, 32), batch_size=64)
    assert r.learning_rate == pytest.approx(0.003 * 64 / 512)
    assert r.supports == (800, 1600, 2400, 3200, 4000) and "× 512/64" in r.why["schedule"]  # 500 × 512 images
    r = bit.rule(5000, (32, 32), batch_size=64, schedule_scale=0.1, resolution_override=(112, 96), seen_at=(96, 96))
    assert r.supports == (80, 160, 240, 320, 400) and "× 0.1 (teacher.bit_scale)" in r.why["schedule"]
    assert r.resolution == (112, 96) and "teacher.bit_resolution" in r.why["resolution"]
    assert "from the 96×96 copies" in r.why["resolution"]
    tiny = bit.rule(100, (32, 32), batch_size=512, schedule_scale=0.001)
    assert tiny.supports == (1, 2, 3, 4, 5)  # strictly increasing even when scaled below one step each
    unknown = bit.rule(100, None, seen_at=(200, 200))
    assert unknown.resolution == (512, 480) and "source size unknown" in unknown.why["resolution"]


def test_the_step_schedule_warms_up_linearly_then_divides_by_ten_after_each_decay_point():
    s = bit.StepSchedule(0.01, (100, 200, 300, 400, 500))
    got = [float(s(step)) for step in (0, 50, 100, 200, 201, 300, 301, 400, 401, 499, 600)]
    want = [0.0, 0.005, 0.01, 0.01, 0.001, 0.001, 1e-4, 1e-4, 1e-5, 1e-5, 1e-5]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert bit.epochs_for(500, 70) == 8 and bit.epochs_for(10, 100) == 1


def test_the_crop_layer_crops_at_random_in_training_and_resizes_at_inference():
    x = np.random.default_rng(0).random((6, 20, 20, 3)).astype(np.float32)
    layer = bit.BitCrop(24, 16, seed=0)
    train = np.asarray(layer(x, training=True))
    assert train.shape == (6, 16, 16, 3)
    test = np.asarray(layer(x, training=False))
    assert test.shape == (6, 16, 16, 3) and not np.allclose(train, test)
    again = np.asarray(bit.BitCrop(24, 16, seed=0)(x, training=True))
    np.testing.assert_array_equal(train, again)  # seeded: a rerun crops alike


def test_the_teacher_stage_builds_the_backbone_at_the_crop_with_its_weights_and_a_zero_head(tmp_path):
    import models
    from edge_kd.keras import keras
    from pipelines import recipe as recipe_mod
    from pipelines.context import Context

    keras.utils.set_random_seed(3)
    pretrained = models.build("mobilenet_v2", (32, 32, 3), 7, alpha=0.35)  # "pretrained" on 7 classes
    pretrained.save_weights(tmp_path / "backbone.h5")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(40) % 3, x_test=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8),
             y_test=np.arange(12) % 3)
    r = recipe_mod.apply_overrides(recipe_mod.load(), [
        f"data.source={tmp_path / 'd.npz'}", "data.image_size=[48,48]", "teacher.path=null", "teacher.finetune=bit",
        "teacher.backbone=mobilenet_v2", "teacher.options={alpha: 0.35}", f"teacher.weights={tmp_path / 'backbone.h5'}"])
    ctx = Context(r, tmp_path / "out", command="test")
    rule = run_models.bit_rule(ctx)
    assert rule.resolution == (160, 128)  # from the source's 32×32, not the 48×48 it is resized to
    net = run_models.build_teacher(ctx, (128, 128, 3))
    assert net.input_shape == (None, 128, 128, 3) and net.output_shape == (None, 3)
    head = net.get_layer("logits").get_weights()
    assert all(not w.any() for w in head)  # the new head starts at zero
    for layer in pretrained.layers:
        if layer.weights and layer.name != "logits":
            for a, b in zip(layer.get_weights(), net.get_layer(layer.name).get_weights()):
                np.testing.assert_array_equal(a, b)  # the backbone is the user's file, layer by layer


@pytest.mark.parametrize("overrides, words", [
    (["teacher.finetune=bit", "teacher.weights=w.h5"], "teacher.backbone"),
    (["teacher.finetune=bit", "teacher.backbone=resnet50_v2"], "teacher.weights"),
    (["teacher.finetune=bit", "teacher.backbone=cnn", "teacher.weights=w.h5"], "not a keras.applications backbone"),
    (["teacher.finetune=bit", "teacher.backbone=resnet50_v2", "teacher.weights=w.h5", "teacher.bit_resolution=[96,128]"],
     "resize >= crop"),
    (["teacher.backbone=resnet50_v2"], "only with teacher.finetune: bit"),
    (["teacher.bit_scale=0.5"], "only with teacher.finetune: bit"),
    (["teacher.finetune=bit", "teacher.backbone=resnet50_v2", "teacher.weights=w.h5", "teacher.bit_resolution=[16,8]"],
     "teacher.bit_resolution"),
    (["teacher.finetune=bit", "teacher.path=builtin:fashion_mnist", "teacher.backbone=resnet50_v2",
      "teacher.weights=w.h5"], "teacher.path must be null"),
])
def test_a_bad_finetune_recipe_is_a_one_line_error(overrides, words):
    from edge_kd.errors import UserError
    from pipelines import recipe as recipe_mod

    base = [] if any(o.startswith("teacher.path=") for o in overrides) else ["teacher.path=null"]
    with pytest.raises(UserError) as e:
        recipe_mod.apply_overrides(recipe_mod.load(), base + overrides)
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
