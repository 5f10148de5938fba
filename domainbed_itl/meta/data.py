"""Per-domain data for meta-training (`DomainData`: one (x, y) per domain, and the labels a
held-out domain is judged on), its checks, the synthetic and planted data sets and their
fingerprint. See docs/meta_learning.md#how-the-meta-learner-is-built.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .settings import SettingsError

Domain = Tuple[Tensor, Tensor]


def check_domains(domains: Sequence[Domain], num_classes: int) -> None:
    """Raise ValueError unless `domains` holds >= 2 non-empty (x, y) pairs fit for meta-training."""
    if len(domains) < 2:
        raise ValueError("leave-one-domain-out meta-training needs at least 2 domains, got "
                         f"{len(domains)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
    features = None
    for i, (x, y) in enumerate(domains):
        if x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"domain {i}: x must be a float tensor of shape (n, features), got "
                             f"{x.dtype} of shape {tuple(x.shape)}")
        if y.dtype != torch.int64 or y.shape != x.shape[:1]:
            raise ValueError(f"domain {i}: y must be int64 class indices of shape ({x.shape[0]},), "
                             f"got {y.dtype} of shape {tuple(y.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"domain {i} is empty")
        if features is not None and x.shape[1] != features:
            raise ValueError(f"domain {i} has {x.shape[1]} features, domain 0 has {features}")
        features = x.shape[1]
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise ValueError(f"domain {i}: labels must lie in [0, {num_classes}), got "
                             f"[{int(y.min())}, {int(y.max())}]")


# The sizes a run draws from its data: from a leave-one-domain-out split's source domains (with
# replacement for the minibatches, a subset for the evaluation) or from its held-out domain.
FROM_SOURCES = ("batch_size", "hvp_batch", "eval_size")
FROM_HELDOUT = ("outer_batch",)
REPEATING = ("batch_size", "hvp_batch")


def size_problems(sizes: Sequence[int], wanted: Mapping[str, Optional[int]],
                  explicit: Collection[str], name: str = "the data",
                  spell: Callable[[str], str] = str) -> List[str]:
    """Notes on the `wanted` sizes (setting name -> value, None: whole domains) larger than what
    domains of `sizes` examples hold; SettingsError, naming the setting and the sizes, for those
    in `explicit` (given by the user), where a smaller value is then what the user meant to ask.
    A per_domain_cap above every domain ("at most") is only noted. spell: how a setting's name
    is written (a command writes its flag)."""
    source, heldout = sum(sizes) - max(sizes), min(sizes)
    cap = wanted.get("per_domain_cap")
    notes = ([] if cap is None or cap <= max(sizes) else [
        f"{spell('per_domain_cap')} {cap} is larger than every domain ({name}: domains of "
        f"{', '.join(map(str, sizes))} examples); all their examples are used"])
    for setting, value in wanted.items():
        if value is None or setting not in (*FROM_SOURCES, *FROM_HELDOUT):
            continue
        available, what = ((source, "source examples of the smallest leave-one-domain-out split")
                           if setting in FROM_SOURCES else (heldout, "examples of the smallest domain"))
        if value <= available:
            continue
        text = (f"{spell(setting)} {value} is larger than the {available} {what} ({name}: domains "
                f"of {', '.join(map(str, sizes))} examples)")
        if setting in explicit:
            raise SettingsError(setting, f"{text}; expected at most {available}")
        notes.append(text + ("; the batches repeat examples" if setting in REPEATING else
                             f"; all {available} are used"))
    return notes


@dataclass
class DomainData:
    """A multi-domain dataset: one (x, y) per environment, with its name and class count."""

    name: str
    environments: List[str]
    domains: List[Domain]
    num_classes: int
    input_shape: Tuple[int, ...]
    info: dict = field(default_factory=dict)
    heldout_labels: Optional[List[Tensor]] = None

    def __post_init__(self) -> None:
        check_domains(self.domains, self.num_classes)
        if len(self.environments) != len(self.domains):
            raise ValueError(f"{len(self.environments)} environment names for "
                             f"{len(self.domains)} domains")
        if self.heldout_labels is not None:
            if len(self.heldout_labels) != len(self.domains):
                raise ValueError(f"{len(self.heldout_labels)} held-out label tensors for "
                                 f"{len(self.domains)} domains")
            check_domains([(x, y) for (x, _), y in zip(self.domains, self.heldout_labels)],
                          self.num_classes)

    def heldout_targets(self) -> List[Tensor]:
        """The labels each domain is judged by when held out: `heldout_labels`, else the
        training labels."""
        return list(self.heldout_labels or [y for _, y in self.domains])


def synthetic_domains(num_domains: int = 6, per_domain: int = 500, features: int = 784,
                      num_classes: int = 10, seed: int = 0, noise: float = 1.0,
                      degrees_per_domain: float = 15.0, separation: float = 1.0,
                      label_noise: float = 0.0) -> DomainData:
    """Gaussian class clusters seen under a domain-specific rotation, a RotatedMNIST stand-in.

    Class means are N(0, separation²·I) draws; an example is x = R_k (μ_y + noise·ε), where R_k
    rotates every coordinate pair (2m, 2m+1) by k·degrees_per_domain for domain k. With
    `label_noise` p, each label is replaced, with probability p, by a class drawn uniformly (in
    every domain). Deterministic in `seed`; the defaults (separation 1, no label noise) draw no
    extra random numbers, so the default task's data do not depend on these two options.
    """
    if num_domains < 2 or per_domain < 1 or features < 2 or num_classes < 2:
        raise ValueError("synthetic domains need num_domains >= 2, per_domain >= 1, features >= 2 and "
                         f"num_classes >= 2, got {num_domains}, {per_domain}, {features}, {num_classes}")
    if not separation > 0 or not 0 <= label_noise <= 1:
        raise ValueError(f"synthetic domains need separation > 0 and label_noise in [0, 1], got "
                         f"{separation} and {label_noise}")
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, features, generator=g) * separation
    pairs = features // 2 * 2
    domains, names = [], []
    for k in range(num_domains):
        y = torch.randint(num_classes, (per_domain,), generator=g)
        x = means[y] + noise * torch.randn(per_domain, features, generator=g)
        if label_noise > 0:
            flipped = torch.rand(per_domain, generator=g) < label_noise
            y = torch.where(flipped, torch.randint(num_classes, (per_domain,), generator=g), y)
        angle = math.radians(k * degrees_per_domain)
        a, b = x[:, 0:pairs:2].clone(), x[:, 1:pairs:2].clone()
        x[:, 0:pairs:2] = math.cos(angle) * a - math.sin(angle) * b
        x[:, 1:pairs:2] = math.sin(angle) * a + math.cos(angle) * b
        domains.append((x, y))
        names.append(f"{k * degrees_per_domain:g}")
    return DomainData("synthetic", names, domains, num_classes, (features,),
                      {"dataset": "synthetic", "seed": seed, "per_domain": per_domain,
                       "features": features, "noise": noise, "separation": separation,
                       "degrees_per_domain": degrees_per_domain, "label_noise": label_noise})


# `--dataset synthetic` of meta_train, cma_search and evaluate_loss: 32 features, a rotation
# twice as strong between domains and 10% of the labels redrawn, so that held-out accuracy stays
# below 100% and losses differ on it (what losses reach on either: docs/results/synthetic.md).
SYNTHETIC_DATASET = {"features": 32, "separation": 2.0, "degrees_per_domain": 30.0,
                     "label_noise": 0.1}


def synthetic_dataset(per_domain: int = 500, seed: int = 0) -> DomainData:
    """The data set named `synthetic` on the command line (SYNTHETIC_DATASET)."""
    return synthetic_domains(per_domain=per_domain, seed=seed, **SYNTHETIC_DATASET)


def symmetric_label_noise(y: Tensor, num_classes: int, rate: float, seed: int) -> Tensor:
    """`y` with each label replaced, with probability `rate`, by a class drawn uniformly from all
    `num_classes` (so a label is wrong with probability rate·(C−1)/C); a new tensor,
    deterministic in `seed`."""
    if not 0 <= rate <= 1:
        raise ValueError(f"label noise rate must lie in [0, 1], got {rate!r}")
    g = torch.Generator().manual_seed(seed)
    flipped = torch.rand(y.shape, generator=g) < rate
    return torch.where(flipped, torch.randint(num_classes, y.shape, generator=g), y)


# `--dataset planted`: a task on which a known robust loss beats cross-entropy out of domain at
# convergence (docs/results/planted.md). Four rotated domains of Gaussian classes whose training
# labels carry symmetric noise; the held-out domain is judged on its clean labels, so a loss that
# does not memorise the noise (MAE-like, Gao et al., ICCV 2021) generalises better.
PLANTED_DATASET = {"num_domains": 4, "features": 32, "num_classes": 4, "separation": 1.0,
                   "degrees_per_domain": 10.0, "training_label_noise": 0.6}


def planted_domains(per_domain: int = 200, seed: int = 0, num_domains: int = 4,
                    features: int = 32, num_classes: int = 4, separation: float = 1.0,
                    degrees_per_domain: float = 10.0, training_label_noise: float = 0.6) -> DomainData:
    """Synthetic domains (`synthetic_domains`, clean) whose training labels get
    `symmetric_label_noise` in every domain, while `heldout_labels` keep the clean ones: every
    network trains on noisy labels and is judged, on its held-out domain, by clean labels."""
    clean = synthetic_domains(num_domains, per_domain, features, num_classes, seed,
                              degrees_per_domain=degrees_per_domain, separation=separation)
    noisy = [(x, symmetric_label_noise(y, num_classes, training_label_noise, seed * 1000 + k))
             for k, (x, y) in enumerate(clean.domains)]
    return DomainData("planted", clean.environments, noisy, num_classes, (features,),
                      {**clean.info, "dataset": "planted",
                       "training_label_noise": training_label_noise},
                      heldout_labels=[y for _, y in clean.domains])


def planted_dataset(per_domain: int = 200, seed: int = 0) -> DomainData:
    """The data set named `planted` on the command line (PLANTED_DATASET)."""
    return planted_domains(per_domain=per_domain, seed=seed, **PLANTED_DATASET)


def data_fingerprint(data: DomainData) -> Dict[str, Any]:
    """Dataset name, environments, domain sizes and a SHA-256 of every tensor's bytes."""
    digest = hashlib.sha256()
    for t in [t for domain in data.domains for t in domain] + list(data.heldout_labels or []):
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return {"dataset": data.name, "environments": list(data.environments),
            "num_classes": data.num_classes, "domain_sizes": [len(y) for _, y in data.domains],
            "sha256": digest.hexdigest()}
