"""A stand-in for DomainBed's package (see ../README.md): what domainbed-itl's bridge touches."""
