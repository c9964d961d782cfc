"""One ``/metrics`` for all workers: the supervisor merges what each worker counts.

Each worker keeps its own registry (``esmtpfa.web.metrics.RelayMetrics``), live collectors
included; on a scrape the supervisor asks every worker for a ``snapshot`` (plain data
over the control channel) and merges them.  The scrape does not read prometheus_client's
multiprocess files: collectors that read live objects at scrape time (providers, open
connections) have no file, and the merge rules below need each worker's own values.

What a worker counts must outlive it, even a SIGKILL right after a 250: the supervisor
starts every worker in prometheus_client's multiprocess mode, in a directory of its own
(``CountFiles``), so each increment is written to a memory-mapped file, in the kernel's
page cache the moment it is made.  When a worker dies, the supervisor reads that
worker's counters and histograms from its files, adds them to what it keeps for the
retired (``RetiredCounts``) and removes the files.  Sums only grow, and lose nothing.

How samples merge (docs/metrics.md, "Workers"):

* counters and histograms **add up** over workers, the retired included;
* gauges add up (open connections), except those every worker reports the same way:
  ``configured_providers``, the reload timestamp and the spool's gauges (every worker
  reads the same spool) take the highest value,
  ``config_last_reload_successful``, ``oauth2_token_expiry_seconds`` and
  ``tls_certificate_expiry_seconds`` the lowest (one worker that failed a reload, whose
  token is about to run out, or that still serves an old certificate, shows);
* ``config_reloads_total`` takes the highest value: every worker applies every reload,
  so a sum would count each reload once per worker;
* ``process_*`` are not merged at all: they describe one process (its start time, open
  files, resident memory), so a sum or a maximum would describe none.  Each worker's
  come labelled ``worker="N"`` (``of_worker``), beside the supervisor's own unlabelled
  ones; prometheus_client's multiprocess collector, which leaves them out, is not used
  for scrapes.  A dead worker's are dropped with it: its replacement is a new process.
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from typing import Any, Iterable

from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.samples import Sample

#: Metric names (without namespace) merged by highest or lowest value instead of a sum.
HIGHEST = ("configured_providers", "config_last_reload_success_timestamp_seconds",
           "config_reloads", "spool_messages", "spool_bytes",
           "spool_oldest_message_age_seconds", "build_info")
#: Families of one process (prometheus_client's ``ProcessCollector``): never merged.
PROCESS_PREFIX = "process_"
LOWEST = ("config_last_reload_successful", "oauth2_token_expiry_seconds",
          "tls_certificate_expiry_seconds")

#: A family as plain data: name, type, help, then [sample name, labels, value] lists.
Snapshot = list[dict[str, Any]]


def snapshot(families: Iterable[Metric]) -> Snapshot:
    """A registry's families as JSON-able data (``_created`` samples left out)."""
    return [{"name": family.name, "type": family.type, "help": family.documentation,
             "samples": [[s.name, s.labels, s.value] for s in family.samples
                         if not s.name.endswith("_created")]}
            for family in families]


def of_worker(families: Snapshot, number: int) -> Snapshot:
    """A worker's snapshot with its ``process_*`` samples labelled ``worker="N"``
    (``N`` its slot: bounded by ``--workers``), so that no merge adds them up."""
    labelled = []
    for family in families:
        if family["name"].startswith(PROCESS_PREFIX):
            family = dict(family, samples=[[name, dict(labels, worker=str(number)), value]
                                           for name, labels, value in family["samples"]])
        labelled.append(family)
    return labelled


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


class CountFiles:
    """The directory where the workers' values live in memory-mapped files
    (prometheus_client's multiprocess mode), private to one supervisor.

    prometheus_client picks the mode when it is imported, from ``PROMETHEUS_MULTIPROC_DIR``
    (``environment()``): set for the workers, which the supervisor starts, never for the
    supervisor itself, whose registry stays in memory.  The files of one process are
    named ``<kind>_<pid>.db``; the supervisor reads a dead worker's files and removes
    them before any new worker starts, so a reused pid begins at zero."""

    VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
    #: The kinds of file that hold counters and histograms (gauges are read live).
    COUNTED = ("counter", "histogram")

    def __init__(self, path: str):
        self.path = path

    @classmethod
    def create(cls) -> CountFiles:
        """A new, empty directory that only this user may enter."""
        return cls(tempfile.mkdtemp(prefix="esmtpfa-metrics-"))  # mode 0700

    def environment(self) -> dict[str, str]:
        return {self.VARIABLE: self.path}

    def counts_of(self, pid: int) -> Snapshot:
        """What process ``pid`` counted, to its last increment, as a snapshot."""
        paths = [os.path.join(self.path, f"{kind}_{pid}.db") for kind in self.COUNTED]
        present = [path for path in paths if os.path.exists(path)]
        return snapshot(MultiProcessCollector.merge(present, accumulate=True))

    def forget(self, pid: int) -> None:
        """Remove the files of process ``pid`` (every kind, gauges included)."""
        suffix = f"_{pid}.db"
        for name in os.listdir(self.path):
            if name.endswith(suffix):
                _remove(os.path.join(self.path, name))

    def remove(self) -> None:
        for name in os.listdir(self.path):
            _remove(os.path.join(self.path, name))
        try:
            os.rmdir(self.path)
        except OSError:
            pass


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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
                and _rule(family["name"], namespace) is None
                and not family["name"].startswith(PROCESS_PREFIX)]
        # Folded into one snapshot, so restarts never make the list grow.
        self._merged = snapshot(merge([self._merged, kept], namespace))

    def snapshot(self) -> Snapshot:
        return self._merged


__all__ = ["CountFiles", "RetiredCounts", "merge", "of_worker", "snapshot"]
