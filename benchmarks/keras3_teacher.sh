#!/bin/bash
# The shipped teacher re-saved as a Keras 3 file against the shipped tf_keras file: the same run, in two rounds
# (tf_keras file first in each); distilled students' weights compared, distill-stage times read.
#   benchmarks/keras3_teacher.sh           a slice: 6,000 training images, 2 epochs (about 3 minutes)
#   FULL=1 benchmarks/keras3_teacher.sh    the default run's distill stage whole (all images, its 10 epochs);
#                                          the later stages off, as they do not touch the teacher file
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/k3bench}; mkdir -p "$OUT"
PY=.venv/bin/python
$PY - <<PY
from edge_kd import builtin_teachers, keras3
from edge_kd.keras import keras
m = keras.models.load_model(builtin_teachers.resolve("builtin:fashion_mnist"), compile=False)
keras3.save_keras3(m, "$OUT/teacher_keras3.keras", "shipped teacher")
print("writer:", keras3.writer("$OUT/teacher_keras3.keras"))
PY
ARGS="--set baseline=false --set prune=false --set qat=false --set export.variants=[int8] --set benchmark.min_seconds=0.1 --set benchmark.warmup_seconds=0.05 --set benchmark.rounds=3"
[ "${FULL:-0}" = 1 ] || ARGS="--limit-train 6000 --limit-test 2000 --epochs 2 --threads 1 $ARGS"
for round in 1 2; do
  for which in tfkeras keras3; do
    t=builtin:fashion_mnist; [ $which = keras3 ] && t=$OUT/teacher_keras3.keras
    $PY -m pipelines.compress $ARGS --teacher $t --out $OUT/out$round --run-name $which > $OUT/$which$round.log 2>&1
    echo "$which round $round rc=$? $(grep 'distill: done in' $OUT/$which$round.log)"
  done
done
$PY - <<PY
import json, numpy as np
from edge_kd.keras import keras
for r in (1, 2):
    a, b = (keras.models.load_model(f"$OUT/out{r}/{w}/distill/student.keras", compile=False).get_weights() for w in ("tfkeras", "keras3"))
    print("round", r, "student weights equal:", all(np.array_equal(x, y) for x, y in zip(a, b)))
    for w in ("tfkeras", "keras3"):
        res = json.loads(open(f"$OUT/out{r}/{w}/results.json").read())
        print(w, {m["name"]: m["accuracy"] for m in res["models"]}, "distill val_accuracy:", res["stage_summaries"].get("distill", {}).get("val_accuracy"))
PY
