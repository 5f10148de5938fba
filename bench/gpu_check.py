"""The CUDA path end to end, through the commands' own command lines, with one summary table.

    python bench/gpu_check.py --device cuda [--data_dir MNIST --domainbed_root DOMAINBED]
    python bench/gpu_check.py --device cpu --tiny          # the same checks, tiny, on the CPU (CI)

Each check runs real commands in subprocesses (python -m domainbed_itl.scripts.meta_train, ...)
on --device, in a scratch folder, and is reported ok, failed (with the reason) or skipped (with
the reason), with its seconds:

1. meta_train batched, with the reference MINRES solve every step (--reference_every 1);
2. meta_train sequential with the CG solver;
3. bitwise resume: a run of N-1 steps, copied to a fresh folder and resumed to N with --resume,
   must end with the loss parameters and metrics (all but the time_* fields) of check 1's
   uninterrupted N-step run;
4. cross-device resume: check 3's checkpoint written on CUDA, resumed with --device cpu, must be
   refused with a message naming both devices; "skipped: not supported by this version" when
   this version resumes it instead (on the CPU: skipped, there is no CUDA checkpoint);
5. one CMA-ES generation (cma_search);
6. evaluate_loss meta, CE against ITL;
7. DomainBed's own train with our algorithms for a few steps (needs --domainbed_root or
   $DOMAINBED_ROOT, and at full size --data_dir for RotatedMNIST; --tiny trains on Debug28's
   random images); an unpatched checkout is copied and patched in the scratch folder;
8. bench/meta_speed.py on the device.

Full size (the paper preset's networks and 1000 inner steps; RotatedMNIST from --data_dir, else
synthetic domains of the same size) takes a few minutes on one H100/H200; --tiny takes seconds.
Exit status: 0 when no check failed, 1 when one did, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
META_TRAIN = ("-m", "domainbed_itl.scripts.meta_train")
NOT_SUPPORTED = "not supported by this version"


@dataclass(frozen=True)
class Sizes:
    """The problem sizes of one run of the checks."""

    meta: Tuple[str, ...]         # meta_train flags besides data, output and solver
    outer_steps: int
    cma: Tuple[str, ...]          # cma_search flags besides data and output
    evaluate: Tuple[str, ...]     # evaluate_loss meta flags besides data and output
    domainbed_dataset: str
    domainbed_algorithms: Tuple[str, ...]
    domainbed_flags: Tuple[str, ...]
    speed: Tuple[str, ...]        # bench/meta_speed.py flags besides data and device
    timeout: int                  # seconds per command


FULL = Sizes(meta=("--preset", "paper"), outer_steps=3,
             cma=("--generations", "1", "--popsize", "4"),
             evaluate=("--losses", "CE", "ITL", "--seeds", "0", "--inner_steps", "1000"),
             domainbed_dataset="RotatedMNIST", domainbed_algorithms=("ITL", "RSC_ITL"),
             domainbed_flags=("--steps", "20", "--checkpoint_freq", "10"),
             speed=("--steps", "2"), timeout=300)
_TINY_NET = ("--inner_steps", "5", "--batch_size", "8", "--hidden", "8", "--eval_size", "32")
TINY = Sizes(meta=("--preset", "paper", *_TINY_NET, "--hvp_batch", "16", "--neumann_steps", "3",
                   "--cg_maxiter", "3", "--reference_maxiter", "10"), outer_steps=2,
             cma=("--generations", "1", "--popsize", "4", *_TINY_NET),
             evaluate=("--losses", "CE", "ITL", "--seeds", "0", *_TINY_NET),
             domainbed_dataset="Debug28", domainbed_algorithms=("ITL",),
             domainbed_flags=("--steps", "3", "--checkpoint_freq", "2", "--hparams",
                              '{"batch_size": 8}'),
             speed=("--per_domain", "32", "--inner_steps", "5", "--hidden", "8", "--steps", "1",
                    "--square", "256"),
             timeout=120)


class CheckFailed(Exception):
    """A check's command failed or its outputs are wrong; the message says how."""


class Skipped(Exception):
    """A check that cannot run here; the message says why."""


class Context:
    """The settings shared by the checks: device, sizes, data flags and the scratch folder."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.device, self.workdir, self.tiny = args.device, workdir, args.tiny
        self.sizes = TINY if args.tiny else FULL
        self.domainbed_root = args.domainbed_root or os.environ.get("DOMAINBED_ROOT") or None
        self.data_dir = args.data_dir
        if args.tiny:
            self.data = ("--dataset", "synthetic", "--per_domain_cap", "24")
        elif args.data_dir and self.domainbed_root:
            self.data = ("--dataset", "RotatedMNIST", "--data_dir", args.data_dir,
                         "--domainbed_root", self.domainbed_root)
        else:
            self.data = ("--dataset", "synthetic", "--per_domain_cap", "1667")
        self.env = dict(os.environ)
        if args.tiny:  # one thread per command: no oversubscribed cores on a small shared CPU
            self.env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        if (REPO / "domainbed_itl").is_dir():  # a checkout: its package, not another installed one
            self.env["PYTHONPATH"] = os.pathsep.join(
                [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])

    def run(self, argv: Sequence[str], env: Optional[Dict[str, str]] = None,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run `python argv...` in the scratch folder; CheckFailed (with the end of its output)
        when `check` and it exits non-zero."""
        result = subprocess.run([sys.executable, *argv], cwd=self.workdir, env=env or self.env,
                                capture_output=True, text=True, timeout=self.sizes.timeout)
        if check and result.returncode != 0:
            raise CheckFailed(f"`{' '.join(argv[:3])} ...` exited {result.returncode}: "
                              + _last_line(result.stderr or result.stdout))
        return result

    def meta_train(self, folder: str, steps: int, *extra: str, device: Optional[str] = None,
                   check: bool = True) -> subprocess.CompletedProcess:
        """meta_train into scratch folder `folder`: batched with the reference solve (checks 1, 3
        and 4 share these settings), unless `extra` says otherwise."""
        return self.run([*META_TRAIN, *self.data, *self.sizes.meta, "--outer_steps", str(steps),
                         "--batched", "--reference_every", "1", *extra, "--output_dir", folder,
                         "--device", device or self.device, "--no_progress"], check=check)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def _metrics(folder: Path) -> List[dict]:
    """metrics.jsonl without the time_* fields (the only ones that differ between runs)."""
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time_")}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _expect_steps(folder: Path, steps: int) -> List[dict]:
    records = _metrics(folder)
    if len(records) != steps:
        raise CheckFailed(f"{folder.name}/metrics.jsonl has {len(records)} records, expected {steps}")
    return records


def check_batched(ctx: Context) -> str:
    ctx.meta_train("batched", ctx.sizes.outer_steps)
    records = _expect_steps(ctx.workdir / "batched", ctx.sizes.outer_steps)
    cosines = [r["reference"]["cosine"] for r in records]
    return f"{len(records)} steps; cosine to the MINRES reference {', '.join(f'{c:.3f}' for c in cosines)}"


def check_sequential_cg(ctx: Context) -> str:
    ctx.meta_train("sequential", ctx.sizes.outer_steps, "--no-batched", "--solver", "cg",
                   "--reference_every", "0")
    records = _expect_steps(ctx.workdir / "sequential", ctx.sizes.outer_steps)
    return f"{len(records)} steps; solver residual {records[-1]['solver_residual']:.3g}"


def check_resume(ctx: Context) -> str:
    whole = ctx.workdir / "batched"
    if not (whole / "metrics.jsonl").is_file():
        raise Skipped("needs check 1's uninterrupted run")
    ctx.meta_train("cut", ctx.sizes.outer_steps - 1)
    shutil.copytree(ctx.workdir / "cut", ctx.workdir / "resumed")
    ctx.meta_train("resumed", ctx.sizes.outer_steps, "--resume")
    omega = [json.loads((f / "loss.json").read_text())["parameters"]
             for f in (whole, ctx.workdir / "resumed")]
    if omega[0] != omega[1]:
        raise CheckFailed(f"loss parameters differ: uninterrupted {omega[0]}, resumed {omega[1]}")
    if _metrics(whole) != _metrics(ctx.workdir / "resumed"):
        raise CheckFailed("metrics.jsonl of the resumed run differs from the uninterrupted run's")
    return (f"{ctx.sizes.outer_steps - 1} steps + 1 resumed = {ctx.sizes.outer_steps} "
            "uninterrupted, bitwise")


def check_cross_device_resume(ctx: Context) -> str:
    if not ctx.device.startswith("cuda"):
        raise Skipped("needs a checkpoint written on CUDA (--device cuda)")
    if not (ctx.workdir / "cut" / "checkpoint.pt").is_file():
        raise Skipped("needs check 3's checkpoint")
    shutil.copytree(ctx.workdir / "cut", ctx.workdir / "on_cpu")
    result = ctx.meta_train("on_cpu", ctx.sizes.outer_steps, "--resume", device="cpu", check=False)
    message = _last_line(result.stderr)
    if result.returncode == 0:
        raise Skipped(f"{NOT_SUPPORTED} (the CUDA checkpoint was resumed on the CPU)")
    if "cuda" not in message.lower() or "cpu" not in message.lower():
        raise CheckFailed(f"refused without naming both devices: {message}")
    return f"refused: {message}"


def check_cma(ctx: Context) -> str:
    ctx.run(["-m", "domainbed_itl.scripts.cma_search", *ctx.data, *ctx.sizes.cma,
             "--output_dir", "cma", "--device", ctx.device, "--no_progress"])
    records = _expect_steps(ctx.workdir / "cma", 1)
    return f"1 generation; best held-out M {records[-1]['outer_heldout_loss']:.4g}"


def check_evaluate(ctx: Context) -> str:
    ctx.run(["-m", "domainbed_itl.scripts.evaluate_loss", "meta", *ctx.data, *ctx.sizes.evaluate,
             "--output_dir", "evaluate", "--device", ctx.device])
    records = json.loads((ctx.workdir / "evaluate" / "evaluation.json").read_text())["records"]
    return f"{len(records)} records"


def _patched_domainbed(ctx: Context) -> Path:
    """The DomainBed checkout if our hooks are applied there, else a patched copy."""
    root = Path(ctx.domainbed_root)
    patch = ["-m", "domainbed_itl.scripts.patch"]
    report = ctx.run([*patch, "check", "--domainbed_root", str(root)], check=False).stdout
    if report.strip() and all(line.endswith(": applied") for line in report.strip().splitlines()):
        return root
    copy = ctx.workdir / "DomainBed"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc"))
    ctx.run([*patch, "apply", "--domainbed_root", str(copy)])
    return copy


def check_domainbed(ctx: Context) -> str:
    if not ctx.domainbed_root:
        raise Skipped("no DomainBed checkout (--domainbed_root or $DOMAINBED_ROOT)")
    if not ctx.tiny and not ctx.data_dir:
        raise Skipped("no --data_dir for RotatedMNIST")
    root = _patched_domainbed(ctx)
    env = {**ctx.env, "PYTHONPATH": os.pathsep.join([str(root), ctx.env.get("PYTHONPATH", "")])}
    if ctx.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # DomainBed's train takes the GPU whenever there is one
    elif ctx.device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = ctx.device.split(":", 1)[1]
    done = []
    for algorithm in ctx.sizes.domainbed_algorithms:
        out = ctx.workdir / "domainbed" / algorithm
        ctx.run(["-m", "domainbed.scripts.train", "--dataset", ctx.sizes.domainbed_dataset,
                 "--algorithm", algorithm, "--data_dir", ctx.data_dir or str(ctx.workdir),
                 "--test_envs", "0", *ctx.sizes.domainbed_flags, "--output_dir", str(out),
                 "--skip_model_save"], env=env)
        last = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
        if not (out / "done").exists():
            raise CheckFailed(f"{algorithm}: DomainBed's train left no 'done' file")
        if ctx.device.startswith("cuda") and not last["mem_gb"] > 0:
            raise CheckFailed(f"{algorithm}: no CUDA memory used (mem_gb {last['mem_gb']})")
        done.append(f"{algorithm} loss {last['loss']:.3g}")
    return f"{ctx.sizes.domainbed_dataset}: " + ", ".join(done)


def check_speed(ctx: Context) -> str:
    data = (("--data_dir", ctx.data_dir, "--domainbed_root", ctx.domainbed_root)
            if not ctx.tiny and ctx.data_dir and ctx.domainbed_root else ())
    result = ctx.run([str(REPO / "bench" / "meta_speed.py"), *data, *ctx.sizes.speed,
                      "--device", ctx.device])
    return _last_line(result.stdout)


CHECKS: Tuple[Tuple[str, Callable[[Context], str]], ...] = (
    ("meta_train batched + reference solve", check_batched),
    ("meta_train sequential + CG", check_sequential_cg),
    ("bitwise resume", check_resume),
    ("cross-device resume refused", check_cross_device_resume),
    ("CMA-ES generation", check_cma),
    ("evaluate_loss meta", check_evaluate),
    ("DomainBed train, our algorithms", check_domainbed),
    ("bench/meta_speed.py", check_speed),
)


def run_checks(ctx: Context) -> List[Tuple[str, str, float, str]]:
    """(name, ok/failed/skipped, seconds, detail) of every check, printed as they finish."""
    rows = []
    for name, check in CHECKS:
        start = time.perf_counter()
        try:
            status, detail = "ok", check(ctx)
        except Skipped as reason:
            status, detail = "skipped", str(reason)
        except subprocess.TimeoutExpired:
            status, detail = "failed", f"timed out after {ctx.sizes.timeout} s"
        except (CheckFailed, OSError, ValueError, KeyError) as error:
            status, detail = "failed", f"{type(error).__name__}: {error}"
        rows.append((name, status, time.perf_counter() - start, detail))
        print(f"{name}: {status} ({rows[-1][2]:.1f} s) {detail}", flush=True)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:1, cpu, ...")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (seconds on a CPU)")
    p.add_argument("--data_dir", default=None, help="MNIST folder for RotatedMNIST")
    p.add_argument("--domainbed_root", default=None, help="default $DOMAINBED_ROOT")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a new temporary "
                   "folder, deleted at the end); must not exist")
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        print(f"error: --device {args.device!r}: expected cpu, cuda or cuda:N", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device}: CUDA is not available here", file=sys.stderr)
        return 2
    if args.workdir and os.path.exists(args.workdir):
        print(f"error: --workdir {args.workdir} exists; give a new folder", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="domainbed_itl_gpu_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"device {args.device}{' (tiny sizes)' if args.tiny else ''}, torch {torch.__version__}, "
          f"scratch folder {workdir}", flush=True)
    try:
        ctx = Context(args, workdir)
        print(f"meta-learning data: {' '.join(ctx.data)}", flush=True)
        rows = run_checks(ctx)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    width = max(len(name) for name, *_ in rows)
    print(f"\n{'check':<{width}}  {'result':<7}  {'seconds':>7}  detail")
    for name, status, seconds, detail in rows:
        print(f"{name:<{width}}  {status:<7}  {seconds:>7.1f}  {detail}")
    return 1 if any(status == "failed" for _, status, _, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
