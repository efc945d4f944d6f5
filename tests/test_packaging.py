"""Packaging: no import name of ours shadows an installed distribution (transformers imports the `kernels`
distribution, and the repository has a top-level `kernels/` folder), and a wheel carries `mexit.kernels` and
`mexit.bench`."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folders that the documented commands put on sys.path: the root (python -m ..., pytest's rootdir), tests/ and bench/
# (pytest inserts a test file's folder when it has no __init__.py)
SEARCHED = [ROOT, ROOT / "tests", ROOT / "bench"]


def importable_names(folder: Path) -> set[str]:
    """Top-level names `import NAME` finds in `folder` ahead of site-packages: modules and regular packages (a folder
    without `__init__.py` is only a namespace portion, which any installed package of that name wins over)."""
    return ({p.stem for p in folder.glob("*.py")}
            | {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").is_file()})


def test_no_top_level_name_shadows_an_installed_distribution():
    installed = importlib.metadata.packages_distributions()
    assert "transformers" in installed  # the check below sees the environment's distributions
    shadowed = {f"{folder.relative_to(ROOT)}/{name}": installed[name]
                for folder in SEARCHED for name in importable_names(folder)
                if name in installed and set(installed[name]) != {"mexit"}}
    assert shadowed == {}
    assert not (ROOT / "kernels" / "__init__.py").exists() and not (ROOT / "bench" / "__init__.py").exists()


def test_transformers_gpt2_imports_with_the_root_on_sys_path():
    """From the repository root (as `python -m pytest`, `python -m mexit` and the GPU script run), transformers'
    GPT-2 imports (it imports the `kernels` distribution where installed) and `mexit.kernels` is ours."""
    code = ("import sys; assert sys.path[0] == ''; from transformers import GPT2LMHeadModel; "
            "import importlib.util, mexit.kernels.launch as launch; spec = importlib.util.find_spec('kernels'); "
            "print(spec.origin if spec else None); print(launch.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    origin, launch = out.stdout.split()
    assert origin in ("None",) or not Path(origin).resolve().is_relative_to(ROOT / "kernels")
    assert Path(launch) == ROOT / "kernels" / "launch.py"
    done = subprocess.run([sys.executable, "-m", "mexit", "--version"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("mexit "), done.stderr[-3000:]


def test_a_wheel_carries_mexit_kernels_and_mexit_bench(tmp_path):
    """`pip install .` (a built wheel) gets the top-level folders' modules inside the package, and no top-level
    `kernels` or `bench`; installed, they import from the package."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "small_model*", "*.png", "RESULTS.md")
    for name in ("mexit", "kernels", "bench"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("mexit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.split("/")[0] in ("kernels", "bench")]
    assert "mexit/ops/routes.json" in names  # the cards' measured defaults
    kernels = {Path(n).name for n in names if n.startswith("mexit/kernels/")}
    bench = {Path(n).name for n in names if n.startswith("mexit/bench/")}
    assert kernels == {"__init__.py"} | {p.name for p in (ROOT / "kernels").glob("*.py")}
    assert {"__init__.py", "prompts.txt", "shakespeare_prompts.txt"} | {p.name for p in (ROOT / "bench").glob("*.py")} \
        == bench
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import mexit.kernels.fused_linear as k, mexit.bench.latency as b, mexit.kernels, mexit.ops.routes as r; "
            "assert r.measured_route('a card never measured')['card'] == 'default'; "
            "print(k.__file__); print(b.__file__); print(len(mexit.kernels.__path__))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    kernel_file, bench_file, paths = out.stdout.split()
    assert Path(kernel_file).parent == site / "mexit" / "kernels"
    assert Path(bench_file).parent == site / "mexit" / "bench"
    assert paths == "1"  # no checkout folder added outside a checkout
