"""Each listener option is defined once, and everything derives from that."""

from __future__ import annotations

import argparse
import inspect
import typing
from typing import Any

import pytest
import trio

import trio_evlisten
import trio_evlisten._options
from trio_evlisten import ListenerOptions, open_listener, serve_listener
from trio_evlisten._option_flags import add_arguments, from_arguments, to_argv
from trio_evlisten._options import OPTIONS, Option, resolve

#: A value for each option that differs from its default and that the
#: command line can carry (None where an option has no CLI spelling).
EXAMPLES: dict[str, Any] = {
    "max_connections": 7,
    "max_pending": 300,
    "drain_timeout": 2.5,
    "proxy_protocol": True,
    "proxy_trusted": ["10.0.0.0/8", "::1"],
    "proxy_timeout": 0.25,
    "keepalive": 60,
    "max_loop_lag": 0.05,
    "max_accept_rate": 100.0,
    "accept_burst": 10,
    "max_connections_per_client": 10,
    "client_limit_policy": "hold",
    "client_ipv6_prefix": 56,
    "client_table_size": 1000,
}


def test_the_typed_dict_and_the_table_are_one_definition() -> None:
    assert list(OPTIONS) == list(ListenerOptions.__annotations__)
    # Straight from the annotations (OPTIONS may be patched by --stream).
    hints = typing.get_type_hints(
        ListenerOptions, vars(trio_evlisten._options), include_extras=True
    )
    for name, hint in hints.items():
        [option] = [m for m in hint.__metadata__ if isinstance(m, Option)]
        assert option.doc, name
        # The reference text names every option with its default.
        assert f"    {name}: (default ``{option.shown}``)" in (
            ListenerOptions.__doc__ or ""
        )


def test_defaults_fill_in_and_pass_their_own_checks() -> None:
    resolved = resolve({}, trio_evlisten.Flag(0))
    assert set(resolved) == set(OPTIONS)
    for name, option in OPTIONS.items():
        option.check(option.default, name)


def test_unknown_option_names_the_valid_ones() -> None:
    with pytest.raises(TypeError, match=r"unknown option\(s\) max_conections.*"):
        resolve({"max_conections": 5}, trio_evlisten.Flag(0))


async def test_unknown_option_is_refused_by_open_listener() -> None:
    with pytest.raises(TypeError, match="max_conections"):
        async with open_listener(
            None,
            address=("127.0.0.1", 0),
            max_conections=5,  # type: ignore[call-arg]
        ):
            pass  # pragma: no cover


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_check_names_the_option_and_the_bad_value(name: str) -> None:
    bad = object()
    with pytest.raises((TypeError, ValueError), match=name):
        OPTIONS[name].check(bad, name)


def test_open_and_serve_take_the_same_options() -> None:
    for fn in (open_listener, serve_listener):
        params = inspect.signature(fn).parameters
        assert params["options"].kind is inspect.Parameter.VAR_KEYWORD


def test_command_line_flags_derive_from_the_definition() -> None:
    cli_names = [name for name, option in OPTIONS.items() if option.cli is not None]
    assert sorted(cli_names) == sorted(EXAMPLES)
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser, cli_names)
    # Nothing given: nothing in the namespace, so the defaults stay ours.
    assert from_arguments(parser.parse_args([])) == {}
    # Every option survives a trip through the command line (how the
    # workers supervisor hands its options to each worker).
    argv = to_argv(EXAMPLES)
    assert from_arguments(parser.parse_args(argv)) == EXAMPLES
    help_text = parser.format_help()
    for name in cli_names:
        assert "--" + name.replace("_", "-") in help_text


def test_command_line_values_get_the_options_own_check() -> None:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser, ["max_connections"])
    with pytest.raises(argparse.ArgumentError, match="max_connections must be"):
        parser.parse_args(["--max-connections", "0"])


async def test_serve_listener_passes_options_through() -> None:
    async with trio.open_nursery() as nursery:
        listener = await nursery.start(
            lambda task_status: serve_listener(
                None,
                address=("127.0.0.1", 0),
                flags=trio_evlisten.Flag.CLOSE_ON_FREE,
                max_connections=3,
                task_status=task_status,
            )
        )
        assert listener.statistics().max_connections == 3
        listener.close()


def test_both_command_lines_take_every_option_that_has_a_spelling() -> None:
    from trio_evlisten._cli import build_parser
    from trio_evlisten.workers import _parser as workers_parser

    [commands] = [
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    ]
    echo = commands.choices["echo"]
    for parser in (echo, workers_parser()):
        flags = {flag for action in parser._actions for flag in action.option_strings}
        for name, option in OPTIONS.items():
            if option.cli is not None:
                assert "--" + name.replace("_", "-") in flags, (parser.prog, name)
