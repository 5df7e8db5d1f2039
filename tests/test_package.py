"""A wheel of edge-kd holds what the code reads besides its modules: the shipped recipes, teachers, datasets and
the bundle's templates; installed from it (no source tree beside), the default recipe loads by name."""
import shutil
import subprocess
import sys
import zipfile

from tests.conftest import ROOT


def test_a_wheel_install_has_the_recipes_teachers_data_and_templates(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    for pkg in ("edge_kd", "pipelines", "models"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(ROOT).as_posix() for pattern in ("pipelines/recipes/*.yaml", "edge_kd/_data/*.npz",
                                                              "edge_kd/_data/teachers/*", "edge_kd/export/templates/*")
               for p in ROOT.glob(pattern)}
    assert {"pipelines/recipes/fashion_mnist.yaml", "edge_kd/_data/fashion_mnist.npz"} <= shipped
    assert shipped <= names, sorted(shipped - names)

    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    probe = ("import sys; from pipelines import recipe; r = recipe.load('fashion_mnist'); "
             "from edge_kd import builtin_teachers; assert recipe.RECIPES.is_relative_to(sys.argv[1]); "
             "assert r.teacher.path.startswith(sys.argv[1]); print(r.run_name(), recipe.load() == r)")
    ran = subprocess.run([sys.executable, "-c", probe, str(site)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.split() == ["fashion_mnist-cnn", "True"]
