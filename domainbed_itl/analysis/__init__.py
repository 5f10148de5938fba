"""Analyses of sweep results and of learned losses: small pure functions, no DomainBed.

See docs/analyses.md.
"""
