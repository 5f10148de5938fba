"""domainbed-itl: ITL, the learned Taylor loss of Gao et al. (ICML 2022), as a DomainBed plugin.

See docs/domainbed.md.
"""

__version__ = "0.1.0"


def register(domainbed_root: "str | None" = None) -> None:
    """Register ITL, the robust-loss algorithms and launchers into an unpatched DomainBed."""
    from .bridge.registration import register as _register

    _register(domainbed_root)
