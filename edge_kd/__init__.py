"""edge-kd: distil a Keras image classifier into a small, fast TFLite student and report the trade-off."""
from edge_kd.version import __version__  # noqa: F401


def __getattr__(name):
    # Lazy, so that `import edge_kd` for errors or I/O does not pull in TensorFlow.
    if name in ("Distiller", "hinton"):
        from edge_kd import distill

        return getattr(distill, name)
    if name in ("compress_model", "RunResult"):  # the pipeline's run from Python (pipelines/api.py)
        from pipelines import api

        return getattr(api, name)
    raise AttributeError(name)
