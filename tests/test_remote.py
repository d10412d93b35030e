"""Remote inspect (adapters.sources) against a range-capable HTTP server on 127.0.0.1 that counts bytes served.

The server also answers the few Hugging Face Hub routes ``HfFileSystem`` calls (revision,
tree, paths-info, resolve), so ``hf://`` runs against it through ``HF_ENDPOINT``.
"""

import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote

import pytest
import torch

from sharedquant.adapters.checkpoint import open_checkpoint
from sharedquant.adapters.cli import main
from sharedquant.adapters.sources import SourceError, _confined

from _sharded import write_sharded  # pytest puts tests/ on sys.path (it has no __init__.py)

pytest.importorskip("aiohttp")
pytest.importorskip("huggingface_hub")

SHA, TOKEN = "0123456789abcdef0123456789abcdef01234567", "hf_test_token"
HUB = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/(?P<route>revision|tree|paths-info)/(?P<rev>[^/]+)/?(?P<path>.*)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 3-shard checkpoint of 6 layers, about 5 MB, with an index."""
    return write_sharded(tmp_path_factory.mktemp("remote") / "ckpt")


class Server(ThreadingHTTPServer):
    """Serves ``root`` at ``/ckpt/`` and as Hub repo ``org/model``; counts body bytes; can cut a shard short."""

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.root, self.served, self.cut, self.requests, self.ranges = root, 0, {}, [], True
        self.lock = threading.Lock()

    def handle_error(self, request, client_address) -> None:
        # a client hanging up mid-body (fsspec, on a response it refuses) is no failure of the server;
        # its traceback would land in the stderr the tests check
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: Server

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass

    def do_HEAD(self) -> None:
        self.do_GET(body=False)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        form = parse_qs(self.rfile.read(length).decode())
        match = HUB.fullmatch(unquote(self.path))
        if not match or match["route"] != "paths-info" or not self._authorized():
            return self._reply(404 if match else 401, b"{}")
        entries = [self._entry(path) for path in form.get("paths", [])]
        self._json([entry for entry in entries if entry])

    def do_GET(self, body: bool = True) -> None:
        path = unquote(self.path.split("?")[0])
        self.server.requests.append(path)
        if path.startswith("/private/"):
            return self._reply(401, b"unauthorized")
        match = HUB.fullmatch(path)
        if match:
            if not self._authorized() or match["repo"] != "org/model":
                return self._reply(401, b'{"error": "Invalid credentials"}')
            if match["route"] == "revision":
                return self._json({"id": "org/model", "sha": SHA, "siblings": []})
            return self._json([self._entry(p.name) for p in sorted(self.server.root.iterdir())])
        resolve = re.fullmatch(r"/org/model/resolve/[^/]+/(.+)", path)
        name = resolve.group(1) if resolve else path.removeprefix("/ckpt/") if path.startswith("/ckpt/") else None
        file = self.server.root / name if name else None
        if file is None or not file.is_file():
            return self._reply(404, b"not found")
        self._send_file(file, body)

    def _send_file(self, file: Path, body: bool) -> None:
        data, status = file.read_bytes(), 200
        start, end = 0, len(data)
        requested = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if requested and self.server.ranges:
            start, end, status = int(requested[1]), min(len(data), int(requested[2] or len(data) - 1) + 1), 206
        self.send_response(status)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{SHA}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        cut = self.server.cut.get(file.name)
        chunk = data[start:end] if cut is None or end <= cut else data[start : max(start, cut)]
        with self.server.lock:
            self.server.served += len(chunk)
        self.wfile.write(chunk)
        if len(chunk) < end - start:  # the connection drops mid-response
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {TOKEN}"

    def _entry(self, name: str) -> dict | None:
        file = self.server.root / name
        if not file.is_file():
            return None
        return {"type": "file", "path": name, "size": file.stat().st_size, "oid": SHA}

    def _json(self, value) -> None:
        self._reply(200, json.dumps(value).encode(), "application/json")

    def _reply(self, status: int, body: bytes, kind: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


@pytest.fixture
def server(checkpoint):
    server = Server(checkpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def run(capsys, *argv):
    status = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return status, out, err


def _json_without_path(out: str) -> dict:
    report = json.loads(out)
    report.pop("path")
    return report


def test_inspect_over_http_gives_the_local_result_reading_under_1_percent(checkpoint, server, capsys):
    local = run(capsys, "inspect", checkpoint, "--json")
    remote = run(capsys, "inspect", f"{server.url}/ckpt/", "--json")
    assert local[0] == remote[0] == 1 and remote[2] == ""
    assert _json_without_path(remote[1]) == _json_without_path(local[1])
    assert json.loads(remote[1])["path"] == f"{server.url}/ckpt/"
    total = sum(file.stat().st_size for file in checkpoint.iterdir())
    assert total > 4_000_000 and 0 < server.served < total / 100
    probes = [request for request in server.requests if request.endswith("/model.safetensors")]
    assert 0 < len(probes) <= 2  # is there a model.safetensors beside the index (an ambiguous layout)?
    shard_requests = [request for request in server.requests if request.endswith("-of-00003.safetensors")]
    assert len(shard_requests) <= 4 * 3, shard_requests  # per shard: size, header length, header, all its scales


def test_inspect_over_http_of_the_index_and_of_one_shard(checkpoint, server, capsys):
    index = run(capsys, "inspect", f"{server.url}/ckpt/model.safetensors.index.json", "--json")
    assert index[0] == 1 and len(json.loads(index[1])["groups"]) == 12
    shard = run(capsys, "inspect", f"{server.url}/ckpt/model-00002-of-00003.safetensors", "--json")
    parents = {group["parent"] for group in json.loads(shard[1])["groups"]}
    assert shard[0] == 1 and parents == {f"model.layers.{i}.{part}" for i in (2, 3) for part in ("self_attn", "mlp")}


def test_a_shard_cut_mid_read_is_one_line_and_exit_2(checkpoint, server, capsys):
    shard = "model-00002-of-00003.safetensors"
    scales = [info for key, info in open_checkpoint(checkpoint).tensors.items() if key.endswith("weight_scale_2")]
    server.cut[shard] = max(info.end for info in scales if info.shard == shard) - 2  # its header reads whole
    status, out, err = run(capsys, "inspect", f"{server.url}/ckpt/")
    assert status == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("sharedquant inspect: error: ") and f"/ckpt/{shard}" in err


@pytest.mark.parametrize(
    ("where", "says"),
    [("/missing/", "neither model.safetensors nor"), ("/ckpt/nothing.safetensors", "not found (404"),
     ("/private/model.safetensors", "refused: HTTP 401")],
)  # fmt: skip
def test_http_errors_are_one_line_and_exit_2(server, capsys, where, says):
    status, out, err = run(capsys, "inspect", f"{server.url}{where}")
    assert status == 2 and out == "" and len(err.splitlines()) == 1 and says in err


def test_a_server_that_ignores_range_is_one_line_and_exit_2(server, capsys):
    server.ranges = False  # answers every GET with the whole file: reading on would fetch the whole checkpoint
    status, out, err = run(capsys, "inspect", f"{server.url}/ckpt/")
    assert status == 2 and out == "" and len(err.splitlines()) == 1 and "/ckpt/model-00001-of-00003" in err, err


def test_a_refused_connection_is_one_line_and_exit_2(capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed when the block ends: nothing listens there
    status, out, err = run(capsys, "inspect", f"http://127.0.0.1:{port}/ckpt/")
    assert status == 2 and len(err.splitlines()) == 1 and f"127.0.0.1:{port}/ckpt/" in err
    assert "cannot read: ClientConnectorError" in err and "holds neither" not in err


def test_an_hf_url_needs_an_org_and_a_repo(capsys):
    status, _, err = run(capsys, "inspect", "hf://just-a-name")
    assert status == 2 and "expected hf://ORG/REPO[@REVISION][/PATH]" in err


def test_an_index_naming_a_shard_outside_the_directory_is_refused(tmp_path, server, capsys):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": "../secret"}}))
    server.root = tmp_path
    status, _, err = run(capsys, "inspect", f"{server.url}/ckpt/")
    assert status == 2 and "outside the checkpoint directory: '../secret'" in err
    assert not any("secret" in request for request in server.requests)


@pytest.mark.parametrize("name", ["../x.safetensors", "/etc/x", "https://elsewhere/x.safetensors", "a/../../x", ""])
def test_confined_refuses_names_that_leave_the_directory(name):
    with pytest.raises(SourceError, match="outside the checkpoint directory"):
        _confined(name, "http://host/ckpt")


def test_reconcile_of_a_url_is_refused_unless_dry_run(server, tmp_path, capsys):
    status, _, err = run(capsys, "reconcile", f"{server.url}/ckpt/", "--out", tmp_path / "out")
    assert status == 2 and "download it first" in err and not (tmp_path / "out").exists()
    status, out, _ = run(capsys, "reconcile", f"{server.url}/ckpt/", "--dry-run")
    assert status == 0 and out.count("would requantize") == 12


def test_hf_url_through_hf_endpoint_and_hf_token(checkpoint, server, capsys):
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0"}
    command = [sys.executable, "-m", "sharedquant.adapters.cli", "inspect", "hf://org/model@main", "--json"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    local = run(capsys, "inspect", checkpoint, "--json")
    assert result.returncode == 1, result.stderr
    assert _json_without_path(result.stdout) == _json_without_path(local[1])
    assert any(request.startswith("/org/model/resolve/") for request in server.requests)
    assert 0 < server.served < sum(file.stat().st_size for file in checkpoint.iterdir()) / 100
    env["HF_TOKEN"] = "wrong"
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert refused.stderr.startswith("sharedquant inspect: error: hf://org/model@main")


def test_open_checkpoint_over_http_reads_tensors_bit_for_bit(checkpoint, server):
    remote, local = open_checkpoint(f"{server.url}/ckpt/"), open_checkpoint(checkpoint)
    key = "model.layers.3.mlp.up_proj.weight_scale"
    assert remote.tensors == local.tensors and torch.equal(remote.read(key).view(torch.uint8), local.read(key).view(torch.uint8))


def test_without_the_remote_extra_the_error_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fsspec.implementations.http", None)  # import of it raises ImportError
    status, _, err = run(capsys, "inspect", "http://127.0.0.1:1/ckpt/")
    assert status == 2 and "pip install 'sharedquant[remote]'" in err and len(err.splitlines()) == 1
