"""Search a loss with CMA-ES instead of implicit gradients (the paper's Fig. 4 baseline).

    python -m domainbed_itl.scripts.cma_search --dataset RotatedMNIST --data_dir ./data \\
        --domainbed_root ../DomainBed --output_dir runs/cma --generations 20

The same harness as meta_train: the same --preset (default paper_guarded), data flags, loss family and
inner training, and the same held-out objective M (cross-entropy on the left-out domain, mean
over the leave-one-domain-out splits), minimised by pycma's CMA-ES (domainbed_itl.meta.cmaes).
Writes loss.json (the best loss found), metrics.jsonl (one line per generation, with
meta_train's keys: "step" is the generation, plus "inner_trainings") and checkpoint.pt (after
every generation; --resume continues). Draw it beside an implicit-gradient run with
domainbed_itl.scripts.plot_search. Exit status: 0 done, 1 every candidate of a generation
diverged, 2 bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from tqdm import tqdm

from ..bridge.domainbed_env import DomainBedNotFound
from ..losses.lossfile import LossFileError
from ..meta.cmaes import CMAConfig, run_cma_search
from ..meta.inner import INNER_OPTIMIZERS
from ..meta.config import META_PRESETS
from ..meta.runner import LOSS, RunDirError, check_output_dir
from ..files.runlock import FolderLocked, folder_lock
from .meta_train import (CONVERGENCE_FLAGS, DEFAULT_PRESET, _check_data_args, _command_line, _device,
                         _load_data, _meta_config, _nonnegative_int, _positive_float,
                         _positive_int, _widths, add_convergence_flags, add_data_flags,
                         add_loss_flags, add_output_flags)

# MetaConfig settings this command takes (those that shape the inner training and M).
CONFIG_FLAGS = ("inner_steps", "inner_optimizer", "inner_lr", "inner_momentum", "batch_size",
                "hidden", *CONVERGENCE_FLAGS, "outer_batch", "eval_size", "batched", "seed")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface. Inner-loop settings left out come from --preset."""
    p = argparse.ArgumentParser(prog="python -m domainbed_itl.scripts.cma_search",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=tuple(META_PRESETS), default=DEFAULT_PRESET,
                   help=f"meta_train's named settings (default {DEFAULT_PRESET}); explicit flags "
                        "override them")
    add_data_flags(p)
    add_output_flags(p)
    add_loss_flags(p)
    search = p.add_argument_group("CMA-ES")
    search.add_argument("--generations", type=_positive_int, default=CMAConfig.generations)
    search.add_argument("--popsize", type=_int_at_least_2, default=None,
                        help="candidates per generation (default pycma's 4 + floor(3 ln n))")
    search.add_argument("--sigma0", type=_positive_float, default=CMAConfig.sigma0,
                        help="initial step size")
    inner = p.add_argument_group("inner loop (as meta_train)")
    inner.add_argument("--inner_steps", type=_positive_int)
    inner.add_argument("--inner_optimizer", choices=INNER_OPTIMIZERS)
    inner.add_argument("--inner_lr", type=_positive_float)
    inner.add_argument("--inner_momentum", type=float)
    inner.add_argument("--batch_size", type=_positive_int)
    inner.add_argument("--hidden", type=_widths)
    add_convergence_flags(inner)
    inner.add_argument("--outer_batch", type=_positive_int,
                       help="held-out examples for M per domain (default: the whole domain)")
    inner.add_argument("--eval_size", type=_positive_int,
                       help="source examples for the logged inner source accuracy")
    inner.add_argument("--batched", action=argparse.BooleanOptionalAction,
                       help="train the per-domain inner networks as one stack")
    run = p.add_argument_group("execution")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    run.add_argument("--seed", type=_nonnegative_int, default=None,
                     help="seed of the inner trainings (as meta_train's) and of CMA-ES's samples")
    return p


def _int_at_least_2(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2, got {text!r}")
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        init, meta_config = _meta_config(args, CONFIG_FLAGS)
        config = CMAConfig(args.generations, args.popsize, args.sigma0, meta_config.seed)
        device = _device(args.device)
    except (ValueError, LossFileError) as e:
        parser.error(str(e))
    command = _command_line(argv, "cma_search")
    bar = tqdm(total=args.generations, desc="cma-es", unit="generation", disable=args.no_progress)

    def progress(record) -> None:
        bar.n = record["step"]
        bar.set_postfix(best_M=f"{record['best_outer_heldout_loss']:.4f}",
                        heldout_acc=f"{record['outer_heldout_acc']:.3f}")
        bar.refresh()

    try:
        check_output_dir(args.output_dir, args.resume, args.overwrite)
        _check_data_args(args)
        with folder_lock(args.output_dir, command=command):  # before the (slow) data loading
            data = _load_data(args)
            search = run_cma_search(
                data, config, meta_config, args.output_dir, init=init, resume=args.resume,
                overwrite=args.overwrite, device=device, on_generation=progress,
                provenance={"preset": args.preset, "init": args.init, "command": command})
    except (RunDirError, FolderLocked, DomainBedNotFound, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    print(f"CMA-ES done: {search.generations_done} generations of {search.popsize}; best loss "
          f"(generation {search.best['generation']}, M {search.best['result']['outer_heldout_loss']:.4f}) "
          f"in {os.path.join(args.output_dir, LOSS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
