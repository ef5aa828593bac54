"""The voxserve app as the graph tests deploy it: the production deployments, with the Gateway and
the LLM as subclasses that also answer what only tests ask (a session's recorded history, the LLM
engines' latest requests). Production classes keep no test-only methods."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from deployments.gateway import Gateway
from deployments.server import LocalServer, start_local
from deployments.stage_deployments import LLMDeployment


class ObservedGateway(Gateway.func_or_class):  # type: ignore[misc,name-defined]
    async def session_history(self, session_id: str) -> list[dict[str, Any]] | None:
        """The recorded history of a live or recently ended session (with interruption flags)."""
        return self.hub.history(session_id)  # type: ignore[no-any-return]

    async def pid(self) -> int:
        """This replica's process (the resume tests kill it)."""
        return os.getpid()

    async def where(self, session_id: str) -> tuple[str, bool]:
        """This replica's Ray node, and whether it holds ``session_id`` live."""
        import ray

        return ray.get_runtime_context().get_node_id(), session_id in self.hub.live


class ObservedLLM(LLMDeployment.func_or_class):  # type: ignore[misc,name-defined]
    async def recent_requests(self, n: int = 16) -> list[dict[str, Any]]:
        """The latest LLM requests (newest last), finished or aborted: finish reason ("stop",
        "length", "abort", "error"), tokens, timing, and audio samples for speech-native turns."""
        rows = [{**dataclasses.asdict(s), "engine": e.model, "audio_arch": e.audio_arch or ""}
                for e in self._engines() for s in e.recent]
        rows.sort(key=lambda r: r["finished_at"])
        return rows[-n:]


OBSERVED: dict[str, dict[str, Any]] = {"Gateway": {"func_or_class": ObservedGateway},
                                       "LLM": {"func_or_class": ObservedLLM}}


def start_observed(serve_config: dict[str, Any], **kwargs: Any) -> LocalServer:
    """``deployments.server.start_local`` with the observed Gateway and LLM."""
    return start_local(serve_config, deployment_options=OBSERVED, **kwargs)
