"""What the front ends (and the benchmarks above them) show people: argparse help that keeps a description's layout
and shows each flag's default, and matplotlib's pyplot without a display."""

from __future__ import annotations

import argparse
import sys


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and shows each flag's default (when it has one worth showing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is not None and action.default is not False and action.default != argparse.SUPPRESS \
                and "default" not in text:
            text += " (default: %(default)s)"
        return text


def pyplot():
    """matplotlib's pyplot (headless), or None with a note when matplotlib is not installed: plots are optional,
    results are written first."""
    try:
        import matplotlib
    except ImportError:
        print("note: plot skipped: matplotlib is missing from this install (a mexit dependency: "
              "pip install 'matplotlib>=3.9')", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_output_folder(folder, flag: str = "--out") -> None:
    """Before a run's work: `folder` can be the run's output folder (an existing folder, or one that can be made
    under the nearest existing one: a temporary folder is made and removed there). ValueError naming `flag`
    otherwise."""
    import tempfile
    from pathlib import Path

    path = Path(folder).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {folder} exists and is not a folder")
    parent = next(p for p in (path, *path.parents) if p.exists())
    try:
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as err:
        raise ValueError(f"{flag} {folder}: nothing can be written in {parent} ({err.strerror})") from None
