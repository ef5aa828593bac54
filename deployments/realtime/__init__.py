"""The OpenAI Realtime (GA) transport: ``/v1/realtime`` over WebSocket, and the browser page.

- ``schema``: the client events and the session object, as pydantic models;
- ``error_events``: ``RealtimeError`` and the ``error`` events and close codes;
- ``session_config``: the session object <-> the engine's ``SessionSettings`` (``RealtimeConfig``);
- ``mapper``: engine events -> server events, with the protocol's string ids (``EventMapper``);
- ``connection``: one WebSocket driving one conversation (``RealtimeSession``);
- ``endpoint``: authentication and admission (``RealtimeAdapter``) and the FastAPI app.

It imports nothing from the gRPC transport (``deployments.grpc``); what both share is the session
floor (``deployments.sessions``, ``deployments.session_checks``). docs/realtime.md lists the
supported events and every deviation from OpenAI's behaviour.
"""
