"""The gRPC transport: ``voxserve.v1.VoiceAssistant`` (Converse, Transcribe, Synthesize) over the
conversation engine and the shared ``SessionHub``.

- ``wire``: a stream's audio encodings and rates; the one place its audio is decoded and encoded;
- ``session_config``: a ``SessionConfig`` -> the engine's ``SessionSettings``;
- ``mapper``: engine events -> ``ServerEvent`` messages;
- ``status``: our errors -> gRPC status codes on the call;
- ``adapter``: the three methods (``GrpcAdapter``), which the Gateway deployment delegates to.

It imports nothing from the realtime transport (``deployments.realtime``); what both share is the
session floor (``deployments.sessions``, ``deployments.session_checks``).
"""
