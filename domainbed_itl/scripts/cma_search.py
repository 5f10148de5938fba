"""Search a loss with CMA-ES instead of implicit gradients (the paper's Fig. 4 baseline).

    python -m domainbed_itl.scripts.cma_search --dataset RotatedMNIST --data_dir ./data \
        --domainbed_root ../DomainBed --output_dir runs/cma --generations 20

See docs/cma_search.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence, Set

from tqdm import tqdm

from ..files.runfolder import LOSS, RunFolder
from ..losses.families import get_family
from ..meta.cmaes import CMA_RUN, CMAConfig, run_cma_search
from ..meta.config import MetaConfig
from ..meta.data import DomainData
from ._cli import (INNER_TRAINING, CommandParser, add_data_flags, add_device_flag, add_flags,
                   add_output_flags, int_at_least, positive_float, positive_int)
from ._search import (BATCHED, INNER_STEPS, OBJECTIVE, SEED, SearchSettings,
                      add_search_flags, refuse_contradictions, search_main, value_text)

# MetaConfig settings this command takes (those that shape the inner training and M).
CONFIG_FLAGS = tuple({**INNER_STEPS, **INNER_TRAINING, **OBJECTIVE, **BATCHED, **SEED})
SEARCH = {
    "generations": dict(type=positive_int, default=CMAConfig.generations),
    "popsize": dict(type=int_at_least(2, "an integer >= 2"),
                    help="candidates per generation (default pycma's 4 + floor(3 ln n))"),
    "sigma0": dict(type=positive_float, default=CMAConfig.sigma0, help="initial step size"),
}


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface. Inner-loop settings left out come from --preset."""
    p = CommandParser("cma_search", description=__doc__.split("\n\n")[0])
    add_search_flags(p)
    add_data_flags(p)
    add_output_flags(p)
    add_flags(p, "CMA-ES", SEARCH)
    add_flags(p, "inner loop (as meta_train)", INNER_STEPS, INNER_TRAINING, OBJECTIVE, BATCHED)
    add_device_flag(add_flags(p, "execution", SEED))
    return p


def _check_searchable(config: MetaConfig) -> None:
    """ValueError for a family CMA-ES cannot search: pycma needs at least 2 dimensions."""
    family = get_family(config.family, config.order)
    if family.num_params < 2:
        raise ValueError(f"--family: a {family.describe()} has {family.num_params} parameter "
                         f"({', '.join(family.param_names())}); CMA-ES searches at least 2, so use "
                         "meta_train for it, or a family with more parameters")


def _cma_config(args: argparse.Namespace, explicit: Set[str], folder: RunFolder,
                run: SearchSettings) -> CMAConfig:
    """CMA-ES's settings: the flags', or on a resume the checkpoint's (--generations may grow)."""
    if folder.checkpoint is None:
        return CMAConfig(args.generations, args.popsize, args.sigma0, run.config.seed)
    saved = folder.checkpoint["cma_config"]
    refuse_contradictions(folder.checkpoint_path, [
        (f"--{k} {getattr(args, k)}", f"{k} {value_text(saved[k])}") for k in ("popsize", "sigma0")
        if k in explicit and getattr(args, k) != saved[k]])
    generations = args.generations if "generations" in explicit else saved["generations"]
    return CMAConfig(generations, saved["popsize"], saved["sigma0"], run.config.seed)


def _search(args: argparse.Namespace, explicit: Set[str], folder: RunFolder, run: SearchSettings,
            data: DomainData) -> int:
    config = _cma_config(args, explicit, folder, run)
    bar = tqdm(total=config.generations, desc="cma-es", unit="generation", disable=args.no_progress)

    def progress(record) -> None:
        bar.n = record["step"]
        bar.set_postfix(best_M=f"{record['best_outer_heldout_loss']:.4f}",
                        heldout_acc=f"{record['outer_heldout_acc']:.3f}")
        bar.refresh()

    try:
        search = run_cma_search(data, config, run.config, folder, init=run.init, device=run.device,
                                on_generation=progress, provenance=run.provenance)
    finally:
        bar.close()
    print(f"CMA-ES done: {search.generations_done} generations of {search.popsize}; best loss "
          f"(generation {search.best['generation']}, M {search.best['result']['outer_heldout_loss']:.4f}) "
          f"in {os.path.join(args.output_dir, LOSS)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns the exit status (docs/cma_search.md)."""
    return search_main(build_parser(), argv, "cma_search", CMA_RUN, CONFIG_FLAGS, "meta_config",
                       (), _search, check=_check_searchable)


if __name__ == "__main__":
    sys.exit(main())
