"""domainbed-itl: ITL, the learned Taylor loss of Gao et al. (ICML 2022), as a DomainBed plugin."""

__version__ = "0.1.0"
