"""Stand-in of DomainBed's algorithms: an ERM whose supervised loss is `F.cross_entropy`."""

import math

import torch
import torch.nn.functional as F

ALGORITHMS = ["ERM"]


def get_algorithm_class(algorithm_name):
    """The algorithm class named `algorithm_name`, looked up in this module."""
    if algorithm_name not in globals():
        raise NotImplementedError(f"Algorithm not found: {algorithm_name}")
    return globals()[algorithm_name]


class Algorithm(torch.nn.Module):
    """The interface: update(minibatches) -> dict of floats, predict(x) -> logits."""

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__()
        self.hparams = hparams

    def update(self, minibatches, unlabeled=None):
        raise NotImplementedError

    def predict(self, x):
        raise NotImplementedError


class ERM(Algorithm):
    """A linear classifier on the flattened input, trained by Adam on the cross-entropy of the
    concatenated minibatches of all training domains."""

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.network = torch.nn.Sequential(torch.nn.Flatten(),
                                           torch.nn.Linear(math.prod(input_shape), num_classes))
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=hparams["lr"],
                                          weight_decay=hparams["weight_decay"])

    def update(self, minibatches, unlabeled=None):
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        loss = F.cross_entropy(self.predict(all_x), all_y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}

    def predict(self, x):
        return self.network(x)
