"""Process-wide state of the autoscaling policies in Serve's controller.

Serve pickles a custom policy *by value* (its module is registered with cloudpickle), so state
kept in ``deployments.autoscaling`` itself would be one copy per deployment. This module is
imported by reference: every deployment's ``VoicePolicy`` in the controller shares it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading

log = logging.getLogger("ray.serve")

#: The newest signal levels of every deployment, by "app/deployment": Serve runs every
#: deployment's policy in its one controller process, so a stage's policy can read the app-wide
#: latency the Gateway's replicas report (``budget``) without a round trip.
LEVELS: dict[str, tuple[float, dict[str, float]]] = {}


class Publisher:
    """Writes decisions to the GCS from one daemon thread: the policy runs on the controller's
    event loop, which must never wait for a GCS round trip (or a GCS restart)."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._queue: queue.Queue[tuple[bytes, bytes]] = queue.Queue(maxsize=64)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def put(self, key: bytes, value: bytes) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="voxserve-scaling-publisher", daemon=True)
                self._thread.start()
        with contextlib.suppress(queue.Full):  # a backlog means the GCS is slow: drop, never block
            self._queue.put_nowait((key, value))

    def _run(self) -> None:
        from ray.experimental import internal_kv

        while True:
            key, value = self._queue.get()
            try:
                internal_kv._internal_kv_put(key, value, overwrite=True, namespace=self.namespace)
            except Exception:  # the view is advisory: a GCS hiccup must never break scaling
                log.debug("could not publish a scaling decision", exc_info=True)


#: Namespace of the published decisions in Ray's GCS key-value store.
KV_NAMESPACE = "voxserve"
PUBLISHER = Publisher(KV_NAMESPACE)
