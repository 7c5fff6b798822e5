"""Compress the KV cache of a model at several settings and report compression, quality and memory.

Same as ``chunked-decomp compress``; see ``--help``. Example::

    python scripts/run_compression.py --test_mode
    python scripts/run_compression.py --compression_ratio 0.5 0.25 --chunk_size 32 64 --output_dir results/compress
"""

import sys

from chunked_decomp.cli import main

if __name__ == "__main__":
    sys.exit(main(command="compress", prog="run_compression.py"))
