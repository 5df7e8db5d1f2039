"""Recipes: the shipped ones validate; every kind of mistake is one line naming key, value and what is allowed."""
import pytest

from edge_kd.tfmot.cluster import ClusterConfig
from edge_kd.tfmot.prune import PruneConfig
from edge_kd.data import DataConfig
from edge_kd.errors import UserError
from pipelines import compress, recipe, registry


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist", "mnist_tfmot_only", "cifar10_resnet8"])
def test_shipped_recipes_validate(name):
    r = recipe.load(recipe.RECIPES / f"{name}.yaml")
    assert r.stages.enabled()[-4:] == ["export", "benchmark", "bundle", "report"]
    assert ("prune" in r.stages.enabled()) and ("qat" in r.stages.enabled())


def test_default_recipe_runs_every_stage_of_the_product():
    from pathlib import Path

    r = recipe.load()
    assert r.data.source == "fashion_mnist"
    assert Path(r.teacher.path).is_file() and Path(r.teacher.path).parent.name == "teachers"  # the shipped teacher
    assert r.stages.enabled() == ["distill", "baseline", "prune", "qat", "export", "benchmark", "bundle", "report"]
    assert r.stages.prune.target_sparsity == 0.75
    assert r.distils("distill") and r.distils("prune") and r.distils("qat") and r.distillation.consistent
    assert r.stages.distill.augment.translate == 2 and r.stages.distill.augment.flip
    assert r.run_name() == "fashion_mnist-cnn"


def test_the_teacher_recipe_trains_the_shipped_teachers_architecture():
    shipped, default = recipe.load(recipe.RECIPES / "fashion_mnist_teacher.yaml"), recipe.load()
    assert "teacher" in shipped.stages.enabled()
    keys = ("arch", "options", "epochs", "optimizer", "momentum", "nesterov", "learning_rate", "warmup_epochs")
    assert {k: getattr(shipped.teacher, k) for k in keys} == {k: getattr(default.teacher, k) for k in keys}
    assert shipped.augment == default.augment and shipped.data == default.data


def test_a_null_teacher_path_brings_the_teacher_stage_back():
    r = recipe.apply_overrides(recipe.load(), ["teacher.path=null"])
    assert r.stages.enabled()[0] == "teacher" and r.stages.teacher.augment == r.augment
    r = recipe.apply_overrides(r, ["teacher.path=builtin:fashion_mnist"])
    assert "teacher" not in r.stages.enabled()


def test_a_stages_augment_overrides_only_the_keys_it_gives_and_follows_later_sets():
    r = recipe.apply_overrides(recipe.load(), ["augment.mixup=0.2", "prune.augment={flip: false}"])
    assert r.stages.distill.augment.mixup == 0.2 and r.stages.qat.augment.mixup == 0.2
    assert r.stages.prune.augment.flip is False and r.stages.prune.augment.mixup == 0.2
    assert r.stages.prune.augment.translate == 2
    r = recipe.apply_overrides(r, ["augment.translate=3"])
    assert r.stages.prune.augment.translate == 3 and r.stages.prune.augment.flip is False
    assert r.stages.distill.augment.translate == 3
    assert recipe.from_dict(r.to_dict()).to_dict() == r.to_dict()


@pytest.mark.parametrize("base, tfmot", [("mnist", "mnist_tfmot_only"), ("fashion_mnist", "fashion_mnist_tfmot_only"),
                                         ("cifar10_resnet8", "cifar10_tfmot_only")])
def test_tfmot_only_recipe_has_the_same_stages_without_a_teacher(base, tfmot):
    base, tfmot = recipe.load(recipe.RECIPES / f"{base}.yaml"), recipe.load(recipe.RECIPES / f"{tfmot}.yaml")
    assert tfmot.augment == base.augment and tfmot.student == base.student and tfmot.training == base.training
    assert tfmot.teacher is None and not any(tfmot.distils(s) for s in ("distill", "prune", "qat"))
    assert [s for s in base.stages.enabled() if s not in ("teacher", "baseline", "bundle")] == \
        [s for s in tfmot.stages.enabled() if s != "bundle"]
    for stage in ("distill", "prune", "qat"):
        assert getattr(tfmot.stages, stage).epochs == getattr(base.stages, stage).epochs
    assert tfmot.stages.prune.target_sparsity == base.stages.prune.target_sparsity


def test_overrides_are_typed_and_reach_the_stage():
    r = recipe.apply_overrides(recipe.load(), ["prune.target_sparsity=0.5", "stages.qat.epochs=3", "seed=7",
                                               "data.limit_train=100", "prune.structured_2_4=true",
                                               "distillation.terms.0.temperature=2.5", "student.options.width=0.5"])
    assert r.stages.prune.target_sparsity == 0.5 and r.stages.qat.epochs == 3 and r.seed == 7
    assert r.data.limit_train == 100 and r.stages.prune.structured_2_4 is True
    assert r.distillation.terms[0]["temperature"] == 2.5 and r.student.options == {"filters": [16, 32, 48], "width": 0.5}


def test_naming_an_absent_stage_adds_it_and_false_removes_one():
    r = recipe.apply_overrides(recipe.load(), ["cluster.clusters=8", "baseline=false"])
    assert r.stages.cluster.clusters == 8 and "cluster" in r.stages.enabled()
    assert "baseline" not in r.stages.enabled()


def test_a_users_teacher_replaces_the_teacher_stage():
    r = recipe.apply_overrides(recipe.load(), ["teacher.path=some/teacher.keras"])
    assert "teacher" not in r.stages.enabled()


def test_fingerprint_is_stable_and_sensitive():
    from pipelines.fingerprint import fingerprint

    a = fingerprint({"a": 1, "b": [1, 2]})
    assert a == fingerprint({"b": [1, 2], "a": 1})
    assert a != fingerprint({"a": 1, "b": [2, 1]})


RECIPE_MISTAKES = {
    "yaml syntax": ("stages: {distill: {epochs: 8}\nseed: [", ["invalid yaml", "line"]),
    "top level not a mapping": ("- a\n- b\n", ["top level must be a mapping"]),
    "unknown key": ("seed: 0\nsed: 1\n", ["unknown key 'sed'", "allowed", "seed"]),
    "unknown nested key": ("stages: {prune: {sparsity: 0.5}}\n", ["stages.prune.sparsity", "target_sparsity"]),
    "wrong type": ("stages: {distill: {epochs: many}}\n", ["stages.distill.epochs", "integer", "many"]),
    "bool for int": ("seed: true\n", ["seed", "integer", "true"]),
    "out of range": ("stages: {prune: {target_sparsity: 1.5}}\n", ["target_sparsity", "(0, 1)", "1.5"]),
    "bad choice": ("stages: {prune: {schedule: cubic}}\n", ["schedule", "polynomial, constant", "cubic"]),
    "unknown stage": ("stages: {distil: {}}\n", ["unknown key 'stages.distil'", "distill"]),
    "unknown loss": ("distillation: {terms: [{name: hintonn}]}\n", ["distillation.terms.0", "hintonn", "hinton"]),
    "bad loss parameter": ("distillation: {terms: [{name: hinton, temperature: 0}]}\n", ["temperature", "> 0"]),
    "unknown student": ("student: {arch: vgg99}\n", ["student.arch", "vgg99", "resnet8"]),
    "missing required stage": ("stages: {teacher: {}, distill: {}, export: {}, report: {}}\n", ["stages.benchmark"]),
    "bad variant": ("stages: {teacher: {}, distill: {}, export: {variants: [int4]}, benchmark: {}, report: {}}\n",
                    ["variants", "int4", "fp16"]),
    "mean teacher with a teacher": ("distillation: {mode: mean_teacher}\n", ["mean_teacher", "teacher: null"]),
    "mutual with a feature term": ("teacher: null\ndistillation: {mode: mutual, terms: [{name: at, pairs: [[a, b]]}]}\n"
                                   "stages: {distill: {}, export: {}, benchmark: {}, report: {}}\n", ["mutual", "at"]),
    "mutual export out of range": ("teacher: null\ndistillation: {mode: mutual, export: 3}\n"
                                   "stages: {distill: {}, export: {}, benchmark: {}, report: {}}\n",
                                   ["distillation.export", "0", "1", "3"]),
    "unknown peer": ("teacher: null\ndistillation: {mode: mutual, peers: [{arch: vgg99}]}\n"
                     "stages: {distill: {}, export: {}, benchmark: {}, report: {}}\n", ["peers.0.arch", "vgg99"]),
    "teacher weights count": ("distillation: {teacher_weights: [1, 2]}\n",
                              ["distillation.teacher_weights", "1 non-negative", "teacher, then extra_teachers"]),
    "extra teacher range not numbers": ("distillation: {extra_teachers: [{path: a.keras, input_range: [0, x]}]}\n",
                                        ["extra_teachers.0.input_range", "[lo, hi]"]),
    "bad extra teacher": ("distillation: {extra_teachers: [{file: a.keras}]}\n", ["extra_teachers.0", "path"]),
    "ema decay of one": ("teacher: null\ndistillation: {mode: mean_teacher, ema_decay: 1.0}\n"
                         "stages: {distill: {}, export: {}, benchmark: {}, report: {}}\n", ["ema_decay", "[0, 1)"]),
    "bad mode": ("distillation: {mode: ensemble}\n", ["distillation.mode", "mean_teacher", "ensemble"]),
    "bad combine": ("distillation: {combine: max}\n", ["distillation.combine", "fixed", "confidence", "max"]),
    "int8_mixed without its layers": ("stages: {teacher: {}, distill: {}, export: {variants: [int8_mixed]}, "
                                      "benchmark: {}, report: {}}\n", ["variants", "int8_mixed", "float_worst"]),
    "unknown strategy": ("training: {strategy: tpu}\n", ["training.strategy", "none", "mirrored", "tpu"]),
    "bad min runtime": ("stages: {teacher: {}, distill: {}, export: {}, benchmark: {}, bundle: {min_runtime: latest}, "
                        "report: {}}\n", ["stages.bundle.min_runtime", "2.14", "latest"]),
    "cache with consistent teaching": ("distillation: {teacher_cache: true}\n",
                                       ["distillation.teacher_cache", "consistent: false"]),
    "cache of a feature term": ("distillation: {consistent: false, teacher_cache: true, terms: [{name: fitnet, "
                                "student_layer: block1_relu, teacher_layer: stack1_relu}]}\n",
                                ["teacher_cache", "fitnet"]),
    "unknown built-in teacher": ("teacher: {path: 'builtin:nope'}\n", ["teacher.path", "builtin:fashion_mnist",
                                                                      "builtin:nope"]),
    "flip average of a feature term": ("teacher: {flip_average: true}\ndistillation: {terms: [{name: fitnet, "
                                       "student_layer: block1_relu, teacher_layer: stack1_relu}]}\n",
                                       ["teacher.flip_average", "fitnet", "read the teacher's layers"]),
    "flip average of a data-free teacher": (
        "data: {source: synthetic, classes: [a, b], input_shape: [8, 8, 1]}\nteacher: {path: 'builtin:fashion_mnist', "
        "flip_average: true}\nstages: {synthesize: {}, distill: {}, export: {}, benchmark: {}, report: {}}\n",
        ["teacher.flip_average", "stages.synthesize"]),
    "bad augment": ("augment: {zoom: 2}\n", ["augment.zoom", "2"]),
    "bad stage augment": ("stages: {teacher: {}, distill: {augment: {flip: 1}}, export: {}, benchmark: {}, "
                          "report: {}}\n", ["stages.distill.augment.flip"]),
    "adamw without decay": ("training: {optimizer: adamw}\n", ["weight_decay"]),
    "baseline without teacher": ("teacher: null\nstages: {distill: {}, baseline: {}, export: {}, benchmark: {}, report: {}}\n",
                                 ["stages.baseline"]),
}


def _full(text):
    # mistakes in stages are checked against a recipe that otherwise has every required stage
    if "stages:" in text or text.startswith("- "):
        return text
    return text + "stages: {teacher: {}, distill: {}, export: {}, benchmark: {}, report: {}}\n"


@pytest.mark.parametrize("case", sorted(RECIPE_MISTAKES))
def test_recipe_mistake_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys):
    text, needles = RECIPE_MISTAKES[case]
    path = tmp_path / "r.yaml"
    path.write_text(_full(text))
    out = tmp_path / "out"
    code = compress.main(["--recipe", str(path), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n.lower() in err.lower(), err
    assert not out.exists()


@pytest.mark.parametrize("assignment, needles", [
    ("prune.target_sparsity=2", ["stages.prune.target_sparsity", "(0, 1)", "2"]),
    ("prune.bogus=1", ["unknown key 'stages.prune.bogus'"]),
    ("qat.unsupported=maybe", ["error, float", "maybe"]),
    ("noequals", ["key=value"]),
    ("distillation.terms.5.weight=1", ["not an index"]),
    ("training.mixed_precision=fp16", ["training.mixed_precision must be true, false, float16 or bfloat16", "fp16"]),
])
def test_bad_set_is_one_line_exit_2(assignment, needles, tmp_path, capsys):
    out = tmp_path / "out"
    code = compress.main(["--set", assignment, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    for n in needles:
        assert n.lower() in err.lower(), err
    assert not out.exists()


def test_every_learning_rate_and_epoch_default_is_resolved_at_load():
    r = recipe.apply_overrides(recipe.load(), ["prune.learning_rate=null", "distill.learning_rate=1e-3",
                                               "training.learning_rate=3e-3", "teacher.learning_rate=null"])
    assert r.stages.prune.learning_rate == 3e-3 and r.stages.distill.learning_rate == 1e-3
    assert r.teacher.learning_rate == 3e-3 and r.stages.qat.learning_rate == 1e-4  # a stage's own default stays
    assert r.stages.baseline.epochs == r.stages.distill.epochs == 10
    assert all(s.get("learning_rate", 1.0) is not None for s in r.to_dict()["stages"].values())
    # and the resolved recipe (the run folder's recipe.yaml) loads back to the same settings
    assert recipe.from_dict(r.to_dict()).to_dict() == r.to_dict()


def test_a_later_set_reaches_the_keys_that_were_derived_from_it():
    r = recipe.apply_overrides(recipe.load(), ["distill.epochs=3"])
    r = recipe.apply_overrides(r, ["training.learning_rate=0.01", "distill.epochs=2"])
    assert r.stages.baseline.epochs == 2 and r.stages.distill.learning_rate == 0.01
    assert r.teacher.learning_rate == 0.05  # set by the recipe (the teacher's own), so kept
    assert r.stages.prune.learning_rate == 0.001  # set by the recipe, so kept
    r = recipe.apply_overrides(r, ["baseline.epochs=5", "teacher=null", "stages.teacher=false", "baseline=false"])
    assert r.stages.baseline is None and r.teacher is None


def test_the_recipe_holds_the_library_configs_and_their_rules():
    r = recipe.apply_overrides(recipe.load(), ["cluster.clusters=8"])
    assert isinstance(r.data, DataConfig) and isinstance(r.stages.prune, PruneConfig)
    assert isinstance(r.stages.cluster, ClusterConfig)
    assert r.stages.prune.config() == PruneConfig(target_sparsity=0.75, schedule="polynomial", end_fraction=0.5,
                                                  frequency=50)
    assert r.stages.cluster.config() == ClusterConfig(clusters=8)
    # the stages and their order are the registry's
    assert list(recipe.Stages.model_fields) == list(registry.STAGES)


def test_exponent_numbers_are_numbers():
    r = recipe.apply_overrides(recipe.load(), ["training.learning_rate=1e-3", "prune.learning_rate=5E-4"])
    assert r.training.learning_rate == 1e-3 and r.stages.prune.learning_rate == 5e-4


def test_missing_recipe_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="recipe not found"):
        recipe.load(tmp_path / "nope.yaml")


def test_a_shipped_recipe_is_named_by_its_name_and_a_wrong_name_lists_them(tmp_path, monkeypatch):
    assert recipe.shipped() == sorted(p.stem for p in recipe.RECIPES.glob("*.yaml")) and "mnist" in recipe.shipped()
    monkeypatch.chdir(tmp_path)
    assert recipe.load("mnist") == recipe.load(recipe.RECIPES / "mnist.yaml")
    # the recipes' folder as it was once named, or the file's name, where no such file is here
    assert recipe.load("mnist.yaml") == recipe.load("recipes/mnist.yaml") == recipe.load("mnist")
    # a file of that name here is the user's, and wins
    (tmp_path / "mnist").write_text((recipe.RECIPES / "mnist.yaml").read_text() + "\nname: mine\n")
    assert recipe.load("mnist").name == "mine"
    with pytest.raises(UserError) as info:
        recipe.load("mnits")
    assert str(info.value) == ("recipe not found: mnits (give a YAML file, or a shipped recipe: "
                               f"{', '.join(recipe.shipped())})")


def test_cli_shortcuts_become_recipe_keys():
    args = compress.build_parser().parse_args(["--epochs", "3", "--alpha", "0.7", "--temperature", "2", "--seed", "4",
                                               "--student", "mlp", "--threads", "1,4", "--int8-float-io"])
    r = compress.load_recipe(args)
    assert r.stages.distill.epochs == 3 and r.seed == 4 and r.student.arch == "mlp"
    assert r.distillation.terms[0] == {"name": "hinton", "weight": 0.7, "temperature": 2.0}
    assert r.distillation.hard_weight == pytest.approx(0.3)
    assert r.stages.benchmark.threads == [1, 4] and r.stages.export.int8_io is False


def test_flip_average_changes_what_reads_the_teacher_and_not_how_the_teacher_stage_trains(tmp_path):
    import numpy as np

    from pipelines import run_keys
    from pipelines.context import Context
    from pipelines.stages.report import distillation_summary
    from pipelines.stages.teacher import Teacher

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.integers(0, 256, (40, 8, 8), np.uint8), y_train=np.arange(40) % 2,
             x_test=rng.integers(0, 256, (10, 8, 8), np.uint8), y_test=np.arange(10) % 2)
    keys = {}
    for flip in (False, True):
        r = recipe.apply_overrides(recipe.load("mnist"), [f"data.source={tmp_path / 'd.npz'}",
                                                          f"teacher.flip_average={str(flip).lower()}"])
        ctx = Context(r, tmp_path / f"run{flip}", "test")
        ctx.manifests["teacher"] = {"fingerprint": "the trained teacher"}
        keys[flip] = (Teacher().key(ctx), run_keys.distillation_key(ctx), distillation_summary(r)["teacher view"])
    assert keys[False][0] == keys[True][0]  # the teacher trains the same either way
    assert keys[False][1] != keys[True][1]  # what distils from it reads it anew
    assert "flip_average" not in str(keys[False][1])  # a run without it keeps the key it had
    assert keys[False][2] == "consistent" and keys[True][2] == "consistent, averaged with its mirror image"
    # a user's (here the shipped) teacher file: what reads it (distil, export, benchmark) is keyed by the setting too
    files = {flip: run_keys.teacher_key(Context(recipe.apply_overrides(recipe.load(), [
        f"teacher.flip_average={str(flip).lower()}"]), tmp_path / "f", "test")) for flip in (False, True)}
    assert files[True] == {**files[False], "flip_average": True} and "flip_average" not in files[False]
