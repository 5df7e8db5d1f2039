"""Photos at phone resolution: a JPEG folder, a BiT-fine-tuned teacher at a larger resolution, a MobileNetV2 student
through pruning, int8 export, LiteRT benchmark and bundle (pipelines/recipes/photos_mobilenetv2.yaml; its PQAT is left out
here for time: converting a QAT MobileNetV2 takes half a minute, and tests/test_models.py checks what PQAT leaves in
float)."""
import json

import numpy as np
import pytest

import models
from edge_kd.keras import keras
from tests.pipelines.test_compress import _main_ok

RECIPE = "photos_mobilenetv2"  # a shipped recipe, by name


def _photos(folder, per_class=16, rng=None):
    """Writes photos (JPEG, every fourth PNG) of three sizes about 104×120, whose class is the colour that dominates."""
    from PIL import Image

    rng = rng or np.random.default_rng(0)
    for label, cls in enumerate(("red", "green", "blue")):
        (folder / cls).mkdir(parents=True)
        for i in range(per_class):
            h, w = 100 + 4 * (i % 3), 120
            a = rng.normal(90, 30, (h, w, 3))
            a[..., label] += 90
            image = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")
            if i % 4 == 3:
                image.save(folder / cls / f"{i:03d}.png")
            else:
                image.save(folder / cls / f"{i:03d}.jpg", quality=85)
    return folder


@pytest.mark.slow
@pytest.mark.heavy
def test_a_jpeg_folder_at_96_px_runs_the_photos_recipe_with_a_bit_teacher_and_its_bundle_verifies(tmp_path, capsys):
    photos = _photos(tmp_path / "photos")
    keras.utils.set_random_seed(0)
    models.build("mobilenet_v2", (64, 64, 3), 7, alpha=0.35).save_weights(tmp_path / "backbone.h5")  # the "pretrained"
    out = tmp_path / "out"
    stdout = _main_ok(
        capsys, "--recipe", RECIPE, "--data", photos, "--out", out, "--run-name", "photos",
        "--set", "teacher.finetune=bit", "--set", "teacher.backbone=mobilenet_v2", "--set", "teacher.options={alpha: 0.35}",
        "--set", f"teacher.weights={tmp_path / 'backbone.h5'}", "--set", "teacher.bit_scale=0.0025",
        "--set", "teacher.bit_resolution=[112,104]", "--set", "distill.epochs=1", "--set", "baseline=false",
        "--set", "prune.epochs=1", "--set", "prune.frequency=1", "--set", "qat=false",
        "--set", "export.variants=[int8]", "--set", "export.models=final", "--set", "export.representative_samples=16",
        "--set", "benchmark.threads=[1]", "--set", "benchmark.min_seconds=0", "--set", "benchmark.rounds=3",
        "--set", "benchmark.warmup_seconds=0", "--set", "benchmark.layer_error_samples=4")
    assert "BiT-HyperRule, branch under 20k" in stdout and "teacher cache: logits of" in stdout
    run = out / "photos"
    rule = json.loads((run / "teacher" / "bit_rule.json").read_text())
    assert (rule["branch"], rule["resize"], rule["crop"], rule["mixup"]) == ("under 20k", 112, 104, 0.0)
    # the rule on the median source size, then the override
    assert "images 104×120, area 12,480 >= 96×96: resize 512, crop 480" in rule["why"]["resolution"]
    # 500 steps of 512 images = 4,000 of 64, times 0.0025
    assert rule["supports"] == [2, 4, 6, 8, 10] and rule["learning_rate"] == pytest.approx(0.003 * 64 / 512)
    results = json.loads((run / "results.json").read_text())
    assert results["teacher"]["input_shape"] == [104, 104, 3] and results["teacher"]["resized"] is True
    from edge_kd import data
    from edge_kd.bench import litert

    b = data.load(str(photos), image_size=(96, 96), val_fraction=0.1, seed=0)  # the run's own split, read again
    assert b.streamed and results["data"]["test_size"] == b.count("test") == 9
    x_test, y_test = b.arrays("test")
    for m in results["models"]:
        if m["format"] == "tflite":  # the streamed, resized test split gave what a direct LiteRT run gives
            assert litert.accuracy(run / m["path"], x_test, y_test) == pytest.approx(m["accuracy"])
    row = next(m for m in results["models"] if m["name"] == "pruned-int8")
    assert row["ops"]["xnnpack_fallback"] == {} and row["sparsity"] > 0.4
    bundle = run / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["input_shape"] == [1, 96, 96, 3] and manifest["channel_order"] == "RGB"
    readme = (bundle / "README.md").read_text()
    assert "Bitmap.createScaledBitmap(readable, 96, 96, true)" in readme and "// R" in readme
    assert "context.draw(photo, in: CGRect(x: 0, y: 0, width: 96, height: 96))" in readme
    from pipelines import verify

    assert verify.main([str(bundle)]) == 0
