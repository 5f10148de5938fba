"""Analyses of sweep results: Friedman and Nemenyi tests with critical-difference diagrams
(`friedman_nemenyi`) and DomainBed's multi-source accuracies as blocks for them (`multi_source`).
No DomainBed import: DomainBed's selection functions are handed in by the caller."""
