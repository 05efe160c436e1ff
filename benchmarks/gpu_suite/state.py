"""What has been measured, for which kernel sources, on which GPU: the committed state file.

``benchmarks/results/gpu_suite_state.json`` holds one entry per (step, kernel source hash, device):
that run's status, seconds, date and the result files it wrote. A run skips a recorded step whose
entry for the current kernel sources and GPU is ``ok``, so that several sessions with a device
complete the plan between them; ``--collect`` merges the entries a call returned.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.gpu_suite.plan import REPO_ROOT, RESULTS_DIR, Measured

STATE_FILE = RESULTS_DIR / "gpu_suite_state.json"
# The kernel sources a measurement belongs to: the ops (Triton kernels, launch table, autograd
# wiring) and the compiled extension's sources.
KERNEL_SOURCES = ("nlft_kernels/ops/*.py", "csrc/**/*")


def kernel_source_hash(root: Path = REPO_ROOT) -> str:
    """16 hex digits of SHA-256 over the kernel sources (paths and contents, in path order)."""
    digest = hashlib.sha256()
    files = sorted({p for pattern in KERNEL_SOURCES for p in root.glob(pattern) if p.is_file()})
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@dataclass
class Entry:
    """One step's newest run for one kernel source hash on one device."""

    step: str
    source_hash: str
    device: str
    status: str  # ok, failed, timeout (steps that did not start leave no entry)
    seconds: float
    date: str
    outputs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.step, self.source_hash, self.device)


def load(path: Path = STATE_FILE) -> list[Entry]:
    if not path.exists():
        return []
    return [Entry(**e) for e in json.loads(path.read_text())["entries"]]


def save(entries: list[Entry], path: Path = STATE_FILE) -> Path:
    """Write ``entries`` (ordered by device, step and date, so that diffs stay small)."""
    payload = {
        "what": "the GPU suite's steps per kernel source hash and device: a step recorded ok is skipped "
        "for the same sources on the same GPU (python -m benchmarks.gpu_suite --plan)",
        "kernel_sources": list(KERNEL_SOURCES),
        "entries": [asdict(e) for e in sorted(entries, key=lambda e: (e.device, e.step, e.date))],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def merge(entries: list[Entry], new: list[Entry]) -> list[Entry]:
    """``entries`` with each of ``new`` in place of the entry of its key (the newer date wins)."""
    by_key = {e.key: e for e in entries}
    for entry in new:
        if entry.key not in by_key or entry.date >= by_key[entry.key].date:
            by_key[entry.key] = entry
    return list(by_key.values())


def done(entries: list[Entry], step: str, source_hash: str, device: str) -> Entry | None:
    """The ``ok`` entry of ``step`` for these sources on this device, or None."""
    for entry in entries:
        if entry.key == (step, source_hash, device) and entry.status == "ok":
            return entry
    return None


def measured(entries: list[Entry], step: str, device: str) -> Measured | None:
    """The newest run of ``step`` on ``device`` that ended ok or was stopped by its budget, whatever
    its sources (the time model's measured replacement), or None."""
    runs = [e for e in entries if e.step == step and e.device == device and e.status in ("ok", "timeout")]
    if not runs:
        return None
    newest = max(runs, key=lambda e: e.date)
    return Measured(newest.seconds, newest.status == "ok")
