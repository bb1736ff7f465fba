"""The chat page: a Gradio front end that talks to the gateway like any other client."""

from shipyard.ui.client import GatewayClient, GatewayError, build_messages, message_text

__all__ = ["GatewayClient", "GatewayError", "build_messages", "message_text"]
