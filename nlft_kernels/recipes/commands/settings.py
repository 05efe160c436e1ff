"""How the ``nlft`` command reads its settings: the dataclasses (``NLFTTrainingArguments``,
``NLFTConfig``) parsed by ``HfArgumentParser``, one flag per field (``--field_name`` and
``--field-name``, plus the short aliases the fields name: ``--lr``, ``--steps``, ...); a YAML file
(``--config file.yaml``, one ``setting: value`` per line) whose values the command line overrides;
every check in the dataclasses' ``__post_init__``, reported as :class:`BadInput`."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from transformers import HfArgumentParser

from nlft_kernels.recipes.errors import BadInput

CONFIG_HELP = (
    "settings from a YAML file, one 'setting: value' per line (any flag of this command, by its name "
    "with _ or -, e.g. learning_rate: 5.0e-5 or lr: 5.0e-5); flags on the command line override it"
)


class Parser(HfArgumentParser):
    """``HfArgumentParser`` whose errors are :class:`BadInput` (one line, exit status 2, printed
    by the one ``main``) instead of argparse's usage block and exit; no prefix abbreviations
    (with a hundred TrainingArguments flags, a prefix would be a guess)."""

    def __init__(self, dataclass_types=None, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(dataclass_types, **kwargs)

    def error(self, message: str):
        raise BadInput(f"{message} (`{self.prog} --help` lists the flags)")


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", default=None, help=CONFIG_HELP)


def config_path(argv: list[str]) -> str | None:
    """The ``--config`` of ``argv`` (the last one), read before the command line is parsed."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    return known.config


def apply_config(parser: argparse.ArgumentParser, path: str, command: str) -> None:
    """The settings of the YAML file ``path`` as ``parser``'s defaults, each converted and checked
    by its flag's own type and choices (so that a value of the wrong type is named with the file
    and the setting); a required flag the file sets is no longer required on the command line."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise BadInput(f"--config {path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise BadInput(f"--config {path}: {err.strerror or err}") from None
    try:
        settings = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise BadInput(f"--config {path}{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if settings is None:
        return
    if not isinstance(settings, dict):
        raise BadInput(f"--config {path}: expected 'setting: value' lines, got a {type(settings).__name__}")
    by_name = {}
    for action in parser._actions:  # argparse's list of a parser's actions (TRL's parser reads it too)
        for option in action.option_strings:
            by_name.setdefault(option.lstrip("-").replace("-", "_"), action)
    defaults = {}
    for key, value in settings.items():
        action = by_name.get(str(key).replace("-", "_"))
        if action is None or action.dest in ("help", "config"):
            raise BadInput(
                f"--config {path}: unknown setting {key!r} for `nlft {command}` (`nlft {command} --help` lists them)"
            )
        defaults[action.dest] = _convert(action, value, f"--config {path}: {key}")
        action.required = False
    parser.set_defaults(**defaults)


def _convert(action: argparse.Action, value, where: str):
    """``value`` (from YAML) as the flag ``action`` would parse it on the command line."""
    if value is None:
        return None
    if action.nargs == 0:  # a switch (--full, --strict): true sets it, false leaves the default
        if not isinstance(value, bool):
            raise BadInput(f"{where}: expected true or false, got {value!r}")
        return action.const if value else action.default
    if action.nargs in ("+", "*"):
        return [_one(action, item, where) for item in (value if isinstance(value, list) else [value])]
    if isinstance(value, list):
        raise BadInput(f"{where}: expected one value, got a list")
    return _one(action, value, where)


def _one(action: argparse.Action, value, where: str):
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, dict):
        text = json.dumps(value)  # the TrainingArguments fields that take a dict read it as JSON text
    else:
        text = str(value)
    try:
        result = action.type(text) if callable(action.type) else text
    except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
        raise BadInput(f"{where}: invalid value {value!r} ({err})") from None
    if action.choices is not None and result not in action.choices:
        raise BadInput(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return result


def build(cls, args: argparse.Namespace, **overrides):
    """The dataclass ``cls`` from the fields ``args`` holds (``overrides`` win); its
    ``__post_init__``'s ValueError or TypeError becomes :class:`BadInput`."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
    try:
        return cls(**(values | overrides))
    except (ValueError, TypeError) as err:
        raise BadInput(f"{cls.__name__}: {err}") from None


def training_arguments(args: argparse.Namespace, default_steps: int, **overrides):
    """The ``NLFTTrainingArguments`` of the training flags: ``--steps`` or ``--epochs`` (neither:
    ``default_steps`` steps; both: BadInput), the rest as given."""
    from nlft_kernels.training.arguments import NLFTTrainingArguments

    fields = {f.name: f for f in dataclasses.fields(NLFTTrainingArguments)}
    steps, epochs = args.max_steps, args.num_train_epochs
    if steps is not None and epochs is not None:
        raise BadInput("--steps and --epochs both given: train for one or the other")
    if steps is None:
        steps = fields["max_steps"].default if epochs is not None else default_steps
    if epochs is None:
        epochs = fields["num_train_epochs"].default
    return build(NLFTTrainingArguments, args, max_steps=steps, num_train_epochs=epochs, **overrides)


def nlft_config(args: argparse.Namespace):
    """The ``NLFTConfig`` of the ``--<field>`` flags."""
    from nlft_kernels.config import NLFTConfig

    return build(NLFTConfig, args)


def training_parser_defaults(parser: argparse.ArgumentParser) -> None:
    """``--steps`` and ``--epochs`` unset unless given (see :func:`training_arguments`)."""
    parser.set_defaults(max_steps=None, num_train_epochs=None)
