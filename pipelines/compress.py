"""python -m pipelines.compress: distil, prune, quantize, export, benchmark and report, from one recipe.

With no arguments it runs the built-in recipe (pipelines/recipes/fashion_mnist.yaml) on the built-in
Fashion-MNIST: takes the teacher shipped in the package, distils a small student from it on augmented
images (the teacher seeing each step's view), trains the same student without a teacher for
comparison, prunes the student to 75 % while distilling, runs sparsity-preserving quantization-aware training
while distilling, exports TFLite models, measures them with LiteRT and writes
tflite_out/<run>/report.md, results.json, results.csv, pareto.png and layer_error.png. Each stage is resumable:
rerunning a command skips the stages that finished with the same settings, inputs and code.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

from edge_kd.errors import UserError

PROG = "python -m pipelines.compress"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2: the same contract as every other user mistake
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _pair(kind, n, text):
    parts = text.replace("x", ",").split(",")
    try:
        values = tuple(kind(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {text!r}") from None
    if len(values) != n:
        raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {text!r}")
    return values


def _int_list(text):
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """Returns the command's argument parser; --help documents every option."""
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[1].replace("\n", " "),
                epilog="Options other than --recipe, --set and --out are shortcuts for recipe keys (shown in "
                       "brackets) and override the recipe. Defaults are the built-in recipe's (fashion_mnist).")
    g = p.add_argument_group("recipe")
    g.add_argument("--recipe", default=None, metavar="YAML|NAME",
                   help="the run's recipe (data, teacher, student, stages and their parameters): a YAML file, or "
                        "the name of a shipped recipe (fashion_mnist, mnist, cifar10_resnet8, ...: "
                        "pipelines/recipes/); default: fashion_mnist")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a recipe key, typed as in YAML, e.g. --set prune.target_sparsity=0.5 "
                        "--set distill.epochs=10 --set data.limit_train=5000 (repeatable; `stage.key` is short "
                        "for `stages.stage.key`; naming a stage the recipe lacks adds it)")
    g.add_argument("--out", default="tflite_out", metavar="DIR", help="folder holding run folders (default: tflite_out)")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="[data.source] 'fashion_mnist' or 'mnist' (built in), a .npz with x_train/y_train/x_test/y_test "
                   "(uint8 pixels), a folder with one subfolder of images per class (optionally under train/ and "
                   "test/), or tfds:<name> (tensorflow-datasets; downloads once)")
    g.add_argument("--image-size", type=lambda t: _pair(int, 2, t), metavar="H,W",
                   help="[data.image_size] resize the images to H,W (any source)")
    g.add_argument("--val-fraction", type=float, help="[data.val_fraction] training images held out for validation")
    g.add_argument("--limit-train", type=int, metavar="N", help="[data.limit_train] use only N training images")
    g.add_argument("--limit-test", type=int, metavar="N", help="[data.limit_test] use only N test images")
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", metavar="PATH",
                   help="[teacher.path] your trained teacher (.keras or .h5; softmax or logits head; or builtin:<name>) instead of "
                        "training one")
    g.add_argument("--trust-teacher", action="store_true", default=None,
                   help="[teacher.trust] allow loading a teacher whose file runs code (Lambda layers); only for "
                        "files you trust")
    g.add_argument("--teacher-input-range", type=lambda t: _pair(float, 2, t), metavar="LO,HI",
                   help="[teacher.input_range] the input range your teacher was trained on (raw 0..255 mapped "
                        "linearly to LO..HI, e.g. -1,1 or 0,255); default: the student's, 0,1")
    g.add_argument("--teacher-arch", help="[teacher.arch] architecture of the teacher trained when no --teacher")
    g.add_argument("--teacher-epochs", type=int, help="[teacher.epochs] epochs to train that teacher")
    g = p.add_argument_group("student and distillation")
    g.add_argument("--student", help="[student.arch or student.path] student architecture (with its default options) from "
                   "the models registry (mlp, cnn, cnn_large, resnet8, mobilenet; keras.applications: mobilenet_v2, "
                   "mobilenet_v3_small, mobilenet_v3_large, efficientnet_b0, resnet50_v2), or your model file "
                   "(.keras or .h5, tf_keras or Keras 3, trained or not)")
    g.add_argument("--student-width", type=float, help="[student.options.width] width multiplier (cnn, resnet8, mobilenet)")
    g.add_argument("--epochs", type=int, help="[stages.distill.epochs] epochs of distillation (the baseline follows)")
    g.add_argument("--batch-size", type=int, help="[training.batch_size] training batch size")
    g.add_argument("--learning-rate", type=float,
                   help="[training.learning_rate] the peak learning rate (training.optimizer; warm-up, then cosine "
                   "decay within each stage)")
    g.add_argument("--temperature", "-T", type=float,
                   help="[distillation.terms hinton temperature] softmax temperature T of the soft targets (> 0)")
    g.add_argument("--alpha", type=float,
                   help="[hinton weight, hard_weight = 1 - alpha] weight of the soft term: "
                        "loss = (1-alpha)*CE + alpha*T^2*KL, alpha in [0, 1]")
    g.add_argument("--seed", type=int, help="[seed] seed of weights, shuffling and the validation split")
    g.add_argument("--worker-timeout", type=float, metavar="SECONDS",
                   help="[training.worker_timeout] with training.strategy multi_worker: how long a worker waits for "
                        "the others (to start, at each step) before it gives up with one line (default 600)")
    g = p.add_argument_group("export and benchmark")
    g.add_argument("--int8-float-io", action="store_true", default=None,
                   help="[stages.export.int8_io: false] keep float32 input/output on int8 models")
    g.add_argument("--threads", type=_int_list, metavar="N[,N...]",
                   help="[stages.benchmark.threads] LiteRT thread counts to measure latency at")
    g.add_argument("--run-name", help="[name] run folder name (default: <data>-<student>)")
    return p


def _shortcut_overrides(args) -> list[str]:
    """Returns the --set assignments that the shortcut options stand for."""
    def dump(v):
        return json.dumps(list(v) if isinstance(v, tuple) else v)

    simple = {"data": "data.source", "image_size": "data.image_size", "val_fraction": "data.val_fraction",
              "limit_train": "data.limit_train", "limit_test": "data.limit_test", "teacher": "teacher.path",
              "trust_teacher": "teacher.trust", "teacher_input_range": "teacher.input_range",
              "teacher_arch": "teacher.arch", "teacher_epochs": "teacher.epochs", "student": "student.arch",
              "student_width": "student.options.width", "epochs": "stages.distill.epochs",
              "batch_size": "training.batch_size", "learning_rate": "training.learning_rate", "seed": "seed",
              "threads": "stages.benchmark.threads", "run_name": "name", "worker_timeout": "training.worker_timeout"}
    out = []
    for attr, key in simple.items():
        if getattr(args, attr) is not None:
            value = getattr(args, attr)
            if attr == "student":  # the model named replaces the recipe's choice whole: its own defaults, no weights
                out += ["student.options={}", "student.weights=null", "student.path=null"]
                if str(value).lower().endswith((".keras", ".h5", ".hdf5")):
                    out.append(f"student.path={dump(value)}")
                    continue
            if attr == "teacher_arch":  # a teacher trained here, of this architecture with its own defaults
                out += ["teacher.path=null", "teacher.options={}", "teacher.weights=null"]
            out.append(f"{key}={dump(value)}")
    if args.int8_float_io:
        out.append("stages.export.int8_io=false")
    return out


def load_recipe(args):
    """Returns the validated recipe: the file (or the default), then the shortcuts, then every --set."""
    from edge_kd.errors import UserError
    from pipelines import recipe as recipe_mod

    r = recipe_mod.load(args.recipe)
    r = recipe_mod.apply_overrides(r, _shortcut_overrides(args) + list(args.overrides))
    if args.temperature is not None or args.alpha is not None:
        from edge_kd.distill import losses
        from edge_kd.distill.distiller import alpha_weights

        try:  # the option's value is checked by the rule it feeds, named as the option
            if args.temperature is not None:
                losses.get("hinton", temperature=args.temperature)
            hard, soft = alpha_weights(args.alpha) if args.alpha is not None else (None, None)
        except UserError as e:
            raise UserError(f"--{e}") from None
        idx = [i for i, t in enumerate(r.distillation.terms) if t.get("name") == "hinton"]
        if not idx:
            raise UserError("--temperature/--alpha set the hinton term, but the recipe's distillation.terms has none")
        sets = []
        if args.temperature is not None:
            sets.append(f"distillation.terms.{idx[0]}.temperature={args.temperature!r}")
        if args.alpha is not None:
            sets += [f"distillation.terms.{idx[0]}.weight={soft!r}", f"distillation.hard_weight={hard!r}"]
        r = recipe_mod.apply_overrides(r, sets)
    return r


def _send_native_logs_to(path):
    """Points file descriptor 2 (TensorFlow's C++ logging) and Python's log records (absl, tfds, urllib3) at
    ``path``; Python's own stderr, where edge-kd writes its errors, stays on the terminal."""
    import logging
    import warnings

    # before any library configures logging: their later basicConfig calls find this handler and add none
    logging.basicConfig(handlers=[logging.FileHandler(path)], level=logging.INFO, force=True)

    saved = os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 2)
    os.close(log)
    sys.stderr = os.fdopen(saved, "w", buffering=1, closefd=True)
    log_stream = open(path, "a", buffering=1)
    warnings.showwarning = lambda msg, cat, fn, ln, file=None, line=None: log_stream.write(
        warnings.formatwarning(msg, cat, fn, ln, line))


def main(argv=None, quiet_native: bool = False) -> int:
    """Runs the command; returns its exit status (0 done, 2 user mistake, 130 interrupted).

    With ``quiet_native`` (the command line), TensorFlow's C++ log lines go to a log file: the run
    folder's native.log after a run, and a temporary file, named on failure, until then.
    """
    args = build_parser().parse_args(argv)
    command = " ".join([PROG, *(argv if argv is not None else sys.argv[1:])])

    def body(native_log):
        recipe = load_recipe(args)
        from pipelines.run import run

        run_dir = run(recipe, out=args.out, command=command)  # None on a worker of a multi-worker job but the chief
        if quiet_native and run_dir is not None:
            shutil.copyfile(native_log, run_dir / "native.log")
        return 0

    return run_command(PROG, body, quiet_native, kept="finished stages and epochs")


def run_command(prog: str, body, quiet_native: bool, kept: str) -> int:
    """Runs ``body(native_log)``, a command's work, and returns its exit status: body's, or 2 for a UserError (one
    line), 130 for Ctrl-C (one line saying where it stopped, that ``kept`` are kept and a rerun resumes).

    Ctrl-C is made reliable for the whole body (``edge_kd.interrupt``): a second one, or a first one not acted on
    within a few seconds, ends the process at once with the same line. With ``quiet_native``, TensorFlow's C++
    log lines and other libraries' Python log records go to ``native_log``, a temporary file, set up before
    body runs (and so before TensorFlow is first imported); it is removed afterwards, unless the command failed
    with a traceback, whose message then names it.
    """
    from edge_kd import interrupt

    native_log = os.path.join(tempfile.gettempdir(), f"edge-kd-native-{os.getpid()}.log")
    if quiet_native:
        _send_native_logs_to(native_log)

    def interrupted(where=None, resume_at=None):
        where = where or interrupt.where()
        during = f" during {where}" if where else ""
        return (f"{prog}: interrupted{during}; {kept} are kept: rerun the same command to resume"
                + (f" at {resume_at}" if resume_at else ""))

    keep_log = False
    try:
        with interrupt.handling(interrupted):
            code = body(native_log)
        if interrupt.requested():  # a Ctrl-C swallowed where it was raised, after the last check
            raise KeyboardInterrupt
        return code
    except BaseException as e:
        # a Ctrl-C, or whatever error a library made of one where it arrived
        if isinstance(e, KeyboardInterrupt) or interrupt.requested():
            print(interrupted(getattr(e, "where", None), getattr(e, "resume_at", None)), file=sys.stderr)
            return interrupt.EXIT_STATUS
        if isinstance(e, UserError):
            print(f"{prog}: error: {e}", file=sys.stderr)
            return e.exit_code
        keep_log = quiet_native
        if keep_log:
            print(f"{prog}: failed; TensorFlow's own log is in {native_log}", file=sys.stderr)
        raise
    finally:
        if quiet_native and not keep_log and os.path.exists(native_log):
            os.unlink(native_log)


if __name__ == "__main__":
    sys.exit(main(quiet_native=True))
