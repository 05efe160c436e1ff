"""The ``nlft`` command: generate -> judge -> train -> eval, ``saliency`` (the saliency map of
judged records), and ``demo``, which runs them all; one module per subcommand in
:mod:`nlft_kernels.recipes.commands`.

:func:`main` is the one place that turns outcomes into exit statuses: 0 done, 2 bad input (one
line on stderr), 1 the run stopped, 3 ``--strict`` with failed records, 130 Ctrl-C. Warnings go
through :mod:`logging` (``logging.captureWarnings``) and print as one ``nlft <command>:`` line.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Sequence
from contextlib import contextmanager

from nlft_kernels.recipes.errors import Interrupted, NLFTError

DESCRIPTION = (
    "Natural Language Fine-Tuning (arXiv 2412.20382): generate responses, judge them, NLFT-train on the "
    "judgments, evaluate on GSM8K."
)
# Warnings that tell a user of the command nothing they can act on: peft (<= 0.21) reads
# transformers 5's deprecated is_gradient_checkpointing whenever it wraps a model in LoRA.
NOISE = (("`is_gradient_checkpointing` is deprecated", FutureWarning),)
# warnings.formatwarning's layout: "path:line: Category: message\n" and the source line, if any.
_WARNING = re.compile(r"(?P<path>[^\n]*?):(?P<line>\d+): (?P<category>\w+): (?P<message>[^\n]*)")


def build_parser(only: str | None = None):
    """The ``nlft`` parser (transformers' ``HfArgumentParser``); ``parser.commands`` maps each
    subcommand to its own parser. ``only``: the one subcommand that gets its flags (the others
    are listed by name and help only: their flags would import what this run does not need)."""
    from nlft_kernels.recipes.commands import COMMANDS, command
    from nlft_kernels.recipes.commands.settings import Parser

    parser = Parser(prog="nlft", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=version_line(), help="the versions, then exit")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    parser.commands = {
        name: _command_parser(subparsers, name)
        if only in (None, name)
        else subparsers.add_parser(name, help=command(name).HELP.summary)
        for name in COMMANDS
    }
    return parser


def version_line() -> str:
    """``nlft-kernels X (torch Y, triton Z)``: the installed distributions' metadata (torch and
    triton are the core's requirements), nothing imported."""
    from importlib.metadata import version

    from nlft_kernels import __version__

    return f"nlft-kernels {__version__} (torch {version('torch')}, triton {version('triton')})"


def _command_parser(subparsers, name: str):
    """The parser of subcommand ``name``, with its help texts and flags: its settings dataclasses'
    (one flag per field), its own (``add_flags``), then ``--config``."""
    from nlft_kernels.recipes.commands import command
    from nlft_kernels.recipes.commands.settings import add_config_flag

    module = command(name)
    text = module.HELP
    types = module.dataclass_types() if hasattr(module, "dataclass_types") else []
    p = subparsers.add_parser(
        name,
        dataclass_types=types,
        help=text.summary,
        description=text.description,
        usage=text.usage,
        epilog=text.epilog,
    )
    module.add_flags(p)
    add_config_flag(p)
    return p


def parse_args(argv: Sequence[str]):
    """The parsed flags of ``argv``, over the settings of its ``--config`` file."""
    from nlft_kernels.recipes.commands.settings import apply_config, config_path

    name = _command_name(argv)
    parser = build_parser(only=name or "")
    path = config_path(list(argv))
    if path is not None and name is not None:
        apply_config(parser.commands[name], path, name)
    return parser.parse_args(argv)


def _command_name(argv: Sequence[str]) -> str | None:
    from nlft_kernels.recipes.commands import COMMANDS

    name = next((a for a in argv if not a.startswith("-")), None)
    return name if name in COMMANDS else None


class _WarningLine(logging.Formatter):
    """A warning raised in this package as one ``nlft <command>: <message>`` line; any other
    warning as Python shows it."""

    def __init__(self, prog: str) -> None:
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage().rstrip("\n")
        match = _WARNING.match(text)
        if match is not None and "nlft_kernels" in match["path"]:
            return f"{self.prog}: {match['message']}"
        return text


@contextmanager
def _warnings_as_lines(prog: str):
    """Within the block, warnings go through logging's ``py.warnings`` logger to stderr."""
    logger = logging.getLogger("py.warnings")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_WarningLine(prog))
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            for message, category in NOISE:
                warnings.filterwarnings("ignore", message=re.escape(message), category=category)
            yield
    finally:
        logging.captureWarnings(False)
        logger.removeHandler(handler)
        logger.propagate = propagate


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``nlft`` command line; returns the exit status (``--help`` exits 0 as argparse does).

    Run as the program (``argv`` None: the ``nlft`` script, ``python -m nlft_kernels``), an
    interrupted run exits at once: what it kept is on disk, and the interpreter's teardown
    (threads still waiting on a request, the modules imported) would only delay the prompt."""
    status = _main(sys.argv[1:] if argv is None else argv)
    if argv is None and status == Interrupted.exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _main(argv: Sequence[str]) -> int:
    argv = list(argv)
    name = _command_name(argv)
    prog = f"nlft {name}" if name else "nlft"
    with _warnings_as_lines(prog):
        try:
            try:
                args = parse_args(argv)
            except ImportError as err:  # the core alone is installed: the command needs the train extra
                message = f"the nlft command needs the train extra ({err}): pip install 'nlft-kernels[train]'"
                raise NLFTError(message) from None
            from nlft_kernels.recipes.commands import command

            return command(args.command).run(args)
        except Interrupted as err:
            print(f"\n{prog}: {err}", file=sys.stderr)
            return err.exit_status
        except NLFTError as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            return err.exit_status
        except KeyboardInterrupt:
            print(f"\n{prog}: interrupted", file=sys.stderr)
            return Interrupted.exit_status


if __name__ == "__main__":
    sys.exit(main())
