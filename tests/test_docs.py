"""The documentation site (issue 38): it builds with ``mkdocs build --strict`` (a broken link, a missing page or an
unknown anchor fails), its reference pages are what the code says now and name everything there is, the README
stays a page, and the built site renders in a browser (screenshots)."""

from __future__ import annotations

import functools
import http.server
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_deploy_files import queried_metrics

ROOT = Path(__file__).resolve().parents[1]


def build_site(out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
    )


def test_the_site_builds_strict_and_every_page_is_in_the_navigation(tmp_path: Path) -> None:
    done = build_site(tmp_path / "site")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    nav = (ROOT / "mkdocs.yml").read_text()
    assert not {p for p in pages if p not in nav}, "pages missing from mkdocs.yml's nav"
    assert (tmp_path / "site" / "get-started" / "index.html").is_file()
    search = (tmp_path / "site" / "search" / "search_index.json").read_text()
    assert "admission" in search and "blue-green" in search  # the search box finds the guides


def test_a_broken_link_fails_the_build(tmp_path: Path) -> None:
    """The check above can fail: a page linking a file the repository does not have stops the build."""
    page = ROOT / "docs" / "guides" / "observe.md"
    original = page.read_text()
    try:
        page.write_text(original + "\n[raw](../../benchmarks/results/no-such-run/README.md)\n")
        done = build_site(tmp_path / "site")
    finally:
        page.write_text(original)
    assert done.returncode != 0 and "no-such-run" in done.stdout + done.stderr


def test_the_reference_pages_are_what_the_code_says_now() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "docs_reference.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, "stale reference pages:\n" + done.stdout[-4000:] + done.stderr[-2000:]


def test_the_reference_names_every_command_setting_route_and_metric() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    import docs_reference

    cli = (ROOT / "docs/reference/cli.md").read_text()
    from shipyard.cli.app import app

    for path, _ in docs_reference._commands(docs_reference.typer.main.get_command(app), ["shipyard"]):
        if len(path) > 1:
            assert f"## `{' '.join(path)}`" in cli, path
    settings = (ROOT / "docs/reference/settings.md").read_text()
    from shipyard.settings import Settings

    def keys(model: type, prefix: str) -> Iterator[str]:
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            yield prefix + name
            sub = docs_reference._nested_model(field.annotation)
            if sub is not None and sub is not model:
                list_ = "[]" if getattr(field.annotation, "__origin__", None) is list else ""
                yield from keys(sub, f"{prefix}{name}{list_}.")

    every = list(keys(Settings, ""))
    assert {"admission.max_in_flight", "models[].autoscale.max_replicas", "cluster.address"} <= set(every)
    assert not [key for key in every if f"`{key}`" not in settings]
    http = (ROOT / "docs/reference/http.md").read_text()
    for path in docs_reference.openapi_document()["paths"]:
        assert f"`{path}`" in http, path
    metrics = (ROOT / "docs/reference/metrics.md").read_text()
    documented = set(re.findall(r"`(shipyard_[a-z_]+)`", metrics))
    base = {re.sub(r"_(bucket|sum|count|created)$", "", m) for m in queried_metrics() if m.startswith("shipyard_")}
    missing = {
        m
        for m in base
        if m not in documented and f"{m}_total" not in documented and m.removesuffix("_total") not in documented
    }
    assert not missing, f"queried by the dashboard, missing from the metrics reference: {sorted(missing)}"


def test_the_readme_is_a_page_and_its_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), target
    assert "scripts/up" in readme and "scripts/test" in readme  # the two commands stay on the first page


@pytest.fixture
def served_site(tmp_path: Path) -> Iterator[str]:
    done = build_site(tmp_path / "site")
    assert done.returncode == 0, done.stdout[-2000:]
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "site"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.mark.browser
def test_the_built_site_renders_get_started_and_a_guide(served_site: str) -> None:
    """Headless Chromium on the built site: the navigation, the search box and the page's content render; the
    screenshots (docs/screenshots/ holds two of these) are written to the test artifacts."""
    from playwright.sync_api import expect

    from tests.test_ui import ARTIFACTS, browser_page

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with browser_page(viewport={"width": 1280, "height": 900}) as page:
        for path, heading, name in (
            ("/get-started/", "Get started", "docs-get-started.png"),
            ("/guides/overload/", "Overload and admission", "docs-guide-overload.png"),
        ):
            page.goto(served_site + path)
            expect(page.locator("h1").first).to_contain_text(heading)
            expect(page.locator(".md-search__input")).to_have_count(1)
            expect(page.locator(".md-nav__link", has_text="Concepts").first).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / name))
            assert (ARTIFACTS / name).stat().st_size > 20_000
