"""The ``nlft`` subcommands, one module each: ``add_parser(subparsers)`` adds its parser (its
flags, from the settings dataclasses where it has them), ``run(args) -> int`` runs it on the parsed
flags and returns 0, raising :mod:`nlft_kernels.recipes.errors`' typed errors for everything else."""

from __future__ import annotations

import importlib
from types import ModuleType

# In the order `nlft --help` lists them.
COMMANDS = ("demo", "generate", "judge", "train", "eval", "saliency")


def command(name: str) -> ModuleType:
    """The module of the subcommand ``name``."""
    return importlib.import_module(f"{__name__}.{name}")
