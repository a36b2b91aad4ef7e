"""Finding the model files, and downloading the default model (stories260K) checksum-verified.

Lookup order for the default model (the first folder holding both files wins):

1. an explicit path (a ``.bin`` file or a folder) — taken as is, not checksummed;
2. ``$TPFED_MODELS/stories260K/``;
3. ``../shared/models/stories260K/`` relative to the working directory, then relative to the
   repository holding this package;
4. the user cache, ``$XDG_CACHE_HOME/tpfed/models/stories260K/`` (``~/.cache/...`` by default);
5. a download into the user cache from ``$TPFED_MODEL_URL`` (default: the karpathy/tinyllamas
   repository on the Hugging Face hub).

Files of the default model found locally are verified against the pinned sha256; a bad file in
a shared folder is an error, a bad file in the user cache is downloaded again. Downloads stream
into a temporary file in the target folder and are renamed into place only after their size and
sha256 match, so an interrupted or corrupted download leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tpfed.errors import ModelError

MODEL_NAME = "stories260K"
DEFAULT_BASE_URL = "https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K"
URL_ENV = "TPFED_MODEL_URL"
MODELS_ENV = "TPFED_MODELS"


@dataclass(frozen=True)
class PinnedFile:
    name: str
    size: int
    sha256: str


MODEL_FILE = PinnedFile(
    "stories260K.bin", 1056540, "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696"
)
TOKENIZER_FILE = PinnedFile(
    "tok512.bin", 6227, "037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312"
)
PINNED = (MODEL_FILE, TOKENIZER_FILE)
TOKENIZER_NAMES = ("tok512.bin", "tokenizer.bin")
_CHUNK = 1 << 16


@dataclass(frozen=True)
class ModelFiles:
    model: Path
    tokenizer: Path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tpfed" / "models" / MODEL_NAME


def search_dirs(cwd: Path | None = None) -> list[Path]:
    """Folders searched for the default model, in order (the user cache excluded)."""
    dirs: list[Path] = []
    env = os.environ.get(MODELS_ENV)
    if env:
        dirs.append(Path(env) / MODEL_NAME)
    dirs.append((cwd or Path.cwd()) / ".." / "shared" / "models" / MODEL_NAME)
    repo = Path(__file__).resolve().parents[3]
    dirs.append(repo.parent / "shared" / "models" / MODEL_NAME)
    seen: set[Path] = set()
    unique = []
    for d in dirs:
        key = d.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(d)
    return unique


def verify(path: Path, pinned: PinnedFile) -> None:
    """Raise :class:`ModelError` unless ``path`` has the pinned size and sha256."""
    size = path.stat().st_size
    if size != pinned.size:
        raise ModelError(f"{path}: {size} bytes, expected {pinned.size} (sha256 {pinned.sha256})")
    actual = sha256_file(path)
    if actual != pinned.sha256:
        raise ModelError(f"{path}: sha256 mismatch: expected {pinned.sha256}, got {actual}")


def _explicit(path: Path, tokenizer: Path | None) -> ModelFiles:
    if path.is_dir():
        models = sorted(p for p in path.glob("*.bin") if p.name not in TOKENIZER_NAMES)
        if not models:
            raise ModelError(f"{path}: no model .bin file in this folder")
        if len(models) > 1:
            raise ModelError(f"{path}: several model files ({', '.join(p.name for p in models)}); name one")
        folder, model = path, models[0]
    elif path.is_file():
        folder, model = path.parent, path
    else:
        raise ModelError(f"model not found: {path}")
    if tokenizer is None:
        found = [folder / n for n in TOKENIZER_NAMES if (folder / n).is_file()]
        if not found:
            raise ModelError(f"no tokenizer ({' or '.join(TOKENIZER_NAMES)}) next to {model}; pass it explicitly")
        tokenizer = found[0]
    elif not tokenizer.is_file():
        raise ModelError(f"tokenizer not found: {tokenizer}")
    return ModelFiles(model, tokenizer)


def locate_model(
    path: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    *,
    dirs: Sequence[Path] | None = None,
    cache_dir: Path | None = None,
    base_url: str | None = None,
    download: bool = True,
    progress: bool | None = None,
) -> ModelFiles:
    """Find (or fetch) the model and tokenizer files; see the module docstring for the order.

    ``dirs`` replaces the searched folders (default :func:`search_dirs`), ``cache_dir`` the user
    cache; ``download=False`` raises instead of downloading."""
    if path is not None:
        return _explicit(Path(path), Path(tokenizer) if tokenizer is not None else None)
    for d in search_dirs() if dirs is None else dirs:
        if all((d / f.name).is_file() for f in PINNED):
            for f in PINNED:
                verify(d / f.name, f)
            files = ModelFiles(d / MODEL_FILE.name, d / TOKENIZER_FILE.name)
            return _with_tokenizer(files, tokenizer)
    cache = cache_dir or user_cache_dir()
    if not download:
        missing = [f.name for f in PINNED if not _good(cache / f.name, f)]
        if missing:
            raise ModelError(
                f"{MODEL_NAME} not found (searched {MODELS_ENV}, ../shared/models and {cache}); "
                f"missing {', '.join(missing)}"
            )
    files = fetch_model(cache, base_url=base_url, progress=progress)
    return _with_tokenizer(files, tokenizer)


def _with_tokenizer(files: ModelFiles, tokenizer: str | os.PathLike[str] | None) -> ModelFiles:
    if tokenizer is None:
        return files
    tok = Path(tokenizer)
    if not tok.is_file():
        raise ModelError(f"tokenizer not found: {tok}")
    return ModelFiles(files.model, tok)


def _good(path: Path, pinned: PinnedFile) -> bool:
    if not path.is_file():
        return False
    try:
        verify(path, pinned)
    except ModelError:
        return False
    return True


def fetch_model(
    dest: Path, *, base_url: str | None = None, progress: bool | None = None, timeout: float = 60.0
) -> ModelFiles:
    """Make ``dest`` hold verified copies of the default model's files, downloading any that
    are missing or do not match their pinned sha256."""
    base = (base_url or os.environ.get(URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create {dest}: {exc.strerror}") from None
    for f in PINNED:
        if not _good(dest / f.name, f):
            download(f"{base}/{f.name}", dest / f.name, f, progress=progress, timeout=timeout)
    return ModelFiles(dest / MODEL_FILE.name, dest / TOKENIZER_FILE.name)


def download(
    url: str, target: Path, pinned: PinnedFile, *, progress: bool | None = None, timeout: float = 60.0
) -> None:
    """Stream ``url`` into ``target`` via a temporary file in the same folder; the file appears
    only if its size and sha256 match ``pinned``."""
    if progress is None:
        progress = sys.stderr.isatty()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            actual, size = _stream(url, out, pinned, progress, timeout)
        if size != pinned.size or actual != pinned.sha256:
            raise ModelError(
                f"download of {url} failed verification: sha256 expected {pinned.sha256}, got {actual} "
                f"({size} bytes, expected {pinned.size})"
            )
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _stream(url: str, out, pinned: PinnedFile, progress: bool, timeout: float) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    # Read at most a little more than expected: a wrong URL serving something huge is cut off.
    limit = pinned.size + _CHUNK
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            total = resp.headers.get("Content-Length")
            total_n = int(total) if total and total.isdigit() else pinned.size
            with _progress_bar(progress, pinned.name, total_n) as advance:
                while size < limit:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                    advance(len(chunk))
    except urllib.error.HTTPError as exc:
        raise ModelError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise ModelError(f"download of {url} failed: {exc.reason}") from None
    except (OSError, TimeoutError) as exc:
        raise ModelError(f"download of {url} failed: {exc}") from None
    return h.hexdigest(), size


@contextlib.contextmanager
def _progress_bar(enabled: bool, name: str, total: int):
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(f"downloading {name}", total=total)
        yield lambda n: bar.advance(task, n)
