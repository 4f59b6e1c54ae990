"""``sf-ext`` command line: one entry point for the package's runnable parts.

sf-ext demo [flags]        pruning demo in SecretFlow (python -m sf_ext.demo)
sf-ext dlg {attack,sweep,capture}  gradient-inversion attacks and sweeps (python -m sf_ext.dlg)
sf-ext audit [flags]       what the server reconstructs in your setting (python -m sf_ext.dlg.audit)
sf-ext simulate CONFIG     many-client robustness experiment (python -m sf_ext.simulator.run)
"""

import importlib
import sys

COMMANDS = {
    "demo": "sf_ext.demo",
    "dlg": "sf_ext.dlg.cli",
    "audit": "sf_ext.dlg.audit",
    "simulate": "sf_ext.simulator.run",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}")
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
