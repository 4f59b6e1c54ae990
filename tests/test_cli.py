"""The ``sf-ext`` dispatcher and the shared command-line conventions in ``sf_ext._cli``."""

import argparse
import importlib.util
import io
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import sf_ext
from sf_ext import _cli, cli

SF_EXT = Path(sys.executable).with_name("sf-ext")


def _run_console(*args, timeout=120):
    """The installed ``sf-ext`` console script, as a user runs it."""
    return subprocess.run(
        [str(SF_EXT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


# --- the dispatcher ----------------------------------------------------------------------------


def test_help_lists_every_subcommand_on_one_line(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name, command in cli.COMMANDS.items():
        matching = [line for line in lines if line.strip().startswith(command.usage)]
        assert len(matching) == 1, (name, out)
        assert matching[0].strip().endswith(command.summary)
    assert {"demo", "dlg", "simulate", "audit"} <= set(cli.COMMANDS)
    assert "dlg {attack,sweep,capture}" in out
    assert "--version" in out


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"sf-ext {sf_ext.__version__}"


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "no command given"),
        (["demoo"], "unknown command 'demoo'; did you mean 'demo'?"),
        (["xyz"], "unknown command 'xyz' (choose from demo, dlg, simulate, scorecard, audit)"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_dispatcher_mistakes_exit_2_with_a_message(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def _command_module(tmp_path, monkeypatch, name, body):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_dispatch_passes_arguments_prog_and_exit_code(tmp_path, monkeypatch, capsys):
    module = _command_module(
        tmp_path,
        monkeypatch,
        "sfx_echo_command",
        """
        from sf_ext._cli import InvalidParameterError, make_parser

        def main(argv=None):
            parser = make_parser("python -m sfx_echo_command", "Echo.")
            parser.add_argument("--times", type=int, default=3, help="repetitions")
            parser.add_argument("words", nargs="*")
            args = parser.parse_args(argv)
            if args.times == 0:
                raise InvalidParameterError("--times must not be 0")
            print(parser.prog, "|", " ".join(args.words * args.times))
            return 7 if args.times == 5 else 0
        """,
    )
    monkeypatch.setitem(cli.COMMANDS, "echo", cli.Command(module, "echo", "repeat words"))
    assert cli.main(["echo", "a", "b", "--times", "2"]) == 0
    assert capsys.readouterr().out.strip() == "sf-ext echo | a b a b"
    assert cli.main(["echo", "--times", "5"]) == 7  # the command's own exit code
    capsys.readouterr()
    assert cli.main(["echo", "--times", "0"]) == 2
    assert capsys.readouterr().err.strip() == "sf-ext echo: error: --times must not be 0"
    assert cli.main(["echo", "--times", "x"]) == 2
    err = capsys.readouterr().err
    assert "usage: sf-ext echo" in err and "argument --times: invalid int value: 'x'" in err
    assert cli.main(["echo", "--help"]) == 0
    assert "repetitions (default: 3)" in capsys.readouterr().out
    # Outside the dispatcher the module keeps its own program name.
    spec = importlib.util.find_spec(module)
    assert spec is not None
    assert _cli.current_prog("python -m sfx_echo_command") == "python -m sfx_echo_command"


def test_missing_command_module_is_reported_not_raised(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(
        cli.COMMANDS, "audit", cli.Command("sf_ext.dlg.no_such_audit", "audit", "audit")
    )
    assert cli.main(["audit", "--help"]) == 2
    err = capsys.readouterr().err
    assert "'sf-ext audit' is not available in this installation" in err
    assert "sf_ext.dlg.no_such_audit" in err
    # A command whose module exists but lacks a dependency names the dependency instead.
    module = _command_module(
        tmp_path, monkeypatch, "sfx_broken_command", "import sfx_not_installed_dependency\n"
    )
    monkeypatch.setitem(cli.COMMANDS, "broken", cli.Command(module, "broken", "broken"))
    assert cli.main(["broken"]) == 2
    assert "needs the module 'sfx_not_installed_dependency'" in capsys.readouterr().err


def test_audit_dispatches_when_the_module_exists(capsys):
    available = importlib.util.find_spec("sf_ext.dlg.audit") is not None
    code = cli.main(["audit", "--help"])
    captured = capsys.readouterr()
    if available:
        assert code == 0 and "usage:" in captured.out
    else:
        assert code == 2 and "not available" in captured.err


@pytest.mark.parametrize(
    "args, flag",
    [
        (["demo", "--prune-scope", "channel"], "--prune-scope"),
        (["demo", "--epochs", "two"], "--epochs"),
        (["demo", "--no-such-flag"], "--no-such-flag"),
        # A value only the library rejects (InvalidParameterError), before any training starts.
        (["demo", "--prune-percent", "0", "--out", "{tmp}/demo"], "prune_percent"),
    ],
)
@pytest.mark.secretflow  # the demo imports SecretFlow before it checks the pruning values
def test_console_script_bad_argument_exits_2_without_traceback(tmp_path, args, flag):
    result = _run_console(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.returncode == 2, result.stderr
    assert flag.replace("_", "-") in result.stderr.replace("_", "-")
    assert "error:" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "demo").exists()  # nothing written for a refused run


def test_console_script_help_and_version():
    result = _run_console("--help")
    assert result.returncode == 0 and "simulate" in result.stdout and "audit" in result.stdout
    result = _run_console("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"sf-ext {sf_ext.__version__}"


# --- shared conventions ------------------------------------------------------------------------


def test_run_main_turns_user_errors_into_exit_2():
    def failing(exc):
        def main(argv):
            raise exc

        return main

    cases = [
        (_cli.InvalidParameterError("lr must be > 0, got -1"), "lr must be > 0, got -1"),
        (
            _cli.MissingInputError(2, "No such file or directory", "cfg.yaml"),
            "No such file or directory: cfg.yaml",
        ),
        (_cli.MissingInputError("no runs.csv in runs/x"), "no runs.csv in runs/x"),
        (_cli.UnknownNameError("unknown model 'resnet'"), "unknown model 'resnet'"),
    ]
    for exc, message in cases:
        err = io.StringIO()
        assert _cli.run_main(failing(exc), [], prog="tool", stderr=err) == 2
        assert err.getvalue() == f"tool: error: {message}\n"
    # The markers keep the built-in types, so library callers can catch them as usual.
    assert issubclass(_cli.InvalidParameterError, ValueError)
    assert issubclass(_cli.MissingInputError, FileNotFoundError)
    assert str(_cli.UnknownNameError("plain text")) == "plain text"


def test_run_main_keeps_tracebacks_for_bugs_unless_listed():
    def buggy(argv):
        raise ValueError("internal invariant broken")

    with pytest.raises(ValueError, match="internal invariant"):
        _cli.run_main(buggy, [], prog="tool", stderr=io.StringIO())
    err = io.StringIO()
    assert _cli.run_main(buggy, [], prog="tool", user_errors=(ValueError,), stderr=err) == 2
    assert err.getvalue() == "tool: error: internal invariant broken\n"


def test_run_main_exit_codes():
    err = io.StringIO()
    assert _cli.run_main(lambda argv: None, []) == 0
    assert _cli.run_main(lambda argv: 3, []) == 3
    assert _cli.run_main(lambda argv: len(argv), ["a", "b"]) == 2

    def interrupted(argv):
        raise KeyboardInterrupt

    assert _cli.run_main(interrupted, [], prog="tool", stderr=err) == 130
    assert err.getvalue() == "tool: interrupted\n"

    def exits(code):
        def main(argv):
            sys.exit(code)

        return main

    assert _cli.run_main(exits(None), []) == 0
    assert _cli.run_main(exits(2), []) == 2
    err = io.StringIO()
    assert _cli.run_main(exits("fatal: text"), [], stderr=err) == 1
    assert err.getvalue() == "fatal: text\n"


def test_make_parser_shows_defaults_and_takes_the_dispatcher_name(capsys):
    parser = _cli.make_parser("python -m tool", "Line one.\n  indented line two.")
    parser.add_argument("--epochs", type=_cli.positive_int, default=10, help="epochs")
    assert parser.prog == "python -m tool"
    help_text = parser.format_help()
    assert "epochs (default: 10)" in help_text
    assert "\n  indented line two." in help_text  # description layout kept
    with _cli.prog_name("sf-ext tool"):
        assert _cli.make_parser("python -m tool", "x").prog == "sf-ext tool"
    assert _cli.make_parser("python -m tool", "x").prog == "python -m tool"


@pytest.mark.parametrize(
    "kind, good",
    [
        (_cli.positive_int, [("1", 1), ("12", 12)]),
        (_cli.non_negative_int, [("0", 0), ("4", 4)]),
        (_cli.positive_float, [("0.5", 0.5), ("3", 3.0)]),
        (_cli.fraction, [("1", 1.0), ("0.1", 0.1)]),
        (_cli.percent, [("5", 5.0), ("99.5", 99.5)]),
    ],
)
def test_value_types_accept(kind, good):
    for text, value in good:
        assert kind(text) == value


@pytest.mark.parametrize(
    "kind, text, message",
    [
        (_cli.positive_int, "0", "must be a positive integer, got '0'"),
        (_cli.positive_int, "-3", "must be a positive integer, got '-3'"),
        (_cli.positive_int, "1.5", "must be an integer, got '1.5'"),
        (_cli.non_negative_int, "-1", "must be an integer >= 0, got '-1'"),
        (_cli.positive_float, "0", "must be a number > 0, got '0'"),
        (_cli.positive_float, "nan", "must be a number > 0, got 'nan'"),
        (_cli.positive_float, "inf", "must be a number > 0, got 'inf'"),
        (_cli.fraction, "0", "must be in (0, 1], got '0'"),
        (_cli.fraction, "1.01", "must be in (0, 1], got '1.01'"),
        (_cli.fraction, "nan", "must be in (0, 1], got 'nan'"),
        (_cli.percent, "100", "must be in (0, 100), got '100'"),
        (_cli.percent, "0", "must be in (0, 100), got '0'"),
        (_cli.percent, "five", "must be a number, got 'five'"),
    ],
)
def test_value_types_reject_with_the_reason(kind, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as error:
        kind(text)
    assert str(error.value) == message


def test_value_type_errors_through_argparse(capsys):
    parser = _cli.make_parser("tool", "x")
    parser.add_argument("--rate", type=_cli.fraction, default=0.1)
    assert _cli.run_main(parser.parse_args, ["--rate", "2"], prog="tool") == 2
    assert "argument --rate: must be in (0, 1], got '2'" in capsys.readouterr().err


def test_setup_logging_is_quiet_by_default():
    stream = io.StringIO()
    logger = _cli.setup_logging(0, stream=stream)
    child = logging.getLogger("sf_ext.some.module")
    child.info("progress note")
    child.warning("something to know")
    assert stream.getvalue() == "WARNING sf_ext.some.module: something to know\n"
    assert logging.getLogger("secretflow").level == logging.WARNING

    stream = io.StringIO()
    _cli.setup_logging(1, stream=stream)
    _cli.setup_logging(1, stream=stream)  # again: one handler, not two
    child.info("progress note")
    child.debug("details")
    assert stream.getvalue() == "INFO sf_ext.some.module: progress note\n"
    assert sum(getattr(h, "_sf_ext_cli", False) for h in logger.handlers) == 1

    stream = io.StringIO()
    _cli.setup_logging(2, stream=stream)
    child.debug("details")
    assert stream.getvalue() == "DEBUG sf_ext.some.module: details\n"
    assert logging.getLogger("ray").level == logging.INFO
    _cli.setup_logging(0, stream=io.StringIO())
