"""Single-source domain generalisation (Sec. 4.2): planning the sweep's jobs, reading their
folders, selecting models and aggregating them, and rendering Tables 4 and 10.

See docs/single_source.md.
"""
