"""``python -m anomaly_dask``: the ``anomaly-dask`` command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
