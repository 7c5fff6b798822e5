"""Quality vs. compression: perplexity and generation fidelity per ratio, plots, a comparison study and a
recommendation.

Same as ``chunked-decomp evaluate``; see ``--help``. Example::

    python scripts/evaluate_model.py --compression_ratio 0.5 0.25 0.125 --metrics perplexity bleu rouge \
        --comparison_study --save_plots --output_dir results/evaluate
"""

import sys

from chunked_decomp.cli import main

if __name__ == "__main__":
    sys.exit(main(command="evaluate", prog="evaluate_model.py"))
