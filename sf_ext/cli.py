"""``sf-ext``: one command line for the package's runnable parts.

``sf-ext <command> [options]`` runs the command module's ``main`` with the remaining arguments
(``sf-ext <command> --help`` shows that command's options and their defaults). The same modules
also run as ``python -m <module>``.
"""

import difflib
import importlib
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

from sf_ext import __version__
from sf_ext._cli import EXIT_USAGE, make_parser, prog_name, run_main

PROG = "sf-ext"


@dataclass(frozen=True)
class Command:
    """A subcommand: the module whose ``main(argv)`` runs it and one line for ``--help``."""

    module: str
    usage: str
    summary: str


COMMANDS: Dict[str, Command] = {
    "demo": Command(
        "sf_ext.demo",
        "demo [--out DIR]",
        "pruning demo in SecretFlow: fed_avg_w vs fed_avg_w_prune",
    ),
    "dlg": Command(
        "sf_ext.dlg.cli",
        "dlg {attack,sweep,capture}",
        "gradient inversion: attack an upload, sweep pruning rates, capture a round",
    ),
    "simulate": Command(
        "sf_ext.simulator.run",
        "simulate CONFIG --out DIR",
        "many-client robustness experiment from a YAML/JSON config",
    ),
    "scorecard": Command(
        "sf_ext.simulator.scorecard",
        "scorecard CARD --out DIR",
        "robustness scorecard: defenses x attacks x settings x seeds, worst seed",
    ),
    "audit": Command(
        "sf_ext.dlg.audit",
        "audit",
        "privacy audit of your own setting: what can the server reconstruct?",
    ),
}


def _parser():
    width = max(len(c.usage) for c in COMMANDS.values())
    listing = "\n".join(f"  {c.usage.ljust(width)}  {c.summary}" for c in COMMANDS.values())
    parser = make_parser(
        PROG,
        "SecretFlow extensions: federated pruning with secure aggregation, gradient-inversion "
        "audits and Byzantine-robust aggregation.",
        epilog=f"commands:\n{listing}\n\n'{PROG} <command> --help' shows a command's options.",
        usage=f"{PROG} [-h] [--version] <command> [options]",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


def _unknown(name: str) -> str:
    close = difflib.get_close_matches(name, list(COMMANDS), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown command {name!r}{hint} (choose from {', '.join(COMMANDS)})"


def _load(name: str):
    """Import a command's module, or None with a message when it is not installed."""
    module_name = COMMANDS[name].module
    try:
        return importlib.import_module(module_name), None
    except ModuleNotFoundError as exc:
        # Only the command's own module being absent means "not available"; a missing
        # dependency inside it is reported as such.
        if exc.name is not None and module_name.startswith(exc.name):
            return None, (
                f"'{PROG} {name}' is not available in this installation "
                f"(module {module_name} is missing)"
            )
        return None, f"'{PROG} {name}' needs the module {exc.name!r}, which is not installed"


def _dispatch(argv: List[str]) -> int:
    parser = _parser()
    if not argv:
        parser.print_usage(sys.stderr)
        print(
            f"{PROG}: error: no command given (choose from {', '.join(COMMANDS)})", file=sys.stderr
        )
        return EXIT_USAGE
    first = argv[0]
    if first.startswith("-"):
        # Only --help and --version exist at this level; argparse handles both (and errors).
        parser.parse_args(argv[:1])
    if first not in COMMANDS:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {_unknown(first)}", file=sys.stderr)
        return EXIT_USAGE
    module, problem = _load(first)
    if module is None:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    with prog_name(f"{PROG} {first}"):
        return run_main(module.main, argv[1:], prog=f"{PROG} {first}")


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``sf-ext`` console script; returns the exit code."""
    return run_main(_dispatch, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
