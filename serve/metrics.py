"""Prometheus metrics of one server, through prometheus-client, in a registry of its own
(so two servers in one process, as in the tests, do not share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

# Generation times run from tens of milliseconds (a tiny model) to minutes (SDXL on a CPU).
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 600)
STAGES = ("text_encoder", "vae_encoder", "unet", "vae_decoder", "safety_checker", "total")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("sdrt_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.latency = Histogram("sdrt_request_seconds", "time from a request's arrival to its answer, by route",
                                 ["route"], buckets=SECONDS, registry=r)
        self.queue_wait = Histogram("sdrt_queue_wait_seconds", "time a job waited in the queue before it ran",
                                    buckets=SECONDS, registry=r)
        self.stage = Histogram("sdrt_stage_seconds", "seconds per generation stage per job (unet: all the "
                               "denoising steps; total: the whole generation)", ["stage"], buckets=SECONDS,
                               registry=r)
        self.batch_items = Histogram("sdrt_batch_items", "images per engine call (an artifact exported with "
                                     "--batch N runs up to N, from one request or several)",
                                     buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.queue_depth = Gauge("sdrt_queue_depth", "jobs waiting in the queue", registry=r)
        self.running = Gauge("sdrt_jobs_running", "jobs generating now", registry=r)
        self.images = Counter("sdrt_images_generated", "images generated, by model", ["model"], registry=r)
        self.rejected = Counter("sdrt_jobs_rejected", "jobs refused or dropped, by reason (queue_full, deadline, "
                                "disconnected, interrupted)", ["reason"], registry=r)
        self.load_seconds = Gauge("sdrt_model_load_seconds", "seconds the model's engines took to load",
                                  ["model"], registry=r)
        self.ready = Gauge("sdrt_ready", "1 when every served model is loaded", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def job_done(self, model: str, images: int, stages: dict[str, float], queue_wait: float) -> None:
        self.images.labels(model).inc(images)
        self.queue_wait.observe(queue_wait)
        for name, seconds in stages.items():
            self.stage.labels(name).observe(seconds)
