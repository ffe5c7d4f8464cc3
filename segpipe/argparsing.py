"""Argument parsing shared by segpipe's commands.

:class:`CommandParser` is ``argparse`` with the conventions of ``segpipe fit``:

* options are documented with underscores (``--batch_size``, as LightningCLI's
  ``--ckpt_path``), and the dashed spelling (``--batch-size``) is accepted for every one;
* no abbreviations (a misspelt option is an error, not a guess);
* ``--config FILE``: a YAML mapping of option values (``batch_size: 8``); options given on the
  command line override it;
* a mistake is one line, ``segpipe predict: error: ...``, with exit code 2;
* plain-text help (docstrings' RST markup removed).

It is plain ``argparse``, so ``predict``, ``export`` and ``demo`` start without jsonargparse
(whose help for ``fit``/``validate``/``test`` and ``check-data`` is formatted by
:class:`segpipe.helpformat.HelpFormatter`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["CommandParser", "class_parameters", "command_line_value", "home_path", "option_at",
           "positive_int"]


def class_parameters(class_path: Any) -> dict[str, Any]:
    """The parameters (``inspect.Parameter``) of the class a dotted ``class_path`` names, by
    name; empty when it names none that can be imported and read."""
    import importlib
    import inspect

    if not isinstance(class_path, str) or "." not in class_path:
        return {}
    module, _, name = class_path.rpartition(".")
    try:
        return dict(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
    except (ImportError, AttributeError, ValueError, TypeError):
        return {}


def command_line_value(argv: Sequence[str], option: str) -> str | None:
    """The value of the last ``option VALUE`` or ``option=VALUE`` in ``argv`` (None if absent).

    jsonargparse applies options and ``--config`` files in their order, so ``--ckpt_path FILE
    --config RUN/config.yaml`` took the ``ckpt_path: null`` every saved run config holds and
    started a new run, setting the one to resume aside. An option typed on the command line
    is meant whatever its place."""
    value = None
    for i in range(len(argv)):
        here = option_at(argv, i, option)
        value = value if here is None else here
    return value


def option_at(argv: Sequence[str], i: int, option: str) -> str | None:
    """The value ``option`` is given at ``argv[i]`` (``option VALUE`` or ``option=VALUE``), or
    None when ``argv[i]`` is another argument."""
    arg = argv[i]
    if arg == option:
        return argv[i + 1] if i + 1 < len(argv) else None
    return arg[len(option) + 1:] if arg.startswith(option + "=") else None


def home_path(value: str) -> str:
    """An argparse ``type`` for paths: a leading ``~`` expanded, as the shell does it for a word
    but not in ``--option=~/x`` nor in a ``--config`` file's value."""
    import os

    return os.path.expanduser(value)


def positive_int(value: str) -> int:
    """An argparse ``type`` for counts (images, steps, rounds): a whole number >= 1."""
    return at_least(1)(value)


def at_least(lowest: int):  # noqa: ANN201 - an argparse type
    """An argparse ``type``: a whole number >= ``lowest`` (``at_least(0)`` for worker counts,
    ``at_least(2)`` for class counts)."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
        if number < lowest:
            raise argparse.ArgumentTypeError(f"must be >= {lowest}, got {number}")
        return number

    parse.__name__ = f"whole number >= {lowest}"
    return parse


class _Formatter(argparse.HelpFormatter):
    """Shows each option under its first (documented) spelling; drops RST double backquotes."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            return super()._format_action_invocation(action)
        first = action.option_strings[0]
        if action.nargs == 0:
            return first
        return f"{first} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _format_text(self, text: str) -> str:
        return super()._format_text(text.replace("``", ""))

    def _expand_help(self, action: argparse.Action) -> str:
        return super()._expand_help(action).replace("``", "")


class CommandParser(argparse.ArgumentParser):
    """See the module docstring.

    Args:
        *args: As for ``argparse.ArgumentParser``.
        config: Add ``--config FILE`` (YAML of option values).
        **kwargs: As for ``argparse.ArgumentParser``.
    """

    def __init__(self, *args: Any, config: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        if config:
            self.add_argument(
                "--config", metavar="FILE",
                help="YAML file of option values, keyed like the options without dashes (e.g. "
                     "batch_size: 8); options on the command line override it",
            )

    # ------------------------------------------------------------------ spellings
    def _spelled(self, token: str) -> str:
        """``--batch-size=8`` -> ``--batch_size=8`` when only the other spelling is an option."""
        if not token.startswith("--") or token == "--":
            return token
        name, eq, value = token.partition("=")
        if name in self._option_string_actions:
            return token
        for other in ("--" + name[2:].replace("-", "_"), "--" + name[2:].replace("_", "-")):
            if other in self._option_string_actions:
                return other + eq + value
        return token

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        argv = list(sys.argv[1:] if args is None else args)
        argv = [self._spelled(a) for a in argv]
        if "--config" in self._option_string_actions:
            self._apply_config(argv)
        return super().parse_known_args(argv, namespace)

    # ------------------------------------------------------------------ --config
    def _apply_config(self, argv: list[str]) -> None:
        path = command_line_value(argv, "--config")
        if path is None:
            return
        import yaml

        p = Path(path).expanduser()
        try:
            values = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            self.error(f"--config {p}: {exc.strerror or exc}")
        except yaml.YAMLError as exc:
            self.error(f"--config {p}: not valid YAML ({' '.join(str(exc).split())})")
        if not isinstance(values, dict):
            self.error(f"--config {p}: expected a mapping of option values, e.g. batch_size: 8")
        by_name = {}
        for action in self._actions:
            for option in action.option_strings:
                by_name[option.lstrip("-").replace("-", "_")] = action
        typed = self._given_on_command_line(argv)
        from_file: dict[argparse.Action, str] = {}
        for key, value in values.items():
            action = by_name.get(str(key).replace("-", "_"))
            if action is None or action.dest in ("help", "config"):
                known = sorted({a.option_strings[0].lstrip("-") for a in self._actions
                                if a.option_strings and a.dest not in ("help", "config")})
                self.error(f"--config {p}: unknown option {key!r}; options: {', '.join(known)}")
            rivals = self._rivals(action)
            if rivals & typed:
                # `--ckpt_path B` on the command line overrides `onnx: A` in the file, as any
                # typed option overrides the file's value for it
                continue
            if value is not None:  # `onnx: null` gives nothing
                clash = next((from_file[r] for r in rivals if r in from_file), None)
                if clash is not None:
                    self.error(f"--config {p}: {clash} and {key} cannot both be given; keep one")
                from_file[action] = str(key)
            value = self._config_value(p, str(key), action, value)
            self.set_defaults(**{action.dest: value})
            action.required = False
            for group in self._mutually_exclusive_groups:
                if action in group._group_actions:
                    group.required = False

    def _given_on_command_line(self, argv: Sequence[str]) -> set[argparse.Action]:
        """The actions of the options typed in ``argv`` (``--x`` or ``--x=value``)."""
        given = set()
        for token in argv:
            action = self._option_string_actions.get(token.partition("=")[0])
            if action is not None:
                given.add(action)
        return given

    def _rivals(self, action: argparse.Action) -> set[argparse.Action]:
        """The other options of ``action``'s mutually exclusive groups (``--onnx`` for
        ``--ckpt_path``): argparse checks those only among options on the command line."""
        return {other for group in self._mutually_exclusive_groups
                if action in group._group_actions
                for other in group._group_actions if other is not action}

    def _config_value(self, path: Path, key: str, action: argparse.Action, value: Any) -> Any:
        """``value`` from the YAML file as the command line would give it, or one error line:
        flags take only true/false (the string "false" is no flag's false), a list option takes
        a list or one string (as one value on the command line: ``mask,palette``), a typed
        option its type (no silent 2.7 -> 2), a choice one of its choices."""
        where = f"--config {path}: {key}"
        if action.nargs == 0:  # store_true / store_false
            if not isinstance(value, bool):
                self.error(f"{where} must be true or false, got {value!r}")
            # `no_progress: true` means what --no_progress does: progress off
            return not value if isinstance(action, argparse._StoreFalseAction) else value
        if value is None:
            return None
        if action.nargs in ("+", "*"):
            items = value if isinstance(value, list) else [value]
            return [self._typed(where, action, v) for v in items]
        if isinstance(value, (list, dict)):
            self.error(f"{where} takes one value, got {value!r}")
        return self._typed(where, action, value)

    def _typed(self, where: str, action: argparse.Action, value: Any) -> Any:
        kind = action.type
        if kind is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            self.error(f"{where} must be a whole number, got {value!r}")
        if kind is float and isinstance(value, bool):  # float(True) is 1.0; --x true is an error
            self.error(f"{where} must be a number, got {value!r}")
        if callable(kind):
            try:
                value = kind(value if isinstance(value, str) or kind in (int, float) else str(value))
            except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                name = getattr(kind, "__name__", "value")
                detail = f" ({exc})" if isinstance(exc, argparse.ArgumentTypeError) else ""
                self.error(f"{where}: invalid {name} value {value!r}{detail}")
        elif not isinstance(value, str):
            value = str(value)
        if action.choices is not None and value not in action.choices:
            self.error(f"{where} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
        return value

    # ------------------------------------------------------------------ errors
    def error(self, message: str) -> NoReturn:
        """One line on stderr, exit code 2."""
        text = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {text} (see `{self.prog} --help`)\n")
