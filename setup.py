"""Install llava-fast. `kernels/`, `train/` and `bench/` install as subpackages of `llava_fast` (there is an
unrelated PyPI package named `kernels`; we never shadow it). The native extension `llava_fast._C` is built
from `csrc/` by CMake when a C++ toolchain is present; without one the install still succeeds and the
Python paths are used."""

from setuptools import setup

setup(
    name="llava-fast",
    version="0.1.0",
    description="A performance-first engine for LLaVA: fast generate(), Triton kernels, a small trainer.",
    python_requires=">=3.10",
    packages=["llava_fast", "llava_fast.kernels", "llava_fast.train", "llava_fast.bench"],
    package_dir={
        "llava_fast": "llava_fast",
        "llava_fast.kernels": "kernels",
        "llava_fast.train": "train",
        "llava_fast.bench": "bench",
    },
    package_data={"llava_fast": ["assets/*", "assets/tokenizer/*"]},
    install_requires=[
        "torch>=2.4",
        "safetensors>=0.4",
        "tokenizers>=0.15",
        "numpy",
        "pillow>=10",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "transformers>=4.45"],
        "bench": ["pytest-benchmark", "nvidia-ml-py", "matplotlib"],
        "hub": ["huggingface_hub"],
    },
    entry_points={"console_scripts": ["llava-fast=llava_fast.cli:main"]},
)
