"""Write the PrometheusRule of the monitoring component from tfshield-rules.yml.

tfshield-rules.yml is the one source of the rules (promtool checks and tests
it); the Prometheus Operator wants the same groups wrapped in a
PrometheusRule. Run after editing the rules:

    python deploy/prometheus/sync_prometheusrule.py

tests/deploy/test_prometheus.py fails while the two disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "tfshield-rules.yml"
TARGET = HERE.parent / "kubernetes" / "components" / "monitoring" / "prometheusrule.yaml"
HEADER = "# Generated from deploy/prometheus/tfshield-rules.yml by sync_prometheusrule.py: edit that file.\n"


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, descriptions) as literal blocks, as a person writes them."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def prometheus_rule(groups: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "tfshield",
            "labels": {
                "app.kubernetes.io/name": "tfshield",
                "app.kubernetes.io/part-of": "tfshield",
            },
        },
        "spec": groups,
    }


def render() -> str:
    groups = yaml.safe_load(RULES.read_text())
    body = yaml.dump(prometheus_rule(groups), Dumper=_BlockDumper, sort_keys=False, width=120)
    return HEADER + body


def main() -> int:
    TARGET.write_text(render())
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
