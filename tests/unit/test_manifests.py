"""The cluster install manifests in runtime-class/: rendered by the real kustomize and Helm,
every object valid against Kubernetes' OpenAPI schema, and the installer's contract kept.

Offline: no cluster and no network. The tools: Debian's `kustomize` on PATH, and the Python
packages `kubernetes-validate` (the API schemas, bundled) and `helm-python-sdk` (Helm's own Go
library, helm.sh/helm/v4, loaded in-process: `helm template` without the binary). Helm runs in a
child process, so that the Go runtime and its threads never live in the test process, which forks.
The node guard's CEL expressions are evaluated by the Python package `cel-python` (celpy).
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "runtime-class"
KUSTOMIZE = MANIFESTS / "kustomize"
CHART = MANIFESTS / "helm" / "hotrestart"

NAMESPACE = "hotrestart-system"
INSTALLER = "hotrestart-installer"
IMAGE = "docker.io/hotrestart/installer"

# The oldest Kubernetes the README names; the newest is whatever kubernetes-validate knows.
OLDEST_KUBERNETES = "1.25"

# APIs newer than OLDEST_KUBERNETES, with the release that made them GA: only the optional node
# guard uses them, and their objects are checked against the schemas of that release on.
NEWER_APIS = {
    ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy"): "1.30",
    ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding"): "1.30",
}
NODE_GUARD = "hotrestart-node-guard"
READY_LABEL = "hotrestart.io/ready"
NODE_NAME_CLAIM = "authentication.kubernetes.io/node-name"

# The installer's contract: these names, in this order, with these defaults.
INSTALLER_ENV = {
    "HOTRESTART_HOST_ROOT": "/host",
    "HOTRESTART_INSTALL_DIR": "/opt/hotrestart",
    "HOTRESTART_CONTAINERD_CONFIG": "/etc/containerd/config.toml",
    "HOTRESTART_RESTART": "systemd",
    "HOTRESTART_CONTAINERD_UNIT": "containerd",
    "HOTRESTART_RUNTIME_NAME": "hotrestart",
    "HOTRESTART_STORE": "/var/lib/hotrestart/checkpoints",
    "HOTRESTART_SYSTEMD_CGROUP": "auto",
    "HOTRESTART_PRUNE_INTERVAL": "10m",
    "HOTRESTART_RETENTION_MAX_AGE": "",
    "HOTRESTART_RETENTION_MAX_SIZE": "",
}
KEY_SOURCE = "/etc/hotrestart-key/store-key"

KUSTOMIZE_MISSING = (
    "the `kustomize` command is not on PATH; install Debian's package: "
    "apt-get install -y --no-install-recommends kustomize/trixie "
    "(trixie is among the apt sources once `make setup` has run)"
)

Obj = dict[str, Any]


def version_key(version: str) -> tuple[int, ...]:
    """A Kubernetes version as numbers to compare: "1.30" -> (1, 30), "1.37.0" -> (1, 37, 0)."""
    return tuple(int(part) for part in version.split("."))


def _need(module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"Python package {package} is not installed ({exc}); pip install {package}", pytrace=False)


@pytest.fixture(scope="module")
def yaml() -> ModuleType:
    return _need("yaml", "PyYAML")


@pytest.fixture(scope="module")
def schema_versions() -> tuple[str, ...]:
    kv = _need("kubernetes_validate", "kubernetes-validate")
    return (OLDEST_KUBERNETES, kv.latest_version())


@pytest.fixture(scope="module")
def valid(schema_versions: tuple[str, ...]) -> Callable[[list[Obj]], None]:
    """Checks every object against the Kubernetes API schema (strict: unknown fields fail too), on
    the oldest and the newest Kubernetes, or the newest only for an API the oldest does not have."""
    import kubernetes_validate

    def check(objects: list[Obj]) -> None:
        assert objects
        for obj in objects:
            since = version_key(NEWER_APIS.get((obj["apiVersion"], obj["kind"]), OLDEST_KUBERNETES))
            versions = [v for v in schema_versions if version_key(v) >= since]
            assert versions, f"{obj['kind']} is newer than every schema here"
            for version in versions:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    where = "/".join(str(p) for p in exc.path)
                    name = f"{obj['kind']}/{obj['metadata']['name']}"
                    pytest.fail(f"{name} on Kubernetes {version}: at /{where}: {exc.message}", pytrace=False)

    return check


# ---------------------------------------------------------------------------------------------
# kustomize


@pytest.fixture(scope="module")
def kustomize(yaml: ModuleType) -> Callable[[Path], list[Obj]]:
    binary = shutil.which("kustomize")
    if binary is None:
        pytest.fail(KUSTOMIZE_MISSING, pytrace=False)

    def build(directory: Path) -> list[Obj]:
        result = subprocess.run(
            [binary, "build", str(directory)], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, f"kustomize build {directory}: {result.stderr}"
        return [obj for obj in yaml.safe_load_all(result.stdout) if obj]

    return build


def overlay(tmp_path: Path, resources: list[Path], **fields: Any) -> Path:
    """A kustomization of the caller's own over the given directories, as a user would write."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(p, tmp_path) for p in resources],
        **fields,
    }
    (tmp_path / "kustomization.yaml").write_text(json.dumps(spec))
    return tmp_path


def store_key_overlay(tmp_path: Path) -> Path:
    """The base with the store-key component, as the README shows."""
    return overlay(tmp_path, [KUSTOMIZE / "base"], components=[os.path.relpath(KUSTOMIZE / "store-key", tmp_path)])


def object_store_overlay(tmp_path: Path) -> Path:
    """The base with the store-key and s3-config components and the store set to a bucket."""
    components = [os.path.relpath(KUSTOMIZE / c, tmp_path) for c in ("store-key", "s3-config")]
    path = overlay(tmp_path, [KUSTOMIZE / "base"], components=components)
    return path


def node_guard_overlay(tmp_path: Path) -> Path:
    """The base with the node-guard component, as the README shows."""
    return overlay(tmp_path, [KUSTOMIZE / "base"], components=[os.path.relpath(KUSTOMIZE / "node-guard", tmp_path)])


@pytest.fixture(scope="module")
def base(kustomize: Callable[[Path], list[Obj]]) -> list[Obj]:
    return kustomize(KUSTOMIZE / "base")


def the(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} objects named {name}"
    return found[0]


def installer_of(objects: list[Obj]) -> Obj:
    pod = the(objects, "DaemonSet")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["installer"]
    assert not pod.get("initContainers")
    container: Obj = pod["containers"][0]
    return container


def env_of(container: Obj) -> dict[str, Any]:
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), names
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_the_base_and_its_variants_are_valid_kubernetes(
    kustomize: Callable[[Path], list[Obj]], valid: Callable[[list[Obj]], None], tmp_path: Path
) -> None:
    valid(kustomize(KUSTOMIZE / "base"))
    valid(kustomize(MANIFESTS))
    valid(kustomize(KUSTOMIZE / "uninstall"))
    valid(kustomize(store_key_overlay(tmp_path / "store-key")))
    valid(kustomize(node_guard_overlay(tmp_path / "node-guard")))
    valid(kustomize(object_store_overlay(tmp_path / "object-store")))


def test_the_manual_runtimeclass_is_valid_kubernetes(yaml: ModuleType, valid: Callable[[list[Obj]], None]) -> None:
    objects = [o for o in yaml.safe_load_all((MANIFESTS / "runtimeclass.yaml").read_text()) if o]
    valid(objects)
    assert the(objects, "RuntimeClass", "hotrestart")["handler"] == "hotrestart"


def test_the_base_holds_exactly_the_installer_and_its_runtimeclass(base: list[Obj]) -> None:
    found = sorted((o["kind"], o["metadata"]["name"], o["metadata"].get("namespace")) for o in base)
    assert found == [
        ("ClusterRole", INSTALLER, None),
        ("ClusterRoleBinding", INSTALLER, None),
        ("DaemonSet", INSTALLER, NAMESPACE),
        ("Namespace", NAMESPACE, None),
        ("RuntimeClass", "hotrestart", None),
        ("ServiceAccount", INSTALLER, NAMESPACE),
    ]


def test_apply_k_on_runtime_class_installs_the_base(kustomize: Callable[[Path], list[Obj]], base: list[Obj]) -> None:
    assert kustomize(MANIFESTS) == base


def test_the_installer_daemonset_keeps_its_contract(base: list[Obj]) -> None:
    daemonset = the(base, "DaemonSet", INSTALLER)
    spec = daemonset["spec"]
    assert spec["updateStrategy"]["type"] == "RollingUpdate"
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == INSTALLER
    assert pod["automountServiceAccountToken"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["hostPID"] is True  # systemctl reaches systemd only from the host PID namespace
    assert not pod.get("hostNetwork")
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["terminationGracePeriodSeconds"] == 30
    assert pod["volumes"] == [{"name": "host", "hostPath": {"path": "/", "type": "Directory"}}]

    installer = installer_of(base)
    assert installer["image"] == f"{IMAGE}:0.1.0"
    assert installer["imagePullPolicy"] == "IfNotPresent"
    assert installer["command"] == ["/hotrestart/bin/hotrestart", "install", "--wait"]
    assert not installer.get("args")
    assert installer["securityContext"] == {"privileged": True}
    assert installer["volumeMounts"] == [{"name": "host", "mountPath": "/host", "mountPropagation": "HostToContainer"}]
    assert installer["resources"]["limits"]["memory"] == "256Mi"
    assert set(installer["resources"]["requests"]) == {"cpu", "memory"}
    assert not installer.get("readinessProbe")  # the node label is the readiness signal

    env = env_of(installer)
    assert env.pop("NODE_NAME") == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env == INSTALLER_ENV
    assert list(env) == list(INSTALLER_ENV)


def test_the_installer_may_only_read_and_label_nodes(base: list[Obj]) -> None:
    role = the(base, "ClusterRole", INSTALLER)
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]
    assert "aggregationRule" not in role
    binding = the(base, "ClusterRoleBinding", INSTALLER)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": INSTALLER}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": INSTALLER, "namespace": NAMESPACE}]
    assert the(base, "ServiceAccount", INSTALLER)["automountServiceAccountToken"] is True
    assert not [o for o in base if o["kind"] in ("Role", "RoleBinding", "Secret")]


def test_the_runtimeclass_schedules_onto_ready_nodes_only(base: list[Obj]) -> None:
    runtime_class = the(base, "RuntimeClass", "hotrestart")
    assert runtime_class["handler"] == env_of(installer_of(base))["HOTRESTART_RUNTIME_NAME"]
    assert runtime_class["scheduling"] == {"nodeSelector": {"hotrestart.io/ready": "true"}}


def test_the_uninstall_overlay_changes_only_the_command(
    kustomize: Callable[[Path], list[Obj]], base: list[Obj]
) -> None:
    uninstall = kustomize(KUSTOMIZE / "uninstall")
    assert installer_of(uninstall)["command"] == ["/hotrestart/bin/hotrestart", "uninstall", "--wait"]
    # The RuntimeClass stays, so that `kubectl delete -k` on the overlay removes it too.
    expected = copy.deepcopy(base)
    installer_of(expected)["command"] = installer_of(uninstall)["command"]
    assert uninstall == expected


def test_the_store_key_component_mounts_the_users_secret(
    kustomize: Callable[[Path], list[Obj]], base: list[Obj], tmp_path: Path
) -> None:
    with_key = kustomize(store_key_overlay(tmp_path))
    pod = the(with_key, "DaemonSet")["spec"]["template"]["spec"]
    assert {"name": "store-key", "mountPath": "/etc/hotrestart-key", "readOnly": True} in installer_of(with_key)[
        "volumeMounts"
    ]
    secret = next(v["secret"] for v in pod["volumes"] if v["name"] == "store-key")
    assert secret["secretName"] == "hotrestart-store-key"
    assert secret["items"] == [{"key": "store-key", "path": "store-key"}]
    assert secret["defaultMode"] == 0o400
    assert not secret.get("optional")
    assert env_of(installer_of(with_key))["HOTRESTART_STORE_KEY_SOURCE"] == KEY_SOURCE
    # Nothing else changes, and the Secret itself is the user's.
    assert normalized(with_key) == normalized(with_store_key(base))
    assert not [o for o in with_key if o["kind"] == "Secret"]


def newer_apis_in(objects: list[Obj]) -> list[str]:
    return [o["kind"] for o in objects if (o["apiVersion"], o["kind"]) in NEWER_APIS]


def test_the_node_guard_component_adds_only_the_policy_and_its_binding(
    kustomize: Callable[[Path], list[Obj]], base: list[Obj], tmp_path: Path
) -> None:
    guarded = kustomize(node_guard_overlay(tmp_path))
    added = [o for o in guarded if o not in base]
    assert sorted((o["kind"], o["metadata"]["name"]) for o in added) == [
        ("ValidatingAdmissionPolicy", NODE_GUARD),
        ("ValidatingAdmissionPolicyBinding", NODE_GUARD),
    ]
    assert [o for o in guarded if o in base] == base
    # The component is opt-in: nothing the README installs by default needs Kubernetes 1.30.
    for directory in (MANIFESTS, KUSTOMIZE / "base", KUSTOMIZE / "uninstall"):
        assert not newer_apis_in(kustomize(directory)), directory


def check_node_guard(objects: list[Obj], policy_name: str, service_account: Obj) -> Obj:
    """The node guard's structure; returns the policy."""
    policy = the(objects, "ValidatingAdmissionPolicy", policy_name)
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    assert "paramKind" not in spec
    assert spec["matchConstraints"] == {
        "resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["nodes"]}]
    }
    user = f"system:serviceaccount:{service_account['metadata']['namespace']}:{service_account['metadata']['name']}"
    assert spec["matchConditions"] == [
        {"name": "hotrestart-installer", "expression": f"request.userInfo.username == '{user}'"}
    ]
    assert len(spec["validations"]) == 5
    for validation in spec["validations"]:
        assert validation.keys() == {"expression", "message", "reason"}
        assert validation["reason"] == "Forbidden"
    assert "variables" not in spec and "auditAnnotations" not in spec
    binding = the(objects, "ValidatingAdmissionPolicyBinding", policy_name)
    assert binding["spec"] == {"policyName": policy_name, "validationActions": ["Deny"]}
    return policy


def test_the_node_guard_binds_its_policy_to_the_installer_only(
    kustomize: Callable[[Path], list[Obj]], tmp_path: Path
) -> None:
    objects = kustomize(node_guard_overlay(tmp_path))
    check_node_guard(objects, NODE_GUARD, the(objects, "ServiceAccount", INSTALLER))


def test_the_node_guard_needs_kubernetes_1_30(kustomize: Callable[[Path], list[Obj]], tmp_path: Path) -> None:
    """What the README says: the API is GA from 1.30, and absent from 1.29 and the oldest supported."""
    import kubernetes_validate

    guard = [o for o in kustomize(node_guard_overlay(tmp_path)) if o["metadata"]["name"] == NODE_GUARD]
    assert len(guard) == 2
    for obj in guard:
        kubernetes_validate.validate(obj, "1.30", strict=True)
        for version in ("1.29", OLDEST_KUBERNETES):
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(obj, version, strict=True)


def test_kustomize_images_overrides_the_installer_image(kustomize: Callable[[Path], list[Obj]], tmp_path: Path) -> None:
    images = [{"name": IMAGE, "newName": "registry.example/mirror/installer", "newTag": "0.1.1"}]
    objects = kustomize(overlay(tmp_path, [MANIFESTS], images=images))
    assert installer_of(objects)["image"] == "registry.example/mirror/installer:0.1.1"


# ---------------------------------------------------------------------------------------------
# Helm

# Run in a child process: loads Helm's Go library, runs one request from stdin, prints JSON.
HELM_CHILD = r"""
import json, sys
try:
    import helm_python as helm
except ImportError as exc:
    print(json.dumps({"missing": str(exc)}))
    sys.exit(0)
req = json.load(sys.stdin)
try:
    if req["op"] == "version":
        path = str(helm.library_path)
        with open(path, "rb") as f:
            info = [line for line in f.read().split(b"\n") if line.startswith((b"mod\t", b"dep\thelm.sh/", b"=>\t"))]
        out = {"sdk": helm.helm_sdk_version(), "library": path, "buildinfo": [b.decode() for b in info]}
    elif req["op"] == "lint":
        out = {
            "lint": helm.lint(
                req["chart"], req["values"], strict=True, namespace=req["namespace"], kube_version=req["kube_version"]
            )
        }
    else:
        chart = helm.Chart.load(req["chart"])
        config = helm.Config(namespace=req["namespace"])
        # What `helm template` and `helm install --dry-run=client` do: an install that stops
        # before contacting any cluster, values schema and kubeVersion checked.
        release = config.install(chart, req["release"], req["values"], namespace=req["namespace"], dry_run="client")
        out = {"manifest": release["manifest"], "notes": release["notes"]}
except helm.HelmError as exc:
    out = {"error": f"{type(exc).__name__}: {exc}"}
print(json.dumps(out))
"""

HELM_MISSING = "Python package helm-python-sdk (Helm's Go library, helm.sh/helm/v4) is not installed"


def helm_call(op: str, values: Obj | None = None, release: str = "hotrestart", kube_version: str | None = None) -> Obj:
    request = {
        "op": op,
        "chart": str(CHART),
        "values": values,
        "release": release,
        "namespace": NAMESPACE,
        "kube_version": kube_version,
    }
    result = subprocess.run(
        [sys.executable, "-c", HELM_CHILD],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "KUBECONFIG": os.devnull},
    )
    assert result.returncode == 0, result.stderr
    answer: Obj = json.loads(result.stdout.strip().splitlines()[-1])
    if "missing" in answer:
        pytest.fail(f"{HELM_MISSING} ({answer['missing']}); pip install helm-python-sdk", pytrace=False)
    answer["log"] = result.stderr
    return answer


@pytest.fixture(scope="module")
def helm_template(yaml: ModuleType) -> Callable[..., list[Obj]]:
    def render(values: Obj | None = None, release: str = "hotrestart") -> list[Obj]:
        answer = helm_call("template", values, release)
        assert "error" not in answer, answer["error"]
        return [obj for obj in yaml.safe_load_all(answer["manifest"]) if obj]

    return render


def helm_error(values: Obj) -> str:
    answer = helm_call("template", values)
    assert "error" in answer, f"rendered with {values}"
    message: str = answer["error"]
    return message


def normalized(objects: list[Obj]) -> dict[tuple[str, str], Obj]:
    """The objects by kind and name, less what legitimately differs between kustomize and Helm:
    labels (Helm adds its own and the release to the selector) and the order of lists keyed by name."""
    out = {}
    for original in objects:
        obj = copy.deepcopy(original)
        obj["metadata"].pop("labels", None)
        if obj["kind"] == "DaemonSet":
            obj["spec"].pop("selector")
            obj["spec"]["template"]["metadata"].pop("labels")
            pod = obj["spec"]["template"]["spec"]
            pod["volumes"].sort(key=lambda v: v["name"])
            for container in pod["containers"]:
                container["env"].sort(key=lambda e: e["name"])
                container["volumeMounts"].sort(key=lambda m: m["name"])
        out[(obj["kind"], obj["metadata"]["name"])] = obj
    return out


def with_store_key(objects: list[Obj], key: str = "store-key", secret: str = "hotrestart-store-key") -> list[Obj]:
    """The objects as the store key's documented shape would make them."""
    objects = copy.deepcopy(objects)
    pod = the(objects, "DaemonSet")["spec"]["template"]["spec"]
    pod["volumes"].append(
        {
            "name": "store-key",
            "secret": {"secretName": secret, "items": [{"key": key, "path": "store-key"}], "defaultMode": 0o400},
        }
    )
    installer = pod["containers"][0]
    installer["volumeMounts"].append({"name": "store-key", "mountPath": "/etc/hotrestart-key", "readOnly": True})
    installer["env"].append({"name": "HOTRESTART_STORE_KEY_SOURCE", "value": KEY_SOURCE})
    return objects


def test_the_helm_engine_is_helms_own_go_module() -> None:
    answer = helm_call("version")
    assert answer["sdk"].startswith("v4."), answer
    deps = [line for line in answer["buildinfo"] if line.startswith("dep\thelm.sh/helm/v4\t")]
    assert deps, f"{answer['library']} does not link helm.sh/helm/v4: {answer['buildinfo']}"
    assert deps[0].split("\t")[2] == answer["sdk"]
    assert not [line for line in answer["buildinfo"] if line.startswith("=>\t")], "Helm replaced by another module"


@pytest.mark.parametrize(
    ("values", "kube_version"),
    [
        (None, None),
        (None, f"{OLDEST_KUBERNETES}.0"),
        ({"store": {"keySecret": {"name": "k"}}, "mode": "uninstall"}, None),
        ({"nodeGuard": {"enabled": True}}, "1.30.0"),
    ],
)
def test_helm_lint_is_clean(values: Obj | None, kube_version: str | None) -> None:
    answer = helm_call("lint", values, kube_version=kube_version)
    assert "error" not in answer, answer["error"]
    report = answer["lint"]
    assert not report["errors"], report
    # Severities: 1 info (icon is recommended), 2 warning, 3 error.
    assert not [m for m in report["messages"] if m["severity"] >= 2], report


def test_helm_defaults_render_the_kustomize_base(
    helm_template: Callable[..., list[Obj]], valid: Callable[[list[Obj]], None], base: list[Obj]
) -> None:
    objects = helm_template()
    valid(objects)
    assert not newer_apis_in(objects)
    # The namespace is Helm's to create (--create-namespace) unless namespace.create is set.
    without_namespace = [o for o in base if o["kind"] != "Namespace"]
    assert normalized(objects) == normalized(without_namespace)
    installer = installer_of(objects)
    assert installer["command"] == ["/hotrestart/bin/hotrestart", "install", "--wait"]
    assert list(env_of(installer)) == ["NODE_NAME", *INSTALLER_ENV]
    daemonset = the(objects, "DaemonSet")
    assert (
        daemonset["spec"]["selector"]["matchLabels"].items()
        <= daemonset["spec"]["template"]["metadata"]["labels"].items()
    )


def test_helm_with_namespace_create_renders_all_of_the_base(
    helm_template: Callable[..., list[Obj]], valid: Callable[[list[Obj]], None], base: list[Obj]
) -> None:
    objects = helm_template({"namespace": {"create": True}})
    valid(objects)
    assert normalized(objects) == normalized(base)


def test_helm_uninstall_mode_renders_the_uninstall_overlay(
    helm_template: Callable[..., list[Obj]], kustomize: Callable[[Path], list[Obj]]
) -> None:
    objects = helm_template({"mode": "uninstall", "namespace": {"create": True}})
    assert normalized(objects) == normalized(kustomize(KUSTOMIZE / "uninstall"))


def test_helm_store_key_secret_renders_the_store_key_component(
    helm_template: Callable[..., list[Obj]],
    valid: Callable[[list[Obj]], None],
    kustomize: Callable[[Path], list[Obj]],
    tmp_path: Path,
) -> None:
    objects = helm_template({"store": {"keySecret": {"name": "hotrestart-store-key"}}, "namespace": {"create": True}})
    valid(objects)
    assert normalized(objects) == normalized(kustomize(store_key_overlay(tmp_path)))


def test_helm_store_key_secret_with_its_own_key_name(
    helm_template: Callable[..., list[Obj]], valid: Callable[[list[Obj]], None]
) -> None:
    plain = helm_template()
    objects = helm_template({"store": {"keySecret": {"name": "node-keys", "key": "hotrestart.key"}}})
    valid(objects)
    assert normalized(objects) == normalized(with_store_key(plain, key="hotrestart.key", secret="node-keys"))


def test_helm_object_store_renders_the_store_key_and_s3_config_components(
    helm_template: Callable[..., list[Obj]],
    valid: Callable[[list[Obj]], None],
    kustomize: Callable[[Path], list[Obj]],
    tmp_path: Path,
) -> None:
    store = {
        "backend": "s3",
        "url": "s3://checkpoints/cluster-a",
        "keySecret": {"name": "hotrestart-store-key"},
        "s3ConfigSecret": {"name": "hotrestart-s3-config"},
    }
    objects = helm_template({"store": store, "namespace": {"create": True}})
    valid(objects)
    env = env_of(installer_of(objects))
    assert env["HOTRESTART_STORE"] == "s3://checkpoints/cluster-a"
    assert env["HOTRESTART_S3_CONFIG_SOURCE"] == "/etc/hotrestart-s3/s3-config"
    # The kustomize components give the same, with HOTRESTART_STORE set by the user's overlay.
    expected = kustomize(object_store_overlay(tmp_path))
    for name, value in env_of(installer_of(expected)).items():
        assert env[name] == value or name == "HOTRESTART_STORE", name
    pod = installer_of(objects)
    assert {"name": "s3-config", "mountPath": "/etc/hotrestart-s3", "readOnly": True} in pod["volumeMounts"]


def test_helm_node_guard_renders_the_node_guard_component(
    helm_template: Callable[..., list[Obj]],
    valid: Callable[[list[Obj]], None],
    kustomize: Callable[[Path], list[Obj]],
    tmp_path: Path,
) -> None:
    objects = helm_template({"nodeGuard": {"enabled": True}, "namespace": {"create": True}})
    valid(objects)
    assert normalized(objects) == normalized(kustomize(node_guard_overlay(tmp_path)))


def test_helm_node_guard_names_follow_the_release(
    helm_template: Callable[..., list[Obj]], valid: Callable[[list[Obj]], None]
) -> None:
    objects = helm_template({"nodeGuard": {"enabled": True}}, release="edge")
    valid(objects)
    policy = check_node_guard(objects, "edge-hotrestart-node-guard", the(objects, "ServiceAccount"))
    assert "edge-hotrestart-installer'" in policy["spec"]["matchConditions"][0]["expression"]
    assert the(objects, "ValidatingAdmissionPolicy")["metadata"]["labels"]["app.kubernetes.io/instance"] == "edge"


def test_helm_refuses_the_node_guard_below_kubernetes_1_30() -> None:
    refusal = "nodeGuard.enabled: needs Kubernetes 1.30 or later"
    # Lint keeps rendering past a template's `fail` and only logs it.
    assert refusal in helm_call("lint", {"nodeGuard": {"enabled": True}}, kube_version="1.29.0")["log"]
    assert refusal not in helm_call("lint", {"nodeGuard": {"enabled": True}}, kube_version="1.30.0")["log"]
    assert refusal not in helm_call("lint", None, kube_version="1.29.0")["log"]


def test_helm_non_default_values(helm_template: Callable[..., list[Obj]], valid: Callable[[list[Obj]], None]) -> None:
    values = {
        "image": {"repository": "registry.example/mirror/installer", "tag": "0.1.1", "pullPolicy": "Always"},
        "installDir": "/usr/local/hotrestart",
        "containerd": {"configPath": "/etc/k3s/containerd/config.toml", "unit": "k3s", "restart": "none"},
        "runtimeClass": {"name": "hot"},
        "store": {"path": "/data/checkpoints"},
        "retention": {"maxAge": "72h", "maxSize": "20Gi", "pruneInterval": "1h"},
        "systemdCgroup": True,
        "nodeSelector": {"pool": "gpu", "kubernetes.io/arch": "arm64"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "priorityClassName": "",
    }
    objects = helm_template(values, release="edge")
    valid(objects)
    assert sorted((o["kind"], o["metadata"]["name"]) for o in objects) == [
        ("ClusterRole", "edge-hotrestart-installer"),
        ("ClusterRoleBinding", "edge-hotrestart-installer"),
        ("DaemonSet", "edge-hotrestart-installer"),
        ("RuntimeClass", "hot"),
        ("ServiceAccount", "edge-hotrestart-installer"),
    ]
    runtime_class = the(objects, "RuntimeClass")
    assert runtime_class["handler"] == "hot"
    assert runtime_class["scheduling"] == {"nodeSelector": {"hotrestart.io/ready": "true"}}
    binding = the(objects, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "edge-hotrestart-installer", "namespace": NAMESPACE}
    ]
    assert binding["roleRef"]["name"] == "edge-hotrestart-installer"

    pod = the(objects, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "edge-hotrestart-installer"
    assert "priorityClassName" not in pod
    # Extra selectors are added; the bundle's os and arch are not overridden.
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64", "pool": "gpu"}
    assert pod["tolerations"] == values["tolerations"]
    installer = installer_of(objects)
    assert installer["image"] == "registry.example/mirror/installer:0.1.1"
    assert installer["imagePullPolicy"] == "Always"
    assert installer["resources"] == values["resources"]
    assert env_of(installer) == {
        "NODE_NAME": {"fieldRef": {"fieldPath": "spec.nodeName"}},
        "HOTRESTART_HOST_ROOT": "/host",
        "HOTRESTART_INSTALL_DIR": "/usr/local/hotrestart",
        "HOTRESTART_CONTAINERD_CONFIG": "/etc/k3s/containerd/config.toml",
        "HOTRESTART_RESTART": "none",
        "HOTRESTART_CONTAINERD_UNIT": "k3s",
        "HOTRESTART_RUNTIME_NAME": "hot",
        "HOTRESTART_STORE": "/data/checkpoints",
        "HOTRESTART_SYSTEMD_CGROUP": "true",
        "HOTRESTART_PRUNE_INTERVAL": "1h",
        "HOTRESTART_RETENTION_MAX_AGE": "72h",
        "HOTRESTART_RETENTION_MAX_SIZE": "20Gi",
    }


def test_helm_without_the_runtimeclass(helm_template: Callable[..., list[Obj]]) -> None:
    objects = helm_template({"runtimeClass": {"create": False, "name": "hot"}})
    assert not [o for o in objects if o["kind"] == "RuntimeClass"]
    assert env_of(installer_of(objects))["HOTRESTART_RUNTIME_NAME"] == "hot"


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"store": {"backend": "gcs"}}, 'store.backend: "gcs" is not supported'),
        ({"store": {"backend": "s3"}}, "store.url: give the object store as s3://bucket/prefix"),
        ({"store": {"backend": "s3", "url": "s3://ckpt/a"}}, "needs a store key"),
        ({"store": {"url": "https://ckpt"}}, "/store/url"),
        ({"mode": "remove"}, "/mode"),
        ({"containerd": {"restart": "always"}}, "/containerd/restart"),
        ({"systemdCgroup": "yes"}, "/systemdCgroup"),
        ({"runtimeClass": {"name": "Hot_Restart"}}, "/runtimeClass/name"),
        ({"store": {"path": "relative/path"}}, "/store/path"),
        ({"retention": {"maxAge": "7d"}}, "/retention/maxAge"),
        ({"retention": {"maxSize": "lots"}}, "/retention/maxSize"),
        ({"retention": {"pruneInterval": ""}}, "/retention/pruneInterval"),
        ({"nodeGuard": {"enabled": "yes"}}, "/nodeGuard/enabled"),
        ({"stor": {"path": "/data"}}, "'stor' not allowed"),
    ],
)
def test_helm_refuses_unsupported_values(values: Obj, expected: str) -> None:
    assert expected in helm_error(values)


def test_helm_notes_tell_the_uninstall_flow() -> None:
    answer = helm_call("template", {"mode": "uninstall"})
    assert "hotrestart: uninstalled" in answer["notes"]
    assert f"helm uninstall hotrestart -n {NAMESPACE}" in answer["notes"]


# ---------------------------------------------------------------------------------------------
# The node guard's CEL, evaluated offline by cel-python (celpy) on the objects an API server
# would hand it: oldObject as stored, object after the merge patch, request with the token's user.

INSTALLER_USER = f"system:serviceaccount:{NAMESPACE}:{INSTALLER}"

STORED_NODE: Obj = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {
        "name": "node-a",
        "uid": "0c7e7c4e-2f4b-4d2c-9a57-6f1b8d1f0a11",
        "resourceVersion": "1200",
        "creationTimestamp": "2026-01-05T10:00:00Z",
        "labels": {"kubernetes.io/hostname": "node-a", "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"},
        "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
        "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1"}],
    },
    "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"], "providerID": "kind://docker/kind/node-a"},
    "status": {"conditions": [{"type": "Ready", "status": "True"}]},
}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies application/merge-patch+json."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def updated(old: Obj, patch: Obj) -> Obj:
    """The node after the patch, with what the server changes on every update, and with empty maps
    dropped as the server's serialization drops them."""
    new: Obj = merge_patch(old, patch)
    meta = new["metadata"]
    meta["resourceVersion"] = str(int(meta["resourceVersion"]) + 1)
    meta["managedFields"] = [*meta["managedFields"], {"manager": "hotrestart", "operation": "Update"}]
    for key in ("labels", "annotations"):
        if key in meta and not meta[key]:
            del meta[key]
    new["status"] = old["status"]
    return new


def with_labels(node: Obj, labels: dict[str, str] | None) -> Obj:
    node = copy.deepcopy(node)
    if labels is None:
        del node["metadata"]["labels"]
    else:
        node["metadata"]["labels"] = labels
    return node


def request_from(user: str = INSTALLER_USER, node_claim: str | None = "node-a") -> Obj:
    user_info: Obj = {"username": user, "uid": "3f1b", "groups": ["system:serviceaccounts", "system:authenticated"]}
    if node_claim is not None:
        user_info["extra"] = {"authentication.kubernetes.io/pod-name": ["installer-x"], NODE_NAME_CLAIM: [node_claim]}
    return {"operation": "UPDATE", "kind": {"group": "", "version": "v1", "kind": "Node"}, "userInfo": user_info}


LABELLED = with_labels(STORED_NODE, {**STORED_NODE["metadata"]["labels"], READY_LABEL: "true"})
SET_READY = {"metadata": {"labels": {READY_LABEL: "true"}}}
REMOVE_READY = {"metadata": {"labels": {READY_LABEL: None}}}
NO_CLAIM = request_from(node_claim=None)
CLAIM_WITHOUT_NODE = {
    **NO_CLAIM,
    "userInfo": {**NO_CLAIM["userInfo"], "extra": {"authentication.kubernetes.io/pod-name": ["x"]}},
}

# (old node, merge patch, request): what the installer sends, on the nodes it may meet.
ALLOWED: dict[str, tuple[Obj, Obj, Obj]] = {
    "label set": (STORED_NODE, SET_READY, request_from()),
    "label set again": (LABELLED, SET_READY, request_from()),
    "label removed": (LABELLED, REMOVE_READY, request_from()),
    "label set on a node without labels": (with_labels(STORED_NODE, None), SET_READY, request_from()),
    "last label removed": (with_labels(STORED_NODE, {READY_LABEL: "true"}), REMOVE_READY, request_from()),
    "token without the node claim": (STORED_NODE, SET_READY, NO_CLAIM),
    "token with other claims only": (STORED_NODE, SET_READY, CLAIM_WITHOUT_NODE),
}

LABELS = "the installer may change no node label but hotrestart.io/ready"
VALUE = 'the installer may set hotrestart.io/ready only to "true"'
METADATA = "the installer may not change a node's annotations, finalizers or owner references"
SPEC = "the installer may not change a node's spec"
OWN_NODE = "the installer may label only the node its pod runs on"

# (old node, merge patch, the validations that fail), sent with the installer's own token: what a
# compromised installer could try.
DENIED: dict[str, tuple[Obj, Obj, set[str]]] = {
    "another label set": (
        STORED_NODE,
        {"metadata": {"labels": {"node-role.kubernetes.io/control-plane": ""}}},
        {LABELS},
    ),
    "another label changed": (STORED_NODE, {"metadata": {"labels": {"kubernetes.io/arch": "arm64"}}}, {LABELS}),
    "another label removed": (LABELLED, {"metadata": {"labels": {"kubernetes.io/hostname": None}}}, {LABELS}),
    "all labels replaced": (STORED_NODE, {"metadata": {"labels": None}}, {LABELS}),
    "label set with another": (STORED_NODE, {"metadata": {"labels": {READY_LABEL: "true", "pool": "x"}}}, {LABELS}),
    "label set to false": (STORED_NODE, {"metadata": {"labels": {READY_LABEL: "false"}}}, {VALUE}),
    "label set to empty": (LABELLED, {"metadata": {"labels": {READY_LABEL: ""}}}, {VALUE}),
    "annotation added": (STORED_NODE, {"metadata": {"annotations": {"x": "y"}}}, {METADATA}),
    "annotations removed": (STORED_NODE, {"metadata": {"annotations": None}}, {METADATA}),
    "finalizer added": (STORED_NODE, {"metadata": {"finalizers": ["example.com/keep"]}}, {METADATA}),
    "owner reference added": (
        STORED_NODE,
        {"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": "gone", "uid": "1"}]}},
        {METADATA},
    ),
    "taint added": (STORED_NODE, {"spec": {"taints": [{"key": "evict", "effect": "NoExecute"}]}}, {SPEC}),
    "cordoned": (STORED_NODE, {"spec": {"unschedulable": True}}, {SPEC}),
    "label and taint": (STORED_NODE, {**SET_READY, "spec": {"taints": [{"key": "k", "effect": "NoSchedule"}]}}, {SPEC}),
}


@pytest.fixture(scope="module")
def celpy() -> ModuleType:
    return _need("celpy", "cel-python")


@pytest.fixture(scope="module")
def node_guard(kustomize: Callable[[Path], list[Obj]], tmp_path_factory: pytest.TempPathFactory) -> Obj:
    objects = kustomize(node_guard_overlay(tmp_path_factory.mktemp("node-guard")))
    spec: Obj = the(objects, "ValidatingAdmissionPolicy", NODE_GUARD)["spec"]
    return spec


def evaluate(celpy: ModuleType, expression: str, activation: Obj) -> bool:
    """The expression's value, which must be a bool: an error would deny with another message."""
    env = celpy.Environment()
    program = env.program(env.compile(expression))
    result = program.evaluate({name: celpy.json_to_cel(value) for name, value in activation.items()})
    assert isinstance(result, celpy.celtypes.BoolType), f"{expression!r} gave {result!r}"
    return bool(result)


def failing(celpy: ModuleType, policy: Obj, old: Obj, new: Obj, request: Obj) -> set[str]:
    activation = {"oldObject": old, "object": new, "request": request}
    return {v["message"] for v in policy["validations"] if not evaluate(celpy, v["expression"], activation)}


def test_the_node_guard_applies_to_the_installers_user_only(celpy: ModuleType, node_guard: Obj) -> None:
    [condition] = node_guard["matchConditions"]
    activation = {"oldObject": STORED_NODE, "object": updated(STORED_NODE, SET_READY)}
    assert evaluate(celpy, condition["expression"], {**activation, "request": request_from()})
    for other in ("system:node:node-a", f"system:serviceaccount:{NAMESPACE}:default", "kubernetes-admin"):
        assert not evaluate(celpy, condition["expression"], {**activation, "request": request_from(other)})


@pytest.mark.parametrize("case", list(ALLOWED))
def test_the_node_guard_allows_what_the_installer_sends(celpy: ModuleType, node_guard: Obj, case: str) -> None:
    old, patch, request = ALLOWED[case]
    assert failing(celpy, node_guard, old, updated(old, patch), request) == set()


@pytest.mark.parametrize("case", list(DENIED))
def test_the_node_guard_denies_any_other_change(celpy: ModuleType, node_guard: Obj, case: str) -> None:
    old, patch, expected = DENIED[case]
    assert failing(celpy, node_guard, old, updated(old, patch), request_from()) == expected


def test_the_node_guard_denies_labelling_another_node(celpy: ModuleType, node_guard: Obj) -> None:
    old = copy.deepcopy(STORED_NODE)
    old["metadata"]["name"] = "node-b"
    assert failing(celpy, node_guard, old, updated(old, SET_READY), request_from(node_claim="node-a")) == {OWN_NODE}
    # Without the claim (older clusters, tokens not bound to a pod) only the rules on the change hold.
    assert failing(celpy, node_guard, old, updated(old, SET_READY), NO_CLAIM) == set()
