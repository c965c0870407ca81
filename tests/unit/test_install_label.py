"""The node label: the merge patch, and a round trip to a local plain-HTTP stand-in for the API."""

from __future__ import annotations

import dataclasses
import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotrestart.install import node_label
from hotrestart.install.errors import InstallError
from hotrestart.install.settings import Settings


def test_the_patch_sets_or_removes_the_label() -> None:
    api = node_label.Api("https://10.96.0.1:443", "secret-token", None, "node a/1")
    req = node_label.request(api, "true")
    assert req.get_method() == "PATCH"
    assert req.full_url == "https://10.96.0.1:443/api/v1/nodes/node%20a%2F1"
    assert req.get_header("Authorization") == "Bearer secret-token"
    assert req.get_header("Content-type") == "application/merge-patch+json"
    assert isinstance(req.data, bytes)
    assert json.loads(req.data) == {"metadata": {"labels": {"hotrestart.io/ready": "true"}}}
    removal = node_label.request(api, None)
    assert isinstance(removal.data, bytes)
    assert json.loads(removal.data) == {"metadata": {"labels": {"hotrestart.io/ready": None}}}


def test_in_cluster_needs_the_api_and_the_node_name(tmp_path: Path) -> None:
    assert node_label.in_cluster(Settings(node_name="n")) is None
    assert node_label.in_cluster(Settings(api_host="10.0.0.1")) is None
    with pytest.raises(InstallError, match="service account credentials"):
        node_label.in_cluster(Settings(api_host="10.0.0.1", api_port="443", node_name="n"), str(tmp_path))


def test_in_cluster_verifies_with_the_service_accounts_ca(tmp_path: Path) -> None:
    cert = Path(ssl.get_default_verify_paths().cafile or "")
    if not cert.is_file():
        pytest.skip("no CA bundle on this machine to stand in for the cluster's")
    (tmp_path / "token").write_text("tok\n")
    (tmp_path / "ca.crt").write_bytes(cert.read_bytes())
    api = node_label.in_cluster(Settings(api_host="fd00::1", api_port="6443", node_name="n"), str(tmp_path))
    assert api is not None
    assert api.base == "https://[fd00::1]:6443" and api.token == "tok"
    assert api.context is not None and api.context.verify_mode == ssl.CERT_REQUIRED and api.context.check_hostname


@dataclasses.dataclass
class Seen:
    patches: list[tuple[str, str, dict[str, object]]] = dataclasses.field(default_factory=list)
    status: int = 200


@pytest.fixture
def server() -> Iterator[tuple[str, Seen]]:
    seen = Seen()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PATCH(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.patches.append((self.path, self.headers["Authorization"], body))
            reply = b'{"kind":"Node"}' if seen.status == 200 else b'{"message":"nodes \\"a\\" is forbidden"}'
            self.send_response(seen.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_the_label_round_trip(server: tuple[str, Seen], monkeypatch: pytest.MonkeyPatch) -> None:
    base, seen = server
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # never used for the API
    api = node_label.Api(base, "tok", None, "a")
    node_label.set_label(api, "true")
    node_label.set_label(api, None)
    assert seen.patches == [
        ("/api/v1/nodes/a", "Bearer tok", {"metadata": {"labels": {"hotrestart.io/ready": "true"}}}),
        ("/api/v1/nodes/a", "Bearer tok", {"metadata": {"labels": {"hotrestart.io/ready": None}}}),
    ]
    seen.status = 403
    with pytest.raises(InstallError, match=r'label hotrestart.io/ready: HTTP 403: nodes "a" is forbidden'):
        node_label.set_label(api, "true")


def test_an_api_out_of_reach_is_an_error() -> None:
    with pytest.raises(InstallError, match=r"node a: label hotrestart\.io/ready"):
        node_label.set_label(node_label.Api("http://127.0.0.1:9", "t", None, "a"), "true")
