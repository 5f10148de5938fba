"""Test double for `domainbed.algorithms`, written for domainbed-itl's tests (no DomainBed code).

It keeps only the names domainbed-itl's bridge relies on: the `ALGORITHMS` list, the
`get_algorithm_class` lookup (which must also find classes the bridge adds to this module), an
`Algorithm` base class and an `ERM` to subclass, here a linear softmax classifier.
"""

import math
import sys

import torch
from torch import nn
from torch.nn import functional as F

ALGORITHMS = ["ERM"]


def get_algorithm_class(algorithm_name):
    """The class called `algorithm_name` in this module, registered ones included."""
    found = getattr(sys.modules[__name__], algorithm_name, None)
    if not (isinstance(found, type) and issubclass(found, Algorithm)):
        raise NotImplementedError(f"the stand-in has no algorithm {algorithm_name!r}")
    return found


class Algorithm(nn.Module):
    """What the bridge calls: `update(minibatches, unlabeled)` returns a dict of floats,
    `predict(x)` returns logits."""

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__()
        self.hparams = hparams

    def update(self, minibatches, unlabeled=None):
        raise NotImplementedError

    def predict(self, x):
        raise NotImplementedError


class ERM(Algorithm):
    """Linear softmax regression on the flattened images of every domain at once, by Adam."""

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.network = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=hparams["lr"],
                                          weight_decay=hparams["weight_decay"])

    def update(self, minibatches, unlabeled=None):
        inputs, labels = (torch.cat(parts) for parts in zip(*minibatches))
        loss = F.cross_entropy(self.predict(inputs), labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss)}

    def predict(self, x):
        return self.network(x)
