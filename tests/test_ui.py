"""The chat page: its rules as functions, and the page itself in headless Chromium (Playwright) in front of the
real gateway and a fake engine that streams slowly enough to watch the answer grow."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from shipyard.cli import app
from shipyard.engine import free_port
from shipyard.settings import load_settings
from shipyard.testing import FakeOpenAI
from shipyard.ui import GatewayClient, GatewayError, build_messages, message_text
from shipyard.ui.app import UIConfigError, check_exposure, launch, parse_users
from tests.stack import API_KEY, Stack, start_stack

ARTIFACTS = Path(os.environ.get("SHIPYARD_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def test_users_and_exposure_rules() -> None:
    assert parse_users(["alice:s3cret:with-colon"]) == [("alice", "s3cret:with-colon")]
    for bad in ("alice", "alice:", ":pw"):
        with pytest.raises(UIConfigError, match="NAME:PASSWORD"):
            parse_users([bad])
    check_exposure("127.0.0.1", [])
    check_exposure("localhost", [])
    check_exposure("::1", [])
    check_exposure("0.0.0.0", [("alice", "pw")])
    with pytest.raises(UIConfigError, match="without a login"):
        check_exposure("0.0.0.0", [])


def test_messages_from_gradio_history() -> None:
    history = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "hello"},
        {"role": "system", "content": "ignored: the page's own system prompt is used"},
    ]
    assert build_messages("Be brief.", history, "and now?") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and now?"},
    ]
    assert build_messages("  ", [], "x") == [{"role": "user", "content": "x"}]
    assert message_text([{"type": "text", "text": "a"}, "b"]) == "ab"


def test_client_errors_say_what_to_do(stack: Stack) -> None:
    assert GatewayClient(stack.url, API_KEY).models() == ["fake-model"]
    with pytest.raises(GatewayError, match="refused the API key"):
        GatewayClient(stack.url, "sk-wrong").models()
    with pytest.raises(GatewayError, match="not reachable"):
        GatewayClient(f"http://127.0.0.1:{free_port()}", API_KEY).models()
    with pytest.raises(GatewayError, match="404.*not served"):
        list(GatewayClient(stack.url, API_KEY).stream_chat("other", [{"role": "user", "content": "x"}], 0, 1, 4))
    pieces = list(
        GatewayClient(stack.url, API_KEY).stream_chat("fake-model", [{"role": "user", "content": "x"}], 0, 1, 4)
    )
    assert "".join(pieces).strip() == "tok0 tok1 tok2 tok3"
    assert "ready (1 of 1 replicas ready)" in GatewayClient(stack.url, API_KEY).health()


def test_cli_refuses_an_open_page_without_users() -> None:
    result = CliRunner().invoke(app, ["ui", "--host", "0.0.0.0", "--port", str(free_port())])
    assert result.exit_code == 1
    assert "refusing to serve the chat page on 0.0.0.0 without a login" in result.output


def test_page_key_order(tmp_path: Path) -> None:
    from shipyard.cli.ui import page_key

    settings = load_settings(data_dir=tmp_path)
    assert page_key(settings, None) is None
    settings.api_key_file.write_text("sk-from-file\n")
    assert page_key(settings, None) == "sk-from-file"
    assert page_key(load_settings(data_dir=tmp_path, api_keys="sk-a,sk-b"), None) == "sk-a"
    assert page_key(load_settings(data_dir=tmp_path, ui={"api_key": "sk-ui"}, api_keys="sk-a"), None) == "sk-ui"
    assert page_key(settings, "sk-flag") == "sk-flag"


# --- in a real browser ---------------------------------------------------------------------------------------


def chromium() -> str:
    path = os.environ.get("SHIPYARD_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed (scripts/test installs Debian's chromium): the browser test must run")
    pytest.skip("chromium is not installed (apt-get install chromium, or set SHIPYARD_CHROMIUM)")


@pytest.fixture
def slow_stack() -> Iterator[Stack]:
    # 40 tokens at 20 tokens/s: a two-second stream the browser can watch grow
    yield from start_stack(FakeOpenAI("fake-model", token_rate=20.0, default_tokens=40, max_model_len=4096))


@contextmanager
def browser_page(**options: Any) -> Iterator[Any]:
    """A page in headless Chromium (Debian's build, driven by Playwright), closed with its browser."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            yield browser.new_page(**options)
        finally:
            browser.close()


def log_in(page: Any, user: str, password: str) -> None:
    page.get_by_label("username").fill(user)
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()


def serve_page(url: str, key: str, users: list[str]) -> str:
    port = free_port()
    launch(GatewayClient(url, key), "127.0.0.1", port, users, block=False)
    return f"http://127.0.0.1:{port}"


@pytest.mark.browser
def test_chat_page_streams_an_answer_after_login(slow_stack: Stack) -> None:
    from playwright.sync_api import expect

    page_url = serve_page(slow_stack.url, API_KEY, ["alice:correct-horse"])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with browser_page(viewport={"width": 1280, "height": 1000}) as page:
        page.goto(page_url)
        log_in(page, "alice", "wrong")
        expect(page.get_by_text("Incorrect Credentials")).to_be_visible(timeout=10_000)
        log_in(page, "alice", "correct-horse")

        # the model picker is filled from the gateway's /v1/models, the status line from /ready
        expect(page.locator("#gateway-status")).to_contain_text("ready (1 of 1 replicas ready)", timeout=20_000)
        expect(page.locator("#model-picker input")).to_have_value("fake-model")

        page.get_by_label("System prompt").fill("You are terse.")
        page.locator("#chat-input textarea").fill("Where is my order?")
        page.locator("#chat-input textarea").press("Enter")
        bot = page.locator("#chatbot .message.bot").last
        lengths: list[int] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = bot.inner_text() if bot.count() else ""
            if text and (not lengths or len(text) != lengths[-1]):
                lengths.append(len(text))
            if "tok39" in text:
                break
            time.sleep(0.1)
        assert "tok39" in bot.inner_text(), "the whole answer arrived"
        assert len(lengths) >= 3, f"the answer grew while it streamed, seen lengths {lengths}"
        page.screenshot(path=str(ARTIFACTS / "ui-chat-streamed.png"), full_page=True)

        # what the engine got: the system prompt, the user's turn and the sampling controls
        sent = slow_stack.fake.requests[-1]
        assert sent["messages"][0] == {"role": "system", "content": "You are terse."}
        assert sent["messages"][-1] == {"role": "user", "content": "Where is my order?"}
        assert sent["stream"] is True and sent["max_tokens"] == 256 and sent["temperature"] == 0.7

        # second turn: the history goes along
        page.locator("#chat-input textarea").fill("Thanks")
        page.locator("#chat-input textarea").press("Enter")
        expect(page.locator("#chatbot .message.bot")).to_have_count(2, timeout=10_000)
        expect(page.locator("#chatbot .message.bot").last).to_contain_text("tok39", timeout=20_000)
        assert [m["role"] for m in slow_stack.fake.requests[-1]["messages"]] == [
            "system",
            "user",
            "assistant",
            "user",
        ]

        # the intent tab answers with one of the labels
        page.get_by_role("tab", name="Intent").click()
        page.locator("#intent-text textarea").fill("I want my money back")
        page.locator("#intent-run").click()
        expect(page.locator("#intent-answer textarea")).not_to_have_value("", timeout=10_000)


@pytest.mark.browser
def test_chat_page_says_when_the_key_is_wrong_or_the_gateway_is_down(slow_stack: Stack) -> None:
    from playwright.sync_api import expect

    wrong_key = serve_page(slow_stack.url, "sk-not-a-key", [])
    down = serve_page(f"http://127.0.0.1:{free_port()}", API_KEY, [])
    with browser_page() as page:
        page.goto(wrong_key)
        expect(page.locator("#gateway-status")).to_contain_text("refused the API key", timeout=20_000)
        page.goto(down)
        expect(page.locator("#gateway-status")).to_contain_text("is not reachable", timeout=20_000)
        page.locator("#chat-input textarea").fill("hello?")
        page.locator("#chat-input textarea").press("Enter")
        expect(page.get_by_text("No model selected").first).to_be_visible(timeout=10_000)
    assert httpx.get(wrong_key, timeout=5).status_code == 200
