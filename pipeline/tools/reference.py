"""docs/config.md, generated from the code: every config key with its default and doc (pipeline.config.schema),
the metrics a run is scored by (pipeline.eval.metrics) and the schedulers a sweep can use (pipeline.sweep.schedulers).
``python -m pipeline config --markdown > docs/config.md`` writes it; tests/test_config.py keeps it current."""

from __future__ import annotations

import dataclasses

from pipeline.config.load import describe_fields
from pipeline.config.schema import PipelineConfig
from pipeline.eval.metrics import CHAMPION_METRIC, DEFAULT_RANKING, METRICS
from pipeline.sweep.schedulers import SCHEDULERS

HEAD = """# Configuration

Generated from the code by `python -m pipeline config --markdown` (tests/test_config.py fails when it is stale).

A run's config is the defaults below, then a YAML file (`--config`, listing only what it changes), then each
`--set section.key=value` (repeatable; values read as YAML). Unknown keys, wrong types, out-of-range values and
rules broken across keys stop the command before any work, with exit code 2 and one line naming the key and the
fix. `python -m pipeline config -c FILE` prints the resolved config; `python -m pipeline config --keys` lists the
keys below in a terminal.
"""


def config_markdown() -> str:
    """The whole page."""
    parts = [HEAD.rstrip()]
    for section in dataclasses.fields(PipelineConfig):
        rows = [row for row in describe_fields() if row[0].startswith(f"{section.name}.")]
        parts.append(f"\n## {section.name}\n\n| key | default | meaning |\n|---|---|---|")
        parts += [f"| `{key}` | {_shown(default)} | {_escaped(doc)} |" for key, default, doc in rows]
    parts.append(
        "\n## Metrics\n\nWhat runs are scored by (`pipeline/eval/metrics.py`, one entry each). `tune.metric` takes "
        f"one that can rank trials (null: {DEFAULT_RANKING.name}); the Model Registry's champion and the checkpoints "
        f"Ray Train keeps are chosen by {CHAMPION_METRIC.name}.\n\n| metric | shown as | better | can rank | "
        "compares with the test split | meaning |\n|---|---|---|---|---|---|"
    )
    parts += [
        f"| `{m.name}` | {m.label} | {'lower' if m.mode == 'min' else 'higher'} | {'yes' if m.ranks else 'no'} | "
        f"{'yes' if m.compares else 'no'} | {_escaped(m.doc)} |"
        for m in METRICS.values()
    ]
    parts.append(
        "\n## Schedulers\n\n`tune.scheduler` (`pipeline/sweep/schedulers.py`, one entry each).\n\n"
        "| scheduler | what it does |\n|---|---|"
    )
    parts += [f"| `{s.name}` | {_escaped(s.doc)} |" for s in SCHEDULERS.values()]
    return "\n".join(parts) + "\n"


def _shown(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`" if value != "" else "`''`"


def _escaped(text: str) -> str:
    return text.replace("|", "\\|")
