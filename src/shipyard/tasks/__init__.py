"""Task endpoints' domain logic (no I/O): intent classification and templated complaint replies."""

from shipyard.tasks.intent import IntentDecode, IntentRequest, IntentResponse, LabelSet, load_labels
from shipyard.tasks.reply import ReplyDraft, ReplyRequest, ReplyResponse, ReplyTemplate, load_templates

__all__ = [
    "IntentDecode",
    "IntentRequest",
    "IntentResponse",
    "LabelSet",
    "ReplyDraft",
    "ReplyRequest",
    "ReplyResponse",
    "ReplyTemplate",
    "load_labels",
    "load_templates",
]
