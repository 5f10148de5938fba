"""Single-source domain generalisation (Sec. 4.2): planning the sweep's jobs, reading their
folders, selecting models and aggregating them, and rendering Tables 4 and 10.

`planning` (the jobs), `runs` (job folders and the sweep manifest), `selection` (model selection
and aggregation), `tables` (rendering). None of them imports DomainBed.
"""
