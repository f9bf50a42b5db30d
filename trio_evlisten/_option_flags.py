"""Listener options as command-line flags, derived from their definitions.

``python -m trio_evlisten echo`` and ``python -m trio_evlisten.workers`` take
the options that have a :class:`._options.Cli` spelling: the flag's name,
value, check and help all come from the option's one definition in
:mod:`._options`, and :func:`to_argv` turns given options back into flags
(how the workers' supervisor passes them on to each worker).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ._options import OPTIONS, Cli, Option

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(
    parser: argparse.ArgumentParser,
    names: Iterable[str] | None = None,
    *,
    defaults: Mapping[str, object] | None = None,
    unset: Mapping[str, str] | None = None,
) -> None:
    """Add ``--max-connections N`` and the like for the options ``names``.

    ``None``: every option that has a command-line spelling, so an option
    defined with one appears on every command line at once. Each flag's help
    is its :class:`Cli` text (else the reference's), and ends with the
    default this command line has, as one would type it
    (``(default: none)``).

    An option left off the command line is left out of the namespace, so its
    default stays the one defined here, unless this command line has one of
    its own: ``defaults`` maps an option to a value (the workers drain for
    5 s, not forever), ``unset`` to what leaving the flag out means where
    that is no option value (the echo server's stop does not drain).
    """
    defaults = defaults or {}
    unset = unset or {}
    if names is None:
        names = [name for name, option in OPTIONS.items() if option.cli is not None]
    for name in names:
        option = OPTIONS[name]
        cli = option.cli
        assert cli is not None, f"{name} has no command-line spelling"
        if name in unset:
            shown = unset[name]
        else:
            shown = _as_typed(defaults.get(name, option.default), cli)
        text = cli.help if cli.help is not None else _plain(option.doc)
        help_text = f"{text} (default: {shown})".replace("%", "%%")
        default = defaults.get(name, argparse.SUPPRESS)
        if cli.metavar is None:
            parser.add_argument(
                _flag(name), action="store_true", default=default, help=help_text
            )
            continue
        parser.add_argument(
            _flag(name),
            type=_argument_type(name, option),
            action="append" if cli.repeat else "store",
            metavar=cli.metavar,
            default=default,
            help=help_text,
        )


def _as_typed(value: object, cli: Cli) -> str:
    """A default as one would give it on the command line."""
    if cli.metavar is None:
        return "on" if value else "off"
    if value is None:
        return cli.shown or "none"
    return str(value)


def _argument_type(name: str, option: Option) -> Callable[[str], object]:
    cli = option.cli
    assert cli is not None

    def convert(text: str) -> object:
        try:
            value = cli.parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {cli.metavar}, not {text!r}"
            ) from None
        try:
            option.check([value] if cli.repeat else value, name)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    return convert


def from_arguments(namespace: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line, for ``open_listener(**...)``."""
    return {name: vars(namespace)[name] for name in OPTIONS if name in vars(namespace)}


def to_argv(given: Mapping[str, Any]) -> list[str]:
    """Command-line arguments that :func:`from_arguments` turns back into ``given``."""
    argv: list[str] = []
    for name, value in given.items():
        cli = OPTIONS[name].cli
        assert cli is not None, f"{name} has no command-line spelling"
        if cli.metavar is None:
            argv += [_flag(name)] if value else []
        elif cli.repeat:
            argv += [f"{_flag(name)}={item}" for item in value]
        else:
            argv.append(f"{_flag(name)}={'none' if value is None else value}")
    return argv


def _plain(doc: str) -> str:
    """Reference text without reST markup, for ``--help``."""
    for markup in (":meth:", ":class:", ":func:", ":mod:", "``", "~"):
        doc = doc.replace(markup, "")
    return doc.replace("`", "")
