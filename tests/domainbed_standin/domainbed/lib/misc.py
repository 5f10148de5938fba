"""Stand-in of DomainBed's misc helpers: only `seed_hash`."""

import hashlib


def seed_hash(*args):
    """A seed in [0, 2**31) derived from the arguments' text by md5."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2 ** 31)
