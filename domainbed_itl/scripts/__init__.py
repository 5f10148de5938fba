"""The commands (`python -m domainbed_itl.scripts.<command>`): thin layers over the library.

A command parses its flags, calls the library and prints; it imports the library and the shared
command-line modules (`_cli`: argument types, flag groups, devices, data loading and the one
error boundary; `_search`: what the loss-search commands share), never another command.
"""

from ._requirements import check_imports

check_imports()
