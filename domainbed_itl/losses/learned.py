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

# Eq. 10's ω0..ω11 after outer step 20 (the last) of `meta_train --preset stationary`, seed 0, on
# 300 digits per domain (docs/results/stationary.md).
RMNIST_STATIONARY_S0_STEP20: List[float] = [
    0.851834774017334, -0.3638342320919037, 0.1372704952955246, -0.37439146637916565,
    0.3888723850250244, -0.44385114312171936, 9.787753105163574, -0.18717843294143677,
    -5.090786457061768, 3.5519227981567383, -0.1705971658229828, -0.005760102532804012,
]

# The composite family's ce_weight, focal_gamma, smoothing_epsilon, poly1_epsilon and Eq. 10's
# ω0..ω11 after outer step 20 (the last) of `meta_train --preset stationary_minres --family
# composite --objective calibrated_ce`, search seed 1, on 300 digits per domain
# (docs/results/objectives.md).
RMNIST_COMPOSITE_S1_STEP20: List[float] = [
    1.5321309566497803, 0.013809241354465485, 0.2711124122142792,
    0.5436976552009583, 1.3422478437423706, -0.4406622648239136,
    0.061918530613183975, 0.47376909852027893, -0.47984275221824646,
    0.4490164518356323, 0.5436839461326599, 0.5210473537445068,
    -0.580741286277771, 0.45391398668289185, 0.503754734992981,
    -0.5222617983818054,
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
    "stationary-RotatedMNIST": {
        "family": "taylor", "order": 4, "parameters": RMNIST_STATIONARY_S0_STEP20,
        "provenance": {
            "source": "domainbed-itl meta_train, preset 'stationary' (inner networks trained to "
                      "the stopping rule), seed 0, 300 offline MNIST digits per domain as "
                      "DomainBed's RotatedMNIST (6 domains)",
            "command": "python -m domainbed_itl.scripts.meta_train --preset stationary "
                       "--dataset RotatedMNIST --data_dir <MNIST folder> --domainbed_root "
                       "<DomainBed> --per_domain_cap 300 --outer_steps 20 --reference_every 5 "
                       "--output_dir <run folder> --no_progress",
            "meta_train_dataset": "RotatedMNIST", "steps": 20, "seed": 0, "preset": "stationary",
            "per_domain_cap": 300, "data_seed": 0,
            "init": "Taylor expansion of cross-entropy",
            "source_commit": "1483f9e573a41cfccbfc0a9ca503d4d01aa52968",
            "selection": "outer step 20, the last step of the run (its loss.json); held-out M "
                         "had flattened at 0.69-0.70 from step 10",
            "hardware": "2 shared AMD EPYC CPU cores", "date": "2026-12-02",
            "evaluation": "docs/results/stationary.md",
        },
    },
    "composite-RotatedMNIST": {
        "family": "composite", "order": None, "parameters": RMNIST_COMPOSITE_S1_STEP20,
        "provenance": {
            "source": "domainbed-itl meta_train, preset 'stationary_minres', composite family "
                      "from CE, objective 'calibrated_ce', search seed 1 of 0-2, 300 offline "
                      "MNIST digits per domain as DomainBed's RotatedMNIST (6 domains)",
            "command": "python -m domainbed_itl.scripts.meta_train --preset stationary_minres "
                       "--family composite --objective calibrated_ce --seed 1 --dataset "
                       "RotatedMNIST --data_dir <MNIST folder> --domainbed_root <DomainBed> "
                       "--per_domain_cap 300 --outer_steps 20 --output_dir <run folder>",
            "meta_train_dataset": "RotatedMNIST", "steps": 20, "seed": 1,
            "preset": "stationary_minres", "per_domain_cap": 300, "data_seed": 0,
            "init": "cross-entropy (the composite family's default)",
            "source_commit": "0e21896ee54fc2f2d2bfb3adc63bd1528b744f19",
            "selection": "outer step 20, the last step of the run (its loss.json); of the three "
                         "search seeds, the one with the highest held-out accuracy in the SGD "
                         "evaluation on other digits (data seed 1)",
            "hardware": "2 shared AMD EPYC CPU cores", "date": "2026-12-07",
            "evaluation": "docs/results/objectives.md",
        },
    },
}
