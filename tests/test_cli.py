"""The commands' shared module: the error boundary, explicit flags, devices, and that no command
imports another."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest
import torch

from domainbed_itl.scripts._cli import explicit_flags, integer, parse_device, positive_int, run_command

SCRIPTS = Path(__file__).resolve().parents[1] / "domainbed_itl" / "scripts"


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
