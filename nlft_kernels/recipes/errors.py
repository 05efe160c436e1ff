"""The typed errors of the recipes: library code raises them, the ``nlft`` command's one ``main``
maps each to its exit status (``exit_status``) and prints its message as one line.

0 is success; 1 :class:`RunStopped` (the run could not go on: a judge that cannot be reached);
2 :class:`BadInput` (an argument, an input file or an ``--out`` that cannot be used); 3
:class:`StrictFailure` (``--strict`` and some records have an error); 130 :class:`Interrupted`
(Ctrl-C). What was finished before any of them stays in ``--out``.
"""

from __future__ import annotations


class NLFTError(Exception):
    """An error the ``nlft`` command reports as one line and exits with ``exit_status``."""

    exit_status = 1


class BadInput(NLFTError, ValueError):
    """An argument, an input or an output path that cannot be used (nothing was done)."""

    exit_status = 2


class RunStopped(NLFTError):
    """The run stopped before its end (e.g. the judge cannot be reached); what it finished is kept."""

    exit_status = 1


class StrictFailure(NLFTError):
    """The run finished, but ``--strict`` and some records have an error instead of a result."""

    exit_status = 3


class Interrupted(NLFTError):
    """Ctrl-C: the run ended early; what it finished is kept."""

    exit_status = 130
