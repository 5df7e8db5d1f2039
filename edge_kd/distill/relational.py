"""Relational and contrastive distillation terms: ``rkd`` and ``crd``.

Both terms match the *structure* of a batch of embeddings rather than each example's output: RKD
matches pairwise distances and triplet angles, CRD pulls each student embedding towards its own
teacher embedding and away from other examples' embeddings. The embedding is the logits by default,
or the output of a named layer (``student_layer``/``teacher_layer``), flattened to (batch, -1) and
cast to float32. Student and teacher embeddings may have different sizes.

References:

- W. Park, D. Kim, Y. Lu, M. Cho. Relational Knowledge Distillation. CVPR 2019. arXiv:1904.05068.
- Y. Tian, D. Krishnan, P. Isola. Contrastive Representation Distillation. ICLR 2020.
  arXiv:1910.10699 (reference code: github.com/HobbitLong/RepDistiller).
- A. van den Oord, Y. Li, O. Vinyals. Representation Learning with Contrastive Predictive Coding
  (InfoNCE). arXiv:1807.03748.
- K. He, H. Fan, Y. Wu, S. Xie, R. Girshick. Momentum Contrast for Unsupervised Visual
  Representation Learning (MoCo, the FIFO queue of negatives). CVPR 2020. arXiv:1911.05722.

>>> from edge_kd.distill import losses
>>> losses.get("rkd").config()
{'distance_weight': 25.0, 'angle_weight': 50.0, 'student_layer': None, 'teacher_layer': None, 'weight': 1.0}
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from edge_kd.distill.registry import LossTerm, check_int, check_layer, check_range, register
from edge_kd.errors import UserError
from edge_kd.keras import keras, tf

#: Squared lengths at or below this count as zero: floored before a square root (finite gradient at
#: zero distance), and a difference this short has no direction in the angle term.
_SQ_EPS = 1e-12
#: Floor of the mean distance that normalises a model's distances (a batch of identical rows).
_MEAN_EPS = 1e-12


def _huber(x):
    """Elementwise Huber / smooth-L1 loss with δ = 1: 0.5·x² where |x| < 1, |x| − 0.5 elsewhere."""
    a = tf.abs(x)
    return tf.where(a < 1.0, 0.5 * tf.square(x), a - 0.5)


class _EmbeddingTerm(LossTerm):
    """A term reading one embedding per model: the logits, or a tapped layer's output."""

    def __init__(self, student_layer, teacher_layer, weight):
        super().__init__(weight)
        self.student_layer = check_layer("student_layer", student_layer, optional=True)
        self.teacher_layer = check_layer("teacher_layer", teacher_layer, optional=True)

    def student_taps(self):
        return [] if self.student_layer is None else [self.student_layer]

    def teacher_taps(self):
        return [] if self.teacher_layer is None else [self.teacher_layer]

    @staticmethod
    def _embedding(outputs: dict, layer: str | None):
        x = outputs["logits"] if layer is None else outputs["features"][layer]
        x = tf.cast(x, tf.float32)
        return tf.reshape(x, (tf.shape(x)[0], -1))

    def _embeddings(self, student, teacher):
        """Returns the (batch, ds) student and (batch, dt) teacher embeddings; no gradient to the teacher."""
        s = self._embedding(student, self.student_layer)
        t = tf.stop_gradient(self._embedding(teacher, self.teacher_layer))
        return s, t


def _normalised_distances(x):
    """Returns (distances / their off-diagonal mean, the off-diagonal mask, the pair count B(B−1)), all float32.

    The diagonal is set to 0 before the square root and the squared distances are floored at 1e-12,
    so the gradient is finite on the diagonal and for identical rows.
    """
    b = tf.shape(x)[0]
    sq_norm = tf.reduce_sum(tf.square(x), axis=1)
    sq = sq_norm[:, None] + sq_norm[None, :] - 2.0 * tf.matmul(x, x, transpose_b=True)
    off = 1.0 - tf.eye(b, dtype=x.dtype)
    d = tf.sqrt(tf.maximum(sq * off, _SQ_EPS)) * off
    pairs = tf.maximum(tf.cast(b * (b - 1), x.dtype), 1.0)  # B(B−1), at least 1 for a batch of one
    mean = tf.maximum(tf.reduce_sum(d) / pairs, _MEAN_EPS)
    return d / mean, off, pairs


def _angles(x):
    """Returns cos[i, j, k] = <e_ij, e_kj> with e_ij = normalize(x_i − x_j), shape (B, B, B).

    A difference with squared norm ≤ 1e-12 (i = j, or two identical rows) has no direction: its
    e_ij is the zero vector, with zero gradient. (Plain ``l2_normalize`` would also give 0 there, but
    with a gradient scaled by 1/√1e-12 = 10⁶, which a repeated row in a batch turns into a huge step.)
    """
    diff = x[:, None, :] - x[None, :, :]  # [i, j] = x_i − x_j, (B, B, D)
    sq = tf.reduce_sum(tf.square(diff), axis=-1, keepdims=True)
    ok = sq > _SQ_EPS
    # Both tf.where branches are finite, so the masked entries pass back exactly zero gradient.
    e = tf.where(ok, diff, 0.0) * tf.math.rsqrt(tf.where(ok, sq, 1.0))
    e_by_vertex = tf.transpose(e, (1, 0, 2))  # [j, i] = e_ij
    cos = tf.matmul(e_by_vertex, e_by_vertex, transpose_b=True)  # [j, i, k] = <e_ij, e_kj>
    return tf.transpose(cos, (1, 0, 2))  # [i, j, k]


@register("rkd")
class RKD(_EmbeddingTerm):
    """Relational KD (Park et al. 2019): ``distance_weight · D + angle_weight · A``.

    With ψ_D(x)_ij = ‖x_i − x_j‖ / μ_x, where μ_x is the mean of the B(B−1) off-diagonal distances of
    the same model's batch,

    - ``D = mean over i ≠ j of huber(ψ_D(s)_ij − ψ_D(t)_ij)`` (the B(B−1) off-diagonal pairs;
      RepDistiller's code averages over all B² entries, the zero diagonal included, so its D is
      (B−1)/B of this one);
    - ``A = mean over all B³ (i, j, k) of huber(cos_s[i,j,k] − cos_t[i,j,k])`` with
      ``cos[i,j,k] = <normalize(x_i − x_j), normalize(x_k − x_j)>``, the angle at vertex j. Like the
      reference code it averages over every entry of the (B, B, B) tensor, degenerate triplets
      (i = j or k = j, whose cosine is 0 for both models) included. A difference shorter than 1e-6
      (two identical rows) has no direction: its cosines are 0, with zero gradient.

    ``huber`` is smooth-L1 with δ = 1. Both parts are invariant to scaling either embedding, so the
    student and teacher embeddings may differ in size and scale. The angle part costs O(B²·D) memory
    and O(B³·D) time and is skipped when ``angle_weight`` is 0.

    Defaults: ``distance_weight = 25`` and ``angle_weight = 50`` are the RKD weights of the CRD
    benchmark code (Tian et al., RepDistiller ``RKDLoss(w_d=25, w_a=50)``), used for CIFAR-100
    classification; Park et al.'s own metric-learning runs use λ_D = 1, λ_A = 2.
    """

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0,
                 student_layer: Optional[str] = None, teacher_layer: Optional[str] = None, weight: float = 1.0):
        super().__init__(student_layer, teacher_layer, weight)
        self.distance_weight = check_range("distance_weight", distance_weight, 0.0, None)
        self.angle_weight = check_range("angle_weight", angle_weight, 0.0, None)
        if self.distance_weight == 0.0 and self.angle_weight == 0.0:
            raise UserError("rkd needs distance_weight or angle_weight > 0, got both 0")

    def distance_loss(self, s, t):
        """Returns D for (B, ds) and (B, dt) embeddings."""
        ds, off, pairs = _normalised_distances(s)
        dt, _, _ = _normalised_distances(t)
        return tf.reduce_sum(_huber(ds - dt) * off) / pairs

    @staticmethod
    def angle_loss(s, t):
        """Returns A for (B, ds) and (B, dt) embeddings."""
        return tf.reduce_mean(_huber(_angles(s) - _angles(t)))

    def __call__(self, student, teacher, y):
        s, t = self._embeddings(student, teacher)
        value = tf.constant(0.0)
        if self.distance_weight > 0.0:
            value += self.distance_weight * self.distance_loss(s, t)
        if self.angle_weight > 0.0:
            value += self.angle_weight * self.angle_loss(s, t)
        return value


@register("crd")
class CRD(_EmbeddingTerm):
    """Contrastive Representation Distillation (Tian et al. 2020), in its InfoNCE (softmax) form.

    Two trainable linear heads map the embeddings to ``dim``: ``z_s = normalize(W_s s + b_s)``,
    ``z_t = normalize(W_t t + b_t)``. Both heads train with the student, as in CRD; the teacher
    network stays frozen (no gradient reaches its embedding). Per example i, with τ = ``temperature``
    and the positive at index 0,

    - student anchor: ``CE_s,i = −log softmax([z_s,i·z_t,i, z_s,i·n_1, …, z_s,i·n_K] / τ)_0`` with
      negatives ``n`` from the teacher side;
    - teacher anchor: the same with ``z_t,i`` as anchor and negatives from the student side;

    and the term is ``mean_i (CE_s,i + CE_t,i) / 2``.

    With ``bank_size = 0`` the negatives are the other examples of the batch: the loss is the
    cross-entropy of the (B, B) matrix ``z_s z_tᵀ / τ`` with the diagonal as labels, row-wise for the
    student anchor and column-wise for the teacher anchor (B − 1 negatives each).

    With ``bank_size = K > 0`` the negatives are K embeddings of earlier batches held in two memory
    banks (teacher-side for student anchors, student-side for teacher anchors), read without
    gradient. The banks start as fixed-seed random unit vectors and ``after_train_step`` enqueues the
    batch's embeddings (recomputed with the just-updated heads) first-in first-out. Unlike CRD's
    memory, which keeps a momentum-averaged embedding per dataset index and draws negatives from it,
    this is a MoCo-style FIFO queue of recent embeddings, so it needs no dataset indices; and the
    objective is the softmax (InfoNCE) form of CRD's contrastive bound rather than its binary NCE
    form. The pairs already in the bank include copies of earlier views of the same examples; as in
    MoCo, that is not filtered. A batch larger than K keeps only its last K rows in the bank.

    Defaults ``dim = 128`` and ``temperature = 0.07`` are CRD's; CRD draws 16384 negatives, the
    smaller default bank here suits small edge models and datasets.
    """

    has_per_sample = True

    def __init__(self, dim: int = 128, temperature: float = 0.07, bank_size: int = 4096,
                 student_layer: Optional[str] = None, teacher_layer: Optional[str] = None, weight: float = 1.0):
        super().__init__(student_layer, teacher_layer, weight)
        self.dim = check_int("dim", dim, 1)
        self.temperature = check_range("temperature", temperature, 0.0, None, low_open=True)
        self.bank_size = check_int("bank_size", bank_size, 0)
        self.student_head = None
        self.teacher_head = None
        self.student_bank = None  # (bank_size, dim) student-side negatives, for teacher anchors
        self.teacher_bank = None  # (bank_size, dim) teacher-side negatives, for student anchors
        self.pointer = None  # next row of the banks to overwrite

    def build(self, student, teacher):
        s, t = self._embeddings(student, teacher)
        # float32 whatever the global dtype policy: the logits / τ of unit vectors need the precision.
        self.student_head = keras.layers.Dense(self.dim, name="crd_student_head", dtype="float32")
        self.teacher_head = keras.layers.Dense(self.dim, name="crd_teacher_head", dtype="float32")
        self.student_head(s)
        self.teacher_head(t)
        self._layers += [self.student_head, self.teacher_head]
        if self.bank_size > 0:
            rng = np.random.default_rng(0)
            banks = rng.normal(size=(2, self.bank_size, self.dim))
            banks /= np.linalg.norm(banks, axis=-1, keepdims=True)
            banks = banks.astype(np.float32)
            self.teacher_bank = tf.Variable(banks[0], trainable=False, name="crd_teacher_bank")
            self.student_bank = tf.Variable(banks[1], trainable=False, name="crd_student_bank")
            self.pointer = tf.Variable(0, dtype=tf.int64, trainable=False, name="crd_bank_pointer")

    def variables(self):
        banks = [self.teacher_bank, self.student_bank, self.pointer] if self.pointer is not None else []
        return super().variables() + banks

    def project(self, student, teacher):
        """Returns the unit-norm projections (z_s, z_t), each (batch, dim)."""
        if self.student_head is None:
            raise RuntimeError("crd: build(student, teacher) must be called before the term is used")
        s, t = self._embeddings(student, teacher)
        z_s = tf.math.l2_normalize(self.student_head(s), axis=-1)
        z_t = tf.math.l2_normalize(self.teacher_head(t), axis=-1)
        return z_s, z_t

    def per_sample(self, student, teacher, y):
        z_s, z_t = self.project(student, teacher)
        tau = self.temperature
        if self.bank_size == 0:
            sim = tf.matmul(z_s, z_t, transpose_b=True) / tau  # [i, j] = z_s,i · z_t,j / τ
            labels = tf.range(tf.shape(sim)[0])
            ce_s = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=sim)
            ce_t = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=tf.transpose(sim))
        else:
            pos = tf.reduce_sum(z_s * z_t, axis=-1, keepdims=True) / tau
            neg_s = tf.matmul(z_s, tf.stop_gradient(self.teacher_bank), transpose_b=True) / tau
            neg_t = tf.matmul(z_t, tf.stop_gradient(self.student_bank), transpose_b=True) / tau
            # Cross-entropy with the positive at index 0: logsumexp(logits) − logits[0].
            ce_s = tf.reduce_logsumexp(tf.concat([pos, neg_s], axis=1), axis=1) - pos[:, 0]
            ce_t = tf.reduce_logsumexp(tf.concat([pos, neg_t], axis=1), axis=1) - pos[:, 0]
        return 0.5 * (ce_s + ce_t)

    def after_train_step(self, student, teacher, y):
        """Enqueues the batch's (z_s, z_t) into the banks at the pointer (FIFO, wrapping around)."""
        if self.bank_size == 0:
            return
        z_s, z_t = self.project(student, teacher)
        z_s, z_t = tf.stop_gradient(z_s), tf.stop_gradient(z_t)
        k = tf.constant(self.bank_size, tf.int64)
        b = tf.shape(z_s, out_type=tf.int64)[0]
        # Enqueueing B rows one by one leaves only the last min(B, K) of them; write those directly,
        # at the positions they would have reached, so the scatter never sees a duplicate index.
        n = tf.minimum(b, k)
        idx = (self.pointer + (b - n) + tf.range(n, dtype=tf.int64)) % k
        self.student_bank.scatter_nd_update(idx[:, None], z_s[b - n:])
        self.teacher_bank.scatter_nd_update(idx[:, None], z_t[b - n:])
        self.pointer.assign((self.pointer + b) % k)
