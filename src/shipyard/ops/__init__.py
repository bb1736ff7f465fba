"""Operator files generated from settings: the nginx front for the gateway and the chat page."""

from shipyard.ops.nginx import NginxConfig, render_nginx

__all__ = ["NginxConfig", "render_nginx"]
