"""mexit's packaging. The top-level `kernels/` and `bench/` folders install as `mexit.kernels` and `mexit.bench`:
the folders have no `__init__.py` (each name is also a distribution on PyPI, and transformers imports `kernels`), so
from the repository root they never shadow the installed distributions; `mexit/kernels/__init__.py` and
`mexit/bench/__init__.py` read them in a checkout, and `build_py` below copies their modules into a wheel."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

TOP_LEVEL = {"kernels": ["*.py"], "bench": ["*.py", "prompts.txt", "shakespeare_prompts.txt"]}


class BuildPy(build_py):
    """A wheel gets `kernels/*.py` and `bench/*.py` inside `mexit/kernels/` and `mexit/bench/` (an editable install
    reads them in place through `mexit.version.source_folder`)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for folder, patterns in TOP_LEVEL.items():
            files = sorted(f for pattern in patterns for f in Path(folder).glob(pattern))
            if not files:  # an sdist without the folders (MANIFEST.in carries them) would build a broken wheel
                raise RuntimeError(f"{folder}/ holds no modules: mexit.{folder} would be empty")
            for file in files:
                self.copy_file(str(file), str(Path(self.build_lib, "mexit", folder, file.name)))


# Version ranges are what the tests have passed on (README, "Tested versions"): the floors in the floor run, the
# newest releases in CI.
setup(
    name="mexit",
    version="0.1.0",
    description="Fast early-exit and Autocontrastive Decoding runtime for multi-exit GPT-2 models",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=["mexit", "mexit.decoding", "mexit.engines", "mexit.frontends", "mexit.model", "mexit.ops",
              "mexit.training", "mexit.kernels", "mexit.bench"],
    package_data={"mexit.ops": ["routes.json"]},  # the cards' measured default kernel choices
    cmdclass={"build_py": BuildPy},
    install_requires=[
        "torch>=2.11,<3",
        "transformers>=5.17,<6",
        "safetensors>=0.8",
        "huggingface_hub>=1.5,<3",
        "numpy>=2.0",
        "tqdm>=4.66",
        "matplotlib>=3.9",  # `mexit bench`, `mexit ablate` and `mexit layers --plot` draw for users
    ],
    extras_require={
        "triton": ["triton>=3.6; platform_system == 'Linux'"],
        "ray": ["ray[data]>=2.60"],
        "eval": ["lm_eval[hf]>=0.4.13,<0.5"],  # `mexit eval` and lm-eval's --model mexit
        "bench": ["pytest>=8.3", "pytest-benchmark>=5.3", "triton>=3.6; platform_system == 'Linux'"],
        "dev": ["pytest>=8.3", "pytest-xdist>=3.6", "pytest-benchmark>=5.3", "ruff",
                "triton>=3.6; platform_system == 'Linux'", "ray[data]>=2.60", "lm_eval[hf]>=0.4.13,<0.5"],
    },
    entry_points={"console_scripts": ["mexit=mexit.__main__:main"]},
)
