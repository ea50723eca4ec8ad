"""Distributed DCGAN training on Ray Train and Ray Tune, tracked in MLflow.

The packages, bottom to top (each imports only those below it; docs/design.md is the map): ``core``, ``data``,
``config``, ``gan``, ``eval``, ``tracking``, ``distributed``, ``sweep``, ``tools``; ``cli`` on top. Importing the
package imports no torch, ray or mlflow; the modules do, each as it needs.
"""

import time
from pathlib import Path

from pipeline import legacy

# When this process began running pipeline code (`python -m pipeline` imports this first): the start
# that `bench` measures "command start to first training step" from.
STARTED_AT = time.time()

__version__ = "0.1.0"

# The checkout (or installed tree) that holds pipeline/: default home of runs/ and mlflow.db.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

legacy.install()  # sweeps saved by earlier versions name modules that have moved since
