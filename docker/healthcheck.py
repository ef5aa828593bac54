"""Container health check: the standard gRPC health service of a local `voxserve serve`.

Exit 0 when ``grpc.health.v1.Health/Check`` answers SERVING for voxserve.v1.VoiceAssistant on
127.0.0.1:$VOXSERVE_GRPC_PORT (default 9000), else 1. Health checks need no API key.
Kubernetes ignores an image's HEALTHCHECK: the Helm chart declares its own gRPC probes.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    address = f"127.0.0.1:{os.environ.get('VOXSERVE_GRPC_PORT', '9000')}"
    request = health_pb2.HealthCheckRequest(service="voxserve.v1.VoiceAssistant")
    try:
        with grpc.insecure_channel(address) as channel:
            # Serve routes the call by application; "voxserve" is the app's name.
            reply = health_pb2_grpc.HealthStub(channel).Check(
                request, timeout=5, metadata=(("application", "voxserve"),))
    except grpc.RpcError as exc:
        print(f"unhealthy: {exc.code().name}", file=sys.stderr)
        return 1
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
