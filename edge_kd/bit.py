"""BiT-HyperRule (Kolesnikov et al. 2020, "Big Transfer"): how to fine-tune a pretrained backbone on a new dataset.

The rule fixes every setting from two facts about the data, its number of training images and its images'
own size, so nothing is tuned per dataset:

- a new classification head, initialised to zero;
- SGD with momentum 0.9, no weight decay, base learning rate 0.003 (at the paper's batch of 512);
- the schedule, in steps: under 20,000 images a 100-step linear warm-up and 500 steps in all, decays by 10×
  at 200, 300 and 400; under 500,000 images [500, 3000, 6000, 9000, 10000]; beyond, [500, 6000, 12000,
  18000, 20000] (warm-up end, the three decays, the end);
- MixUp with α = 0.1 from 20,000 images up, none below;
- images smaller than 96×96 in area are resized to 160 and randomly cropped to 128 for training, larger
  ones to 512 and 480; the test resolution is the crop; training also flips at random.

The rule's steps are batches of 512. At another batch size edge-kd keeps what the rule trains on, each
adaptation stated in what ``rule`` returns:

- the step counts are scaled by 512 / batch (the same images seen, the same epochs) and the learning rate by
  batch / 512 (the linear scaling rule of Goyal et al. 2017);
- ``schedule_scale`` < 1 shortens every step count in proportion (a compute budget; 1 is the rule).

>>> r = rule(train_images=5000, image_size=(32, 32), batch_size=512)   # the paper's batch: the rule as written
>>> r.branch, r.supports, r.resolution, r.mixup
('under 20k', (100, 200, 300, 400, 500), (160, 128), 0.0)
>>> [round(float(StepSchedule(r.learning_rate, r.supports)(s)), 6) for s in (50, 150, 250, 450)]
[0.0015, 0.003, 0.0003, 3e-06]
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from edge_kd.keras import keras, tf

SMALL, LARGE = 20_000, 500_000  # the rule's dataset-size thresholds (training images)
SCHEDULES = {"under 20k": (100, 200, 300, 400, 500),
             "20k to 500k": (500, 3000, 6000, 9000, 10_000),
             "500k and more": (500, 6000, 12_000, 18_000, 20_000)}
BASE_LR, BASE_BATCH, MOMENTUM, MIXUP = 0.003, 512, 0.9, 0.1
SMALL_IMAGE_AREA = 96 * 96
RESOLUTIONS = {"small": (160, 128), "large": (512, 480)}  # (resize to, random crop to)


@dataclasses.dataclass(frozen=True)
class Rule:
    """The settings BiT-HyperRule gives a dataset, and why."""

    branch: str  # the schedule branch: "under 20k", "20k to 500k" or "500k and more"
    supports: tuple[int, ...]  # warm-up end, the decay points, the last step
    resolution: tuple[int, int]  # (resize to, random crop to); the crop is also the test resolution
    mixup: float
    learning_rate: float
    why: dict

    @property
    def steps(self) -> int:
        return self.supports[-1]

    def describe(self) -> dict:
        """Returns the rule as plain data for a run's records."""
        return {"branch": self.branch, "supports": list(self.supports), "steps": self.steps,
                "resize": self.resolution[0], "crop": self.resolution[1], "mixup": self.mixup,
                "learning_rate": self.learning_rate, "optimizer": f"sgd, momentum {MOMENTUM}, no weight decay",
                "head": "new, initialised to zero", "why": dict(self.why)}


def branch(train_images: int) -> str:
    """Returns the schedule branch for a dataset of ``train_images`` training images."""
    if train_images < SMALL:
        return "under 20k"
    return "20k to 500k" if train_images < LARGE else "500k and more"


def resolution(image_size: Sequence[int]) -> tuple[int, int]:
    """Returns (resize to, crop to) for images of ``image_size`` (H, W): small below 96×96 in area."""
    h, w = image_size
    return RESOLUTIONS["small" if h * w < SMALL_IMAGE_AREA else "large"]


def mixup(train_images: int) -> float:
    """Returns the MixUp α: none under 20k training images, 0.1 from there."""
    return 0.0 if train_images < SMALL else MIXUP


def rule(train_images: int, image_size: Sequence[int] | None, batch_size: int = BASE_BATCH,
         schedule_scale: float = 1.0, resolution_override: Sequence[int] | None = None,
         seen_at: Sequence[int] | None = None) -> Rule:
    """Returns the Rule for ``train_images`` images of ``image_size`` (H, W, as the source holds them before any
    resize; None: unknown, ``seen_at`` stands in) trained at ``batch_size``; ``seen_at`` is the (H, W) the
    training images are read at (``data.image_size``); ``schedule_scale`` shortens the schedule,
    ``resolution_override`` ((resize, crop)) replaces the rule's resolution. Each departure from the rule is
    said in ``why``."""
    name = branch(train_images)
    edge = ("< 20,000" if name == "under 20k" else "< 500,000" if name == "20k to 500k" else ">= 500,000")
    supports = SCHEDULES[name]
    why = {"schedule": f"{train_images:,} training images {edge}: steps {list(supports)} of batch {BASE_BATCH}"}
    factor = BASE_BATCH / batch_size * schedule_scale
    if factor != 1.0:
        scaled = []
        for s in supports:  # at least one step each, the points kept strictly increasing
            scaled.append(max(1, int(round(s * factor)), scaled[-1] + 1 if scaled else 1))
        scaled = tuple(scaled)
        if batch_size != BASE_BATCH:
            why["schedule"] += f", × {BASE_BATCH}/{batch_size} for batch {batch_size} (the same images seen)"
        if schedule_scale != 1.0:
            why["schedule"] += f", × {schedule_scale:g} (teacher.bit_scale)"
        why["schedule"] += f": steps {list(scaled)}"
        supports = scaled
    known = image_size is not None
    h, w = (int(d) for d in (image_size if known else seen_at))
    res = resolution((h, w))
    area = "<" if h * w < SMALL_IMAGE_AREA else ">="
    what = "images" if known else "source size unknown, data.image_size"
    why["resolution"] = f"{what} {h}×{w}, area {h * w:,} {area} 96×96: resize {res[0]}, crop {res[1]}"
    if known and seen_at is not None and tuple(int(d) for d in seen_at) != (h, w):
        why["resolution"] += f" (from the {seen_at[0]}×{seen_at[1]} copies data.image_size made)"
    if resolution_override is not None:
        res = (int(resolution_override[0]), int(resolution_override[1]))
        why["resolution"] += f"; replaced by teacher.bit_resolution: resize {res[0]}, crop {res[1]}"
    alpha = mixup(train_images)
    why["mixup"] = f"{train_images:,} training images {'<' if alpha == 0 else '>='} 20,000: MixUp α {alpha:g}"
    lr = BASE_LR * batch_size / BASE_BATCH
    why["learning_rate"] = f"{BASE_LR:g} at batch {BASE_BATCH}, scaled linearly to batch {batch_size}: {lr:.6g}"
    return Rule(name, supports, res, alpha, lr, why)


def epochs_for(steps: int, steps_per_epoch: int) -> int:
    """Returns the whole epochs that cover ``steps`` (the last ones past the schedule's end at its last rate)."""
    return max(1, math.ceil(steps / max(1, steps_per_epoch)))


class StepSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The rule's learning rate per step: linear warm-up to ``supports[0]``, then ÷10 after each decay point
    (``supports[1:-1]``); past the end it stays at the last rate."""

    def __init__(self, learning_rate: float, supports: Sequence[int]):
        self.learning_rate, self.supports = float(learning_rate), [int(s) for s in supports]

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = float(self.supports[0])
        decays = tf.add_n([tf.cast(step > s, tf.float32) for s in self.supports[1:-1]] or [tf.constant(0.0)])
        return tf.where(step < warm, self.learning_rate * step / warm, self.learning_rate * tf.pow(0.1, decays))

    def get_config(self):
        return {"learning_rate": self.learning_rate, "supports": self.supports}


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """What ``edge_kd.train.fit`` builds its optimizer from: the rule's SGD and step schedule."""

    rule: Rule

    def build(self, learning_rate, steps, steps_per_epoch):
        return keras.optimizers.SGD(StepSchedule(self.rule.learning_rate, self.rule.supports), momentum=MOMENTUM)


def zero_head(model, head: str = "logits") -> None:
    """Sets the kernel and bias of ``model``'s ``head`` layer to zero (the rule's new head)."""
    layer = model.get_layer(head)
    layer.set_weights([w * 0 for w in layer.get_weights()])


class BitCrop(keras.layers.Layer):
    """Training: bilinear resize to ``resize``, a random ``crop``×``crop`` window per image and a random
    horizontal flip per image. Inference: bilinear resize to ``crop``."""

    def __init__(self, resize, crop, seed=0, **kw):
        super().__init__(**kw)
        self.resize, self.crop, self.seed = int(resize), int(crop), int(seed)
        self._rng = tf.random.Generator.from_seed(self.seed)

    def call(self, x, training=None):
        if not training:
            return tf.image.resize(x, (self.crop, self.crop), method="bilinear")
        big = tf.image.resize(x, (self.resize, self.resize), method="bilinear")
        n = tf.shape(big)[0]
        offsets = tf.cast(self._rng.uniform((n, 2), 0, self.resize - self.crop + 1, dtype=tf.int32), tf.float32)
        last, span = float(self.resize - 1), float(self.crop - 1)
        top, left = offsets[:, 0], offsets[:, 1]
        boxes = tf.stack([top / last, left / last, (top + span) / last, (left + span) / last], axis=1)
        crops = tf.image.crop_and_resize(big, boxes, tf.range(n), (self.crop, self.crop))  # exact pixels: no blur
        flip = self._rng.uniform(tf.stack([n, 1, 1, 1])) < 0.5
        return tf.where(flip, tf.reverse(crops, axis=[2]), crops)

    def get_config(self):
        return {**super().get_config(), "resize": self.resize, "crop": self.crop, "seed": self.seed}


def training_model(net, input_shape: Sequence[int], rule_: Rule, seed: int):
    """Returns the model the fine-tuning trains: ``net`` (which takes crop×crop images) behind a BitCrop of the
    rule's resolution. ``net`` is what is kept; the wrapper is not saved."""
    inp = keras.Input(tuple(input_shape), name="image")
    x = BitCrop(*rule_.resolution, seed=seed, name="bit_crop")(inp)
    return keras.Model(inp, net(x), name=f"{net.name}_bit")
