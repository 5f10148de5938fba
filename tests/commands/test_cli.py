"""The commands' shared module: the error boundary, explicit flags, devices, and that no command
imports another; the `domainbed-itl` console command and `python -m` of every command."""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from domainbed_itl import console
from domainbed_itl.scripts._cli import (CommandParser, explicit_flags, integer, parse_device, positive_int,
                                        run_command)

SCRIPTS = Path(__file__).resolve().parents[2] / "domainbed_itl" / "scripts"


def _raise(error):
    def body():
        raise error
    return body


@pytest.mark.parametrize("error,code", [(ValueError("--x 3: expected an even number"), 2),
                                        (FileNotFoundError("no such file: a.json"), 2),
                                        (FloatingPointError("outer step 2: non-finite ω"), 1)])
def test_expected_errors_and_failures_are_one_line(capsys, error, code):
    assert run_command(_raise(error)) == code
    assert capsys.readouterr().err == f"error: {error}\n"


def test_ctrl_c_is_one_line_saying_how_to_continue(capsys):
    assert run_command(_raise(KeyboardInterrupt()), interrupted=lambda: "run it again") == 130
    assert capsys.readouterr().err.strip() == "interrupted: run it again"


def test_an_unexpected_error_keeps_its_traceback_and_asks_for_a_report(capsys):
    assert run_command(_raise(KeyError("steps"))) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "KeyError: 'steps'" in err
    assert err.splitlines()[-1] == ("error: this is a bug in domainbed-itl (an unexpected KeyError); "
                                    "please report it with the command and this traceback")


def test_a_multi_line_message_is_one_line(capsys):
    assert run_command(_raise(ValueError("--x 3:\n  expected an even number\n"))) == 2
    assert capsys.readouterr().err == "error: --x 3: expected an even number\n"


def test_running_out_of_memory_is_a_failure_not_a_bug(capsys):
    """A real allocation beyond any memory (torch's RuntimeError), then Python's MemoryError;
    another RuntimeError stays a bug."""
    assert run_command(lambda: torch.empty(2 ** 60, dtype=torch.uint8).numel()) == 1
    assert run_command(_raise(MemoryError())) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("error: out of memory (") for line in lines)
    assert "--batch_size" in lines[0] and "Traceback" not in lines[0]
    assert run_command(_raise(RuntimeError("shape mismatch"))) == 1
    assert "this is a bug" in capsys.readouterr().err


def test_a_commands_own_exception_types_join_the_boundary(capsys):
    class StepFailed(RuntimeError):
        pass

    assert run_command(_raise(StepFailed("the sweep failed")), failures=(StepFailed,)) == 1
    assert run_command(_raise(StepFailed("bad flag")), expected=(StepFailed,)) == 2
    assert capsys.readouterr().err == "error: the sweep failed\nerror: bad flag\n"


@pytest.mark.parametrize("parse,text,message", [
    (integer, "3.0", "expected an integer, got '3.0'"),
    (integer, str(2 ** 63), "expected an integer that fits in 64 bits"),
    (integer, str(-2 ** 63 - 1), "expected an integer that fits in 64 bits"),
    (positive_int, "0", "expected a positive integer, got '0'")])
def test_integer_flags_are_plain_and_fit_in_64_bits(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse(text)
    assert integer("-3") == -3 and integer(str(2 ** 63 - 1)) == 2 ** 63 - 1 and positive_int(" 7") == 7


def test_explicit_flags_are_those_on_the_command_line():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--batched", action=argparse.BooleanOptionalAction)
    assert explicit_flags(parser, ["--lr", "0.01", "--no-batched"]) == {"lr", "batched"}
    assert explicit_flags(parser, []) == set()


def test_explicit_flags_of_a_sub_command():
    """A sub-command's flags count when given (even at their default), its defaults and its
    parent's defaults do not, and the parent's flags given before it are kept."""
    parser = CommandParser("demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    sub = parser.add_subparsers(dest="protocol", required=True)
    meta = sub.add_parser("meta")
    meta.add_argument("--batch_size", type=int, default=64)
    meta.add_argument("--hidden", default="256")
    meta.set_defaults(kind="inner")
    assert explicit_flags(parser, ["--device", "cpu", "meta", "--batch_size", "64"]) == {
        "device", "protocol", "batch_size"}
    assert explicit_flags(parser, ["meta"]) == {"protocol"}
    assert parser.parse_args(["meta"]).hidden == "256"  # the parser itself is left as it was


@pytest.mark.parametrize("text,message", [("gpu0", "'gpu0' is not a device"),
                                          ("meta", "only cpu and cuda devices are supported"),
                                          ("mps", "only cpu and cuda devices are supported")])
def test_devices_other_than_cpu_and_cuda_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_device(text)
    assert parse_device("cpu") == torch.device("cpu")


def test_a_missing_gpu_is_refused_by_number():
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    expected = (f"this machine has {count} CUDA device" if count else "CUDA is not available")
    with pytest.raises(ValueError, match=f"--device cuda:{count}: {expected}"):
        parse_device(f"cuda:{count}")


def test_no_command_imports_another():
    """Commands share code through the library and the _-prefixed shared modules only."""
    commands = {p.stem for p in SCRIPTS.glob("*.py") if not p.stem.startswith("_")}
    offenders = []
    for path in SCRIPTS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
                if node.level == 1 and any(n.split(".")[0] in commands for n in names if n):
                    offenders.append((path.name, names))
                if (node.module or "").startswith("domainbed_itl.scripts."):
                    offenders.append((path.name, [node.module]))
    assert offenders == []


COMMANDS = sorted(p.stem for p in SCRIPTS.glob("*.py") if not p.stem.startswith("_"))


def test_the_console_command_lists_every_command_with_one_line(capsys):
    assert console.main(["--help"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert listed == [name.replace("_", "-") for name in COMMANDS]
    assert list(console.commands().values()) == COMMANDS
    assert all(console.summary(name).endswith(".") for name in COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_each_sub_command_shows_its_own_help_under_its_console_name(capsys, name):
    with pytest.raises(SystemExit) as stop:
        console.main([name.replace("_", "-"), "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.split()[:3] == ["usage:", "domainbed-itl", name.replace("_", "-")]
    assert "show this help message and exit" in out


@pytest.mark.parametrize("argv,message", [([], "a command is required"),
                                          (["meta-tran"], "unknown command 'meta-tran'")])
def test_a_missing_or_unknown_sub_command_is_refused_with_the_list(capsys, argv, message):
    assert console.main(argv) == 2
    err = capsys.readouterr().err
    assert f"domainbed-itl: error: {message}; expected one of cma-search, " in err
    assert err.startswith("usage: domainbed-itl <command>")


# `python -m X --help` for every command in one child interpreter (runpy runs a module as
# `python -m` does): the status, the usage line and whether the help was printed.
_RUN_AS_MAIN = """
import contextlib, io, json, runpy, sys
results = []
for module, args in json.loads(sys.argv[1]):
    sys.argv = [module, *args]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = None
        except SystemExit as stop:
            code = stop.code
    results.append([code, out.getvalue().splitlines()[0] if out.getvalue() else ""])
print(json.dumps(results))
"""


def test_python_dash_m_runs_every_command_both_ways():
    """`python -m domainbed_itl.scripts.X --help` and `python -m domainbed_itl x --help` for
    every command, each as `python -m` runs it; then one real child of each kind."""
    runs = [(f"domainbed_itl.scripts.{name}", ["--help"]) for name in COMMANDS]
    runs += [("domainbed_itl", [name.replace("_", "-"), "--help"]) for name in COMMANDS]
    result = subprocess.run([sys.executable, "-c", _RUN_AS_MAIN, json.dumps(runs)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    usages = [f"usage: python -m domainbed_itl.scripts.{name}" for name in COMMANDS]
    usages += [f"usage: python -m domainbed_itl {name.replace('_', '-')}" for name in COMMANDS]
    shown = [[code, " ".join(line.split()[:len(usage.split())])]
             for (code, line), usage in zip(json.loads(result.stdout), usages)]
    assert shown == [[0, usage] for usage in usages]
    for child in (["domainbed_itl", "--help"], ["domainbed_itl.scripts.patch", "--help"]):
        shown = subprocess.run([sys.executable, "-m", *child], capture_output=True, text=True, timeout=300)
        assert shown.returncode == 0 and shown.stdout.startswith(f"usage: python -m {child[0]} "), shown
