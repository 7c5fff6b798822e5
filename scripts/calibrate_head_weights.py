"""Measure per-head weights of the rank allocation (``head_weights``) for a model and write them as JSON.

Same as ``chunked-decomp calibrate``; see ``--help``. Example::

    python scripts/calibrate_head_weights.py --output head_weights.json
    chunked-decomp evaluate --head_weights head_weights.json --compression_ratio 0.125

``make head-weights`` regenerates the weights shipped for the default model.
"""

import sys

from chunked_decomp.cli import main

if __name__ == "__main__":
    sys.exit(main(command="calibrate", prog="calibrate_head_weights.py"))
