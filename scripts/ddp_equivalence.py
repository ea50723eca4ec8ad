"""Data parallelism against one process, as a table: two DDP workers (gloo) and one process train the same 20 steps
in float64 (tests/test_ddp.py's setup), with gradients averaged and with the injected sum, and the largest
difference of each group of tensors (relative to each tensor's largest value) is printed per rank.

    python scripts/ddp_equivalence.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import test_ddp as ddp  # noqa: E402 - the repository on the path first


def groups(differences: dict[str, float]) -> dict[str, float]:
    """The largest difference per group: G's and D's tensors, and each Adam moment of each network."""
    out: dict[str, float] = {}
    for key, value in differences.items():
        group = key.split(".")[0] + (" params and buffers" if key[0] in "GD" else f" {key.split('.')[-1]}")
        out[group] = max(out.get(group, 0.0), value)
    return out


def main() -> None:
    overrides = [*ddp.SETTINGS, "model.sync_batchnorm=true"]
    data = ddp.load(ddp.load_config(ddp.CONFIGS / "smoke.yaml", overrides).data)
    reference = ddp.single_process(overrides, data)
    tmp = Path(tempfile.mkdtemp())
    runs = {how: ddp.data_parallel(tmp, overrides, data, summed=how == "summed") for how in ("averaged", "summed")}
    columns = [(f"{how}, rank {rank}", ranks[rank]) for how, ranks in runs.items() for rank in range(ddp.WORLD)]
    rows = [groups(ddp.largest_differences(result["tensors"], reference)) for _, result in columns]
    print("| tensors | " + " | ".join(name for name, _ in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for group in rows[0]:
        print(f"| {group} | " + " | ".join(f"{row[group]:.1e}" for row in rows) + " |")


if __name__ == "__main__":
    main()
