"""The DomainBed bridge: every module that imports DomainBed or registers into it.

See docs/domainbed.md.
"""
