"""Process metrics for Prometheus: latencies, images, failures and refusals.

Queue depth by status and the pause switches are read from the database at scrape time (see
:mod:`bot.web`); what only a process can see (how long its claims, batches and posts take, what
failed and why) is recorded here. One :class:`Metrics` per process, owned by the App; ``/metrics``
serves it next to the database gauges.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.claim_seconds = Histogram("dallebot_claim_seconds", "Time to claim a batch from the queue",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.generate_seconds = Histogram("dallebot_generate_seconds", "Time to generate one batch",
                                          buckets=_LATENCY_BUCKETS, registry=r)
        self.post_seconds = Histogram("dallebot_post_seconds", "Time to deliver one reply",
                                      ["platform"], buckets=_LATENCY_BUCKETS, registry=r)
        self.request_seconds = Histogram("dallebot_request_to_reply_seconds",
                                         "From a request's arrival to its reply being posted", ["platform"],
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.images = Counter("dallebot_images_generated", "Images generated", registry=r)
        self.batches = Counter("dallebot_batches", "Generation batches run", registry=r)
        self.posted = Counter("dallebot_replies_posted", "Replies posted", ["platform"], registry=r)
        # reason: generation_error (the model run failed), save_error (an image could not be written),
        # prompt_unreadable (the model could not read the prompt), settings_unusable (a seed or image
        # count the model refuses), delivery_permanent / delivery_transient (the platform refused the
        # reply for good / for now), delivery_retry (a delivery retried within its attempt)
        self.failures = Counter("dallebot_failures", "Failures by reason", ["reason"], registry=r)
        self.refusals = Counter("dallebot_refusals", "Requests refused at intake, by reason", ["reason"],
                                registry=r)
        self.held = Counter("dallebot_held_for_review", "Requests held for a moderator", registry=r)
