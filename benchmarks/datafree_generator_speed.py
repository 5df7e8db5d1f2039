"""Seconds per synthesis iteration of the data-free Fashion-MNIST recipe's generator (``edge_kd.datafree``), by
generator width, companion-student steps and the generator's precision: the shipped teacher, the recipe's student,
batch 128, each variant warmed up 3 iterations, then 3 rounds of 10 iterations, the variants interleaved within a
round, nothing else running. Prints one line a variant (the median of the rounds).

    python benchmarks/datafree_generator_speed.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from edge_kd.builtin_teachers import resolve  # noqa: E402
from edge_kd.datafree import AdversarialSynthesizer, GeneratorConfig  # noqa: E402
from edge_kd.keras import keras  # noqa: E402
from pipelines import recipe as recipe_mod  # noqa: E402

#: (generator.filters, generator.student_steps, the generator's Keras policy or None for float32)
VARIANTS = [([128, 64], 2, None), ([64, 32], 2, None), ([32, 16], 2, None), ([64, 32], 5, None),
            ([128, 64], 2, "mixed_bfloat16"), ([64, 32], 2, "mixed_bfloat16")]


def main() -> int:
    r = recipe_mod.load("fashion_mnist_datafree")  # its teacher, student, input and generator settings
    teacher = keras.models.load_model(resolve(r.teacher.path), compile=False)
    shape, classes, synth = tuple(r.data.input_shape), len(r.data.classes), r.stages.synthesize
    synths = {}
    for filters, steps, policy in VARIANTS:
        student = models.build(r.student.arch, shape, classes, **r.student.options)
        if policy:
            keras.mixed_precision.set_global_policy(policy)
        config = GeneratorConfig(**{**synth.generator.model_dump(), "student_steps": steps, "filters": filters})
        s = AdversarialSynthesizer(teacher, student, shape, classes, batch_size=synth.batch_size, seed=0,
                                   config=config)
        keras.mixed_precision.set_global_policy("float32")
        if policy:  # its images in float32, for the float32 teacher and student
            g = s.generator
            s.generator = keras.Model(g.inputs, keras.layers.Activation("linear", dtype="float32")(g.output))
        s.train(3)
        synths[f"filters {filters}, student_steps {steps}, {policy or 'float32'}"] = s
    times = {k: [] for k in synths}
    for _ in range(3):
        for k, s in synths.items():
            t = time.perf_counter()
            s.train(10)
            times[k].append((time.perf_counter() - t) / 10)
    for k, v in times.items():
        print(f"{k}: {np.median(v):.3f} s an iteration (rounds {', '.join(f'{x:.3f}' for x in v)}); generator "
              f"{synths[k].generator.count_params():,} parameters", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
