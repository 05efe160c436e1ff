"""The device record, from a fresh interpreter: what the harness records of every run (device,
slug, versions), the GPU's facts, the driver and nvcc, the packages the steps use, and the
package's backends as this interpreter sees them (after a build, the CUDA kernel's status).

  python3 -m benchmarks.gpu_suite.probe PATH     # writes PATH (JSON)
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

# The distributions whose versions a step's figures depend on.
PACKAGES = (
    "liger-kernel",
    "cut-cross-entropy",
    "bitsandbytes",
    "transformers",
    "peft",
    "pytest-xdist",
    "pytest-timeout",
)


def _output(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        return f"unavailable: {error}"


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def record() -> dict:
    import torch

    import nlft_kernels
    from benchmarks import _util

    device = _util.pick_device(None)
    info = _util.environment(device) | {"backends": nlft_kernels.backends(), "cpu_count": os.cpu_count()}
    info["packages"] = {name: _version(name) for name in PACKAGES}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_bytes": props.total_memory,
            "l2_cache_bytes": getattr(props, "L2_cache_size", None),
        }
        info["nvidia_smi"] = _output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"])
    info["nvcc"] = (_output(["nvcc", "--version"]).splitlines() or ["unavailable"])[-1]
    return info


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(record(), indent=2) + "\n")
