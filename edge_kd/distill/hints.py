"""Feature-hint terms: the student matches intermediate layers of the teacher, not only its logits.

``fitnet`` — FitNets hints (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015,
arXiv:1412.6550). One student layer (the guided layer) is regressed onto one teacher layer (the hint):

    L = mean over all elements of (r(s) − t)²   (the batch mean of each example's mean, equal sizes)

where ``r`` is the adapter (the paper's regressor): the identity when both features have the same
shape, else a 1×1 convolution to the teacher's channels (followed by a resize to the teacher's H×W
when the spatial sizes differ, see below) for NHWC maps, or a Dense layer to the teacher's units
for (batch, units) vectors. The adapter trains with the student and is never part of the exported
student. The paper's ½·sum is a mean here (its scale is absorbed in ``weight``), and the hint is a
term trained jointly with the others rather than a separate pre-training stage.

``at`` — attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017,
arXiv:1612.03928). For an NHWC map A the spatial attention map is

    Q = sum over channels of |A|^p,  flattened to (batch, H·W),

the student's Q being resized to the teacher's H×W first when the spatial sizes differ.
For each [student layer, teacher layer] pair the value is

    mean over the batch of ‖ Q_s/‖Q_s‖₂ − Q_t/‖Q_t‖₂ ‖₂²   (the squared distance summed over positions)

and the term is the mean over pairs. The paper's β/2 (and its sum over pairs) is absorbed in
``weight``; the authors' code averages over positions as well, hence their β = 10³.

Resizing a student map to the teacher's H×W: along an axis that shrinks, each output is the mean of its share of
the input (adaptive average pooling, as mdistiller's AT shrinks), so every student position gets gradient; along
an axis that grows, linear interpolation (half-pixel centres, as ``tf.image.resize``'s bilinear). A plain bilinear
shrink would read only two of every four rows at a 4× shrink and leave the rest without gradient.

>>> from edge_kd.distill import losses
>>> losses.get("at", pairs=[["s_block1", "t_block1"]], p=2.0).config()
{'pairs': [['s_block1', 't_block1']], 'p': 2.0, 'weight': 1.0}
"""
from __future__ import annotations

import numpy as np

from edge_kd.distill.registry import LossTerm, check_layer, check_range, register
from edge_kd.errors import UserError
from edge_kd.keras import keras, tf


def _shape(x) -> tuple:
    return tuple(x.shape.as_list())


def _axis_weights(n_in: int, n_out: int) -> np.ndarray:
    """Returns the (n_out, n_in) matrix that resizes an axis of length ``n_in`` to ``n_out``: the mean of each
    output's share of the input when it shrinks (adaptive average pooling), linear interpolation with half-pixel
    centres when it grows."""
    m = np.zeros((n_out, n_in), np.float32)
    for o in range(n_out):
        if n_out < n_in:
            lo, hi = (o * n_in) // n_out, -(-((o + 1) * n_in) // n_out)
            m[o, lo:hi] = 1.0 / (hi - lo)
        else:
            src = min(max((o + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1.0)
            lo = int(np.floor(src))
            hi = min(lo + 1, n_in - 1)
            m[o, lo] += 1.0 - (src - lo)
            m[o, hi] += src - lo
    return m


def _resize_to(x, like):
    """Returns NHWC ``x`` (as float32) resized to the height and width of ``like`` (see the module's docstring);
    ``x`` itself when they already match. Maps of unknown size are resized with antialiased bilinear filtering,
    which also weighs every position when it shrinks."""
    if x.shape[1:3].is_fully_defined() and x.shape[1:3] == like.shape[1:3]:
        return x
    x = tf.cast(x, tf.float32)
    if not (x.shape[1:3].is_fully_defined() and like.shape[1:3].is_fully_defined()):
        return tf.image.resize(x, tf.shape(like)[1:3], method="bilinear", antialias=True)
    (h, w), (th, tw) = x.shape[1:3], like.shape[1:3]
    x = tf.einsum("oh,bhwc->bowc", tf.constant(_axis_weights(h, th)), x)
    return tf.einsum("pw,bowc->bopc", tf.constant(_axis_weights(w, tw)), x)


@register("fitnet")
class FitNet(LossTerm):
    """FitNets hint: the mean squared error between the adapted student layer and the teacher layer.

    ``student_layer`` and ``teacher_layer`` are required (None only so that a missing one is a
    UserError rather than a TypeError). Both features must be NHWC maps or both (batch, units) vectors.
    ``build`` creates the adapter when their shapes differ; the adapter's variables train with the
    student and are never part of the exported student.
    """

    has_per_sample = True

    def __init__(self, student_layer: str | None = None, teacher_layer: str | None = None, weight: float = 1.0):
        super().__init__(weight)
        self.student_layer = check_layer("fitnet student_layer", student_layer)
        self.teacher_layer = check_layer("fitnet teacher_layer", teacher_layer)
        self._adapter = None  # None after build means the identity (equal shapes)
        self._built = False

    def student_taps(self):
        return [self.student_layer]

    def teacher_taps(self):
        return [self.teacher_layer]

    def build(self, student, teacher):
        s = tf.cast(student["features"][self.student_layer], tf.float32)
        t = teacher["features"][self.teacher_layer]
        rank = s.shape.rank
        if rank not in (2, 4) or t.shape.rank != rank:
            raise UserError(
                f"fitnet needs two 4-D (batch, H, W, C) maps or two 2-D (batch, units) vectors; student layer "
                f"'{self.student_layer}' gives {_shape(s)}, teacher layer '{self.teacher_layer}' gives {_shape(t)}")
        self._layers = []
        self._adapter = None
        if s.shape[1:] != t.shape[1:]:
            name = f"fitnet_adapter_{self.student_layer}"
            # float32 whatever the global mixed-precision policy: the loss is computed in float32.
            if rank == 4:
                self._adapter = keras.layers.Conv2D(t.shape[-1], 1, use_bias=True, name=name, dtype="float32")
            else:
                self._adapter = keras.layers.Dense(t.shape[-1], name=name, dtype="float32")
            self._adapter(s)  # creates the variables
            self._layers.append(self._adapter)
        self._built = True

    def adapt(self, student_feature, teacher_feature):
        """Returns the student feature mapped by the adapter onto the teacher feature's shape (float32)."""
        s = tf.cast(student_feature, tf.float32)
        if self._adapter is None:
            return s
        s = self._adapter(s)
        return _resize_to(s, teacher_feature) if s.shape.rank == 4 else s

    def per_sample(self, student, teacher, y):
        """Returns each example's mean squared error over its feature elements, shape (batch,)."""
        if not self._built:
            raise RuntimeError("fitnet: build() must run before the term is called")
        t = tf.stop_gradient(tf.cast(teacher["features"][self.teacher_layer], tf.float32))
        s = self.adapt(student["features"][self.student_layer], t)
        return tf.reduce_mean(tf.reshape(tf.square(s - t), [tf.shape(t)[0], -1]), axis=1)


def _check_pairs(pairs) -> list:
    """Returns ``pairs`` as a list of [student layer, teacher layer] lists; one bare pair is accepted."""
    def is_pair(x):
        return isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(n, str) and n for n in x)

    if is_pair(pairs):
        pairs = [pairs]
    if not isinstance(pairs, (list, tuple)) or not pairs or not all(is_pair(x) for x in pairs):
        raise UserError(f"at pairs must be a non-empty list of [student_layer, teacher_layer] layer-name pairs, "
                        f"got {pairs!r}")
    return [list(x) for x in pairs]


def _abs_pow(a, p):
    """Returns |a|^p with a finite gradient at a = 0 for every p > 0 (for p < 1, d/da |a|^p is infinite there).

    The inner ``where`` keeps 0 out of ``pow`` so that its gradient is never inf·0 = NaN; zeros map to 0.
    """
    m = tf.abs(a)
    nonzero = m > 0
    return tf.where(nonzero, tf.pow(tf.where(nonzero, m, tf.ones_like(m)), p), tf.zeros_like(m))


@register("at")
class AttentionTransfer(LossTerm):
    """Attention transfer: the student's normalised spatial attention maps match the teacher's.

    ``pairs`` lists [student layer, teacher layer] pairs of NHWC maps (channel counts may differ);
    ``p`` is the exponent of the attention map (the paper uses 2). No variables.
    """

    has_per_sample = True

    def __init__(self, pairs: list | None = None, p: float = 2.0, weight: float = 1.0):
        super().__init__(weight)
        self.pairs = _check_pairs(pairs)
        self.p = check_range("p", p, 0.0, None, low_open=True)

    def student_taps(self):
        return [s for s, _ in self.pairs]

    def teacher_taps(self):
        return [t for _, t in self.pairs]

    def build(self, student, teacher):
        for side, feats, layers in (("student", student, self.student_taps()),
                                    ("teacher", teacher, self.teacher_taps())):
            for layer in layers:
                x = feats["features"][layer]
                if x.shape.rank != 4:
                    raise UserError(f"at needs 4-D (batch, H, W, C) feature maps; {side} layer '{layer}' "
                                    f"gives {_shape(x)}")

    def attention(self, feature, like=None):
        """Returns the L2-normalised attention map of NHWC ``feature``, shape (batch, H·W), float32.

        With ``like`` (a teacher map), the map is first resized to ``like``'s H×W.
        """
        q = tf.reduce_sum(_abs_pow(tf.cast(feature, tf.float32), self.p), axis=-1, keepdims=True)
        if like is not None:
            q = _resize_to(q, like)
        q = tf.reshape(q, [tf.shape(q)[0], -1])
        # Divides by max(‖q‖₂, 1e-12), with a finite gradient for an all-zero map.
        return tf.math.l2_normalize(q, axis=1, epsilon=1e-24)

    def per_sample(self, student, teacher, y):
        distances = []
        for s_layer, t_layer in self.pairs:
            t = tf.stop_gradient(tf.cast(teacher["features"][t_layer], tf.float32))
            q_s = self.attention(student["features"][s_layer], like=t)
            q_t = self.attention(t)
            distances.append(tf.reduce_sum(tf.square(q_s - q_t), axis=1))
        return tf.add_n(distances) / len(distances)
