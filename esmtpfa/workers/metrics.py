"""One ``/metrics`` for all workers: the supervisor merges what each worker counts.

Each worker keeps its own registry (``esmtpfa.metrics.RelayMetrics``), live collectors
included; on a scrape the supervisor asks every worker for a ``snapshot`` (plain data
over the control channel) and merges them.  Why not prometheus_client's multiprocess
mode: its values live in files that every increment writes through, its live gauges
cannot run collectors that read objects at scrape time (providers, open connections),
and it needs an environment variable set before the library is imported.  Merging a
few hundred samples per scrape costs less than any of that, and only when scraped.

How samples merge (docs/metrics.md, "Workers"):

* counters and histograms **add up** over workers.  A worker that dies takes its counts
  with it, which would make the sums go backwards; the supervisor adds the last
  snapshot it had of that worker to what it keeps for the retired
  (``RetiredCounts``), so sums only grow (by at most what the dead worker counted since
  the last scrape: that much is lost);
* gauges add up (open connections), except those every worker reports the same way:
  ``configured_providers``, the reload timestamp and the spool's gauges (every worker
  reads the same spool) take the highest value,
  ``config_last_reload_successful`` and ``oauth2_token_expiry_seconds`` the lowest (one
  worker that failed a reload, or whose token is about to run out, shows);
* ``config_reloads_total`` takes the highest value: every worker applies every reload,
  so a sum would count each reload once per worker.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

#: Metric names (without namespace) merged by highest or lowest value instead of a sum.
HIGHEST = ("configured_providers", "config_last_reload_success_timestamp_seconds",
           "config_reloads", "spool_messages", "spool_bytes",
           "spool_oldest_message_age_seconds")
LOWEST = ("config_last_reload_successful", "oauth2_token_expiry_seconds")

#: A family as plain data: name, type, help, then [sample name, labels, value] lists.
Snapshot = list[dict[str, Any]]


def snapshot(families: Iterable[Metric]) -> Snapshot:
    """A registry's families as JSON-able data (``_created`` samples left out)."""
    return [{"name": family.name, "type": family.type, "help": family.documentation,
             "samples": [[s.name, s.labels, s.value] for s in family.samples
                         if not s.name.endswith("_created")]}
            for family in families]


def _rule(name: str, namespace: str) -> Any:
    bare = name[len(namespace) + 1:] if namespace and name.startswith(namespace + "_") \
        else name
    if bare in HIGHEST:
        return max
    if bare in LOWEST:
        return min
    return None  # a sum


def merge(snapshots: Iterable[Snapshot], namespace: str = "") -> list[Metric]:
    """The families of all snapshots, each sample merged by its family's rule; families
    and samples keep the order in which they were first seen."""
    families: OrderedDict[str, tuple[dict, OrderedDict]] = OrderedDict()
    for families_of_one in snapshots:
        for family in families_of_one:
            known = families.get(family["name"])
            if known is None:
                known = families[family["name"]] = (family, OrderedDict())
            meta, values = known
            rule = _rule(family["name"], namespace)
            for name, labels, value in family["samples"]:
                key = (name, tuple(sorted(labels.items())))
                if key not in values:
                    values[key] = value
                elif rule is None:
                    values[key] += value
                else:
                    values[key] = rule(values[key], value)
    merged = []
    for name, (meta, values) in families.items():
        metric = Metric(name, meta["help"], meta["type"])
        metric.samples = [Sample(sample, dict(labels), value)
                          for (sample, labels), value in values.items()]
        merged.append(metric)
    return merged


class RetiredCounts:
    """What workers that are gone had counted (counters and histograms only), so the
    merged sums never go backwards when a worker is replaced."""

    def __init__(self) -> None:
        self._merged: Snapshot = []

    def retire(self, last: Snapshot | None, namespace: str = "") -> None:
        if not last:
            return
        kept = [family for family in last
                if family["type"] in ("counter", "histogram", "summary")
                and _rule(family["name"], namespace) is None]
        # Folded into one snapshot, so restarts never make the list grow.
        self._merged = snapshot(merge([self._merged, kept], namespace))

    def snapshot(self) -> Snapshot:
        return self._merged


__all__ = ["RetiredCounts", "merge", "snapshot"]
