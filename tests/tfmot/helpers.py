"""Helpers of the compression tests: a Distiller, and reading kernels from Keras models and .tflite files."""
import numpy as np

from edge_kd.distill import Distiller, losses
from edge_kd.keras import keras

BATCH = 18          # 1,800 training images -> 100 steps per epoch
PRUNE_STEPS = 300   # 3 epochs


def distiller(student, teacher, lr=2e-3):
    """Returns a compiled Hinton Distiller (alpha 0.7, T 4) of ``student``."""
    d = Distiller(student, teacher, terms=[losses.get("hinton", temperature=4.0, weight=0.7)], hard_weight=0.3)
    d.compile(optimizer=keras.optimizers.Adam(lr))
    return d


def kernel_layers(model):
    """Returns ``{name: kernel as NumPy}`` of the Conv2D and Dense layers of a plain model."""
    return {l.name: l.kernel.numpy() for l in model.layers if type(l) in (keras.layers.Conv2D, keras.layers.Dense)}


def tflite_kernels(path):
    """Returns ``[(op name, weight tensor detail, weight array)]`` of the CONV_2D and FULLY_CONNECTED ops."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_path=str(path),
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    out = []
    for op in interpreter._get_ops_details():
        if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED"):
            index = int(op["inputs"][1])
            out.append((op["op_name"], details[index], interpreter.get_tensor(index)))
    return out


def as_keras_layout(op_name, weights):
    """Returns TFLite weights ([out, h, w, in] conv, [out, in] dense) in Keras' layout ([h, w, in, out], [in, out])."""
    return np.transpose(weights, (1, 2, 3, 0)) if op_name == "CONV_2D" else weights.T


def export(model, variant, path, representative=None):
    """Returns ``path`` after writing ``model`` converted to TFLite ``variant`` (int8 with int8 input/output)."""
    from edge_kd.export.tflite import convert

    path.write_bytes(convert(model, variant, representative=representative, int8_io=True))
    return path


def tflite_by_layer(path, kernels):
    """Returns ``{layer name: (op name, tensor detail, weights in Keras layout)}``, matching kernels by shape."""
    found = {}
    for op_name, detail, weights in tflite_kernels(path):
        w = as_keras_layout(op_name, weights)
        names = [n for n, k in kernels.items() if k.shape == w.shape]
        assert len(names) == 1, (op_name, w.shape, names)
        found[names[0]] = (op_name, detail, w)
    assert set(found) == set(kernels), (sorted(found), sorted(kernels))
    return found


def infer(model, x):
    """Returns ``model``'s outputs on ``x`` in inference mode as NumPy (an eager call: no predict function to trace)."""
    return model(x, training=False).numpy()
