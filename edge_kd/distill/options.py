"""The names the Distiller's options take, importable without TensorFlow (the recipe's schema is built from them)."""

#: how the teachers' terms are weighed: by ``teacher_weights`` (fixed), or per example by each teacher's
#: confidence in the true class (confidence)
COMBINE = ("fixed", "confidence")
