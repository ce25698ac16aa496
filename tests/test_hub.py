"""Hub ids (``org/name[@revision]``): which strings are ids, local paths first, and the one-line
errors, with huggingface_hub talking to a stand-in Hub on localhost (no network)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub import constants

import mmzoo
from mmzoo.checkpoint.hub import parse_hub_id, resolve_model_dir
from mmzoo.cli import main


@pytest.mark.parametrize(
    "value, expected",
    [
        ("Qwen/Qwen2.5-VL-3B-Instruct", ("Qwen/Qwen2.5-VL-3B-Instruct", None)),
        ("OpenGVLab/InternVL3-8B-hf@main", ("OpenGVLab/InternVL3-8B-hf", "main")),
        ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
        ("org/name@" + "0" * 40, ("org/name", "0" * 40)),
        ("outputs/run", ("outputs/run", None)),  # id-shaped: goes to the Hub only when no such path
        ("name", None),
        ("./org/name", None),
        ("../org/name", None),
        ("/models/org/name", None),
        ("~/name", None),
        ("org/name/sub", None),
        ("org//name", None),
        ("org/na--me", None),
        ("org/name@", None),
        ("org/my name", None),
    ],
)
def test_which_strings_are_hub_ids(value, expected):
    assert parse_hub_id(value) == expected


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache with huggingface_hub offline (its settings are read at import: patch them)."""
    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_local_paths_are_never_looked_up(offline_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert resolve_model_dir("org/name") == Path("org/name")  # exists: a path, though id-shaped
    assert resolve_model_dir(Path("org/other")) == Path("org/other")  # a Path object is a path
    assert resolve_model_dir("./org/other") == Path("org/other")  # not an id: the caller's error
    with pytest.raises(mmzoo.MmzooError, match="org/other: no such directory"):
        mmzoo.load_model("./org/other")


def one_line(capsys, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_offline_without_cache_is_one_line(offline_cache, capsys, tmp_path):
    err = one_line(capsys, ["infer", "--model-dir", "org/name@v2", "--prompt", "hi"])
    assert f"org/name@v2 (Hub cache {offline_cache})" in err
    assert "not in the cache and HF_HUB_OFFLINE is set" in err
    err = one_line(capsys, ["convert", "hf-to-mm", "--hf-dir", "org/name", "--mm-dir", str(tmp_path / "mm")])
    assert f"org/name@main (Hub cache {offline_cache})" in err


class _StandInHub(BaseHTTPRequestHandler):
    """Answers ``/api/models/<id>/revision/<rev>`` with the Hub's error for the repository named."""

    ERRORS = {"org/missing": (404, "RepoNotFound"), "org/gated": (403, "GatedRepo")}

    def do_GET(self) -> None:
        repo = "/".join(self.path.split("/")[3:5])
        status, code = self.ERRORS.get(repo, (404, "RevisionNotFound"))
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def online_cache(tmp_path, monkeypatch) -> Iterator[Path]:
    """An empty Hub cache, huggingface_hub online and talking to :class:`_StandInHub`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandInHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_TOKEN", "")  # no token read from the user's login
    yield cache
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "value, advice",
    [
        ("org/missing", "no such repository on the Hub and no such local directory"),
        ("org/gated", "the repository is gated; accept its terms on the Hub, then log in with `hf auth"),
        ("org/name@nope", "the repository has no such revision"),
    ],
)
def test_hub_errors_are_one_line(online_cache, capsys, value, advice):
    err = one_line(capsys, ["infer", "--model-dir", value, "--prompt", "hi"])
    shown = value if "@" in value else value + "@main"
    assert f"mmzoo: error: {shown} (Hub cache {online_cache}): {advice}" in err


def test_unreachable_hub_is_one_line(online_cache, capsys, monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    err = one_line(capsys, ["train", "--model.load", "org/name", "--train.output_dir", str(tmp_path / "run")])
    assert f"org/name@main (Hub cache {online_cache}): not in the cache and the Hub cannot be reached" in err
