"""Reads an OpenMetrics exposition on stdin and prints its samples as JSON lines
({"family", "type", "name", "labels", "value"}), using prometheus_client's strict
OpenMetrics parser: a malformed exposition makes it exit non-zero with the parser's error."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        print(json.dumps({
            "family": family.name,
            "type": family.type,
            "name": sample.name,
            "labels": sample.labels,
            "value": sample.value,
        }))
