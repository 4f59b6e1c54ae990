"""sf-ext's torch thread default: one thread unless the user chose, never undoing a choice.

The decision is per process and torch's thread count is process-wide, so every case runs in a
fresh interpreter with the thread variables of this test process (conftest sets
OMP_NUM_THREADS=1) removed. The interpreters start together, once per module, to keep this fast.
"""

import json
import os
import subprocess
import sys

import pytest

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "SF_EXT_THREADS")
PRELUDE = "import json, os, torch\nimport sf_ext\nfrom sf_ext import threads\n"

# Case name -> (code printing one JSON object, extra environment).
CASES = {}


def case(name: str, code: str, **env):
    CASES[name] = (code, env)
    return name


@pytest.fixture(scope="module")
def fresh():
    """Run every case in its own fresh interpreter, all at once; name -> printed JSON object."""
    base_env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    running = {
        name: subprocess.Popen(
            [sys.executable, "-c", PRELUDE + code],
            env={**base_env, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (code, env) in CASES.items()
    }
    results = {}
    for name, process in running.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, f"case {name}:\n{err}"
        results[name] = json.loads(out.strip().splitlines()[-1])
    return results


DEFAULT = case(
    "default",
    "startup, estimate = torch.get_num_threads(), threads._startup_threads()\n"
    "before = threads.current_threads()\n"
    "decision = sf_ext.apply_default_threads()\n"
    "print(json.dumps({'startup': startup, 'estimate': estimate, 'before': before,"
    " 'decision': list(decision), 'torch': torch.get_num_threads()}))",
)


def test_default_is_one_thread_and_startup_count_is_read_right(fresh):
    result = fresh[DEFAULT]
    # sf-ext's idea of torch's untouched count matches torch on this machine; otherwise a
    # default would be mistaken for a user's torch.set_num_threads and left in place.
    assert result["startup"] == result["estimate"]
    assert result["before"] is None  # importing sf_ext alone decides nothing
    assert result["decision"] == [1, "sf-ext default"]
    assert result["torch"] == 1


# torch caps these variables at the core count, so they ask for 2: on this 2-core machine the
# sf-ext default (1) would show if the variable were overridden.
RUNTIME_REPORT = (
    "before, startup = torch.get_num_threads(), threads._startup_threads()\n"
    "decision = sf_ext.apply_default_threads()\n"
    "print(json.dumps({'before': before, 'startup': startup, 'decision': list(decision),"
    " 'torch': torch.get_num_threads()}))"
)
case("OMP_NUM_THREADS", RUNTIME_REPORT, OMP_NUM_THREADS="2")
case("MKL_NUM_THREADS", RUNTIME_REPORT, MKL_NUM_THREADS="2")


@pytest.mark.parametrize("variable", ["OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_runtime_thread_variables_are_respected(fresh, variable):
    result = fresh[variable]
    assert result["before"] == min(2, result["startup"])
    assert result["decision"] == [result["before"], variable]
    assert result["torch"] == result["before"]


TORCH_CHOICE = case(
    "torch choice",
    "chosen = threads._startup_threads() + 1\n"
    "torch.set_num_threads(chosen)\n"
    "decision = sf_ext.apply_default_threads()\n"
    "torch.set_num_threads(5)\n"
    "again = sf_ext.apply_default_threads()\n"
    "print(json.dumps({'chosen': chosen, 'decision': list(decision), 'again': list(again),"
    " 'torch': torch.get_num_threads()}))",
)


def test_torch_set_num_threads_before_is_respected_and_after_is_never_undone(fresh):
    result = fresh[TORCH_CHOICE]
    assert result["decision"] == [result["chosen"], "torch.set_num_threads"]
    assert result["again"] == result["decision"]  # decided once per process
    assert result["torch"] == 5  # the later choice is left alone


SET_THREADS = case(
    "set_threads",
    "sf_ext.apply_default_threads()\n"
    "sf_ext.set_threads(3)\n"
    "import subprocess, sys\n"
    "child = subprocess.run([sys.executable, '-c', 'import sf_ext, torch; "
    "print(sf_ext.apply_default_threads(), torch.get_num_threads())'],"
    " capture_output=True, text=True, check=True).stdout.strip()\n"
    "print(json.dumps({'decision': list(sf_ext.apply_default_threads()),"
    " 'torch': torch.get_num_threads(), 'child': child}))",
)


def test_set_threads_wins_and_reaches_child_processes(fresh):
    result = fresh[SET_THREADS]
    assert result["decision"] == [3, "sf_ext.set_threads"] and result["torch"] == 3
    assert result["child"] == "(3, 'SF_EXT_THREADS') 3"


ENV_CHOICE = case(
    "SF_EXT_THREADS",
    "errors = {}\n"
    "for value in ['0', 'two', '1.5', '-2']:\n"
    "    os.environ['SF_EXT_THREADS'] = value\n"
    "    try:\n"
    "        errors[value] = sf_ext.apply_default_threads()\n"
    "    except ValueError as error:\n"
    "        errors[value] = str(error)\n"
    "os.environ['SF_EXT_THREADS'] = ' 3 '\n"
    "decision = sf_ext.apply_default_threads()\n"
    "print(json.dumps({'errors': errors, 'decision': list(decision),"
    " 'torch': torch.get_num_threads()}))",
)


def test_sf_ext_threads_is_applied_and_bad_values_name_the_variable(fresh):
    result = fresh[ENV_CHOICE]
    for value, message in result["errors"].items():
        assert message == (
            f"environment variable SF_EXT_THREADS must be a positive integer, got {value!r}"
        )
    assert len(result["errors"]) == 4
    # A refused value decides nothing: the next valid one still applies.
    assert result["decision"] == [3, "SF_EXT_THREADS"] and result["torch"] == 3


@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True, None])
def test_set_threads_refuses_non_positive_integers(value):
    import sf_ext

    with pytest.raises(ValueError, match=r"set_threads\(n\) must be a positive integer"):
        sf_ext.set_threads(value)
