"""One ``/metrics`` for several router processes (``RouterConfig.processes``).

Each router process records its own requests in its own Prometheus registry. The first process serves
``/metrics``; the launcher hands it every other process's samples each second (:func:`own_samples`
there, ``RouterMetrics.set_process_samples`` here), and :class:`MergedCollector` adds them into the
first's families at scrape time: counters, histograms and the in-flight gauge sum over the processes,
the event-loop lag and GC pause gauges take the largest. A process that restarted starts its counters
from zero again, which Prometheus reads as a counter reset (``rate()`` handles it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

#: (family name, sample name, sorted labels, value): one sample of a router process's own series.
Sample = tuple[str, str, tuple[tuple[str, str], ...], float]

#: Families that take the largest value over the processes instead of the sum.
MAX_FAMILIES = frozenset({"pdserve:router_event_loop_lag_seconds", "pdserve:router_gc_pause_seconds"})


def own_samples(registry: CollectorRegistry) -> list[Sample]:
    """Every sample of ``registry`` (a router process's own series), as another process merges them."""
    return [(family.name, s.name, tuple(sorted(s.labels.items())), float(s.value))
            for family in registry.collect() for s in family.samples]


class MergedCollector(Collector):
    """The families of ``own`` with the samples of ``others()`` (other processes' :func:`own_samples`)
    merged in: summed, or the largest for :data:`MAX_FAMILIES`; a sample only another process has is
    added to its family."""

    def __init__(self, own: CollectorRegistry, others: Callable[[], Iterable[list[Sample]]]) -> None:
        self._own = own
        self._others = others

    def collect(self) -> Iterator[Metric]:
        extra: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for samples in self._others():
            for family_name, name, labels, value in samples:
                merged = extra.setdefault(family_name, {})
                key = (name, labels)
                merged[key] = (max(merged.get(key, value), value) if family_name in MAX_FAMILIES
                               else merged.get(key, 0.0) + value)
        for family in self._own.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            theirs = extra.get(family.name, {})
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                other = theirs.pop(key, None)
                value = s.value if other is None else (max(s.value, other) if family.name in MAX_FAMILIES
                                                      else s.value + other)
                out.add_sample(s.name, s.labels, value, s.timestamp, s.exemplar)
            for (name, labels), value in theirs.items():  # series only the other processes have
                out.add_sample(name, dict(labels), value)
            yield out
