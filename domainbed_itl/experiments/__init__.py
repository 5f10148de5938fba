"""The paper's experiments as sweep definitions (`paper`). No DomainBed import.

See docs/paper_experiments.md.
"""
