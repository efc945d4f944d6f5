"""The package version, and where a checkout keeps the subpackages that live at its top (a leaf module: the CLI
reads it without importing the package)."""

from pathlib import Path

__version__ = "0.1.0"


def source_folder(name: str) -> list[str]:
    """`[path]` of the checkout's top-level folder `name` (`kernels`, `bench`) when mexit runs from a checkout (the
    folder above this package holds `setup.py`), else `[]` (a wheel carries the modules inside the package)."""
    root = Path(__file__).resolve().parents[1]
    return [str(root / name)] if (root / "setup.py").is_file() and (root / name).is_dir() else []


DEPENDENCIES = ("torch", "triton", "transformers", "huggingface_hub", "safetensors", "numpy")


def dependency_versions() -> dict[str, str | None]:
    """The installed version of each distribution mexit runs on (None: not installed), read from the installed
    metadata without importing them."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {name: installed(name) for name in DEPENDENCIES}


def version_line() -> str:
    """`mexit 0.1.0 (torch 2.13.0+cpu, triton 3.9.0, ..., python 3.11.7)`: what `mexit --version` prints."""
    import platform

    found = ", ".join(f"{name} {v or 'not installed'}" for name, v in dependency_versions().items())
    return f"mexit {__version__} ({found}, python {platform.python_version()})"
