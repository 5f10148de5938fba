"""DomainBed's datasets as facts, in one table: classes and environments per dataset.

See docs/paper_experiments.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional


@dataclass(frozen=True)
class DatasetFacts:
    """A DomainBed dataset's number of classes and of environments (domains)."""

    classes: int
    environments: int


DATASETS: Dict[str, DatasetFacts] = {
    "Debug28": DatasetFacts(2, 3), "Debug224": DatasetFacts(2, 3),
    "ColoredMNIST": DatasetFacts(2, 3), "RotatedMNIST": DatasetFacts(10, 6),
    "VLCS": DatasetFacts(5, 4), "PACS": DatasetFacts(7, 4), "OfficeHome": DatasetFacts(65, 4),
    "TerraIncognita": DatasetFacts(10, 4), "DomainNet": DatasetFacts(345, 6),
    "SVIRO": DatasetFacts(7, 10), "WILDSCamelyon": DatasetFacts(2, 5),
    "WILDSFMoW": DatasetFacts(62, 6),
}


def num_classes(dataset: Optional[str]) -> Optional[int]:
    """The classes of a DomainBed dataset of the table; None for another dataset (or None)."""
    facts = DATASETS.get(dataset) if dataset is not None else None
    return None if facts is None else facts.classes


def num_environments(dataset: Optional[str]) -> Optional[int]:
    """The environments of a DomainBed dataset of the table; None for another dataset (or None)."""
    facts = DATASETS.get(dataset) if dataset is not None else None
    return None if facts is None else facts.environments
