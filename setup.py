"""Install llava-fast. `kernels/`, `train/` and `bench/` install as subpackages of `llava_fast` (there is an unrelated
PyPI package named `kernels`; we never shadow it). The native extension `llava_fast._C` is built
from `csrc/` by CMake when a C++ toolchain is present; without one the install still succeeds and the
Python paths are used."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension that CMakeLists.txt (at the repository root) builds; setuptools only places the file.
    optional=True: if it is not built, setuptools does not copy or require it."""

    def __init__(self, name: str):
        super().__init__(name, sources=[], optional=True)


class CMakeBuild(build_ext):
    """Configure and build with CMake (+ ninja when present) into setuptools' build directory; the output
    file lands where setuptools expects it, so `pip install .` packs it and `pip install -e .` copies it
    next to the sources. Any failure (no compiler, no cmake, no pybind11) is reported and skipped: the
    package then runs its Python paths and says so at first use. LLAVA_FAST_BUILD_NATIVE=0 skips it."""

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        if os.environ.get("LLAVA_FAST_BUILD_NATIVE", "1") == "0":
            print("llava-fast: LLAVA_FAST_BUILD_NATIVE=0, not building llava_fast._C")
            return
        # A fixed folder in the checkout rather than setuptools' temporary one: the README's second install
        # (`pip install -e ".[test]"`) then rebuilds only what changed (the bindings, whose pybind11 path moves
        # with pip's isolated build environment) instead of all 13 kernel files again, ~3 min on 2 cores.
        build_dir = ROOT / "build" / f"native-{sys.implementation.cache_tag}"
        try:
            self._cmake_build(build_dir)
        except (OSError, ImportError, subprocess.CalledProcessError) as err:
            shutil.rmtree(build_dir, ignore_errors=True)  # a cache that found no compiler would stick
            message = (f"llava-fast: the native extension llava_fast._C was not built ({err}); the package "
                       "installs without it and uses its Python paths (slower image preprocessing)")
            print(message, file=sys.stderr)
            self.warn(message)

    def _cmake_build(self, build_dir: Path):
        import pybind11  # a build requirement (pyproject.toml); missing only without build isolation

        cmake = shutil.which("cmake")
        if cmake is None:
            raise OSError("cmake not found")
        output = Path(self.get_ext_fullpath("llava_fast._C")).resolve()
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DLLAVA_FAST_OUTPUT_DIR={output.parent}",
            f"-DLLAVA_FAST_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
        ]
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            configure += ["-G", "Ninja"]  # a generator can only be chosen on the first configure
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel"], check=True)


# `llava-fast serve`: the HTTP server (llava_fast/serve/); tests drive it with the openai client.
SERVE = ["fastapi>=0.110", "uvicorn>=0.29", "pydantic>=2.5", "prometheus_client>=0.20"]

setup(
    name="llava-fast",
    version="0.1.0",
    description="A performance-first engine for LLaVA: fast generate(), Triton kernels, a small trainer.",
    python_requires=">=3.10",
    packages=["llava_fast", "llava_fast.checkpoints", "llava_fast.cpu", "llava_fast.image", "llava_fast.prompts",
              "llava_fast.serve", "llava_fast.pipelines", "llava_fast.kernels", "llava_fast.train", "llava_fast.bench"],
    package_dir={
        "llava_fast": "llava_fast",
        "llava_fast.kernels": "kernels",
        "llava_fast.train": "train",
        "llava_fast.bench": "bench",
    },
    package_data={"llava_fast": ["assets/*", "assets/tokenizer/*"], "llava_fast.bench": ["data/*"],
                  "llava_fast.pipelines": ["prompts/*.md", "prompts/*/*.txt"], "llava_fast.serve": ["page/*"]},
    install_requires=[
        # The oldest versions supported and tested (torch 2.11, triton 3.6; CI runs the kernel tests and
        # the sm_90 compile check under triton 3.6 too). Triton 3.6's CPU interpreter needs numpy<2.4 (see
        # kernels/__init__.py); compiled kernels do not.
        "torch>=2.11",
        "safetensors>=0.4",
        "tokenizers>=0.22",  # DecodeStream.step with a list of ids
        "jinja2>=3.1.6",  # checkpoint chat templates (3.1.6: the sandbox fixes transformers also requires)
        "gguf>=0.10",  # llama.cpp's GGUF reader and dequantizers (pure Python + numpy)
        "numpy",
        "pillow>=10",
        "triton>=3.6; platform_system == 'Linux'",
    ],
    extras_require={
        # accelerate: transformers' GGUF loading (the oracle); sentencepiece: llama.cpp's convert_hf_to_gguf.py
        # imports it; openai: the pipelines' and server's test client (openai 3.x brings httpx2, the tests use
        # httpx); selenium: the chat page's browser test; torchao: the quantization tests; peft: the LoRA
        # baseline of `bench train --against transformers` and its test; ruff: the linter CI runs first;
        # pytest-xdist: the README's `-n auto --dist loadfile` (a worker per core; a file's tests stay on one worker,
        # so a module fixture, some of which build and train models, runs once)
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "transformers>=4.45", "accelerate", "sentencepiece",
                 "openai>=1.40", "httpx>=0.27", "selenium>=4.20", "torchao>=0.12", "peft>=0.13", "ruff>=0.6", *SERVE],
        "quant": ["torchao>=0.12"],
        "bench": ["pytest-benchmark", "nvidia-ml-py", "matplotlib"],
        "hub": ["huggingface_hub"],
        "pipelines": ["openai>=1.40"],  # make-data, eval: any OpenAI-compatible endpoint
        "serve": SERVE,
    },
    entry_points={"console_scripts": ["llava-fast=llava_fast.cli:main"]},
    ext_modules=[CMakeExtension("llava_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
)
