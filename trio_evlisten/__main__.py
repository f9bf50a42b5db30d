"""``python -m trio_evlisten``: the command line (see :mod:`trio_evlisten._cli`)."""

from __future__ import annotations

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
