"""``python -m cass.cli``: how torchrun starts each process of ``cass pretrain --nproc N``."""

import sys

from cass.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
