"""The HTTP gateway: OpenAI-compatible API, auth, limits, metrics, in front of vLLM replicas."""

from shipyard.gateway.app import ServedModel, create_app, upstream_client
from shipyard.gateway.auth import KeyChecker
from shipyard.gateway.errors import OpenAIError, error_body
from shipyard.gateway.metrics import GatewayMetrics

__all__ = [
    "GatewayMetrics",
    "KeyChecker",
    "OpenAIError",
    "ServedModel",
    "create_app",
    "error_body",
    "upstream_client",
]
