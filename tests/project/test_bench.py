"""The benchmark scripts' own mechanics (not their numbers: speed targets are not tests).

bench/ is not a package: its scripts are loaded from their files.
"""

from __future__ import annotations

import importlib.util
import re
import time

import torch

from conftest import REPO


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_times_are_read_after_the_device_synchronises(monkeypatch):
    """On CUDA the clock must be read after torch.cuda.synchronize(), before and after the timed
    work, or it times the kernel launches instead of the work."""
    meta_speed = _load("meta_speed")
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("synchronize"))
    clock = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: events.append("clock") or clock())
    seconds, result = meta_speed.timed(lambda: events.append("work") or 7,
                                       meta_speed.wall_clock(torch.device("cuda")))
    assert result == 7 and seconds >= 0
    assert events == ["synchronize", "clock", "work", "synchronize", "clock"]
    events.clear()
    meta_speed.timed(lambda: events.append("work"), meta_speed.wall_clock(torch.device("cpu")))
    assert events == ["clock", "work", "clock"]


def test_the_matmul_floor_is_measured_on_the_chosen_device(monkeypatch):
    """The floor's throughput comes from products on --device (meta stands in for a GPU: it runs
    the products without computing them)."""
    meta_speed = _load("meta_speed")
    devices = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: devices.append((a.device.type, b.device.type))
                        or bmm(a, b))
    assert meta_speed.matmul_throughput([(2, 4, 8, 16)], torch.device("meta"), time.perf_counter,
                                        repeats=3) > 0
    assert devices and set(devices) == {("meta", "meta")}


def test_the_flop_count_includes_the_in_place_products():
    """FlopCounterMode counts baddbmm but not baddbmm_ (the inner loop's fused SGD update): the
    floor adds it, so an in-place product counts as much as the same product out of place."""
    from torch.utils.flop_counter import FlopCounterMode

    meta_speed = _load("meta_speed")
    w, a, b = torch.randn(3, 5, 7), torch.randn(3, 5, 4), torch.randn(3, 4, 7)
    counts = []
    for product in (lambda: torch.baddbmm(w, a, b), lambda: w.baddbmm_(a, b),
                    lambda: w[0].addmm_(a[0], b[0])):
        counter = FlopCounterMode(display=False, custom_mapping=meta_speed.IN_PLACE_FLOPS)
        with counter:
            product()
        counts.append(counter.get_total_flops())
    assert counts == [2 * 3 * 5 * 4 * 7, 2 * 3 * 5 * 4 * 7, 2 * 5 * 4 * 7]


def _gpu_check(*args, timeout=600):
    import subprocess
    import sys

    from conftest import DOMAINBED_ROOT, with_pythonpath

    env = with_pythonpath(REPO)
    env.pop("DOMAINBED_ROOT", None)
    root = ("--domainbed_root", str(DOMAINBED_ROOT)) if DOMAINBED_ROOT is not None else ()
    return subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), *args, *root],
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_the_gpu_check_runs_every_check_on_the_cpu_at_tiny_sizes():
    """The GPU check script, exercised on the CPU (CI has no GPU): every command it drives runs
    and the summary table says so; what needs CUDA or DomainBed says why it was skipped."""
    from conftest import DOMAINBED_ROOT

    result = _gpu_check("--device", "cpu", "--tiny")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout[result.stdout.index("\ncheck "):]
    rows = dict(re.match(r"(.+?)\s{2,}(ok|failed|skipped)\s", line).groups()
                for line in table.strip().splitlines()[1:])
    domainbed = "ok" if DOMAINBED_ROOT is not None else "skipped"
    assert rows == {"meta_train batched + reference solve": "ok", "meta_train sequential + CG": "ok",
                    "bitwise resume": "ok", "cross-device resume refused": "skipped",
                    "CMA-ES generation": "ok", "evaluate_loss meta": "ok",
                    "DomainBed train, our algorithms": domainbed, "bench/meta_speed.py": "ok"}, table
    assert "needs a checkpoint written on CUDA" in table


def test_the_gpu_check_refuses_a_device_it_cannot_use():
    import torch

    for device, message in [("tpu", "expected cpu, cuda or cuda:N"),
                            *([] if torch.cuda.is_available() else [("cuda", "CUDA is not available")])]:
        result = _gpu_check("--device", device, timeout=120)
        assert result.returncode == 2 and message in result.stderr, result.stderr
