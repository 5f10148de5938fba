"""Losses learned by this package's own searches, shipped as presets beside the paper's ITL.

Each carries how it was found and how it was evaluated; docs/loss_search.md has the runs behind
them. A learned loss is shipped to be compared and built on, whatever its evaluation showed.
"""

from __future__ import annotations

from typing import Dict, List

# Eq. 10's ω0..ω11 after outer step 52 of `meta_train --preset paper`, seed 0 (docs/loss_search.md).
RMNIST_PAPER_S0_STEP52: List[float] = [
    7.8998236656188965, -1.4471635818481445, -1.17421083967173e-09, -0.04568279907107353,
    0.18365876376628876, -0.7418826222419739, 10.07004165649414, 0.17390799522399902,
    -5.458232879638672, 5.984564781188965, 0.363524466753006, -1.2378779649734497,
]

LEARNED: Dict[str, dict] = {
    "learned-RotatedMNIST": {
        "family": "taylor", "order": 4, "parameters": RMNIST_PAPER_S0_STEP52,
        "provenance": {
            "source": "domainbed-itl meta_train, preset 'paper', seed 0, 10,000 offline MNIST "
                      "digits as DomainBed's RotatedMNIST (6 domains)",
            "command": "python -m domainbed_itl.scripts.meta_train --preset paper --outer_steps 52 "
                       "--dataset RotatedMNIST --data_dir <MNIST folder> --batched "
                       "--output_dir <run folder>",
            "meta_train_dataset": "RotatedMNIST", "steps": 52, "seed": 0, "preset": "paper",
            "init": "Taylor expansion of cross-entropy",
            "source_commit": "907cca8910504d530e0501f02a0fa488826486a1",
            "selection": "the outer step with the lowest held-out M (0.529) before the run "
                         "diverged at step 54",
            "hardware": "2-core shared CPU", "date": "2026-11-26",
            "evaluation": "docs/loss_search.md",
        },
    },
}
