"""Running experiments: the paper's experiments as sweep definitions (`paper`) and the
`submitit` command launcher for DomainBed's sweeps (`launchers`). No DomainBed import."""
