"""Seed 003 Table 1 on AmazonCat-13K (student width 8).

    python experiments/amazoncat13k.py                 # synthetic stand-in, scale 'cpu' (or 'full' on a GPU)
    python experiments/amazoncat13k.py --data DIR      # the real XMLRepo train.txt / test.txt
    python experiments/amazoncat13k.py --scale tiny    # a CI smoke run

See experiments/xmc.py for what is trained and measured; --help for every flag.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from xmc import AMAZONCAT13K, main

if __name__ == "__main__":
    main(AMAZONCAT13K)
