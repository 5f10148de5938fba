"""Registration into DomainBed: the hooks its patched modules call, and in-process `register()`.

See docs/domainbed.md.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, MutableMapping, Optional

from .algorithms import LOSS_ALGORITHMS, make_loss_algorithm
from .hparams import wrap_hparams
from .single_source_mixup import BASE as MIXUP, NAME as SINGLE_SOURCE_MIXUP, make_single_source_mixup

__all__ = ["register", "register_algorithms", "register_command_launchers", "wrap_hparams"]


def register_algorithms(namespace: MutableMapping) -> Dict[str, type]:
    """Add our algorithms to the namespace of `domainbed.algorithms` and to its ALGORITHMS list.

    `namespace` is that module's globals(): DomainBed's `get_algorithm_class` looks names up
    there. Already registered names are left as they are, and an algorithm whose base this
    DomainBed does not have (a fork without Fish, say) is left out, so that DomainBed still
    imports; the others are registered.
    """
    names = namespace["ALGORITHMS"]
    added = {}
    builders = {name: (spec.base, functools.partial(make_loss_algorithm, loss=spec.loss, name=name))
                for name, spec in LOSS_ALGORITHMS.items()}
    builders[SINGLE_SOURCE_MIXUP] = (MIXUP, make_single_source_mixup)
    for name, (base, build) in builders.items():
        if name not in namespace:
            if base not in namespace:
                continue
            namespace[name] = added[name] = build(namespace[base])
        if name not in names:
            names.append(name)
    return added


def register_command_launchers(registry: MutableMapping[str, Callable]) -> None:
    """Add our command launchers (see domainbed_itl.bridge.launchers) to DomainBed's REGISTRY."""
    from .launchers import LAUNCHERS

    for name, launcher in LAUNCHERS.items():
        registry.setdefault(name, launcher)


def register(domainbed_root: Optional[str] = None) -> None:
    """Register everything into an unpatched DomainBed imported in this process.

    `domainbed_root` is the checkout to import DomainBed from when it is not on sys.path.
    """
    from .domainbed_env import import_domainbed

    algorithms = import_domainbed(domainbed_root, "domainbed.algorithms")
    hparams_registry = import_domainbed(domainbed_root, "domainbed.hparams_registry")
    command_launchers = import_domainbed(domainbed_root, "domainbed.command_launchers")
    register_algorithms(vars(algorithms))
    hparams_registry._hparams = wrap_hparams(hparams_registry._hparams)
    register_command_launchers(command_launchers.REGISTRY)
