"""``python -m tests.pipelines.faults <fault> <where> <n> -- <command> <arguments>``: ``python -m pipelines.<command>``
(compress or search) in a real process that signals itself at a point the test chooses, not one a sleep guesses at:

- ``kill <stage> <n>``: SIGKILL (as ``kill -9``) right after stage ``<stage>`` saved its epoch ``<n>``;
- ``kill batch:<stage>:<e> <n>``: SIGKILL at the end of training batch ``<n>`` of stage ``<stage>``'s epoch ``<e>``
  (mid-epoch: in a multi-worker job, after the other workers began that epoch with this one);
- ``sigint batch:<stage> <n>``: Ctrl-C (SIGINT) at the end of training batch ``<n>`` of stage ``<stage>``'s first
  epoch, inside the Keras callback that TensorFlow calls there;
- ``sigint convert <n>``: Ctrl-C when the TFLite converter's calibration loop asks for its sample ``<n>``;
- ``sigint litert <n>``: Ctrl-C at the ``<n>``-th call of a model in the LiteRT benchmark loop.
"""
import os
import signal
import sys


def _sigint():
    os.kill(os.getpid(), signal.SIGINT)


def _kill_after_saving(stage, epoch):
    from edge_kd import train

    save = train.EpochCheckpoints.save

    def save_then_die(self, model, epochs, history):
        save(self, model, epochs, history)
        if self.folder.name == stage and epochs == epoch:
            os.kill(os.getpid(), signal.SIGKILL)

    train.EpochCheckpoints.save = save_then_die


def _kill_at_batch(stage, epoch, n):
    from edge_kd import interrupt, train
    from edge_kd.keras import keras

    real = train.fit

    class AtBatch(keras.callbacks.Callback):
        def on_epoch_begin(self, e, logs=None):
            self.epoch = e + 1

        def on_train_batch_end(self, batch, logs=None):
            if self.epoch == epoch and batch == n:
                os.kill(os.getpid(), signal.SIGKILL)

    def fit(*args, callbacks=(), **kw):
        if (interrupt.where() or "").startswith(f"stage '{stage}'"):
            callbacks = [*callbacks, AtBatch()]
        return real(*args, callbacks=callbacks, **kw)

    train.fit = fit


def _sigint_at_batch(stage, n):
    from edge_kd import interrupt, train
    from edge_kd.keras import keras

    real = train.fit

    class AtBatch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == n:
                _sigint()

    def fit(*args, callbacks=(), **kw):
        if (interrupt.where() or "").startswith(f"stage '{stage}'"):
            callbacks = [*callbacks, AtBatch()]
        return real(*args, callbacks=callbacks, **kw)

    train.fit = fit


def _sigint_in_converter(n):
    from edge_kd.export import tflite

    real = tflite._representative_dataset

    def representative(samples):  # the generator the converter's calibration loop calls into
        def gen():
            for i, item in enumerate(real(samples)()):
                if i == n:
                    _sigint()
                yield item

        return gen

    tflite._representative_dataset = representative


def _sigint_in_litert(n):
    from edge_kd.bench import litert

    real, calls = litert._invoker, []

    def invoker(*args, **kw):
        invoke = real(*args, **kw)

        def counted():
            calls.append(1)
            if len(calls) == n:
                _sigint()
            invoke()

        return counted

    litert._invoker = invoker


def main(argv):
    fault, where, n, sep, command, *args = argv
    assert sep == "--" and command in ("compress", "search"), argv
    n = int(n)
    if fault == "kill" and where.startswith("batch:"):
        _, stage, epoch = where.split(":")
        _kill_at_batch(stage, int(epoch), n)
    elif fault == "kill":
        _kill_after_saving(where, n)
    elif fault == "sigint" and where.startswith("batch:"):
        _sigint_at_batch(where.split(":", 1)[1], n)
    elif fault == "sigint" and where == "convert":
        _sigint_in_converter(n)
    elif fault == "sigint" and where == "litert":
        _sigint_in_litert(n)
    else:
        raise SystemExit(f"unknown fault {fault} {where}")
    if command == "compress":
        from pipelines.compress import main as run
    else:
        from pipelines.search.__main__ import main as run
    return run(args, quiet_native=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
