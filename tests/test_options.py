"""Each listener option is defined once, and everything derives from that."""

from __future__ import annotations

import argparse
import functools
import inspect
import logging
import operator
import os
import re
import ssl
import subprocess
import sys
import typing
from pathlib import Path
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
    "lameduck": 3.5,
    "agent_port": 9100,
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


# --- an option given where it cannot apply is refused -------------------------

LOCAL = ("127.0.0.1", 0)
FREE = trio_evlisten.Flag.CLOSE_ON_FREE
BLOCKING = trio_evlisten.Flag.LEAVE_SOCKETS_BLOCKING


async def refused(match: str, flags: trio_evlisten.Flag = FREE, **options: Any) -> None:
    """open_listener refuses ``options`` with a ValueError matching ``match``."""
    with pytest.raises(ValueError, match=match):
        async with open_listener(None, address=LOCAL, flags=flags, **options):
            pass  # pragma: no cover


async def taken(flags: trio_evlisten.Flag = FREE, **options: Any) -> None:
    async with open_listener(None, address=LOCAL, flags=flags, **options):
        pass


async def test_tls_handshake_timeout_without_ssl_context_is_refused(
    server_ctx: ssl.SSLContext,
) -> None:
    await refused(
        r"^tls_handshake_timeout= .* only happens with ssl_context=; give "
        r"ssl_context= too",
        tls_handshake_timeout=3,
    )
    # Given, the default's value is as much a mistake as any other.
    await refused("tls_handshake_timeout=", tls_handshake_timeout=10.0)
    await taken(ssl_context=server_ctx, tls_handshake_timeout=3)


@pytest.mark.parametrize(
    ("name", "value"), [("proxy_trusted", ["10.0.0.0/8"]), ("proxy_timeout", 2.0)]
)
async def test_proxy_options_without_proxy_protocol_are_refused(
    name: str, value: Any
) -> None:
    match = rf"^{name}= .* only read with proxy_protocol=True; give proxy_protocol=True"
    await refused(match, **{name: value})
    await refused(match, proxy_protocol=False, **{name: value})
    await taken(proxy_protocol=True, **{name: value})


async def test_max_pending_without_a_preamble_is_refused(
    server_ctx: ssl.SSLContext,
) -> None:
    await refused(
        r"^max_pending= .* only with proxy_protocol=True or ssl_context=; give "
        r"one of those.* use max_connections=",
        max_pending=10,
    )
    await taken(max_pending=10, proxy_protocol=True)
    await taken(max_pending=10, ssl_context=server_ctx)


async def test_stream_with_leave_sockets_blocking_is_refused() -> None:
    for stream in (trio.SocketStream, trio_evlisten.SocketStream):
        await refused(
            r"^stream= .* with Flag\.LEAVE_SOCKETS_BLOCKING they get a blocking "
            r"socket\.socket instead; leave out stream= or the flag",
            flags=FREE | BLOCKING,
            stream=stream,
        )
    await taken(flags=FREE | BLOCKING)
    await taken(stream=trio.SocketStream)


def test_options_not_given_are_never_refused_for_not_applying() -> None:
    # Every default goes with every flag: only what the caller gave is judged.
    for flags in (trio_evlisten.Flag(0), BLOCKING):
        resolve({}, flags)


def test_a_value_check_comes_before_the_cannot_apply_check() -> None:
    # A bad value is named as such, even where the option cannot apply.
    with pytest.raises(ValueError, match="proxy_timeout must be >= 0"):
        resolve({"proxy_timeout": -1.0}, trio_evlisten.Flag(0))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--proxy-timeout", "2"], "proxy_timeout= applies to the PROXY header"),
        (["--max-pending", "9"], "max_pending= bounds the connections"),
    ],
)
def test_the_workers_supervisor_refuses_them_before_starting_workers(
    args: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trio_evlisten import workers

    # main() configures the root logger, which is the process's, not this test's.
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)
    workers_main = workers.main
    with pytest.raises(SystemExit) as info:
        workers_main(["--port", "0", *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


ROOT = Path(__file__).resolve().parent.parent

#: Each command line: how to run it, the arguments it needs, its parser, and
#: the options whose absence is no option value (what --help says instead).
COMMAND_LINES = {
    "echo": (["trio_evlisten", "echo"], [], {"drain_timeout": "no drain"}),
    "workers": (["trio_evlisten.workers"], ["--port", "0"], {}),
}


def _parser_of(name: str) -> argparse.ArgumentParser:
    from trio_evlisten._cli import build_parser
    from trio_evlisten.workers import _parser as workers_parser

    if name == "workers":
        return workers_parser()
    [commands] = [
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    ]
    parser: argparse.ArgumentParser = commands.choices["echo"]
    return parser


def stated_defaults(help_text: str) -> dict[str, str]:
    """``{"--drain-timeout": "5.0", ...}``: the "(default: ...)" of each
    argument in ``--help`` (the usage and the epilog left out)."""
    entries: list[str] = []
    in_section = False
    for line in help_text.splitlines():
        if line in ("options:", "positional arguments:"):
            in_section = True
        elif not line.strip():
            in_section = False
        elif in_section and re.match(r"  \S", line):
            entries.append(line)
        elif in_section and entries:
            entries[-1] += " " + line
    stated = {}
    for entry in entries:
        text = " ".join(entry.split())
        match = re.search(r"\(default: (.*)\)$", text)
        if match:
            stated[text.split()[0]] = match[1]
    return stated


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMMAND_LINES))
def test_help_states_the_defaults_the_command_line_parses(name: str) -> None:
    command, needed, unset = COMMAND_LINES[name]
    result = subprocess.run(
        [sys.executable, "-m", *command, "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        cwd=ROOT,
        env=dict(os.environ, COLUMNS="80"),
    )
    # It speaks of the command line, not of Python: no keyword argument
    # (ssl_context=, which no flag sets), no "with" block to leave.
    assert not re.search(r"\b[a-z_]+=", result.stdout), result.stdout
    assert "the block" not in result.stdout
    stated = stated_defaults(result.stdout)
    parser = _parser_of(name)
    parsed = vars(parser.parse_args(needed))
    checked = 0
    for option_name, option in OPTIONS.items():
        cli = option.cli
        if cli is None:
            continue
        flag = "--" + option_name.replace("_", "-")
        assert flag in stated, f"{name} --help states no default for {flag}"
        if option_name in unset:
            # Left out, the option is not passed on; --help says what that does.
            assert option_name not in parsed
            assert stated[flag].startswith(unset[option_name]), stated[flag]
            continue
        # What the listener gets when the flag is left out...
        actual = parsed.get(option_name, option.default)
        # ... is what the stated default gives when typed.
        if cli.metavar is None:
            assert stated[flag] == "off"
            assert actual is False
            continue
        typed = stated[flag].split(", ") if cli.repeat else [stated[flag]]
        argv = [arg for value in typed for arg in (flag, value)]
        given = vars(parser.parse_args([*needed, *argv]))[option_name]
        assert option.check(given, option_name) == option.check(actual, option_name), (
            name,
            flag,
            stated[flag],
            actual,
        )
        checked += 1
    assert checked >= 5
    # The command line's own arguments.
    own = 0
    for action in parser._actions:
        flag = (action.option_strings or [action.dest])[-1]
        if flag not in stated or action.dest in OPTIONS:
            continue
        convert: Any = action.type or str
        if flag == "--workers":
            assert stated[flag] == "the CPU count"
            assert action.default == (os.cpu_count() or 1)
        elif action.nargs == "*":  # --flags: the names, OR-ed
            names = [convert(text) for text in stated[flag].split()]
            assert functools.reduce(operator.or_, names) == functools.reduce(
                operator.or_, action.default
            )
        else:
            assert convert(stated[flag]) == action.default, flag
        own += 1
    assert own >= 4
