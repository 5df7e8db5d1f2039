"""On-the-fly training augmentation: a random view of each image and, optionally, MixUp or CutMix of the batch.

It runs inside the Distiller's ``train_step`` (never in ``call``), so the exported model holds none
of it, and the teacher can see exactly the student's pixels (consistent teaching, Beyer et al. 2022).
Every draw is stateless, from ``(seed, step)``: a run repeats itself exactly for a seed.

- ``translate``: a shift of up to that many whole pixels on each axis, the space left filled with
  ``fill_value`` (raw black by default): pad-and-crop;
- ``flip``: a horizontal flip with probability 1/2 (off for digits and text);
- ``rotate`` (degrees) and ``zoom`` (a fraction: the scale is drawn from [1 − zoom, 1 + zoom]), bilinear;
- ``mixup`` (α): the batch mixed with a permutation of itself, ``λ x + (1 − λ) x[π]``, λ ~ Beta(α, α);
- ``cutmix`` (α): a box of area ``1 − λ`` pasted from ``x[π]``; λ is then the box's exact complement.

With both ``mixup`` and ``cutmix``, each batch takes one of them, with equal chance. A mixed batch's
labels are mixed with the same λ (the loss is ``λ CE(y) + (1 − λ) CE(y[π])``), and so are the
teacher's logits where the teacher saw the unmixed images (``distillation.consistent: false``).

>>> from edge_kd.augment import AugmentConfig, Augmenter
>>> aug = Augmenter(AugmentConfig(translate=2, flip=True, mixup=0.2), seed=0)
>>> # x_view, mix = aug(x, step)   # mix is None or (permutation, λ)
"""
from __future__ import annotations

import math
from typing import Annotated, ClassVar

from edge_kd.config import Bool, Config, Field, Float, Int


class AugmentConfig(Config):
    """What random view each training image gets; every setting off by default."""

    KEY: ClassVar[str] = "augment"
    translate: Annotated[Int, Field(ge=0)] = 0
    flip: Bool = False
    rotate: Annotated[Float, Field(ge=0, le=180)] = 0.0
    zoom: Annotated[Float, Field(ge=0, lt=1)] = 0.0
    mixup: Annotated[Float, Field(ge=0)] = 0.0
    cutmix: Annotated[Float, Field(ge=0)] = 0.0

    def active(self) -> bool:
        """Returns whether any augmentation is on."""
        return self.views() or self.mixes()

    def views(self) -> bool:
        """Returns whether each image gets a random geometric view."""
        return bool(self.translate or self.flip or self.rotate or self.zoom)

    def mixes(self) -> bool:
        """Returns whether batches are mixed (MixUp or CutMix)."""
        return bool(self.mixup or self.cutmix)


def _tf():
    from edge_kd.keras import tf

    return tf


def _beta(alpha: float, seed):
    """Returns one draw of Beta(alpha, alpha) from stateless ``seed`` (float32 scalar)."""
    tf = _tf()
    seeds = tf.random.experimental.stateless_split(seed, 2)
    a = tf.random.stateless_gamma([], seeds[0], alpha=alpha)
    b = tf.random.stateless_gamma([], seeds[1], alpha=alpha)
    return a / tf.maximum(a + b, 1e-12)


def mix(values, permutation, lam):
    """Returns ``λ · v + (1 − λ) · v[π]`` for a tensor (or nested tensors) ``values``: labels, logits, features."""
    tf = _tf()
    return tf.nest.map_structure(
        lambda v: lam * v + (1.0 - lam) * tf.gather(v, permutation), values)


def cutmix_box(height: int, width: int, lam, seed):
    """Returns the box ``(top, left, box height, box width)`` of CutMix with area ratio about ``1 − lam``.

    The box's centre is uniform over the image and it is clipped at the borders (Yun et al. 2019).
    """
    tf = _tf()
    cut = tf.sqrt(1.0 - lam)
    bh = tf.cast(tf.round(cut * height), tf.int32)
    bw = tf.cast(tf.round(cut * width), tf.int32)
    centre = tf.random.stateless_uniform([2], seed, 0.0, 1.0)
    cy = tf.cast(tf.floor(centre[0] * height), tf.int32)
    cx = tf.cast(tf.floor(centre[1] * width), tf.int32)
    top, bottom = tf.maximum(cy - bh // 2, 0), tf.minimum(cy + (bh - bh // 2), height)
    left, right = tf.maximum(cx - bw // 2, 0), tf.minimum(cx + (bw - bw // 2), width)
    return top, left, bottom - top, right - left


class Augmenter:
    """Applies an ``AugmentConfig`` to a batch of model inputs, from ``(seed, step)``."""

    def __init__(self, config: AugmentConfig, seed: int = 0, fill_value: float = 0.0):
        self.config, self.seed, self.fill_value = config, int(seed), float(fill_value)

    def step_seed(self, step, replica=None):
        """Returns the stateless seed of training step ``step`` (of one replica's share of the batch, if given)."""
        tf = _tf()
        seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(step, tf.int64)])
        # Each replica of a distributed step draws its own views; one device keeps its draws unchanged.
        return seed if replica is None else tf.random.experimental.stateless_fold_in(seed, replica)

    def __call__(self, x, step, replica=None):
        """Returns ``(view, mix)``: the augmented batch, and ``(permutation, λ)`` if it was mixed, else None."""
        tf = _tf()
        seeds = tf.random.experimental.stateless_split(self.step_seed(step, replica), 4)
        if self.config.views():
            x = self.view(x, seeds[0])
        if not self.config.mixes():
            return x, None
        return self.mix_images(x, seeds[1])

    # -- a random view of each image ----------------------------------------------------------------------
    def transforms(self, batch, height: int, width: int, seed):
        """Returns the (batch, 8) projective transforms (output pixel → input pixel) of one draw."""
        tf = _tf()
        c = self.config
        s = tf.random.experimental.stateless_split(seed, 5)
        n = [batch]
        zero, one = tf.zeros(n), tf.ones(n)
        if c.translate:
            ty = tf.cast(tf.random.stateless_uniform(n, s[0], -c.translate, c.translate + 1, tf.int32), tf.float32)
            tx = tf.cast(tf.random.stateless_uniform(n, s[1], -c.translate, c.translate + 1, tf.int32), tf.float32)
        else:
            ty = tx = zero
        flip = tf.where(tf.random.stateless_uniform(n, s[2]) < 0.5, -one, one) if c.flip else one
        theta = tf.random.stateless_uniform(n, s[3], -c.rotate, c.rotate) * (math.pi / 180.0) if c.rotate else zero
        scale = tf.random.stateless_uniform(n, s[4], 1.0 - c.zoom, 1.0 + c.zoom) if c.zoom else one
        # input = centre + R(-θ) · diag(flip, 1) · (output − centre − t) / scale
        cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
        cos, sin = tf.cos(theta) / scale, tf.sin(theta) / scale
        a0, a1 = cos * flip, sin
        b0, b1 = -sin * flip, cos
        ox, oy = -cx - tx, -cy - ty  # (output − centre − t) = (x, y) + (ox, oy)
        a2 = a0 * ox + a1 * oy + cx
        b2 = b0 * ox + b1 * oy + cy
        return tf.stack([a0, a1, a2, b0, b1, b2, zero, zero], axis=1)

    def view(self, x, seed):
        """Returns each image of ``x`` (NHWC) shifted, flipped, rotated and zoomed as drawn from ``seed``."""
        tf = _tf()
        shape = tf.shape(x)
        h, w = int(x.shape[1]), int(x.shape[2])
        exact = not (self.config.rotate or self.config.zoom)  # whole-pixel shifts and flips: no interpolation
        out = tf.raw_ops.ImageProjectiveTransformV3(
            images=tf.cast(x, tf.float32), transforms=self.transforms(shape[0], h, w, seed),
            output_shape=tf.constant([h, w], tf.int32), fill_value=tf.constant(self.fill_value, tf.float32),
            interpolation="NEAREST" if exact else "BILINEAR", fill_mode="CONSTANT")
        return tf.cast(out, x.dtype)

    # -- MixUp and CutMix ------------------------------------------------------------------------------------
    def draw_mix(self, batch, height: int, width: int, seed):
        """Returns ``(permutation, λ, box)``: box is None for MixUp, ``(top, left, h, w)`` for CutMix."""
        tf = _tf()
        c = self.config
        s = tf.random.experimental.stateless_split(seed, 5)
        perm = tf.argsort(tf.random.stateless_uniform([batch], s[0]))
        if c.mixup and c.cutmix:
            use_cut = tf.random.stateless_uniform([], s[1]) < 0.5
        else:
            use_cut = tf.constant(bool(c.cutmix))
        lam_mixup = _beta(c.mixup, s[2]) if c.mixup else tf.constant(1.0)
        lam_cut = _beta(c.cutmix, s[3]) if c.cutmix else tf.constant(1.0)
        top, left, bh, bw = cutmix_box(height, width, lam_cut, s[4])
        lam_box = 1.0 - tf.cast(bh * bw, tf.float32) / float(height * width)
        lam = tf.where(use_cut, lam_box, lam_mixup)
        return perm, lam, use_cut, (top, left, bh, bw)

    def mix_images(self, x, seed):
        """Returns ``(mixed x, (permutation, λ))``."""
        tf = _tf()
        h, w = int(x.shape[1]), int(x.shape[2])
        perm, lam, use_cut, (top, left, bh, bw) = self.draw_mix(tf.shape(x)[0], h, w, seed)
        rows = tf.range(h)[:, None]
        cols = tf.range(w)[None, :]
        inside = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
        other = tf.gather(x, perm)
        cut = tf.where(inside[None, :, :, None], other, x)
        blended = tf.cast(lam, x.dtype) * x + tf.cast(1.0 - lam, x.dtype) * other
        return tf.where(use_cut, cut, blended), (perm, lam)
