"""The hooks' import path: DomainBed checkouts patched by any release call `domainbed_itl.registry`.

The patched DomainBed modules run `from domainbed_itl import registry` and call
`register_algorithms`, `wrap_hparams` and `register_command_launchers`. That path is a public
interface and stays here; the functions live in the bridge (`domainbed_itl.bridge.registration`).
"""

from .bridge.registration import register, register_algorithms, register_command_launchers, wrap_hparams

__all__ = ["register", "register_algorithms", "register_command_launchers", "wrap_hparams"]
