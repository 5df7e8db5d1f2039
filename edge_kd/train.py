"""The one fit loop: the optimizer and schedule of an ``OptimizerConfig``, progress per epoch, a stop on a non-finite
loss, Ctrl-C honoured after every batch, and (with ``resume``) a fit that continues at the epoch it had reached.

The optimizer and its schedule are ``edge_kd.optim.OptimizerConfig``'s.

>>> from edge_kd import data, train
>>> from edge_kd.distill import Distiller
>>> import models
>>> b = data.load("mnist", limit_train=600, limit_test=100)
>>> student = models.build("mlp", b.info.input_shape, b.info.num_classes, hidden=(32,))
>>> history = train.fit(Distiller(student), lambda epochs: b.dataset("train", 64, seed=0, epochs=epochs), epochs=1,
...                     learning_rate=2e-3, validation=b.dataset("val"), verbose=0)
>>> sorted(history)[:2]
['accuracy', 'loss']
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import shutil
import sys
import time
from pathlib import Path

from edge_kd import interrupt
from edge_kd.errors import UserError
from edge_kd.fileio import staging_dir, swap_dir, write_bytes, write_json
from edge_kd.keras import keras, tf
from edge_kd.optim import OptimizerConfig


def verbosity() -> int:
    """Returns 1 (a live progress bar) on a terminal, 2 (one line per epoch) in logs."""
    return 1 if sys.stdout.isatty() else 2


class Diverged(UserError):
    """The training loss stopped being a finite number: training stopped at the end of that epoch."""

    def __init__(self, epoch: int, epochs: int | None, value: float):
        of = f" of {epochs}" if epochs else ""
        super().__init__(f"the training loss became {value} in epoch {epoch}{of}, so training stopped and the stage "
                         "kept nothing; lower the learning rate, or check the data and the loss weights")
        self.epoch, self.value = epoch, value


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Raises ``Diverged`` at the end of the first epoch whose mean training loss is NaN or infinite.

    An epoch's mean is non-finite as soon as one batch's loss is, so checking once per epoch catches
    every divergence without the per-batch copy of the logs that a batch hook costs.
    """

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise Diverged(epoch + 1, (self.params or {}).get("epochs"), float(loss))


class EpochCheckpoints:
    """The state of one fit after each finished epoch, kept in ``folder`` so that a fit stopped at any moment (killed,
    interrupted) continues at the epoch it had reached, in a new process, exactly as if it had not stopped.

    The state is the model's (``checkpoint_objects()`` of a Distiller: the student with the random-number state of
    its layers, peers, the terms' variables, a mean teacher; else the whole model), the optimizer's (its step,
    which drives the learning-rate schedule and the augmentation draws, and its slots) and the history so far.
    The data order of the epochs to come is a function of the seed and the epoch (``DataBundle.dataset``), so it
    needs no saving. Each save is built aside and swapped into place: a kill mid-save leaves the last one whole.
    ``key`` names what the state belongs to (a stage's fingerprint); a state of another key is never resumed.

    Once its clock is started (``start_clock``; ``Context.begin_stage`` starts it), each save also records the
    seconds the work it holds took over every sitting, so that a stage finished in several sittings can state its
    whole cost; the time a stopped sitting spent after its last save was lost with it and is not counted.
    """

    STATE = "state.json"
    CHECKPOINT = "variables"

    def __init__(self, folder, key: str = ""):
        self.folder, self.key = Path(folder), str(key)
        #: the seconds the earlier sittings spent on the saved work (read by ``start_clock``)
        self.earlier, self._since = 0.0, None

    def _state(self) -> dict | None:
        """The saved state's record, or None when there is none of this key."""
        try:
            state = json.loads((self.folder / self.STATE).read_text())
        except (OSError, ValueError):
            return None
        return state if state.get("key") == self.key else None

    def start_clock(self) -> None:
        """Starts timing this sitting, after the ``earlier`` seconds of the saved work (0 when none is saved)."""
        state = self._state()
        self.earlier = float(state.get("seconds", 0.0)) if state else 0.0
        self._since = time.perf_counter()

    def seconds(self) -> float:
        """Returns the seconds of the earlier sittings' saved work and of this sitting so far (``start_clock``)."""
        return self.earlier + (time.perf_counter() - self._since if self._since is not None else 0.0)

    @staticmethod
    def _trackables(model) -> dict:
        objects = model.checkpoint_objects() if hasattr(model, "checkpoint_objects") else {"model": model}
        return {**objects, "optimizer": model.optimizer}

    def load(self, model) -> tuple[int, dict]:
        """Restores the saved state into compiled ``model``; returns (epochs done, history), or (0, {}) if none."""
        state = self._state()
        if state is None:
            return 0, {}
        build_optimizer(model)  # its slots exist before they are restored
        status = tf.train.Checkpoint(**self._trackables(model)).read(str(self.folder / self.CHECKPOINT))
        status.assert_existing_objects_matched()
        return int(state["epochs"]), {k: list(v) for k, v in state["history"].items()}

    def save(self, model, epochs: int, history: dict) -> None:
        """Saves ``model``'s state after ``epochs`` finished epochs, with their ``history``."""
        work = staging_dir(self.folder)
        try:
            tf.train.Checkpoint(**self._trackables(model)).write(str(work / self.CHECKPOINT))
            write_json(work / self.STATE, {"key": self.key, "epochs": int(epochs), "history": history,
                                           "seconds": round(self.seconds(), 2)})
            swap_dir(work, self.folder)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise

    def save_arrays(self, done: int, arrays: dict) -> None:
        """For a stage that works in parts rather than epochs (``synthesize``'s batches): keeps the arrays of part
        ``done`` (numbered from 1) and records that ``done`` parts are finished. The part's file is written whole
        before the record names it, so a kill at any moment leaves the record and its parts consistent."""
        import io

        import numpy as np

        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_bytes(self.folder / f"part-{done}.npz", buf.getvalue())
        write_json(self.folder / self.STATE, {"key": self.key, "epochs": int(done), "history": {},
                                              "seconds": round(self.seconds(), 2)})

    def trim_arrays(self, part: int, keep) -> None:
        """Rewrites ``part``'s file with only the arrays named in ``keep`` (what a later part has made obsolete)."""
        import io

        import numpy as np

        arrays = {k: v for k, v in self.load_arrays(part).items() if k in keep}
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        write_bytes(self.folder / f"part-{part}.npz", buf.getvalue())

    def load_arrays(self, part: int) -> dict:
        """Returns the arrays ``save_arrays`` kept of ``part``."""
        import numpy as np

        with np.load(self.folder / f"part-{part}.npz") as f:
            return {k: f[k] for k in f.files}

    def epochs_done(self) -> int:
        """Returns the epochs the saved state holds (0 when there is none of this key)."""
        state = self._state()
        return int(state["epochs"]) if state else 0

    def clear(self) -> None:
        """Removes the saved state (the fit it belongs to is finished and kept)."""
        shutil.rmtree(self.folder, ignore_errors=True)


class _SaveEachEpoch(keras.callbacks.Callback):
    """Continues a fit at epoch ``start`` (the step counter that the augmentation draws from follows), and saves
    its state after every epoch."""

    def __init__(self, checkpoints: EpochCheckpoints, start: int, history: dict):
        super().__init__()
        self.checkpoints, self.start, self.history = checkpoints, start, history

    def on_train_begin(self, logs=None):
        steps = int((self.params or {}).get("steps") or 0)
        self.model._train_counter.assign(self.start * steps)  # fit set it to 0

    def on_epoch_end(self, epoch, logs=None):
        for k, v in (logs or {}).items():
            self.history.setdefault(k, []).append(float(v))
        self.checkpoints.save(self.model, epoch + 1, self.history)


def build_optimizer(model) -> None:
    """Creates the compiled ``model``'s optimizer slots for the variables its training step updates, in the order
    that step passes them.

    Made before the first step, not inside it: a tf.function that creates variables on its first call is traced
    twice, and tracing a large train step is most of a short fit's time (a pruned MobileNetV2's first step took
    23 s with the slots made inside it, 16 s without; the losses are the same to the last digit).
    """
    trained = model.trained_variables() if hasattr(model, "trained_variables") else model.trainable_variables
    model.optimizer.build(trained)


def fit(model, train, epochs: int, learning_rate: float, validation=None, callbacks=(), verbose=None,
        optimizer: OptimizerConfig | None = None, resume: EpochCheckpoints | None = None) -> dict:
    """Compiles ``model`` with ``optimizer`` (default: Adam, cosine decay over the whole fit; anything with
    ``OptimizerConfig.build``'s signature, such as ``edge_kd.bit.Optimizer``), trains it; returns the history as
    lists, one value per epoch.

    ``train`` gives the training batches: a function of a range of epochs returning their batches, one epoch
    after another, every epoch of the same length (``lambda epochs: bundle.dataset("train", 128, seed=0,
    epochs=epochs)``), or a batched tf.data dataset of one epoch, iterated anew each epoch. With ``resume``
    (which needs the function), the state after each epoch is saved there, and a fit that finds a state of its
    key continues after its last finished epoch. A non-finite loss raises ``Diverged``; a Ctrl-C swallowed where
    it arrived (``edge_kd.interrupt``) is honoured at the end of the batch.

    Under a multi-worker strategy (``tf.distribute.MultiWorkerMirroredStrategy`` over several workers), a function
    ``train`` that takes an ``input_context`` argument is called with each worker's ``tf.distribute.InputContext``
    and returns that worker's share of every global batch (``DataBundle.dataset(..., input_context=...)``); called
    without it, it returns the global batches, which give the steps per epoch.
    """
    by_epoch = callable(train) and not isinstance(train, tf.data.Dataset)
    if resume is not None and not by_epoch:
        raise ValueError("resume needs train as a function of the epochs (DataBundle.dataset(..., epochs=...))")
    per_epoch = max(1, len(train(range(1)) if by_epoch else train))
    steps = max(1, epochs * per_epoch)
    model.compile(optimizer=(optimizer or OptimizerConfig()).build(learning_rate, steps, per_epoch))
    build_optimizer(model)
    start, done = resume.load(model) if resume is not None else (0, {})
    extra = [_SaveEachEpoch(resume, start, done)] if resume is not None else []
    if start >= epochs:
        return done
    # An endless stream, so that Keras opens it once: it reopens a pipeline of one epoch's length before every
    # epoch, and one opened twice would draw its shuffled orders twice, so that no epoch sees its own.
    batches = _epochs_of(train, range(start, epochs)) if by_epoch else train
    history = model.fit(batches, validation_data=validation,
                        epochs=epochs, initial_epoch=start, steps_per_epoch=per_epoch if by_epoch else None,
                        verbose=verbosity() if verbose is None else verbose,
                        callbacks=[StopOnNonFiniteLoss(), interrupt.callback(), *callbacks, *extra])
    if resume is not None:
        return done
    return {k: [float(v) for v in vs] for k, vs in history.history.items()}


def _epochs_of(train, epochs: range):
    """Returns the batches of ``epochs`` as one endless stream: of the global batches, or under a multi-worker strategy
    (where ``train`` takes an ``input_context``) each worker's own share of them."""
    strategy = tf.distribute.get_strategy()
    several_workers = getattr(strategy.extended, "_in_multi_worker_mode", lambda: False)()
    if not several_workers or "input_context" not in inspect.signature(train).parameters:
        return train(epochs).repeat()
    return strategy.distribute_datasets_from_function(lambda ctx: train(epochs, input_context=ctx).repeat())


@contextlib.contextmanager
def precision(policy: str):
    """Sets the global Keras dtype policy for the block (the models built inside take it), then restores the old one."""
    old = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(old)


def float32_copy(model):
    """Returns ``model`` when every layer computes in float32, else a copy that does, holding the same weights.

    A model built under ``mixed_float16`` keeps float32 weights but computes in float16; saved as it is,
    it would carry float16 compute (and casts) into every model loaded from it and into the TFLite export.
    """
    return computing_in(model, "float32")


def computing_in(model, policy: str):
    """Returns a copy of the Functional or Sequential ``model`` holding the same weights whose layers compute under
    ``policy`` (``"float32"``, ``"mixed_bfloat16"``, ...), its outputs in float32 whatever the policy (they are what
    losses read): the layers that give them compute in float32, in a nested model too, and an output that still
    comes out in 16 bits (an op layer, which does not cast) is cast by a float32 layer after it. ``model`` itself
    when its layers already compute so; a subclassed model, which cannot be rebuilt from its config, raises
    NotImplementedError."""
    if _computes_as(model, policy):
        return model
    if not getattr(model, "_is_graph_network", False) and not isinstance(model, keras.Sequential):
        raise NotImplementedError(f"{type(model).__name__} is not a Functional or Sequential model")
    with precision(policy), keras.utils.custom_object_scope(_layer_classes(model)):
        copy = model.__class__.from_config(_with_policy(model.get_config(), policy))
    copy.set_weights(model.get_weights())
    if all(o.dtype == tf.float32 for o in copy.outputs):
        return copy
    with precision("float32"):
        cast = [keras.layers.Activation("linear", dtype="float32", name=f"{copy.name}_float32_{i}")(o)
                for i, o in enumerate(copy.outputs)]
    return keras.Model(copy.inputs, cast if len(cast) > 1 else cast[0], name=copy.name)


def _layer_classes(model) -> dict:
    """Returns {class name: class} of every layer in ``model`` and its nested models: what rebuilding it from its
    config must know beyond Keras' own layers (a custom layer of the model's author or of edge-kd)."""
    classes = {}
    for layer in model.layers:
        classes[type(layer).__name__] = type(layer)
        if isinstance(layer, keras.Model):
            classes.update(_layer_classes(layer))
    return classes


#: layers that only combine what other layers give: the layers feeding one that gives an output give it too
_COMBINING = {"Average", "Add", "Maximum", "Minimum", "Concatenate"}


def _output_layers(config: dict) -> set:
    """Returns the names of a Functional or Sequential model config's layers that give its outputs: the output
    layers and, through a layer that only combines (an average of the logits of two views), the layers it reads."""
    layers_ = config.get("layers", [])
    if "output_layers" in config:  # Functional: [[name, node, tensor], ...], or one such triple
        outs = config["output_layers"]
        todo = [outs[0]] if outs and isinstance(outs[0], str) else [o[0] for o in outs]
    else:  # Sequential: its last layer
        todo = [layers_[-1]["config"]["name"]] if layers_ else []
    by_name = {layer.get("config", {}).get("name"): layer for layer in layers_}
    found = set()
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        layer = by_name.get(name, {})
        if layer.get("class_name") in _COMBINING:
            todo += [inbound[0] for node in layer.get("inbound_nodes", []) if isinstance(node, list)
                     for inbound in node if isinstance(inbound, list) and inbound and isinstance(inbound[0], str)]
    return found


def _computes_as(model, policy: str, float32_outputs: bool = True) -> bool:
    """Whether ``model``'s layers already compute as ``computing_in`` would make them (see ``_with_policy``)."""
    outputs = _output_layers(model.get_config()) if float32_outputs else set()
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            if not _computes_as(layer, policy, layer.name in outputs):
                return False
        elif layer.dtype_policy.name != ("float32" if layer.name in outputs else policy):
            return False
    return True


def _with_policy(config: dict, policy: str, float32_outputs: bool = True) -> dict:
    """Returns a Functional or Sequential model's config with every layer's dtype policy replaced by ``policy``,
    nested models' layers too, except input layers (their dtype is the input's) and, with ``float32_outputs``, the
    layers that give the model's outputs (``_output_layers``: float32; in a nested model that gives an output, the
    layers giving its own)."""
    layers_ = config.get("layers", [])
    outs = _output_layers(config)
    new_layers = []
    for layer in layers_:
        inner, name = layer.get("config", {}), layer.get("config", {}).get("name")
        keep = float32_outputs and name in outs
        if isinstance(inner, dict) and "layers" in inner:  # a nested model
            new_layers.append({**layer, "config": _with_policy(inner, policy, keep)})
        elif layer.get("class_name") == "InputLayer":
            new_layers.append(layer)
        else:
            dtype = "float32" if keep else policy
            new_layers.append({**layer, "config": {**_policies(inner, dtype), "dtype": dtype}})
    return {**config, "layers": new_layers}


def _policies(config, policy: str):
    """Returns ``config`` with every serialized dtype policy inside it (a wrapper's inner layer) replaced."""
    if isinstance(config, list):
        return [_policies(v, policy) for v in config]
    if not isinstance(config, dict):
        return config
    if config.get("class_name") in ("Policy", "DTypePolicy"):
        return policy
    return {k: _policies(v, policy) for k, v in config.items()}
