"""Benchmarks, ablations and the AOT compile gate (`mexit.bench`, `python -m mexit.bench.NAME`).

The modules live in the repository's top-level `bench/` folder, which has no `__init__.py` (a `bench` distribution
exists, and the folder must not shadow it). In a checkout this package reads the modules from that folder; a wheel
(`pip install .`) copies them here.
"""
from mexit.version import source_folder

__path__ += source_folder("bench")
