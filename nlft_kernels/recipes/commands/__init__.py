"""The ``nlft`` subcommands, one module each: ``HELP`` (a :class:`CommandHelp`), ``add_flags(p)``
adds its own flags to the parser :func:`nlft_kernels.recipes.cli.build_parser` made for it (the
flags of the settings dataclasses ``dataclass_types()`` returns, where it has them, come first;
``--config`` last), ``run(args) -> int`` runs it on the parsed flags and returns 0, raising
:mod:`nlft_kernels.recipes.errors`' typed errors for everything else."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

# In the order `nlft --help` lists them.
COMMANDS = ("demo", "generate", "judge", "train", "eval", "saliency")


@dataclass(frozen=True)
class CommandHelp:
    """What the help says of a subcommand: ``summary``, its line in ``nlft --help``; the
    ``description``, ``usage`` and ``epilog`` of ``nlft NAME --help`` (None: argparse's)."""

    summary: str
    description: str | None = None
    usage: str | None = None
    epilog: str | None = None


def command(name: str) -> ModuleType:
    """The module of the subcommand ``name``."""
    return importlib.import_module(f"{__name__}.{name}")
