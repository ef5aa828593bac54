"""Beyond one node: on a local Ray cluster of two nodes on this machine (Ray's cluster utilities:
a head and a worker, each its own raylet), the TTS stage, under the real VoicePolicy, scales from
one replica to two when syntheses pile up; the new replica can only be placed on the node the
first one is not on (one "tts" slot per node), and it takes traffic. Then, idle, the stage scales back down."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from deployments.stage_deployments import TTSDeployment

pytestmark = [pytest.mark.serve, pytest.mark.timeout(600)]

LONG_TEXT = ("The quick brown fox jumps over the lazy dog while the sun sets behind the hills. " * 3).strip()


class ObservedTTS(TTSDeployment.func_or_class):  # type: ignore[misc,name-defined]
    async def __init__(self, config: dict[str, Any] | None = None) -> None:  # type: ignore[misc]
        super().__init__(config)
        self.served = 0

    async def synthesize(self, text: str, sample_rate: int = 0, slack_s: float | None = None) -> AsyncIterator[bytes]:
        self.served += 1
        async for chunk in super().synthesize(text, sample_rate, slack_s):
            yield chunk

    async def where(self) -> tuple[str, int, int]:
        """This replica's Ray node, process and syntheses served."""
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid(), self.served


@pytest.fixture(scope="module")
def cluster():  # type: ignore[no-untyped-def]
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from deployments.server import LOCAL_ENV, set_local_env

    set_local_env()
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"tts": 1}, "object_store_memory": 128 * 1024 * 1024,
        "include_dashboard": False})
    worker = c.add_node(num_cpus=2, resources={"tts": 1}, object_store_memory=128 * 1024 * 1024)
    ray.init(address=c.address, runtime_env={"env_vars": dict(LOCAL_ENV)}, log_to_driver=False)
    serve.start()
    tts = serve.deployment(ObservedTTS, name="TTS").options(
        max_ongoing_requests=8, ray_actor_options={"num_cpus": 0.5, "resources": {"tts": 1}},
        autoscaling_config={
            "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4,
            "upscale_delay_s": 0.5, "downscale_delay_s": 5, "metrics_interval_s": 0.5, "look_back_period_s": 2,
            "policy": {"policy_function": "deployments.autoscaling:VoicePolicy",
                       "policy_kwargs": {"counts": {"syntheses": 1}, "ratios": {"rtf": 0.5}}}})
    serve.run(tts.bind({}), name="tts2", route_prefix=None, blocking=False)
    deadline = time.monotonic() + 300
    while serve.status().applications.get("tts2") is None or serve.status().applications["tts2"].status != "RUNNING":
        assert time.monotonic() < deadline, "the TTS app did not start"
        time.sleep(0.5)
    head_id = ray.get_runtime_context().get_node_id()
    yield {"worker": worker.node_id, "head": head_id}
    serve.shutdown()
    ray.shutdown()
    c.shutdown()


def running_replicas() -> int:
    from ray import serve
    from ray.serve._private.common import ReplicaState

    return int(serve.status().applications["tts2"].deployments["TTS"].replica_states.get(ReplicaState.RUNNING, 0))


async def test_an_extra_tts_replica_lands_on_the_other_node_and_takes_traffic(cluster: dict[str, Any]) -> None:
    from ray import serve

    tts = serve.get_deployment_handle("TTS", "tts2")
    assert running_replicas() == 1
    first_node, _, _ = await tts.where.remote()
    other = cluster["worker"] if first_node == cluster["head"] else cluster["head"]
    stop = asyncio.Event()

    async def caller() -> None:
        while not stop.is_set():
            async for _ in tts.options(stream=True).synthesize.remote(LONG_TEXT):
                pass

    callers = [asyncio.create_task(caller()) for _ in range(4)]
    try:
        deadline = time.monotonic() + 180
        while await asyncio.to_thread(running_replicas) < 2:
            assert time.monotonic() < deadline, "TTS did not scale to two replicas under load"
            await asyncio.sleep(0.5)
        # keep the load on a little: the new replica must take some of it
        await asyncio.sleep(8)
        seen: dict[str, tuple[int, int]] = {}
        for _ in range(400):  # the router may pick the same replica many times in a row
            node, pid, served = await tts.where.remote()
            seen[node] = (pid, served)
            if len(seen) == 2:
                break
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.gather(*callers, return_exceptions=True)
    # one "tts" slot per node: the new replica can only be on the node the first one is not on
    assert set(seen) == {cluster["head"], cluster["worker"]}, seen
    assert seen[other][1] > 0, f"the new replica (node {other}) served nothing: {seen}"
    # idle again: back to one replica after the downscale delay
    deadline = time.monotonic() + 120
    while await asyncio.to_thread(running_replicas) > 1:
        assert time.monotonic() < deadline, "TTS did not scale back down when idle"
        await asyncio.sleep(0.5)
