"""The commands (`python -m domainbed_itl.scripts.<command>`): thin layers over the library.

See docs/testing.md.
"""

from ._requirements import check_imports

check_imports()
