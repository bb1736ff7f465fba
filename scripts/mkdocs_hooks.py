"""MkDocs hooks of the documentation site (``mkdocs.yml``): the repository's own files that pages link to.

A page links a raw result file or a source folder by its path in the repository, relative to the page
(``../benchmarks/results/2026-12-06-h100/README.md`` from ``docs/measurements.md``), so the link also works on a
code host. Such a link leaves ``docs/``, which MkDocs cannot serve: each linked file is copied into the site under
``repo/`` (as it is; Markdown as ``.txt``, so it is shown raw, not rendered) and the link is pointed at the copy. A
link to a folder goes to a generated index of its files. A link to a path that does not exist fails the build
(``mkdocs build --strict``), as a broken link inside ``docs/`` does.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

_LINK = re.compile(r"(\]\()([^)\s#]+)(#[^)\s]*)?(\))")
_FENCE = re.compile(r"^(```|~~~)")


def _repo_root(config: Any) -> Path:
    return Path(config["config_file_path"]).resolve().parent


def _outside_links(markdown: str) -> list[str]:
    found = []
    fenced = False
    for line in markdown.splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            found += [m.group(2) for m in _LINK.finditer(line)]
    return found


def _target(page_src: str, link: str, docs: Path, root: Path) -> Path | None:
    """The repository path a relative link of the page ``page_src`` points at, when it is outside ``docs/``."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", link) or link.startswith("/"):
        return None
    resolved = (docs / posixpath.dirname(page_src) / link).resolve()
    if resolved.is_relative_to(docs) or not resolved.is_relative_to(root):
        return None
    return resolved


def _copy_uri(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    if path.is_dir():
        return f"repo/{rel}/index.html"
    return f"repo/{rel}.txt" if path.suffix == ".md" else f"repo/{rel}"


def on_files(files: Files, config: Any) -> Files:
    root, docs = _repo_root(config), Path(config["docs_dir"]).resolve()
    made: set[str] = set()
    for page in list(files.documentation_pages()):
        for link in _outside_links(Path(page.abs_src_path or "").read_text()):
            path = _target(page.src_uri, link, docs, root)
            if path is None:
                continue
            if not path.exists():
                where = path.relative_to(root)
                raise PluginError(f"{page.src_uri}: the link {link!r} points at {where}, not in the repository")
            uri = _copy_uri(path, root)
            if uri in made:
                continue
            made.add(uri)
            if path.is_dir():
                entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
                items = "".join(
                    f'<li><a href="{posixpath.basename(_copy_uri(p, root))}">{p.name}</a></li>'
                    for p in entries
                    if p.is_file()
                )
                title = path.relative_to(root)
                content = f"<!doctype html><title>{title}</title><h1>{title}</h1><ul>{items}</ul>"
                files.append(File.generated(config, uri, content=content))
                for p in entries:  # a folder's listing links its files: copy them too
                    if p.is_file():
                        sub = _copy_uri(p, root)
                        if sub not in made:
                            made.add(sub)
                            files.append(File.generated(config, sub, abs_src_path=str(p)))
            else:
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    root, docs = _repo_root(config), Path(config["docs_dir"]).resolve()

    def point(match: re.Match[str]) -> str:
        path = _target(page.file.src_uri, match.group(2), docs, root)
        if path is None:
            return match.group(0)
        uri = _copy_uri(path, root)
        relative = posixpath.relpath(uri, posixpath.dirname(page.file.src_uri) or ".")
        return f"{match.group(1)}{relative}{match.group(3) or ''}{match.group(4)}"

    out, fenced = [], False
    for line in markdown.splitlines(keepends=True):
        if _FENCE.match(line.strip()):
            fenced = not fenced
        out.append(line if fenced else _LINK.sub(point, line))
    return "".join(out)
