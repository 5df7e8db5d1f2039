"""Fingerprints cover the code: a stage's code hash is the edge-kd source its module can import, so an edit
reruns exactly the stages that run the edited file, and the pipeline's modules import one another without a
circle."""
import ast
import shutil

import pytest

from pipelines import codehash, recipe, registry, runner
from pipelines.context import Context

TRAINING = ("teacher", "distill", "baseline", "prune", "cluster", "qat")
FAMILIES = ("edge_kd/distill/losses.py", "edge_kd/distill/soft_targets.py", "edge_kd/distill/hints.py",
            "edge_kd/distill/relational.py")
#: what decides which stages run with which settings: their result enters a fingerprint as values, never as code
ORCHESTRATING = ("pipelines/recipe.py", "pipelines/registry.py", "pipelines/runner.py", "pipelines/run.py",
                 "pipelines/context.py", "pipelines/compress.py", "pipelines/api.py", "pipelines/codehash.py",
                 "pipelines/multiworker.py")


def _closure(name, root=None):
    return codehash.closure(runner.stage_modules(registry.STAGES[name]), root)


def test_each_stage_runs_its_own_module_and_what_it_imports_and_nothing_that_orchestrates():
    for name, stage in registry.STAGES.items():
        files = _closure(name)
        assert {f"pipelines/stages/{name}.py", "pipelines/stage.py"} <= set(files)
        assert all(len(digest) == 64 for digest in files.values())
        assert not set(ORCHESTRATING) & set(files), name
        # no stage imports a loss family: the runner adds the modules of the terms a stage distils with
        assert not set(FAMILIES) & set(files), name
    for name in TRAINING:  # every training stage runs the Distiller and the data code
        files = _closure(name)
        assert {"edge_kd/distill/distiller.py", "pipelines/run_training.py", "edge_kd/data.py",
                "edge_kd/train.py", "models/__init__.py"} <= set(files)
        assert "edge_kd/export/tflite.py" not in files and "edge_kd/report/report.py" not in files
    assert "edge_kd/tfmot/prune.py" in _closure("prune")
    assert "edge_kd/export/tflite.py" in _closure("export")
    assert "edge_kd/bench/litert.py" in _closure("benchmark")
    assert "edge_kd/export/bundle.py" in _closure("bundle")
    assert "edge_kd/report/report.py" in _closure("report")
    # the report reads results: it runs neither the Distiller nor a model
    assert not {"edge_kd/distill/distiller.py", "pipelines/run_training.py", "pipelines/run_models.py",
                "models/__init__.py"} & set(_closure("report"))


@pytest.fixture
def tree(tmp_path):
    """A copy of the project's source, to edit."""
    for pkg in codehash.PACKAGES:
        shutil.copytree(codehash.ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "_data"))
    return tmp_path


@pytest.mark.parametrize("edited, changed", [
    # the benchmark converts each integer file's float reference; the bundle prefers tflite.INTEGER variants
    ("edge_kd/export/tflite.py", {"export", "benchmark", "bundle"}),
    ("edge_kd/bench/layer_error.py", {"export", "benchmark"}),  # int8_mixed's worst layers; the report's errors
    ("edge_kd/report/report.py", {"report"}),
    ("edge_kd/datafree.py", {"synthesize", "export"}),  # export reads the synthetic images with the stage's code
    ("edge_kd/distill/soft_targets.py", set()),  # a loss family: in the key of the stages that distil with it
    ("edge_kd/distill/distiller.py", set(TRAINING)),
    ("edge_kd/tfmot/prune.py", {"prune"}),
    ("edge_kd/tfmot/qat.py", set(TRAINING)),  # the Distiller copies a mean teacher with it
    ("pipelines/stages/baseline.py", {"baseline"}),
    ("pipelines/recipe.py", set()),
    ("pipelines/context.py", set()),
])
def test_an_edit_changes_the_code_hash_of_exactly_the_stages_that_import_it(tree, edited, changed):
    before = {n: codehash.code_hash(runner.stage_modules(s), tree) for n, s in registry.STAGES.items()}
    assert before == {n: codehash.code_hash(runner.stage_modules(s), tree) for n, s in registry.STAGES.items()}
    with open(tree / edited, "a") as f:
        f.write("\n# an edit\n")
    after = {n: codehash.code_hash(runner.stage_modules(s), tree) for n, s in registry.STAGES.items()}
    assert {n for n in registry.STAGES if after[n] != before[n]} == changed


@pytest.mark.parametrize("edited, terms, changed", [
    # the default recipe: its teacher is a file, so no teacher stage; hinton in distill, prune and qat
    ("edge_kd/distill/soft_targets.py", None, {"distill", "prune", "qat"}),
    ("edge_kd/distill/relational.py", None, set()),
    ("edge_kd/distill/relational.py", "[{name: rkd, weight: 1.0}]", {"distill", "prune", "qat"}),
    ("edge_kd/distill/hints.py", "[{name: rkd, weight: 1.0}]", set()),
    ("edge_kd/distill/registry.py", None, {"distill", "baseline", "prune", "qat"}),  # the base of every term
])
def test_editing_a_loss_family_reruns_the_stages_that_distil_with_it_and_no_others(tree, monkeypatch, edited,
                                                                                     terms, changed):
    r = recipe.apply_overrides(recipe.load(), [f"distillation.terms={terms}"] if terms else [])
    monkeypatch.setattr(codehash, "ROOT", tree)
    ctx = Context(r, tree / "run", "test")
    ctx.manifests = {n: {"fingerprint": n, "files": {}} for n in ctx.enabled()}  # the inputs, held still

    def fingerprints():
        return {n: runner.stage_fingerprint(ctx, n) for n in ctx.enabled()}

    before = fingerprints()
    with open(tree / edited, "a") as f:
        f.write("\n# an edit\n")
    after = fingerprints()
    assert {n for n in before if after[n] != before[n]} == changed


def _imports(path, module, modules):
    """Returns the project modules a source file imports: at module level, in functions, under TYPE_CHECKING and in a
    package's lazy ``__getattr__`` alike. ``from package import submodule`` counts as the submodule alone (the
    package's ``__init__`` runs too, and is counted by its own imports)."""
    tree, found = ast.parse(path.read_text()), set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return found


def _modules():
    modules = {}
    for pkg in codehash.PACKAGES:
        for f in (codehash.ROOT / pkg).rglob("*.py"):
            rel = f.relative_to(codehash.ROOT).with_suffix("")
            modules[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    return modules


def test_no_module_of_the_project_is_in_an_import_circle():
    modules = _modules()
    graph = {}
    for name, f in modules.items():
        targets = set()
        for imp in _imports(f, name, modules):
            while imp and imp not in modules:  # module.attribute -> module
                imp = imp.rpartition(".")[0]
            if imp and imp != name:
                targets.add(imp)
        graph[name] = targets
    circles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)
    # the leaves of the pipeline: anything may import them
    for leaf in ("pipelines.fingerprint", "pipelines.types", "pipelines.codehash"):
        assert not {m for m in graph[leaf] if m.startswith("pipelines")}, leaf
    # a stage module imports no orchestrating module, not even for its annotations
    for name in graph:
        if name.startswith("pipelines.stages") or name == "pipelines.stage":
            assert not graph[name] & {"pipelines.context", "pipelines.recipe", "pipelines.registry",
                                      "pipelines.runner", "pipelines.run"}, name


def test_the_registry_is_the_one_list_of_stages():
    # every stage module is registered, and the recipe's schema has exactly the registry's stages, in its order
    modules = {p.stem for p in (codehash.ROOT / "pipelines" / "stages").glob("*.py")} - {"__init__", "common"}
    assert {type(s).__module__.rpartition(".")[2] for s in registry.STAGES.values()} == modules
    assert list(recipe.Stages.model_fields) == list(registry.STAGES)


def test_the_bundle_readme_templates_are_code_of_the_stage_that_writes_them(tree):
    assert "edge_kd/export/templates/bundle_readme.md" in _closure("bundle")
    before = {n: codehash.code_hash(runner.stage_modules(s), tree) for n, s in registry.STAGES.items()}
    with open(tree / "edge_kd/export/templates/bundle_readme.md", "a") as f:
        f.write("\nan edit\n")
    after = {n: codehash.code_hash(runner.stage_modules(s), tree) for n, s in registry.STAGES.items()}
    assert {n for n in registry.STAGES if after[n] != before[n]} == {"bundle"}


def test_project_code_imports_from_the_module_that_defines_a_name():
    # a package's lazy names (edge_kd.distill's Distiller, ...) are for users: the code hash follows imports of
    # modules, so `from edge_kd.distill import Distiller` in project code would hide distiller.py from a stage's hash
    modules = _modules()
    lazy = {name for name, f in modules.items() if f.name == "__init__.py" and "def __getattr__" in f.read_text()}
    wrong = []
    for name, f in modules.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module in lazy:
                wrong += [f"{name}: from {node.module} import {a.name}" for a in node.names
                          if f"{node.module}.{a.name}" not in modules and a.name != "__version__"]
    assert not [w for w in wrong if not w.startswith(("edge_kd: ", "edge_kd.distill: "))], wrong
