from setuptools import setup

setup(
    name="mexit",
    version="0.1.0",
    description="Fast early-exit and Autocontrastive Decoding runtime for multi-exit GPT-2 models",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ and bench/ live at the top of the repo but install under the mexit namespace
    # (a top-level `kernels` package would shadow the PyPI distribution of that name).
    packages=["mexit", "mexit.decoding", "mexit.engines", "mexit.frontends", "mexit.model", "mexit.ops",
              "mexit.training", "mexit.kernels", "mexit.bench"],
    package_dir={"mexit": "mexit", "mexit.kernels": "kernels", "mexit.bench": "bench"},
    package_data={"mexit.bench": ["prompts.txt", "shakespeare_prompts.txt"]},
    install_requires=[
        "torch>=2.1,<3",
        "transformers>=4.40,<6",
        "safetensors>=0.4",
        "huggingface_hub>=0.20",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.0; platform_system == 'Linux'"],
        "ray": ["ray[data]>=2.9"],
        "dev": ["pytest>=7", "pytest-xdist>=3", "ruff", "matplotlib", "triton>=3.0; platform_system == 'Linux'",
                "ray[data]>=2.9"],
    },
    entry_points={"console_scripts": ["mexit=mexit.frontends.cli:main"]},
)
