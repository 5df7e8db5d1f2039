"""The one place that imports Keras.

edge-kd uses Keras 2 (``tf_keras``) on purpose: tensorflow-model-optimization only accepts
Keras 2 Sequential/Functional models. Every other module does ``from edge_kd.keras import keras, tf``
so that a later move to Keras 3 is a change to this file alone.
"""
import os

# Must be set before TensorFlow is imported anywhere, so that tf.keras and tfmot resolve to tf_keras.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

__all__ = ["keras", "tf"]

# Retracing and deprecation notices from TensorFlow's Python logger are not the user's business.
tf.get_logger().setLevel("ERROR")
