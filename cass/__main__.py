"""``python -m cass``: the ``cass`` command (:func:`cass.cli.main`)."""

import sys

from cass.cli import main

if __name__ == "__main__":
    sys.exit(main())
