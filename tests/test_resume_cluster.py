"""A session outlives the node that holds its Gateway replica: a local Ray cluster of two nodes on
this machine (Ray's cluster utilities: a head and a worker, each its own raylet), a Gateway
replica on each, the model stages on the head. The worker node holding the session's replica is
removed (its processes die, as when a node is lost) and the call resumes on the head's replica
with its history. Slow: `make test-all`."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from clients.resume import Backoff, converse_resuming
from clients.voice_client import UserTurn, VoiceClient
from protos.voxserve.v1 import voice_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.serve, pytest.mark.timeout(1200)]

CONFIG = pb.SessionConfig(input_encoding=pb.PCM16, input_sample_rate=16000, language="en", max_response_tokens=24)


@pytest.fixture(scope="module")
def cluster():  # type: ignore[no-untyped-def]
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.serve.config import HTTPOptions, gRPCOptions

    from deployments.app import build_app
    from deployments.config import GRPC_SERVICER
    from deployments.profiles import load_serve_config
    from deployments.server import LOCAL_ENV, _wait_healthy, free_port, set_local_env
    from tests.graph_app import OBSERVED

    set_local_env()
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 8, "resources": {"head": 100, "gateway": 1}, "object_store_memory": 256 * 1024 * 1024,
        "include_dashboard": False})
    worker = c.add_node(num_cpus=4, resources={"gateway": 1}, object_store_memory=128 * 1024 * 1024)
    ray.init(address=c.address, runtime_env={"env_vars": dict(LOCAL_ENV)}, log_to_driver=False)
    grpc_port = free_port()
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=free_port()),
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[
                    GRPC_SERVICER, "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]))
    app = load_serve_config("cpu")["applications"][0]
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app["deployments"]}
    for opts in options.values():
        opts.pop("autoscaling_config", None)
        opts["num_replicas"] = 1
        actor = opts.setdefault("ray_actor_options", {})
        actor["resources"] = {"head": 1}  # the model stages stay on the head
    gateway = options["Gateway"]
    gateway.update(num_replicas=2, max_replicas_per_node=1, **OBSERVED["Gateway"])
    gateway["ray_actor_options"]["resources"] = {"gateway": 1}  # one per node
    options["LLM"].update(OBSERVED["LLM"])
    serve.run(build_app(app["args"], options), name="voxserve", route_prefix="/", blocking=False)
    _wait_healthy("voxserve", 900)
    yield {"cluster": c, "worker": worker, "address": f"127.0.0.1:{grpc_port}"}
    serve.shutdown()
    ray.shutdown()
    c.shutdown()


async def session_node(session_id: str, tries: int = 40) -> str | None:
    """The node of the Gateway replica holding ``session_id`` (asked of random replicas)."""
    from ray import serve

    gw = serve.get_deployment_handle("Gateway", "voxserve")
    for _ in range(tries):
        node, holds = await gw.where.remote(session_id)
        if holds:
            return str(node)
    return None


async def test_a_lost_node_does_not_lose_the_call(cluster: dict[str, Any]) -> None:
    worker_id = cluster["worker"].node_id
    client = VoiceClient(cluster["address"])
    try:
        for _ in range(6):  # the proxy picks a replica: the call must land on the worker's
            events: list[str] = []
            sessions: list[str] = []
            removed: list[float] = []

            def on_event(e: pb.ServerEvent, events: list[str] = events, sessions: list[str] = sessions) -> None:
                events.append(e.WhichOneof("event") or "")
                if e.WhichOneof("event") == "session_started":
                    sessions.append(e.session_started.session_id)

            async def remove_worker_if_it_holds_the_call(events: list[str] = events, sessions: list[str] = sessions,
                                                         removed: list[float] = removed) -> None:
                while "response_done" not in events:
                    await asyncio.sleep(0.05)
                if await session_node(sessions[0]) == worker_id:
                    await asyncio.to_thread(cluster["cluster"].remove_node, cluster["worker"])
                    removed.append(time.monotonic())

            remover = asyncio.create_task(remove_worker_if_it_holds_the_call())
            turns = [UserTurn(text="What is the capital of France?", label="q1"),
                     UserTurn(text="And of Spain?", label="q2"), UserTurn(text="Thank you.", label="q3")]
            result, report = await converse_resuming(client, turns, CONFIG, backoff=Backoff(give_up_s=120),
                                                     on_event=on_event, wait_playback=False, pause_ms=1500)
            await remover
            if removed:
                break
        else:
            pytest.fail("no session landed on the worker node's Gateway replica in 6 calls")
    finally:
        await client.close()
    assert report.resumes >= 1 and not report.lost and report.turns_lost == 0, report
    assert result.session_id == sessions[0] and result.extra_answers == 0
    assert all(t.response_text.strip() for t in result.turns)
