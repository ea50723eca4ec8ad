"""Distributed DCGAN training on Ray Train and Ray Tune, tracked in MLflow.

Importing the package imports no torch, ray or mlflow; the submodules do, each as it needs.
"""

from pathlib import Path

__version__ = "0.1.0"

# The checkout (or installed tree) that holds pipeline/: default home of runs/ and mlflow.db.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
