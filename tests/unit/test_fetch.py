"""Model lookup and checksum-verified download from a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import pytest

from tpfed.errors import ModelError
from tpfed.model import fetch
from tpfed.model.fetch import MODEL_FILE, TOKENIZER_FILE, fetch_model, locate_model


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002
        pass


@pytest.fixture
def served(tmp_path, stories260k_dir):
    """An HTTP server serving a copy of the model files made in tmp_path; yields (url, dir)."""
    root = tmp_path / "www" / "stories260K"
    root.mkdir(parents=True)
    for f in (MODEL_FILE, TOKENIZER_FILE):
        shutil.copyfile(stories260k_dir / f.name, root / f.name)
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_verified(served, tmp_path):
    url, _ = served
    dest = tmp_path / "cache"
    files = fetch_model(dest, base_url=url, progress=True)
    assert hashlib.sha256(files.model.read_bytes()).hexdigest() == MODEL_FILE.sha256
    assert hashlib.sha256(files.tokenizer.read_bytes()).hexdigest() == TOKENIZER_FILE.sha256
    assert sorted(p.name for p in dest.iterdir()) == sorted([MODEL_FILE.name, TOKENIZER_FILE.name])
    # already there and good: nothing is downloaded again (the server may even be gone)
    mtime = files.model.stat().st_mtime_ns
    assert fetch_model(dest, base_url="http://127.0.0.1:9/nothing") == files
    assert files.model.stat().st_mtime_ns == mtime


def test_corrupted_download_leaves_nothing(served, tmp_path):
    url, root = served
    raw = bytearray((root / MODEL_FILE.name).read_bytes())
    raw[1000] ^= 0xFF
    (root / MODEL_FILE.name).write_bytes(bytes(raw))
    actual = hashlib.sha256(bytes(raw)).hexdigest()
    dest = tmp_path / "cache"
    with pytest.raises(ModelError) as info:
        fetch_model(dest, base_url=url, progress=False)
    assert MODEL_FILE.sha256 in str(info.value) and actual in str(info.value)
    assert not (dest / MODEL_FILE.name).exists()
    assert [p.name for p in dest.iterdir() if p.name != TOKENIZER_FILE.name] == []


def test_truncated_and_missing_downloads(served, tmp_path):
    url, root = served
    (root / TOKENIZER_FILE.name).write_bytes((root / TOKENIZER_FILE.name).read_bytes()[:100])
    dest = tmp_path / "cache"
    with pytest.raises(ModelError, match="100 bytes"):
        fetch_model(dest, base_url=url, progress=False)
    (root / TOKENIZER_FILE.name).unlink()
    with pytest.raises(ModelError, match="HTTP 404"):
        fetch_model(dest, base_url=url, progress=False)
    assert not (dest / TOKENIZER_FILE.name).exists()
    assert not list(dest.glob(".*part"))


def test_bad_cached_file_is_replaced(served, tmp_path, monkeypatch):
    url, _ = served
    dest = tmp_path / "cache"
    fetch_model(dest, base_url=url, progress=False)
    (dest / MODEL_FILE.name).write_bytes(b"junk")
    monkeypatch.setenv(fetch.URL_ENV, url)
    files = locate_model(dirs=[], cache_dir=dest, progress=False)
    assert files.model.stat().st_size == MODEL_FILE.size


def test_lookup_order(tmp_path, stories260k_dir, monkeypatch):
    first, second = tmp_path / "a" / "stories260K", tmp_path / "b" / "stories260K"
    for d in (first, second):
        d.mkdir(parents=True)
    for f in (MODEL_FILE, TOKENIZER_FILE):
        shutil.copyfile(stories260k_dir / f.name, second / f.name)
    # `first` lacks the files: skipped; `second` holds them
    got = locate_model(dirs=[first, second], cache_dir=tmp_path / "c", download=False)
    assert got.model == second / MODEL_FILE.name
    monkeypatch.setenv(fetch.MODELS_ENV, str(tmp_path / "b"))
    assert fetch.search_dirs(cwd=tmp_path)[0] == second
    # a corrupted shared copy is an error naming both hashes, not silently skipped
    (second / TOKENIZER_FILE.name).write_bytes(b"x" * TOKENIZER_FILE.size)
    with pytest.raises(ModelError, match="sha256 mismatch"):
        locate_model(dirs=[second], cache_dir=tmp_path / "c", download=False)
    with pytest.raises(ModelError, match="not found"):
        locate_model(dirs=[first], cache_dir=tmp_path / "c", download=False)


def test_explicit_path_taken_as_is(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "model.bin").write_bytes(b"whatever")
    (d / "tokenizer.bin").write_bytes(b"tok")
    assert locate_model(d / "model.bin") == fetch.ModelFiles(d / "model.bin", d / "tokenizer.bin")
    assert locate_model(d).model == d / "model.bin"
    with pytest.raises(ModelError, match="not found"):
        locate_model(tmp_path / "none.bin")
    (d / "tokenizer.bin").unlink()
    with pytest.raises(ModelError, match="no tokenizer"):
        locate_model(d / "model.bin")


def test_default_search_finds_shared_models(stories260k_dir, monkeypatch):
    monkeypatch.setenv(fetch.MODELS_ENV, str(stories260k_dir.parent))
    files = locate_model(download=False)
    assert Path(files.model).resolve() == (stories260k_dir / MODEL_FILE.name).resolve()
