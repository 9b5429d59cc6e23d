"""Prometheus metrics for `/lb/metrics` (prometheus_client).

Counts that already live on the cluster are read at scrape time, so nothing is added to
the hot path; only job durations and dispatch gaps are observed as they happen.  Each
cluster has its own registry (several may live in one process, in tests).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Iterator, Mapping, Protocol

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .ledger import COUNTERS
from .peer import Peer

log = logging.getLogger(__name__)


class TaskCounts(Protocol):
    """What the metrics read of the task ledger."""

    @property
    def counts(self) -> Mapping[str, int]: ...
    def queue_depth(self) -> int: ...
    def remaining(self) -> int: ...


JOB_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, peers: Callable[[], Iterable[Peer]], tasks: TaskCounts) -> None:
        self.registry = CollectorRegistry()
        self.job_seconds = Histogram("comfylb_job_duration_seconds", "Time from execution_start to its end, per peer",
                                     ["peer"], buckets=JOB_BUCKETS, registry=self.registry)
        self.gap_seconds = Histogram("comfylb_dispatch_gap_seconds",
                                     "From a peer freeing a slot while work waited to its next prompt being sent",
                                     ["peer"], buckets=GAP_BUCKETS, registry=self.registry)
        self.registry.register(_ClusterCollector(peers, tasks))

    def job(self, peer: str, seconds: float) -> None:
        self.job_seconds.labels(peer).observe(seconds)

    def gap(self, peer: str, seconds: float) -> None:
        self.gap_seconds.labels(peer).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _ClusterCollector:
    def __init__(self, peers: Callable[[], Iterable[Peer]], tasks: TaskCounts) -> None:
        self.peers = peers
        self.tasks = tasks

    def collect(self) -> Iterator[Metric]:
        c = self.tasks
        peers = list(self.peers())
        gauges = {
            "comfylb_peer_in_flight": ("Prompts held on the peer (running + waiting in its queue)",
                                       lambda p: len(p.inflight)),
            "comfylb_peer_max_queue": ("The peer's max_queue", lambda p: p.cfg.max_queue),
            "comfylb_peer_healthy": ("1 if its health checks pass", lambda p: int(p.health.healthy)),
            "comfylb_peer_available": ("1 if it gets new work (enabled, linked, healthy)", lambda p: int(p.available)),
            "comfylb_peer_job_time_seconds": ("Moving average of its job time", lambda p: p.job_time or 0.0),
        }
        for name, (doc, value) in gauges.items():
            g = GaugeMetricFamily(name, doc, labels=["peer"])
            for p in peers:
                g.add_metric([p.name], value(p))
            yield g
        jobs = CounterMetricFamily("comfylb_peer_jobs", "Jobs that ran on the peer, by outcome", labels=["peer", "outcome"])
        for p in peers:
            jobs.add_metric([p.name, "success"], p.jobs_done - p.jobs_failed)
            jobs.add_metric([p.name, "error"], p.jobs_failed)
        yield jobs
        yield GaugeMetricFamily("comfylb_queue_depth", "Prompts waiting in the coordinator", value=c.queue_depth())
        yield GaugeMetricFamily("comfylb_queue_remaining", "Unfinished prompts (ComfyUI's queue_remaining)",
                                value=c.remaining())
        tasks = CounterMetricFamily("comfylb_tasks", "Prompts by what happened to them", labels=["event"])
        for key in COUNTERS:
            tasks.add_metric([key], c.counts.get(key, 0))
        yield tasks
