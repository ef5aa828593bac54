"""The conversation engine: one voice conversation, framework-free (no Ray, no gRPC).

``Conversation`` (engine.py) joins the listening side (listening.py: audio -> VAD stream ->
utterances), the ``Turn`` objects (turn.py) that own each response and the history, and the
answering side (answering.py: ASR -> LLM -> TTS stream -> the turn); protocol adapters drive it.
"""

from services.conversation.engine import Conversation
from services.conversation.history import ChatHistory
from services.conversation.observer import NullObserver, Observer
from services.conversation.settings import (
    CASCADE,
    SPEECH_NATIVE,
    Interruptions,
    SessionSettings,
    StageTimeouts,
    TurnDetection,
)
from services.conversation.stages import Stages

__all__ = ["CASCADE", "SPEECH_NATIVE", "ChatHistory", "Conversation", "Interruptions", "NullObserver",
           "Observer", "SessionSettings", "StageTimeouts", "Stages", "TurnDetection"]
