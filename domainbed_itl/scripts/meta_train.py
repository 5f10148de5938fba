"""Meta-learn a loss on a DomainBed dataset by implicit gradients (Algorithm 1).

    python -m domainbed_itl.scripts.meta_train --dataset RotatedMNIST --data_dir ./data \\
        --domainbed_root ../DomainBed --output_dir runs/meta

See docs/meta_learning.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence, Set

from ..files.runfolder import LOSS, RunFolder
from ..meta.config import GUESSES, META_PRESETS, MetaConfig
from ..meta.data import DomainData
from ..meta.runner import META_RUN, run_meta_training
from ._cli import INNER_TRAINING, CommandParser, add_data_flags, add_device_flag, add_flags, add_output_flags
from ._search import (BATCHED, DEFAULT_PRESET, DIAGNOSTICS, HYPERGRADIENT, INNER_STEPS,
                      OBJECTIVE, OUTER, SEED, WARM_START, SearchSettings, add_search_flags,
                      search_main)

__all__ = ["CONFIG_FLAGS", "DEFAULT_PRESET", "build_parser", "main"]

CONFIG_FLAGS = tuple({**OUTER, **OBJECTIVE, **INNER_STEPS, **INNER_TRAINING, **WARM_START,
                      **HYPERGRADIENT, **DIAGNOSTICS, **BATCHED, **SEED})


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface. Settings left out come from --preset, then MetaConfig."""
    p = CommandParser("meta_train", description=__doc__.split("\n\n")[0], epilog=_presets_help(),
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_search_flags(p)
    add_data_flags(p)
    add_output_flags(p)
    add_flags(p, "outer loop (Algorithm 1)", OUTER, OBJECTIVE)
    add_flags(p, "inner loop", INNER_STEPS, INNER_TRAINING, WARM_START)
    add_flags(p, "implicit gradient (Algorithm 2)", HYPERGRADIENT)
    add_flags(p, "diagnostics", DIAGNOSTICS)
    add_device_flag(add_flags(p, "execution", BATCHED, SEED))
    return p


def _presets_help() -> str:
    lines = ["presets (values that differ from MetaConfig's defaults):"]
    defaults = MetaConfig().flat()
    for name, values in META_PRESETS.items():
        changed = ", ".join(f"{k}={v}" for k, v in values.items() if defaults.get(k) != v)
        lines.append(f"  {name}: {changed}")
        lines += [f"    guessed: {k}: {why}" for k, why in GUESSES.get(name, {}).items()]
    defaults_text = ", ".join(f"{k}={v}" for k, v in defaults.items())
    return "\n".join(lines + ["MetaConfig defaults: " + defaults_text])


def _train(args: argparse.Namespace, explicit: Set[str], folder: RunFolder, run: SearchSettings,
           data: DomainData) -> int:
    trainer = run_meta_training(data, run.config, folder, init=run.init, device=run.device,
                                progress=not args.no_progress, provenance=run.provenance)
    print(f"meta-training done: {trainer.steps_done} outer steps; learned loss in "
          f"{os.path.join(args.output_dir, LOSS)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns the exit status (see the module docstring)."""
    return search_main(build_parser(), argv, "meta_train", META_RUN, CONFIG_FLAGS, "config",
                       ("outer_steps",), _train)


if __name__ == "__main__":
    sys.exit(main())
