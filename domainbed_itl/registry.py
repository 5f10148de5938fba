"""The hooks' import path: DomainBed checkouts patched by any release call `domainbed_itl.registry`.

See docs/domainbed.md.
"""

from .bridge.registration import register, register_algorithms, register_command_launchers, wrap_hparams

__all__ = ["register", "register_algorithms", "register_command_launchers", "wrap_hparams"]
