"""`python -m domainbed_itl <command> ...`: the `domainbed-itl` console command (console.py).

See docs/testing.md.
"""

import sys

from .console import main

if __name__ == "__main__":
    sys.exit(main(program="python -m domainbed_itl"))
