"""Distributed DCGAN training on Ray Train and Ray Tune, tracked in MLflow.

Importing the package imports no torch, ray or mlflow; the submodules do, each as it needs.
"""

import time
from pathlib import Path

# When this process began running pipeline code (`python -m pipeline` imports this first): the start
# that `bench` measures "command start to first training step" from.
STARTED_AT = time.time()

__version__ = "0.1.0"

# The checkout (or installed tree) that holds pipeline/: default home of runs/ and mlflow.db.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
