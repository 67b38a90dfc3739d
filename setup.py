"""Builds qcompile's native kernels (``qcompile/csrc``) into ``qcompile._native`` at install time.

They compile against the installed torch's headers and run on its thread pool: OpenMP code links
the ``libgomp.so.1`` torch ships and has already loaded, so there is one pool, not two. A build
failure fails the install with the compiler's message; nothing falls back to a slow path.
Install with ``pip install --no-build-isolation -e .`` after torch (the Makefile does).
"""

from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

TORCH_LIB = Path(torch.__file__).parent / "lib"
SOURCES = sorted(str(path) for path in Path("qcompile/csrc").glob("*.cpp"))

setup(
    ext_modules=[
        CppExtension(
            "qcompile._native",
            SOURCES,
            extra_compile_args=["-O3", "-fopenmp", "-std=c++17"],
            extra_link_args=[f"-L{TORCH_LIB}", "-lgomp", f"-Wl,-rpath,{TORCH_LIB}"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
