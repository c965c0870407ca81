"""A read-only OCI distribution registry on 127.0.0.1 that serves the offline test images.

containerd's CRI restore from a checkpoint archive pulls the archive's base image by
NAME@DIGEST (a real pull, even when the image is present). With no registry reachable
here, this serves the same OCI layout the test images are imported from; containerd
talks plain HTTP to a localhost registry without configuration.
"""

from __future__ import annotations

import json
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

_MANIFEST = re.compile(r"^/v2/(?P<repo>.+)/manifests/(?P<ref>[^/]+)$")
_BLOB = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")


class LocalRegistry:
    """Serves every image of an OCI archive as 127.0.0.1:<port>/<last path element>:<tag>."""

    def __init__(self, oci_archive: Path) -> None:
        self.blobs: dict[str, bytes] = {}
        self.tags: dict[tuple[str, str], str] = {}  # (repo, tag) -> manifest digest
        self.media: dict[str, str] = {}
        with tarfile.open(oci_archive) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.startswith("blobs/sha256/"):
                    data = tar.extractfile(member)
                    assert data is not None
                    self.blobs["sha256:" + member.name.rsplit("/", 1)[1]] = data.read()
            index_file = tar.extractfile("index.json")
            assert index_file is not None
            index = json.load(index_file)
        for m in index["manifests"]:
            name = m["annotations"]["io.containerd.image.name"]
            repo, tag = name.rsplit("/", 1)[1].rsplit(":", 1)
            self.tags[(repo, tag)] = m["digest"]
            self.media[m["digest"]] = m["mediaType"]
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def ref(self, image: str) -> str:
        """This registry's name for a test image (`hotrestart.test/busybox:latest`)."""
        return f"{self.host}/{image.rsplit('/', 1)[1]}"

    def digest_ref(self, image: str) -> str:
        """NAME@DIGEST of a test image here, the form a pulled image is also known by."""
        repo, tag = image.rsplit("/", 1)[1].rsplit(":", 1)
        return f"{self.host}/{repo}@{self.tags[(repo, tag)]}"

    def __enter__(self) -> LocalRegistry:
        self._thread.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                if self.path == "/v2/":
                    return self._reply(200, b"{}", "application/json", "", body)
                if m := _MANIFEST.match(self.path):
                    ref = m["ref"]
                    digest = ref if ref.startswith("sha256:") else registry.tags.get((m["repo"], ref), "")
                    if digest in registry.media:
                        return self._reply(200, registry.blobs[digest], registry.media[digest], digest, body)
                elif m := _BLOB.match(self.path):
                    if m["digest"] in registry.blobs:
                        data = registry.blobs[m["digest"]]
                        return self._reply(200, data, "application/octet-stream", m["digest"], body)
                self._reply(404, b'{"errors":[{"code":"NOT_FOUND"}]}', "application/json", "", body)

            def _reply(self, code: int, data: bytes, media: str, digest: str, body: bool) -> None:
                self.send_response(code)
                self.send_header("Content-Type", media)
                self.send_header("Content-Length", str(len(data)))
                if digest:
                    self.send_header("Docker-Content-Digest", digest)
                self.end_headers()
                if body:
                    self.wfile.write(data)

        return Handler
