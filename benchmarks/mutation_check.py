"""Mutation check: plant one small bug at a time in the pure core and see whether the tests notice.

    python benchmarks/mutation_check.py --out experiments/mutation/after [--repo .] [--budget 300]

Each *mutant* changes one token of one source file, found with Python's ``ast``:

- ``compare``: ``<`` <-> ``<=``, ``>`` <-> ``>=``, ``==`` <-> ``!=``;
- ``boolop``: ``and`` <-> ``or``; ``not``: ``not x`` -> ``x``;
- ``arith``: ``+`` <-> ``-``, ``*`` <-> ``/``, ``//`` -> ``/`` (also in ``+=`` and friends);
- ``const``: a number ``c`` -> ``c + 1`` (integers), ``0.0`` -> ``1.0`` and ``c`` -> ``0.8 c``
  (floats, so ``0.5`` -> ``0.4``), ``True`` <-> ``False``;
- ``default``: a default argument value, ``c`` -> ``c + 1`` (integers), ``c`` -> ``c / 2`` (floats),
  ``True`` <-> ``False``;
- ``config``: numbers in module-level constants (block sizes and the like), tried last.

Docstrings, ``raise`` statements, f-strings, logging/warning calls, ``if`` branches that only
pick a message, and literals that only name an axis or a shape (``dim=1``, ``reshape(1, -1)``,
``x.shape[0]``: changing them crashes at once) are left alone. The source tree given by ``--repo`` is never written to: its
package and tests are copied to a scratch folder, each mutant is written into the copy, the tests
run there (``PYTHONPATH`` points at the copy, bytecode caching is off so no stale ``.pyc`` can
hide a mutant) and the original file is put back in a ``finally``. By default each run is a
forked child of this process, which has imported torch, scikit-learn and pytest once (but never
``sf_ext``) and calls ``pytest.main``: half the cost of a killed mutant is otherwise the imports. A mutant is *killed* when the
tests fail (or cannot even be collected), *survived* when they pass, *timeout* past
``--timeout`` seconds. Tests run one mutant at a time, with ``-x`` and one torch thread.

When there are more mutants than ``--budget``, the default-argument mutants and those on the lines
named by ``FOCUS`` (the issue's list) are always run; the rest of the budget is shared among the
files in proportion to their mutant counts, taking the kinds in turn (comparisons, boolean
operators, ``not``, arithmetic, constants, module constants) in a seeded random order.
``--include-from`` adds the mutants of an earlier run (e.g. the survivors of the old code) that
still exist in this tree, matched by file, enclosing function, line text and change.

Outputs in ``--out``: ``results.csv`` (one row per mutant, written as it finishes, so a stopped
run resumes where it was), ``report.md`` (per-file counts and every survivor), ``summary.png``
and ``settings.json``. A folder used with other settings is refused unless ``--overwrite``.
"""

import argparse
import ast
import csv
import hashlib
import importlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, OrderedDict, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

DEFAULT_TARGETS = [
    "sf_ext/aggregators/_linalg.py",
    "sf_ext/aggregators/_validate.py",
    "sf_ext/aggregators/report.py",
    "sf_ext/aggregators/registry.py",
    "sf_ext/aggregators/fedavg.py",
    "sf_ext/aggregators/krum.py",
    "sf_ext/aggregators/median.py",
    "sf_ext/aggregators/norm_clipping.py",
    "sf_ext/aggregators/geometric_median.py",
    "sf_ext/aggregators/sign.py",
    "sf_ext/aggregators/flame.py",
    "sf_ext/aggregators/matrix_mapping.py",
    "sf_ext/aggregators/bulyan.py",
    "sf_ext/aggregators/centered_clipping.py",
    "sf_ext/aggregators/dnc.py",
    "sf_ext/aggregators/signguard.py",
    "sf_ext/aggregators/foolsgold.py",
    "sf_ext/aggregators/fltrust.py",
    "sf_ext/aggregators/shield.py",
    "sf_ext/aggregators/masking.py",
    "sf_ext/pruning.py",
    "sf_ext/attacks/untargeted.py",
    "sf_ext/attacks/fang.py",
    "sf_ext/attacks/adaptive.py",
]

DEFAULT_TESTS = [
    "tests/test_mutation_kills.py",
    "tests/test_aggregators_core.py",
    "tests/test_aggregators_extra.py",
    "tests/test_reference_selection.py",
    "tests/test_attacks.py",
    "tests/test_pruning.py",
    "tests/test_scorecard.py",
    "tests/test_simulator.py",
]

# Lines the issue names (defaults that no test pinned): their mutants are always run.
FOCUS = (
    ("median.py", "trim_ratio"),
    ("flame.py", "weight_by_samples"),
    ("krum.py", "m if m is not None"),
    ("sign.py", "step"),
    ("matrix_mapping.py", "apply_softmax"),
    ("geometric_median.py", "max_iter"),
    ("adaptive.py", "lambda"),
    ("untargeted.py", "gamma"),
)

KIND_ORDER = ("default", "compare", "boolop", "not", "arith", "const", "config")
PRIORITY = {"default": 0, "compare": 1, "boolop": 1, "not": 1, "arith": 2, "const": 3, "config": 4}

COMPARE_SWAP = {
    ast.Lt: ("<", "<="),
    ast.LtE: ("<=", "<"),
    ast.Gt: (">", ">="),
    ast.GtE: (">=", ">"),
    ast.Eq: ("==", "!="),
    ast.NotEq: ("!=", "=="),
}
ARITH_SWAP = {
    ast.Add: ("+", "-"),
    ast.Sub: ("-", "+"),
    ast.Mult: ("*", "/"),
    ast.Div: ("/", "*"),
    ast.FloorDiv: ("//", "/"),
}
LOG_OBJECTS = {"logger", "log", "logging", "warnings", "_log", "LOG", "LOGGER"}
LOG_FUNCS = {"print", "warn"}
RESULT_FIELDS = [
    "id",
    "file",
    "line",
    "kind",
    "function",
    "original",
    "mutant",
    "status",
    "seconds",
    "killed_by",
    "key",
]


@dataclass
class Mutant:
    """One planted change: bytes ``start:end`` of ``file`` replaced by ``replacement``."""

    id: str
    file: str
    line: int
    kind: str
    function: str
    start: int
    end: int
    replacement: str
    original_line: str
    mutant_line: str
    key: str

    @property
    def priority(self) -> int:
        return PRIORITY[self.kind]


# ---------------------------------------------------------------------------------------------
# Generating mutants


def _float_text(value: float) -> str:
    return repr(float(value))


def _mutate_number(value, default: bool) -> Optional[str]:
    """Replacement text for a numeric or boolean constant, None when it should be left alone."""
    if isinstance(value, bool):
        return repr(not value)
    if isinstance(value, int):
        return repr(value + 1)
    if isinstance(value, float):
        if value == 0.0:
            return "1.0"
        return _float_text(value / 2.0 if default else value * 0.8)
    return None


def _is_log_call(node: ast.Call) -> bool:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id in LOG_FUNCS
    if isinstance(func, ast.Attribute):
        base = func.value
        return isinstance(base, ast.Name) and base.id in LOG_OBJECTS
    return False


def _message_only(stmts: Sequence[ast.stmt]) -> bool:
    """Statements that only assign message strings (an ``if`` choosing a hint for an error)."""
    if not stmts:
        return True
    for stmt in stmts:
        if isinstance(stmt, ast.If):
            if not (_message_only(stmt.body) and _message_only(stmt.orelse)):
                return False
            continue
        if not isinstance(stmt, ast.Assign):
            return False
        value = stmt.value
        if not (
            isinstance(value, ast.JoinedStr)
            or (isinstance(value, ast.Constant) and isinstance(value.value, str))
        ):
            return False
    return True


def _is_str_node(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (
        isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes))
    )


class _Collector:
    """Walks a module's AST and records the byte spans to change."""

    def __init__(self, source: bytes):
        self.source = source
        self.line_starts = [0]
        for i, byte in enumerate(source):
            if byte == 0x0A:
                self.line_starts.append(i + 1)
        # Literals that only pick an axis or a shape (``dim=1``, ``reshape(1, -1)``,
        # ``x.shape[0]``): changing them crashes at once, so they are not worth a test run.
        self.shape_literals = set()
        # (start, end, replacement, kind, line, function)
        self.sites: List[Tuple[int, int, str, str, int, str]] = []

    def offset(self, line: int, col: int) -> int:
        return self.line_starts[line - 1] + col

    def span(self, node: ast.AST) -> Tuple[int, int]:
        return (
            self.offset(node.lineno, node.col_offset),
            self.offset(node.end_lineno, node.end_col_offset),
        )

    def add(self, start, end, replacement, kind, line, function):
        self.sites.append((start, end, replacement, kind, line, function))

    def token_between(self, left: ast.AST, right: ast.AST, token: str) -> Optional[int]:
        """Offset of ``token`` in the source between two nodes (None if absent or ambiguous)."""
        lo = self.offset(left.end_lineno, left.end_col_offset)
        hi = self.offset(right.lineno, right.col_offset)
        gap = self.source[lo:hi].decode("utf-8")
        if "#" in gap:
            return None
        pattern = {
            "<": r"(?<![<=!>])<(?![<=])",
            ">": r"(?<![<=!>-])>(?![>=])",
            "<=": r"<=",
            ">=": r">=",
            "==": r"==",
            "!=": r"!=",
            "+": r"(?<!\+)\+(?![+=])",
            "-": r"(?<!-)-(?![-=>])",
            "*": r"(?<!\*)\*(?![*=])",
            "/": r"(?<!/)/(?![/=])",
            "//": r"//(?!=)",
            "and": r"\band\b",
            "or": r"\bor\b",
        }[token]
        hits = [m.start() for m in re.finditer(pattern, gap)]
        if len(hits) != 1:
            return None
        return lo + len(gap[: hits[0]].encode("utf-8"))

    # --- the walk ---------------------------------------------------------------------------

    def visit(self, node: ast.AST, function: str, module_level: bool) -> None:
        if isinstance(node, (ast.Raise, ast.JoinedStr, ast.Assert)):
            return
        if isinstance(node, ast.Call) and _is_log_call(node):
            return
        if isinstance(node, ast.Expr) and _is_str_node(node.value):
            return  # docstring or bare string
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            name = getattr(node, "name", "<lambda>")
            qual = f"{function}.{name}" if function else name
            self.visit_defaults(node.args, qual)
            for stmt in node.body if isinstance(node.body, list) else [node.body]:
                self.visit(stmt, qual, False)
            for dec in getattr(node, "decorator_list", []):
                self.visit(dec, function, module_level)
            return
        if isinstance(node, ast.ClassDef):
            qual = f"{function}.{node.name}" if function else node.name
            for stmt in node.body:
                self.visit(stmt, qual, False)
            return
        if isinstance(node, ast.If) and _message_only(node.body) and _message_only(node.orelse):
            return
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and module_level:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
            if any(n == "__all__" for n in names):
                return
            if node.value is not None:
                self.visit_expr(node.value, function, config=True)
            return
        if isinstance(node, ast.AnnAssign):
            if node.value is not None:
                self.visit_expr(node.value, function, config=False)
            return
        if isinstance(node, ast.AugAssign):
            self.visit_augassign(node, function)
            self.visit_expr(node.value, function, config=False)
            self.visit_expr(node.target, function, config=False)
            return
        if isinstance(node, ast.expr):
            self.visit_expr(node, function, config=False)
            return
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.visit_expr(child, function, config=module_level and False)
            else:
                self.visit(child, function, module_level)

    def visit_defaults(self, args: ast.arguments, function: str) -> None:
        for default in list(args.defaults) + [d for d in args.kw_defaults if d is not None]:
            value, node = _literal_number(default)
            if value is None:
                self.visit_expr(default, function, config=False)
                continue
            replacement = _mutate_number(value, default=True)
            if replacement is not None:
                start, end = self.span(node)
                self.add(start, end, replacement, "default", node.lineno, function)

    def visit_augassign(self, node: ast.AugAssign, function: str) -> None:
        swap = ARITH_SWAP.get(type(node.op))
        if swap is None:
            return
        token, new = swap
        lo = self.offset(node.target.end_lineno, node.target.end_col_offset)
        hi = self.offset(node.value.lineno, node.value.col_offset)
        gap = self.source[lo:hi].decode("utf-8")
        pos = gap.find(token + "=")
        if pos < 0 or gap.count(token + "=") != 1:
            return
        start = lo + len(gap[:pos].encode("utf-8"))
        self.add(start, start + len(token), new, "arith", node.lineno, function)

    def visit_expr(self, node: ast.AST, function: str, config: bool) -> None:
        if isinstance(node, (ast.JoinedStr,)):
            return
        if isinstance(node, ast.Call) and _is_log_call(node):
            return
        if isinstance(node, ast.Lambda):
            self.visit(node, function, False)
            return
        if isinstance(node, ast.Call):
            _mark_shape_literals(node, self.shape_literals)
        elif isinstance(node, ast.Subscript):
            if isinstance(node.value, ast.Attribute) and node.value.attr == "shape":
                self.shape_literals.add(id(node.slice))
        value, number_node = _literal_number(node)
        if value is not None:
            if id(node) in self.shape_literals:
                return
            replacement = _mutate_number(value, default=False)
            if replacement is not None:
                start, end = self.span(number_node)
                kind = "config" if config else "const"
                self.add(start, end, replacement, kind, number_node.lineno, function)
            return
        if isinstance(node, ast.Compare):
            left = node.left
            for op, right in zip(node.ops, node.comparators):
                swap = COMPARE_SWAP.get(type(op))
                if swap is not None:
                    pos = self.token_between(left, right, swap[0])
                    if pos is not None:
                        self.add(pos, pos + len(swap[0]), swap[1], "compare", node.lineno, function)
                left = right
        elif isinstance(node, ast.BinOp):
            swap = ARITH_SWAP.get(type(node.op))
            if swap is not None and not (_is_str_node(node.left) or _is_str_node(node.right)):
                pos = self.token_between(node.left, node.right, swap[0])
                if pos is not None:
                    kind = "config" if config else "arith"
                    self.add(pos, pos + len(swap[0]), swap[1], kind, node.lineno, function)
        elif isinstance(node, ast.BoolOp):
            token, new = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
            positions = []
            for left, right in zip(node.values, node.values[1:]):
                pos = self.token_between(left, right, token)
                if pos is None:
                    positions = []
                    break
                positions.append(pos)
            # One mutant per operator position, so ``a and b and c`` gives two.
            for pos in positions:
                self.add(pos, pos + len(token), new, "boolop", node.lineno, function)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            start = self.offset(node.lineno, node.col_offset)
            operand = self.offset(node.operand.lineno, node.operand.col_offset)
            text = self.source[start:operand].decode("utf-8")
            if text.startswith("not") and "#" not in text and "\n" not in text:
                # Drop "not" and the blanks after it; an opening parenthesis stays.
                rest = text[3:]
                cut = 3 + len(rest) - len(rest.lstrip())
                self.add(start, start + cut, "", "not", node.lineno, function)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.visit_expr(child, function, config)
            elif isinstance(child, ast.comprehension):
                for sub in ast.iter_child_nodes(child):
                    if isinstance(sub, ast.expr):
                        self.visit_expr(sub, function, config)
            elif isinstance(child, ast.arguments):
                self.visit_defaults(child, function)


SHAPE_METHODS = {"reshape", "view", "expand", "size", "unsqueeze", "squeeze", "flatten"}
SHAPE_KEYWORDS = {"dim", "axis"}


def _mark_shape_literals(call: ast.Call, marks: set) -> None:
    func = call.func
    if isinstance(func, ast.Attribute) and func.attr in SHAPE_METHODS:
        marks.update(id(arg) for arg in call.args)
    marks.update(id(kw.value) for kw in call.keywords if kw.arg in SHAPE_KEYWORDS)


def _literal_number(node: ast.AST):
    """``(value, node)`` for a numeric/bool literal, possibly negated; ``(None, None)`` otherwise."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (bool, int, float)):
        return node.value, node
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
        and isinstance(node.operand.value, (int, float))
        and not isinstance(node.operand.value, bool)
    ):
        return -node.operand.value, node
    return None, None


def _line_text(source: bytes, line_starts: List[int], line: int) -> str:
    start = line_starts[line - 1]
    end = line_starts[line] if line < len(line_starts) else len(source)
    return source[start:end].decode("utf-8").rstrip("\n")


def generate_mutants(path: Path, rel: str) -> List[Mutant]:
    """Every mutant of one file, in source order (syntactically valid and really different)."""
    source = path.read_bytes()
    tree = ast.parse(source)
    original_dump = ast.dump(tree)
    collector = _Collector(source)
    for stmt in tree.body:
        collector.visit(stmt, "", True)
    mutants: List[Mutant] = []
    seen = set()
    occurrences: Counter = Counter()
    for start, end, replacement, kind, line, function in sorted(collector.sites):
        if (start, end, replacement) in seen:
            continue
        seen.add((start, end, replacement))
        mutated = source[:start] + replacement.encode("utf-8") + source[end:]
        try:
            new_tree = ast.parse(mutated)
        except SyntaxError:
            continue
        if ast.dump(new_tree) == original_dump:
            continue
        original_line = _line_text(source, collector.line_starts, line)
        line_starts = [0] + [i + 1 for i, b in enumerate(mutated) if b == 0x0A]
        mutant_line = _line_text(mutated, line_starts, line)
        change = f"{source[start:end].decode('utf-8')}->{replacement}"
        base_key = f"{rel}|{function}|{original_line.strip()}|{kind}|{change}"
        occurrences[base_key] += 1
        key = f"{base_key}|{occurrences[base_key]}"
        digest = hashlib.sha1(f"{rel}:{start}:{end}:{replacement}".encode()).hexdigest()[:10]
        mutants.append(
            Mutant(
                id=digest,
                file=rel,
                line=line,
                kind=kind,
                function=function or "<module>",
                start=start,
                end=end,
                replacement=replacement,
                original_line=original_line.strip(),
                mutant_line=mutant_line.strip(),
                key=key,
            )
        )
    return mutants


def is_focus(mutant: Mutant) -> bool:
    return any(
        mutant.file.endswith(suffix) and word in mutant.original_line for suffix, word in FOCUS
    )


def select_mutants(
    mutants: List[Mutant], budget: int, seed: int, include_keys: Iterable[str] = ()
) -> List[Mutant]:
    """Defaults, focus lines and ``include_keys`` first; the rest shared among files by count."""
    if budget <= 0 or budget >= len(mutants):
        return list(mutants)
    include_keys = set(include_keys)
    rng = random.Random(seed)
    chosen = {m.id for m in mutants if m.kind == "default" or is_focus(m) or m.key in include_keys}
    rest = [m for m in mutants if m.id not in chosen]
    left = max(budget - len(chosen), 0)
    by_file: Dict[str, List[Mutant]] = OrderedDict()
    for m in rest:
        by_file.setdefault(m.file, []).append(m)
    total = sum(len(v) for v in by_file.values())
    quotas = {}
    if total and left:
        raw = {f: left * len(v) / total for f, v in by_file.items()}
        quotas = {f: int(r) for f, r in raw.items()}
        spare = left - sum(quotas.values())
        for f in sorted(raw, key=lambda f: raw[f] - quotas[f], reverse=True)[:spare]:
            quotas[f] += 1
    for f, items in by_file.items():
        kinds: Dict[str, List[Mutant]] = defaultdict(list)
        for m in items:
            kinds[m.kind].append(m)
        for pool in kinds.values():
            rng.shuffle(pool)
        picked = 0
        while picked < quotas.get(f, 0) and any(kinds.values()):
            for kind in KIND_ORDER:
                if kinds.get(kind) and picked < quotas[f]:
                    chosen.add(kinds[kind].pop().id)
                    picked += 1
    return [m for m in mutants if m.id in chosen]


# ---------------------------------------------------------------------------------------------
# Running them


def copy_tree(repo: Path, scratch: Path) -> None:
    """The package, the tests and the test configuration, without caches."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "*.egg-info")
    for name in ("sf_ext", "tests"):
        shutil.copytree(repo / name, scratch / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.cfg", "setup.py", "pytest.ini", "tox.ini", "conftest.py"):
        if (repo / name).exists():
            shutil.copy2(repo / name, scratch / name)


def test_env(scratch: Path, data_root: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(scratch),
        PYTHONDONTWRITEBYTECODE="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        SF_EXT_DATA=data_root,
        MPLBACKEND="Agg",
    )
    return env


# Quick tests aimed at single mutants: run before the rest for every target. The order only
# changes how soon a mutant is caught (``-x``), never whether it is.
QUICK_TESTS = ("tests/test_mutation_kills.py",)


def tests_for(target: str, tests: List[str], extra: Dict[str, List[str]]) -> List[str]:
    """The test files for one target, the quickest and most specific first (``-x`` stops at the
    first failure)."""
    files = list(tests)
    for pattern, more in extra.items():
        if pattern in target:
            files = list(more) + [f for f in files if f not in more]
    stem = Path(target).stem.lstrip("_")
    if "/attacks/" in target:
        first = [f for f in files if "attack" in f]
    elif "/aggregators/" in target:
        first = [f for f in files if "aggregators" in f or "reference" in f]
    else:
        first = [f for f in files if stem in f]
    quick = [f for f in files if f in QUICK_TESTS]
    first = quick + [f for f in first if f not in quick]
    return first + [f for f in files if f not in first]


def run_tests(
    python: str,
    scratch: Path,
    test_files: List[str],
    pytest_args: List[str],
    env: Dict[str, str],
    timeout: float,
) -> Tuple[str, float, str, str]:
    """``(status, seconds, first failing test, output tail)``; status passed/failed/timeout."""
    cmd = [python, "-m", "pytest", *test_files, "-x", "-q", "-p", "no:cacheprovider"]
    cmd += pytest_args
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=scratch,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return _outcome("timeout", None, time.perf_counter() - start, out)
    return _outcome(None, proc.returncode, time.perf_counter() - start, out)


PRELOAD = ("numpy", "torch", "torch.func", "scipy", "sklearn", "hdbscan", "pytest", "matplotlib")


def preload() -> None:
    """Import the heavy dependencies once here, so that each forked test run starts warm.

    The package under test must not be among them: each run has to import the mutated file.
    """
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    if any(name == "sf_ext" or name.startswith("sf_ext.") for name in sys.modules):
        raise SystemExit("sf_ext was imported before forking: the runs would not see the mutants")


def run_tests_forked(
    scratch: Path, test_files: List[str], pytest_args: List[str], timeout: float
) -> Tuple[str, float, str, str]:
    """As :func:`run_tests`, in a forked child of this (preloaded) process: ``pytest.main``."""
    args = [*test_files, "-x", "-q", "-p", "no:cacheprovider", *pytest_args]
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 70
            try:
                os.setsid()
                os.chdir(scratch)
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                sys.path.insert(0, str(scratch))
                import pytest

                code = int(pytest.main(args))
            except BaseException:  # noqa: BLE001 - report anything, then leave
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        status = None
        while True:
            done, wait_status = os.waitpid(pid, os.WNOHANG)
            if done:
                returncode = os.waitstatus_to_exitcode(wait_status)
                break
            if time.perf_counter() - start > timeout:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                os.waitpid(pid, 0)
                status = "timeout"
                break
            time.sleep(0.1)
        seconds = time.perf_counter() - start
        log.seek(0)
        out = log.read().decode("utf-8", errors="replace")
    return _outcome(status, returncode if status is None else None, seconds, out)


def _outcome(status, returncode, seconds, out) -> Tuple[str, float, str, str]:
    if status == "timeout":
        return "timeout", seconds, "", out[-2000:]
    if returncode == 0:
        return "passed", seconds, "", out[-2000:]
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M)
    if not failed and returncode == 5:
        return "error", seconds, "no tests collected", out[-2000:]
    return "failed", seconds, failed[0] if failed else f"exit {returncode}", out[-2000:]


def check_scratch_import(python: str, scratch: Path, env: Dict[str, str]) -> None:
    out = subprocess.run(
        [python, "-c", "import sf_ext, sys; sys.stdout.write(sf_ext.__file__)"],
        cwd=scratch,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if not Path(out).resolve().is_relative_to(scratch.resolve()):
        raise SystemExit(f"sf_ext imports from {out}, not from the scratch copy {scratch}")


# ---------------------------------------------------------------------------------------------
# Reporting


def read_results(path: Path) -> Dict[str, dict]:
    if not path.exists():
        return {}
    with path.open(newline="") as fh:
        return {row["id"]: row for row in csv.DictReader(fh)}


def summarize(rows: List[dict], targets: List[str]) -> List[dict]:
    table = []
    for target in targets + ["total"]:
        mine = [r for r in rows if target == "total" or r["file"] == target]
        if not mine and target != "total":
            continue
        counts = Counter(r["status"] for r in mine)
        decided = counts["killed"] + counts["survived"] + counts["timeout"]
        score = (counts["killed"] + counts["timeout"]) / decided if decided else float("nan")
        table.append(
            {
                "file": target,
                "mutants": len(mine),
                "killed": counts["killed"],
                "survived": counts["survived"],
                "timeout": counts["timeout"],
                "error": counts["error"],
                "score": score,
            }
        )
    return table


def write_report(out: Path, rows: List[dict], targets: List[str], settings: dict) -> str:
    table = summarize(rows, targets)
    lines = [
        f"# Mutation check of {settings['repo_label']}",
        "",
        f"{len(rows)} mutants run (of {settings['generated']} generated; budget "
        f"{settings['budget']}, seed {settings['seed']}), tests: "
        + ", ".join(f"`{t}`" for t in settings["tests"])
        + (f" (+ {settings['extra_tests']})" if settings["extra_tests"] else "")
        + f", pytest options `{' '.join(settings['pytest_args'])}`, timeout {settings['timeout']} s.",
        "",
        "| file | mutants | killed | survived | timeout | error | killed % |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table:
        score = "-" if row["score"] != row["score"] else f"{100 * row['score']:.0f}"
        name = f"**{row['file']}**" if row["file"] == "total" else f"`{row['file']}`"
        lines.append(
            f"| {name} | {row['mutants']} | {row['killed']} | {row['survived']} | "
            f"{row['timeout']} | {row['error']} | {score} |"
        )
    survivors = [r for r in rows if r["status"] in ("survived", "error")]
    lines += ["", f"## Survivors ({len(survivors)})", ""]
    if survivors:
        lines += [
            "| id | file:line | kind | function | original | mutant |",
            "|---|---|---|---|---|---|",
        ]
        for r in sorted(survivors, key=lambda r: (r["file"], int(r["line"]))):
            lines.append(
                f"| {r['id']} | `{r['file']}:{r['line']}` | {r['kind']} | `{r['function']}` | "
                f"`{_cell(r['original'])}` | `{_cell(r['mutant'])}` |"
            )
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    _plot(out / "summary.png", table[:-1], settings["repo_label"])
    return text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def _plot(path: Path, table: List[dict], label: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the lock
        return
    if not table:
        return
    names = [Path(r["file"]).name for r in table]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(names) + 1.2))
    left = [0] * len(names)
    for status, colour in (("killed", "#4c9a2a"), ("timeout", "#999999"), ("survived", "#d62728")):
        values = [r[status] for r in table]
        ax.barh(names, values, left=left, color=colour, label=status)
        left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    ax.set_xlabel("mutants")
    ax.set_title(f"Mutation check: {label}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    here = Path(__file__).resolve().parents[1]
    parser.add_argument("--repo", type=Path, default=here, help="source tree to mutate (read only)")
    parser.add_argument("--label", default=None, help="name of the tree in the report")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--targets", nargs="+", default=DEFAULT_TARGETS, help="files to mutate")
    parser.add_argument("--tests", nargs="+", default=DEFAULT_TESTS, help="test files to run")
    parser.add_argument(
        "--extra-tests",
        action="append",
        default=[],
        metavar="SUBSTR=FILE[,FILE]",
        help="more test files, run first, for targets whose path contains SUBSTR",
    )
    parser.add_argument(
        "--pytest-arg",
        dest="pytest_args",
        action="append",
        default=None,
        help="extra pytest argument (repeatable); default: -m 'not secretflow and not slow'",
    )
    parser.add_argument("--budget", type=int, default=300, help="most mutants to run (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant")
    parser.add_argument(
        "--include-from",
        type=Path,
        default=None,
        help="results.csv (or --out folder) of another run: also run its survivors that exist here",
    )
    parser.add_argument("--ids", nargs="+", default=None, help="run only these mutant ids")
    parser.add_argument("--list", action="store_true", help="list the selected mutants and stop")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs pytest")
    parser.add_argument(
        "--data-root",
        default=os.environ.get("SF_EXT_DATA", str(here.parent / "shared" / "data")),
        help="SF_EXT_DATA for the tests",
    )
    parser.add_argument(
        "--no-fork",
        dest="fork",
        action="store_false",
        help="start a fresh interpreter per mutant instead of forking a preloaded one (slower)",
    )
    parser.add_argument("--overwrite", action="store_true", help="discard earlier results in --out")
    args = parser.parse_args(argv)
    if args.pytest_args is None:
        args.pytest_args = ["-m", "not secretflow and not slow"]
    extra = {}
    for item in args.extra_tests:
        if "=" not in item:
            parser.error(f"--extra-tests wants SUBSTR=FILE[,FILE], got {item!r}")
        pattern, files = item.split("=", 1)
        extra[pattern] = [f for f in files.split(",") if f]
    args.extra = extra
    if not (args.repo / "sf_ext").is_dir():
        parser.error(f"--repo {args.repo} has no sf_ext package")
    missing = [t for t in args.targets if not (args.repo / t).is_file()]
    if missing:
        parser.error(f"targets not found under {args.repo}: {missing}")
    tests = set(args.tests) | {f for v in extra.values() for f in v}
    missing = [t for t in tests if not (args.repo / t).is_file()]
    if missing:
        parser.error(f"test files not found under {args.repo}: {missing}")
    if args.include_from is not None and args.include_from.is_dir():
        args.include_from = args.include_from / "results.csv"  # an earlier run's --out
    if args.include_from is not None and not args.include_from.is_file():
        parser.error(f"--include-from {args.include_from} does not exist")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    repo = args.repo.resolve()
    mutants: List[Mutant] = []
    for target in args.targets:
        mutants += generate_mutants(repo / target, target)
    include_keys = []
    if args.include_from is not None:
        previous = read_results(args.include_from)
        include_keys = [r["key"] for r in previous.values() if r["status"] == "survived"]
    selected = select_mutants(mutants, args.budget, args.seed, include_keys)
    if args.ids:
        wanted = set(args.ids)
        selected = [m for m in mutants if m.id in wanted]
        unknown = wanted - {m.id for m in selected}
        if unknown:
            print(f"unknown mutant ids: {sorted(unknown)}", file=sys.stderr)
            return 2
    kinds = Counter(m.kind for m in selected)
    print(
        f"{len(mutants)} mutants generated in {len(args.targets)} files, {len(selected)} selected "
        f"({dict(kinds)})"
    )
    if args.list:
        for m in selected:
            print(f"{m.id} {m.file}:{m.line} {m.kind:8s} {m.original_line}  ->  {m.mutant_line}")
        return 0

    settings = {
        "repo_label": args.label or str(repo),
        "targets": args.targets,
        "tests": args.tests,
        "extra_tests": args.extra_tests,
        "pytest_args": args.pytest_args,
        "budget": args.budget,
        "seed": args.seed,
        "timeout": args.timeout,
        "ids": args.ids,
        "include_from": str(args.include_from) if args.include_from else None,
    }
    out = args.out
    settings_path = out / "settings.json"
    if out.exists() and any(out.iterdir()):
        old = json.loads(settings_path.read_text()) if settings_path.exists() else None
        comparable = {k: v for k, v in settings.items() if k != "repo_label"}
        if old is not None and old.get("compare") == comparable:
            pass  # same settings: resume
        elif not args.overwrite:
            print(
                f"{out} holds results of other settings; choose another --out or pass --overwrite",
                file=sys.stderr,
            )
            return 2
        else:
            for name in ("results.csv", "report.md", "summary.png", "settings.json", "log.txt"):
                (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    settings["compare"] = {k: v for k, v in settings.items() if k != "repo_label"}
    settings["generated"] = len(mutants)
    settings_path.write_text(json.dumps(settings, indent=2))
    results_path = out / "results.csv"
    done = read_results(results_path)

    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        scratch = Path(tmp) / "tree"
        scratch.mkdir()
        copy_tree(repo, scratch)
        env = test_env(scratch, args.data_root)
        check_scratch_import(args.python, scratch, env)
        if args.fork:
            os.environ.update(env)
            sys.dont_write_bytecode = True
            preload()

        def run(test_files: List[str], timeout: float):
            if args.fork:
                return run_tests_forked(scratch, test_files, args.pytest_args, timeout)
            return run_tests(args.python, scratch, test_files, args.pytest_args, env, timeout)

        all_tests = sorted(set(args.tests) | {f for v in args.extra.values() for f in v})
        status, seconds, failed, tail = run(all_tests, 10 * args.timeout)
        if status != "passed":
            print(
                f"the unmutated tree does not pass its tests ({failed}):\n{tail}", file=sys.stderr
            )
            return 1
        print(f"baseline: all tests pass in {seconds:.0f} s")
        new_file = not results_path.exists()
        with results_path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=RESULT_FIELDS)
            if new_file:
                writer.writeheader()
            todo = [m for m in selected if m.id not in done]
            bar = tqdm(todo, desc="mutants", unit="mutant")
            counts: Counter = Counter(r["status"] for r in done.values())
            for m in bar:
                path = scratch / m.file
                original = path.read_bytes()
                try:
                    mutated = (
                        original[: m.start] + m.replacement.encode("utf-8") + original[m.end :]
                    )
                    path.write_bytes(mutated)
                    status, seconds, failed, _ = run(
                        tests_for(m.file, args.tests, args.extra), args.timeout
                    )
                finally:
                    path.write_bytes(original)
                status = {"failed": "killed", "passed": "survived"}.get(status, status)
                counts[status] += 1
                row = {
                    "id": m.id,
                    "file": m.file,
                    "line": m.line,
                    "kind": m.kind,
                    "function": m.function,
                    "original": m.original_line,
                    "mutant": m.mutant_line,
                    "status": status,
                    "seconds": f"{seconds:.1f}",
                    "killed_by": failed,
                    "key": m.key,
                }
                writer.writerow(row)
                fh.flush()
                done[m.id] = row
                bar.set_postfix(killed=counts["killed"], survived=counts["survived"])
    rows = [done[m.id] for m in selected if m.id in done]
    print(write_report(out, rows, args.targets, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
