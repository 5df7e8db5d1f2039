"""edge-kd: distil a Keras image classifier into a small, fast TFLite student and report the trade-off."""
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so that `import edge_kd` for errors or I/O does not pull in TensorFlow.
    if name in ("Distiller", "hinton"):
        from edge_kd import distill

        return getattr(distill, name)
    raise AttributeError(name)
