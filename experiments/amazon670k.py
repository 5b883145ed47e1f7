"""Seed 003 Table 1 on Amazon-670K: the project's main job (`make run`).

    python experiments/amazon670k.py                 # synthetic stand-in, scale 'cpu' (or 'full' on a GPU)
    python experiments/amazon670k.py --data DIR      # the real XMLRepo train.txt / test.txt
    python experiments/amazon670k.py --scale tiny    # a CI smoke run

See experiments/xmc.py for what is trained and measured; --help for every flag.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from xmc import AMAZON670K, main

if __name__ == "__main__":
    main(AMAZON670K)
