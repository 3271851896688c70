"""`python -m lorakit ...` is the `lorakit` command."""

import sys

from .cli import main

if __name__ == "__main__":  # not on import (pytest --doctest-modules imports every module it is given)
    sys.exit(main())
