"""Planning a single-source sweep: DomainBed's own sweep arguments, one training domain each.

Nothing here imports DomainBed: the caller passes DomainBed's `make_args_list` output and its
`num_environments` and `seed_hash`.

See docs/single_source.md.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple


def single_source_args(args_list: Sequence[dict], num_environments: Callable[[str], int],
                       seed_hash: Callable[..., int], sources: Optional[Sequence[int]] = None,
                       checkpoint_freq: Optional[int] = None) -> List[Tuple[dict, int]]:
    """(train args, source) for every entry of `make_args_list(..., single_test_envs=True)`.

    Each entry's test_envs [s] becomes every other domain, so s is the one training domain, and
    the seed is re-derived as DomainBed's make_args_list derives it, from the new test_envs.
    Entries whose s is not in `sources` (when given) are left out.
    """
    out = []
    for train_args in args_list:
        (source,) = train_args["test_envs"]
        if sources is not None and source not in sources:
            continue
        train_args = dict(train_args)
        train_args["test_envs"] = [e for e in range(num_environments(train_args["dataset"]))
                                   if e != source]
        train_args["seed"] = seed_hash(train_args["dataset"], train_args["algorithm"],
                                       train_args["test_envs"], train_args["hparams_seed"],
                                       train_args["trial_seed"])
        if checkpoint_freq is not None:
            train_args["checkpoint_freq"] = checkpoint_freq
        out.append((train_args, source))
    return out
