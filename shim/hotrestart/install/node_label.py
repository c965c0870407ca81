"""The node label `hotrestart.io/ready=true`: pods that need the runtime select it.

Set with a JSON merge patch of the Node through the in-cluster API, verified against the
service account's CA; removed (a null in the patch) before uninstall takes anything away, so
no new pod is placed on a node losing the runtime. The service account needs only get and
patch on nodes.
"""

from __future__ import annotations

import dataclasses
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request

from hotrestart.install.errors import InstallError
from hotrestart.install.settings import Settings

LABEL = "hotrestart.io/ready"
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
MAX_TOKEN = 64 << 10
TIMEOUT = 15.0


@dataclasses.dataclass(frozen=True, slots=True)
class Api:
    base: str  # https://host:port (tests: a plain http:// server of theirs)
    token: str
    context: ssl.SSLContext | None
    node: str


def in_cluster(settings: Settings, account: str = SERVICE_ACCOUNT) -> Api | None:
    """The API as the pod's service account reaches it; None when not in a cluster."""
    if not settings.api_host or not settings.node_name:
        return None
    try:
        with open(f"{account}/token", "rb") as f:
            token = f.read(MAX_TOKEN).decode("ascii").strip()
        context = ssl.create_default_context(cafile=f"{account}/ca.crt")
    except (OSError, UnicodeDecodeError, ssl.SSLError) as exc:
        raise InstallError(f"service account credentials in {account}: {exc}") from None
    host = f"[{settings.api_host}]" if ":" in settings.api_host else settings.api_host
    return Api(f"https://{host}:{settings.api_port}", token, context, settings.node_name)


def request(api: Api, value: str | None) -> urllib.request.Request:
    """The PATCH that sets the label to `value`, or removes it (None)."""
    body = json.dumps({"metadata": {"labels": {LABEL: value}}}).encode()
    return urllib.request.Request(
        f"{api.base}/api/v1/nodes/{urllib.parse.quote(api.node, safe='')}",
        data=body,
        method="PATCH",
        headers={
            "Authorization": f"Bearer {api.token}",
            "Content-Type": "application/merge-patch+json",
            "Accept": "application/json",
        },
    )


def set_label(api: Api, value: str | None) -> None:
    # No proxy from the environment: the API server is reached directly, as kubelet does.
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=api.context)
    )
    try:
        with opener.open(request(api, value), timeout=TIMEOUT) as response:
            response.read(1 << 20)
    except urllib.error.HTTPError as exc:
        detail = exc.read(2000).decode("utf-8", "replace")
        try:
            detail = json.loads(detail).get("message", detail)
        except (ValueError, AttributeError):
            pass
        raise InstallError(f"node {api.node}: label {LABEL}: HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise InstallError(f"node {api.node}: label {LABEL}: {exc}") from None
