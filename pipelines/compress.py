"""python -m pipelines.compress: distil, export, benchmark and report in one command.

With no arguments it runs the built-in MNIST default: trains a teacher CNN, distils a small
student from it, trains the same student without a teacher for comparison, exports TFLite
models (fp32, fp16, dynamic-range, int8), measures them with LiteRT and writes
tflite_out/<run>/report.md, results.json, results.csv and pareto.png.
"""
from __future__ import annotations

import argparse
import os
import sys

from edge_kd.errors import UserError

PROG = "python -m pipelines.compress"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2: the same contract as every other user mistake
        print(f"{PROG}: error: {message} (see --help)", file=sys.stderr)
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
    from pipelines.config import RunConfig

    d = RunConfig()
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[1].replace("\n", " "),
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="'mnist' (built in), a .npz with x_train/y_train/x_test/y_test "
                   "(uint8 pixels), a folder with one subfolder of images per class (optionally under train/ and "
                   "test/), or tfds:<name> (tensorflow-datasets; downloads once)")
    g.add_argument("--image-size", type=lambda t: _pair(int, 2, t), default=None, metavar="H,W",
                   help="resize image-folder and tfds images to H,W")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="fraction of the training images held out for validation")
    g.add_argument("--limit-train", type=int, default=None, metavar="N", help="use only N training images (quick runs)")
    g.add_argument("--limit-test", type=int, default=None, metavar="N", help="use only N test images (quick runs)")
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", default=None, metavar="PATH",
                   help="your trained teacher (.keras or .h5; softmax or logits head) instead of training one")
    g.add_argument("--trust-teacher", action="store_true",
                   help="allow loading a teacher whose file runs code (Lambda layers); only for files you trust")
    g.add_argument("--teacher-input-range", type=lambda t: _pair(float, 2, t), default=None, metavar="LO,HI",
                   help="the input range your teacher was trained on (raw 0..255 mapped linearly to LO..HI, "
                        "e.g. -1,1 or 0,255); default: the same as the student, 0,1")
    g.add_argument("--teacher-arch", default=d.teacher_arch, help="architecture of the teacher trained when no --teacher")
    g.add_argument("--teacher-epochs", type=int, default=d.teacher_epochs, help="epochs to train that teacher")
    g = p.add_argument_group("student and distillation")
    g.add_argument("--student", default=d.student, help="student architecture from the models registry "
                   "(mlp, cnn, cnn_large, resnet8, mobilenet)")
    g.add_argument("--student-width", type=float, default=d.student_width,
                   help="width multiplier of the student's layers (cnn, resnet8, mobilenet)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="epochs of distillation (and of the no-teacher baseline)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size")
    g.add_argument("--learning-rate", type=float, default=d.learning_rate,
                   help="Adam's initial learning rate (cosine decay to 0 over the run)")
    g.add_argument("--temperature", "-T", type=float, default=d.temperature, help="softmax temperature T of the soft targets (> 0)")
    g.add_argument("--alpha", type=float, default=d.alpha,
                   help="weight of the soft term: loss = (1-alpha)*CE + alpha*T^2*KL, alpha in [0, 1]")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of weights, shuffling and the validation split")
    g = p.add_argument_group("export, benchmark, output")
    g.add_argument("--int8-float-io", action="store_true",
                   help="keep float32 input/output on the int8 model (default: int8 input and output)")
    g.add_argument("--threads", type=_int_list, default=d.threads, metavar="N[,N...]",
                   help="LiteRT thread counts to measure latency at")
    g.add_argument("--out", default=d.out, metavar="DIR", help="folder that holds run folders")
    g.add_argument("--run-name", default=None, help="run folder name (default: <data>-<student>)")
    return p


def config_from_args(args):
    """Returns the validated RunConfig for parsed ``args``."""
    from pipelines.config import RunConfig

    return RunConfig(
        data=args.data, teacher=args.teacher, trust_teacher=args.trust_teacher,
        teacher_input_range=args.teacher_input_range, teacher_arch=args.teacher_arch,
        teacher_epochs=args.teacher_epochs, student=args.student, student_width=args.student_width,
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
        temperature=args.temperature, alpha=args.alpha, seed=args.seed, val_fraction=args.val_fraction,
        image_size=args.image_size, limit_train=args.limit_train, limit_test=args.limit_test,
        int8_io=not args.int8_float_io, threads=args.threads, out=args.out, run_name=args.run_name,
    ).validate()


def _send_native_logs_to(path):
    """Points file descriptor 2 (TensorFlow's C++ logging) at ``path``; Python's own stderr stays on the terminal."""
    import warnings

    saved = os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 2)
    os.close(log)
    sys.stderr = os.fdopen(saved, "w", buffering=1, closefd=True)
    log_stream = open(path, "a", buffering=1)
    warnings.showwarning = lambda msg, cat, fn, ln, file=None, line=None: log_stream.write(
        warnings.formatwarning(msg, cat, fn, ln, line))


def main(argv=None, quiet_native: bool = False) -> int:
    """Runs the command; returns its exit status (0 done, 2 user mistake, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    command = " ".join([PROG, *(argv if argv is not None else sys.argv[1:])])
    try:
        cfg = config_from_args(args)
        if quiet_native:
            os.makedirs(cfg.out, exist_ok=True)
            _send_native_logs_to(os.path.join(cfg.out, f".{cfg.resolved_run_name()}.native.log"))
        from pipelines.run import run

        run(cfg, command=command)
        return 0
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the run folder was left as it was before this run", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(quiet_native=True))
