"""Triton kernels of mexit (`mexit.kernels`), each with its plain PyTorch `*_ref` beside it.

The modules live in the repository's top-level `kernels/` folder, which has no `__init__.py`: from the repository root
`import kernels` gets the installed `kernels` distribution (which transformers imports), never this folder. In a
checkout (run from the root, or an editable install) this package reads the modules from that folder; a wheel
(`pip install .`) copies them here. Importing a kernel module imports triton; set TRITON_INTERPRET=1 before that to
run kernels on CPU tensors.
"""
from mexit.version import source_folder

__path__ += source_folder("kernels")
