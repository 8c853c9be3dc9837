"""Test setup of the ``sfr`` package's tests.

Pytest (import mode ``prepend``) puts the folder of each ``conftest.py`` on ``sys.path``: this file makes
the shared helpers of this folder (``tiny_models.py``) importable from the tests of its subfolders too
(``tests/sfr/commands/``), whichever test runs first.
"""

from pathlib import Path

import pytest


@pytest.fixture
def hub(monkeypatch, tmp_path_factory):
    """The Hugging Face hub at a local HTTP server: ``org/there`` exists, every other repo is not found.

    ``hub.requests`` lists the paths asked; ``hub.online()`` leaves offline mode (the tests run with
    ``HF_HUB_OFFLINE=1``), ``hub.unreachable()`` points the hub at a closed port; ``hub.cache(repo_id)``
    adds a snapshot to an empty Hugging Face cache of the test's own."""
    import http.server
    import json
    import shutil
    import threading

    from huggingface_hub import constants

    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            requests.append(self.path)
            found = self.path.startswith("/api/models/org/there")
            body = json.dumps({"id": "org/there"} if found else {"error": "Repository not found"}).encode()
            self.send_response(200 if found else 404)
            if not found:
                self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    from sfr.checks import ask_hub

    ask_hub.cache_clear()  # its answers are kept per process: each test asks its own hub
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    class Hub:
        def online(self):
            monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
            monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")

        def unreachable(self):
            import socket

            with socket.socket() as probe:  # a port that was free a moment ago: connection refused
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
            monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")

        def cache(self, repo_id: str, source: Path | None = None) -> Path:
            """A snapshot of ``repo_id`` in the cache (the files of ``source``, else an empty config.json)."""
            repo = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
            snapshot = repo / "snapshots" / "0123abc"
            snapshot.mkdir(parents=True)
            (repo / "refs").mkdir()
            (repo / "refs" / "main").write_text("0123abc")
            if source is not None:
                shutil.copytree(source, snapshot, dirs_exist_ok=True)
            else:
                (snapshot / "config.json").write_text("{}")
            return snapshot

    hub_object = Hub()
    hub_object.requests = requests
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hub-cache")))
    yield hub_object
    ask_hub.cache_clear()
    server.shutdown()
    server.server_close()

