"""The chat page (Gradio): streaming multi-turn chat with the served model, and the task endpoints.

It talks only to the gateway, like any other client, with one API key; people log in to the page itself with
the users from settings (``ui.users``). It refuses to listen beyond loopback without users.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from shipyard.ui.client import GatewayClient, GatewayError, build_messages

if TYPE_CHECKING:
    import gradio as gr

# Gradio phones home for analytics and version checks unless told not to; shipyard runs offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

EXAMPLE_CONVERSATION = [
    {
        "role": "user",
        "content": "My order #48213 was supposed to arrive 6 days ago and it still isn't here. "
        "I paid for express shipping and I want that money back.",
    }
]


class UIConfigError(ValueError):
    """The page would be unsafe or unusable as configured; the message says what to change."""


def parse_users(entries: Sequence[str]) -> list[tuple[str, str]]:
    """``name:password`` entries -> Gradio's auth list; both parts must be non-empty."""
    users = []
    for entry in entries:
        name, sep, password = entry.partition(":")
        if not sep or not name.strip() or not password:
            raise UIConfigError(f"ui user {name.strip() or entry[:20]!r} must be given as NAME:PASSWORD")
        users.append((name.strip(), password))
    return users


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, users: Sequence[tuple[str, str]]) -> None:
    """No login on loopback is fine (only this machine can reach it); anything wider needs users."""
    if not users and not is_loopback(host):
        raise UIConfigError(
            f"refusing to serve the chat page on {host} without a login: set ui.users "
            "(SHIPYARD_UI__USERS=name:password, comma-separated) or listen on 127.0.0.1"
        )


def build_ui(client: GatewayClient, title: str = "shipyard") -> gr.Blocks:
    import gradio as gr

    def fail(exc: GatewayError) -> gr.Error:
        return gr.Error(str(exc), duration=None)

    def refresh_models(current: str | None) -> tuple[Any, str]:
        status = client.health()
        try:
            models = client.models()
        except GatewayError as exc:
            return gr.update(choices=[], value=None), f"{status}\n\n**{exc}**"
        value = current if current in models else (models[0] if models else None)
        return gr.update(choices=models, value=value), status

    def chat(
        message: str,
        history: list[dict[str, Any]],
        model: str | None,
        system: str,
        temperature: float,
        top_p: float,
        max_tokens: float,
    ) -> Iterator[str]:
        if not message.strip():
            raise gr.Error("Type a message first.")
        if not model:
            raise gr.Error("No model selected: the gateway listed none yet. Press 'Refresh' once it is ready.")
        answer = ""
        try:
            for piece in client.stream_chat(
                model, build_messages(system, history, message), temperature, top_p, int(max_tokens)
            ):
                answer += piece
                yield answer
        except GatewayError as exc:
            raise fail(exc) from None

    def task(path: str, body: dict[str, Any], model: str | None) -> dict[str, Any]:
        """One task-endpoint call on the picked model (or the gateway's only one); errors shown on the page."""
        try:
            return client.post(path, {**body, "model": model} if model else body)
        except GatewayError as exc:
            raise fail(exc) from None

    def classify(text: str, labels: str, model: str | None) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"text": text}
        if labels.strip():
            body["labels"] = [label.strip() for label in labels.split(",") if label.strip()]
        answer = task("/v1/intent", body, model)
        return str(answer["intent"]), answer

    def reply(conversation: str, template: str, model: str | None) -> tuple[str, dict[str, Any]]:
        try:
            messages = json.loads(conversation)
        except ValueError as exc:
            raise gr.Error(f"The conversation is not valid JSON: {exc}") from None
        body: dict[str, Any] = {"messages": messages}
        if template.strip():
            body["template"] = template.strip()
        answer = task("/v1/reply", body, model)
        return str(answer["reply"]), answer

    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.Markdown(f"## {title}")
        status = gr.Markdown("Connecting to the gateway ...", elem_id="gateway-status")
        with gr.Row():
            model = gr.Dropdown(choices=[], label="Model", elem_id="model-picker", scale=4, allow_custom_value=False)
            refresh = gr.Button("Refresh", scale=1, elem_id="refresh-models")
        with gr.Tab("Chat"):
            system = gr.Textbox(label="System prompt", value="You are a helpful assistant.", lines=2)
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p")
                max_tokens = gr.Slider(1, 4096, value=256, step=1, label="Max tokens")
            gr.ChatInterface(
                chat,
                additional_inputs=[model, system, temperature, top_p, max_tokens],
                chatbot=gr.Chatbot(elem_id="chatbot", height=420),
                textbox=gr.Textbox(placeholder="Ask something ...", elem_id="chat-input", show_label=False),
                fill_height=False,
                api_name="chat",
            )
        with gr.Tab("Intent"):
            text = gr.Textbox(label="Customer message", elem_id="intent-text", lines=3)
            labels = gr.Textbox(label="Labels (comma-separated; empty = the configured set)")
            classify_button = gr.Button("Classify", elem_id="intent-run")
            intent = gr.Textbox(label="Intent", elem_id="intent-answer", interactive=False)
            intent_json = gr.JSON(label="Response")
            classify_button.click(classify, [text, labels, model], [intent, intent_json], api_name="intent")
        with gr.Tab("Complaint reply"):
            conversation = gr.Code(
                value=json.dumps(EXAMPLE_CONVERSATION, indent=1), language="json", label="Conversation (messages)"
            )
            template = gr.Textbox(label="Template (empty = standard)")
            reply_button = gr.Button("Write reply", elem_id="reply-run")
            reply_text = gr.Textbox(label="Reply", lines=8, interactive=False, elem_id="reply-answer")
            reply_json = gr.JSON(label="Response")
            reply_button.click(reply, [conversation, template, model], [reply_text, reply_json], api_name="reply")
        refresh.click(refresh_models, [model], [model, status])
        page.load(refresh_models, [model], [model, status])
    blocks: gr.Blocks = page
    return blocks


def launch(
    client: GatewayClient,
    host: str,
    port: int,
    users: Sequence[str],
    *,
    block: bool = True,
    title: str = "shipyard",
    root_path: str | None = None,
) -> gr.Blocks:
    """Check the exposure rule, then serve the page (``block=False``: in a background thread)."""
    auth = parse_users(users)
    check_exposure(host, auth)
    page = build_ui(client, title)
    page.queue(default_concurrency_limit=16)
    page.launch(
        server_name=host,
        server_port=port,
        auth=auth or None,
        auth_message="shipyard: log in with a user from the ui.users setting" if auth else None,
        prevent_thread_lock=not block,
        show_error=True,
        quiet=True,
        ssr_mode=False,
        root_path=root_path,
        footer_links=[],
    )
    return page
