"""The model registry: ``<models_dir>/<name>/<version>/`` folders, each with a ``manifest.json`` that says where
the version came from (parent, recipe, scheme), what it is made of (every file with its size and sha256) and
how it evaluated (summaries attached by ``shipyard eval --register``).

A version only appears once it is whole: it is built in ``<models_dir>/.staging/`` and renamed into place after
its manifest is written, so an interrupted prepare step never leaves a half-written version registered.

>>> registry = Registry(Path("~/.cache/shipyard/models").expanduser())   # doctest: +SKIP
>>> with registry.new_version("support-bot", "w8a8", parent="support-bot:merged", scheme="w8a8-int8") as folder:
...     quantize_into(folder)                                             # doctest: +SKIP
>>> registry.resolve("support-bot:w8a8")                                 # doctest: +SKIP
PosixPath('/root/.cache/shipyard/models/support-bot/w8a8')
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class RegistryError(ValueError):
    """A registry operation cannot be done; the message says why in one line."""


@dataclass
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass
class Manifest:
    name: str
    version: str
    created: str
    scheme: str
    """bf16, lora-merged, w8a8-int8, w4a16, fp8-dynamic, ... (what the weights are)."""
    parent: str | None = None
    """``name:version`` this one was made from (None for an imported model)."""
    source: str | None = None
    """Where the first version came from (a folder, a package), for imported models."""
    recipe: dict[str, Any] | None = None
    """How it was made (merge adapter and settings, quantization recipe, calibration data)."""
    files: list[FileEntry] = field(default_factory=list)
    size_bytes: int = 0
    evals: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text())
            files = [FileEntry(**entry) for entry in data.pop("files", [])]
            return cls(**data, files=files)
        except (OSError, ValueError, TypeError) as exc:
            raise RegistryError(f"{path} is not a readable manifest: {exc}") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entries(folder: Path) -> list[FileEntry]:
    """Every file under ``folder`` except the manifest itself, sorted by path."""
    return [
        FileEntry(str(path.relative_to(folder)), path.stat().st_size, sha256_of(path))
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    ]


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``name`` or ``name:version`` -> (name, version or None); RegistryError for anything else."""
    name, _, version = ref.partition(":")
    if not NAME_PATTERN.match(name) or (version and not NAME_PATTERN.match(version)):
        raise RegistryError(f"{ref!r} is not NAME or NAME:VERSION (letters, digits, '.', '_', '-')")
    return name, version or None


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = root

    def manifests(self) -> list[Manifest]:
        """Every registered version, by name then creation time."""
        paths = [p for p in sorted(self.root.glob(f"*/*/{MANIFEST}")) if not p.parts[-3].startswith(".")]
        found = [Manifest.from_file(path) for path in paths]
        return sorted(found, key=lambda m: (m.name, m.created))

    def get(self, name: str, version: str | None = None) -> Manifest:
        """A version, or the newest one of ``name`` when ``version`` is None."""
        versions = [m for m in self.manifests() if m.name == name]
        if not versions:
            known = ", ".join(sorted({m.name for m in self.manifests()})) or "none"
            raise RegistryError(f"no model named {name!r} in {self.root} (registered: {known})")
        if version is None:
            return versions[-1]
        for manifest in versions:
            if manifest.version == version:
                return manifest
        raise RegistryError(f"{name} has no version {version!r} (versions: {', '.join(m.version for m in versions)})")

    def folder(self, manifest: Manifest) -> Path:
        return self.root / manifest.name / manifest.version

    def resolve(self, ref: str) -> Path:
        """The folder of ``NAME[:VERSION]``."""
        return self.folder(self.get(*parse_ref(ref)))

    def verify(self, manifest: Manifest) -> list[str]:
        """Problems between the manifest and the files on disk (empty when they match)."""
        folder = self.folder(manifest)
        problems = []
        on_disk = {entry.path: entry for entry in file_entries(folder)}
        for entry in manifest.files:
            actual = on_disk.pop(entry.path, None)
            if actual is None:
                problems.append(f"{entry.path}: missing")
            elif actual.sha256 != entry.sha256 or actual.size != entry.size:
                problems.append(f"{entry.path}: changed (sha256 or size differs from the manifest)")
        problems += [f"{path}: not in the manifest" for path in sorted(on_disk)]
        return problems

    @contextmanager
    def new_version(
        self,
        name: str,
        version: str,
        *,
        scheme: str,
        parent: str | None = None,
        source: str | None = None,
        recipe: dict[str, Any] | None = None,
        force: bool = False,
    ) -> Iterator[Path]:
        """Yield an empty staging folder to build the version in; on success hash it, write the manifest and
        move it into place. On any error the staging folder is removed and nothing is registered."""
        parse_ref(f"{name}:{version}")
        with build_folder(
            self.root / name / version,
            self.root / ".staging",
            name=name,
            version=version,
            scheme=scheme,
            parent=parent,
            source=source,
            recipe=recipe,
            force=force,
        ) as staging:
            yield staging

    def attach_eval(self, ref: str, task: str, summary: dict[str, Any]) -> Manifest:
        """Record an evaluation summary in a version's manifest (written whole, then renamed over the old one)."""
        manifest = self.get(*parse_ref(ref))
        manifest.evals[task] = summary
        path = self.folder(manifest) / MANIFEST
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(manifest.to_json())
        temporary.replace(path)
        return manifest


@contextmanager
def build_folder(
    target: Path,
    staging_root: Path,
    *,
    name: str,
    version: str,
    scheme: str,
    parent: str | None = None,
    source: str | None = None,
    recipe: dict[str, Any] | None = None,
    force: bool = False,
) -> Iterator[Path]:
    """Build a model folder with its manifest: yield an empty folder under ``staging_root`` (same file system as
    ``target``), then hash what was written, add ``manifest.json`` and rename it to ``target``. An existing target
    is refused unless ``force``, and then replaced only once the new one is complete."""
    if target.exists() and not force:
        raise RegistryError(f"{target} already exists (use --force to replace it)")
    staging_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{name}-{version}-", dir=staging_root))
    try:
        yield staging
        files = file_entries(staging)
        if not files:
            raise RegistryError(f"nothing was written for {name}:{version}")
        manifest = Manifest(
            name=name,
            version=version,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            scheme=scheme,
            parent=parent,
            source=source,
            recipe=recipe,
            files=files,
            size_bytes=sum(f.size for f in files),
        )
        (staging / MANIFEST).write_text(manifest.to_json())
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # --force: the old version leaves only once the new one is complete
            retired = staging_root / f"retired-{name}-{version}-{staging.name}"
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def is_ref(text: str) -> bool:
    """``NAME:VERSION`` (a registry target) rather than a path."""
    return ":" in text and "/" not in text


@contextmanager
def open_output(
    out: str, models_dir: Path, *, scheme: str, parent: str | None, recipe: dict[str, Any], force: bool
) -> Iterator[Path]:
    """Where a prepare step writes: a registry version (``out`` = ``NAME:VERSION``) or a plain folder (any other
    ``out``, which gets the same manifest). Either way it appears only when complete."""
    if is_ref(out):
        name, version = parse_ref(out)
        if version is None:
            raise RegistryError(f"--out {out}: give NAME:VERSION")
        with Registry(models_dir).new_version(
            name, version, scheme=scheme, parent=parent, recipe=recipe, force=force
        ) as staging:
            yield staging
        return
    target = Path(out).expanduser().resolve()
    safe_name = re.sub(r"[^A-Za-z0-9._-]", "-", target.name) or "model"
    with build_folder(
        target,
        target.parent / ".shipyard-staging",
        name=safe_name,
        version="local",
        scheme=scheme,
        parent=parent,
        recipe=recipe,
        force=force,
    ) as staging:
        yield staging
    with contextlib.suppress(OSError):
        (target.parent / ".shipyard-staging").rmdir()  # only when empty


def resolve_input(model: str, models_dir: Path) -> tuple[Path, str | None]:
    """(folder, parent ref or None) for a ``--base``/``--model`` argument: a folder or a registered NAME[:VERSION]."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return folder.resolve(), None
    if "/" in model:
        raise RegistryError(f"{model} does not exist")
    registry = Registry(models_dir)
    manifest = registry.get(*parse_ref(model))
    return registry.folder(manifest), manifest.ref
