"""``python -m chunked_decomp.cli``: the ``chunked-decomp`` command."""

import sys

from chunked_decomp.cli import main

sys.exit(main())
