"""Shared conventions for sf-ext's command lines (``sf-ext demo``, ``sf-ext dlg``, ...).

Every command module exposes ``main(argv: Optional[List[str]] = None) -> int`` and follows the
same rules, which this module implements once:

* :func:`make_parser` builds an ``argparse`` parser whose help shows every default, and whose
  program name reads ``sf-ext <command>`` when the ``sf-ext`` dispatcher runs the command (and the
  module's own name when it runs as ``python -m ...``).
* A mistake the user can fix (a bad flag value, a missing file, an unknown name) is raised as a
  :class:`UserError` (e.g. :class:`InvalidParameterError`, :class:`MissingInputError`), or any
  exception type a command lists in ``user_errors``; :func:`run_main` reports it as
  ``<prog>: error: <message>`` on stderr and returns exit code 2, never a traceback. Any other
  exception is a bug and keeps its traceback.
* :func:`setup_logging` routes ``logging`` through ``tqdm.write`` so messages never break a
  progress bar, and is quiet (warnings only) unless ``-v`` is given. Tables go to stdout.

A command module typically reads::

    def main(argv=None) -> int:
        return run_main(_main, argv, prog=PROG)

    def _main(argv) -> int:
        parser = make_parser(PROG, "What the command does.")
        add_verbosity_flags(parser)
        args = parser.parse_args(argv)
        setup_logging(args.verbose)
        ...
"""

import argparse
import contextlib
import contextvars
import logging
import sys
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Type

#: Exit status for a usage error, as ``argparse`` uses it.
EXIT_USAGE = 2
#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130

_PROG_OVERRIDE: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "sf_ext_cli_prog", default=None
)


class UserError(Exception):
    """Marker base class: a mistake the user can fix, reported without a traceback.

    Library code raises one of the concrete subclasses below (which also derive from the usual
    built-in type, so ``except ValueError`` keeps working); :func:`run_main` prints the message and
    returns :data:`EXIT_USAGE`.
    """


class InvalidParameterError(UserError, ValueError):
    """A parameter has a value outside its allowed range or set (the message names it)."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the user pointed at does not exist or lacks what is needed."""


class UnknownNameError(UserError, KeyError):
    """A name (model, dataset, attack, command) is not one of the known ones.

    ``str()`` gives the plain message (``KeyError`` would quote it).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help that shows each option's default and keeps the description's line breaks."""


def current_prog(default: str) -> str:
    """The program name to show: ``sf-ext <command>`` under the dispatcher, else ``default``."""
    return _PROG_OVERRIDE.get() or default


@contextlib.contextmanager
def prog_name(prog: str) -> Iterator[None]:
    """Within the block, parsers made by :func:`make_parser` are called ``prog``."""
    token = _PROG_OVERRIDE.set(prog)
    try:
        yield
    finally:
        _PROG_OVERRIDE.reset(token)


def make_parser(
    prog: str, description: str, epilog: Optional[str] = None, **kwargs
) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with sf-ext's conventions.

    Args:
        prog: Program name when run on its own (e.g. ``"python -m sf_ext.demo"``); under the
            ``sf-ext`` dispatcher the dispatcher's name (``"sf-ext demo"``) is used instead.
        description: What the command does (shown at the top of ``--help``).
        epilog: Text after the options (examples, notes).
        **kwargs: Other ``argparse.ArgumentParser`` arguments.
    """
    kwargs.setdefault("formatter_class", HelpFormatter)
    return argparse.ArgumentParser(
        prog=current_prog(prog), description=description, epilog=epilog, **kwargs
    )


def add_verbosity_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``-v/--verbose`` (repeatable) for :func:`setup_logging`."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more log messages on stderr (-v: progress notes, -vv: debugging)",
    )


#: Third-party loggers that are chatty at INFO; kept at WARNING unless -vv is given.
NOISY_LOGGERS = ("secretflow", "secretflow_fl", "ray", "jax", "matplotlib", "PIL", "fed")


class _TqdmHandler(logging.StreamHandler):
    """Writes records with ``tqdm.write`` so they appear above an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(verbosity: int = 0, stream=None) -> logging.Logger:
    """Configure the ``sf_ext`` logger for a command line run.

    Args:
        verbosity: 0 (default) shows warnings and errors only, 1 adds INFO, 2 or more adds DEBUG
            (and lets the third-party loggers in :data:`NOISY_LOGGERS` speak at INFO).
        stream: Where messages go (default: ``sys.stderr`` at call time).

    Returns:
        The ``sf_ext`` logger. Calling this again replaces the handler it installed before.
    """
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logger = logging.getLogger("sf_ext")
    for handler in list(logger.handlers):
        if getattr(handler, "_sf_ext_cli", False):
            logger.removeHandler(handler)
    handler = _TqdmHandler(stream if stream is not None else sys.stderr)
    handler._sf_ext_cli = True
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbosity >= 2 else logging.WARNING)
    return logger


def run_main(
    main: Callable[[Optional[List[str]]], Optional[int]],
    argv: Optional[Sequence[str]] = None,
    prog: str = "sf-ext",
    user_errors: Tuple[Type[BaseException], ...] = (),
    stderr=None,
) -> int:
    """Run a command's ``main`` with sf-ext's error conventions and return its exit code.

    Args:
        main: The command body; gets ``argv`` as a list (``sys.argv[1:]`` when ``None``).
        argv: Arguments (without the program name).
        prog: Name printed before ``error:``.
        user_errors: Extra exception types this command treats as user mistakes.
        stderr: Stream for the error message (default: ``sys.stderr`` at call time).

    Returns:
        ``main``'s return value (``None`` counts as 0), 2 after a user mistake (including
        ``argparse`` errors, which exit with 2 themselves), 130 after Ctrl-C.
    """
    stderr = stderr if stderr is not None else sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = main(argv)
    except SystemExit as exit_:
        # argparse's --help/--version (0) and its usage errors (2) end up here.
        code = exit_.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=stderr)
        return EXIT_INTERRUPTED
    except (UserError,) + tuple(user_errors) as mistake:
        print(f"{prog}: error: {_message(mistake)}", file=stderr)
        return EXIT_USAGE
    return 0 if code is None else int(code)


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and not isinstance(exc, UnknownNameError) and exc.args:
        return str(exc.args[0])
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc) or type(exc).__name__


# --- argparse value types that name the problem ------------------------------------------------


def positive_int(text: str) -> int:
    """``argparse`` type: an integer >= 1."""
    value = _parse(int, text, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """``argparse`` type: an integer >= 0."""
    value = _parse(int, text, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """``argparse`` type: a finite number > 0."""
    value = _parse(float, text, "a number")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """``argparse`` type: a number in (0, 1]."""
    value = _parse(float, text, "a number")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def percent(text: str) -> float:
    """``argparse`` type: a number in (0, 100) (a percentage that is neither none nor all)."""
    value = _parse(float, text, "a number")
    if not 0 < value < 100:
        raise argparse.ArgumentTypeError(f"must be in (0, 100), got {text!r}")
    return value


def _parse(kind, text: str, what: str):
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "HelpFormatter",
    "InvalidParameterError",
    "MissingInputError",
    "NOISY_LOGGERS",
    "UnknownNameError",
    "UserError",
    "add_verbosity_flags",
    "current_prog",
    "fraction",
    "make_parser",
    "non_negative_int",
    "percent",
    "positive_float",
    "positive_int",
    "prog_name",
    "run_main",
    "setup_logging",
]
