"""Memory, quality and speed over sequence lengths and batch sizes, memory timelines and recommendations.

Same as ``chunked-decomp benchmark``; see ``--help``. Example::

    python scripts/benchmark_memory.py --sequence_lengths 512 1024 2048 --batch_sizes 1 4 \
        --compression_ratios 0.5 0.25 0.125 --profile_compression --save_timeline --output_dir results/benchmark
"""

import sys

from chunked_decomp.cli import main

if __name__ == "__main__":
    sys.exit(main(command="benchmark", prog="benchmark_memory.py"))
