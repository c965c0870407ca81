"""Wire-level checks of the generated protobuf classes against containerd's encoding.

Expected bytes are written out by hand from the field numbers in containerd's
.proto files, so a renumbered field or renamed package fails here.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest
from google.protobuf import any_pb2, empty_pb2, timestamp_pb2

import hotrestart.api
from hotrestart.api.containerd.events import task_pb2 as events_pb2
from hotrestart.api.containerd.runc.v1 import oci_pb2
from hotrestart.api.containerd.services.events.ttrpc.v1 import events_pb2 as forward_pb2
from hotrestart.api.containerd.task.v2 import shim_pb2 as task_v2
from hotrestart.api.containerd.task.v3 import shim_pb2 as task_v3
from hotrestart.api.containerd.types import event_pb2, mount_pb2
from hotrestart.api.containerd.v1.types import task_pb2 as types_pb2
from hotrestart.api.io.containerd.cgroups.v1 import metrics_pb2 as cg1
from hotrestart.api.io.containerd.cgroups.v2 import metrics_pb2 as cg2
from hotrestart.api.runtimeoptions.v1 import api_pb2 as runtimeoptions_pb2
from hotrestart.api.ttrpc import request_pb2

TASK_RPCS = [
    "State", "Create", "Start", "Delete", "Pids", "Pause", "Resume", "Checkpoint", "Kill",
    "Exec", "ResizePty", "CloseIO", "Update", "Wait", "Stats", "Connect", "Shutdown",
]  # fmt: skip


def ld(tag: int, data: bytes) -> bytes:
    """One length-delimited field (payload shorter than 128 bytes)."""
    assert len(data) < 0x80
    return bytes([tag, len(data)]) + data


def bare_any(msg: object) -> any_pb2.Any:
    """Any with a bare type URL, the form containerd 1.6 understands."""
    return any_pb2.Any(type_url=msg.DESCRIPTOR.full_name, value=msg.SerializeToString())  # type: ignore[attr-defined]


def test_all_modules_import_into_one_pool() -> None:
    names = [
        m.name for m in pkgutil.walk_packages(hotrestart.api.__path__, "hotrestart.api.") if m.name.endswith("_pb2")
    ]
    assert len(names) == 14
    for name in names:
        importlib.import_module(name)


def test_ttrpc_request_bytes() -> None:
    req = request_pb2.Request(
        service="containerd.task.v2.Task",
        method="Create",
        payload=b"\x0a\x02c1",
        timeout_nano=300,
        metadata=[request_pb2.KeyValue(key="containerd-namespace-ttrpc", value="k8s.io")],
    )
    expected = (
        ld(0x0A, b"containerd.task.v2.Task")
        + ld(0x12, b"Create")
        + ld(0x1A, b"\x0a\x02c1")
        + b"\x20\xac\x02"  # timeout_nano=4, varint 300
        + ld(0x2A, ld(0x0A, b"containerd-namespace-ttrpc") + ld(0x12, b"k8s.io"))
    )
    assert req.SerializeToString() == expected
    back = request_pb2.Request.FromString(expected)
    assert back == req
    assert back.metadata[0].key == "containerd-namespace-ttrpc"


def test_ttrpc_response_status() -> None:
    # What the Go server sends on success: an empty status sub-message.
    ok = request_pb2.Response.FromString(b"\x0a\x00" + ld(0x12, b"\x08\x07"))
    assert ok.HasField("status") and ok.status.code == 0
    assert ok.payload == b"\x08\x07"

    err = request_pb2.Response(status=request_pb2.Status(code=12, message="method Foo"))
    assert err.SerializeToString() == ld(0x0A, b"\x08\x0c" + ld(0x12, b"method Foo"))

    status_fields = {f.name: f.number for f in request_pb2.Status.DESCRIPTOR.fields}
    assert status_fields == {"code": 1, "message": 2, "details": 3}  # google.rpc.Status
    detail = request_pb2.Status(details=[any_pb2.Any(type_url="x", value=b"")])
    assert detail.SerializeToString() == ld(0x1A, ld(0x0A, b"x"))


def test_ttrpc_string_list() -> None:
    assert request_pb2.StringList(list=["a", "b"]).SerializeToString() == b"\x0a\x01a\x0a\x01b"


def test_event_any_uses_bare_type_name() -> None:
    exit_ev = events_pb2.TaskExit(
        container_id="c1",
        id="c1",
        pid=42,
        exit_status=137,
        exited_at=timestamp_pb2.Timestamp(seconds=1, nanos=2),
    )
    assert events_pb2.TaskExit.DESCRIPTOR.full_name == "containerd.events.TaskExit"
    assert exit_ev.SerializeToString() == (
        ld(0x0A, b"c1") + ld(0x12, b"c1") + b"\x18\x2a" + b"\x20\x89\x01" + ld(0x2A, b"\x08\x01\x10\x02")
    )
    wrapped = bare_any(exit_ev)
    assert wrapped.type_url == "containerd.events.TaskExit"
    assert wrapped.TypeName() == "containerd.events.TaskExit"
    # Any.Pack cannot produce a bare URL (an empty prefix still yields a
    # leading "/"), and Any.Is/Unpack reject type URLs without a "/": bare
    # names must be built and matched by hand, as bare_any() and this do.
    packed = any_pb2.Any()
    packed.Pack(exit_ev, type_url_prefix="")
    assert packed.type_url == "/containerd.events.TaskExit"
    assert events_pb2.TaskExit.FromString(wrapped.value) == exit_ev


@pytest.mark.parametrize(
    ("cls", "name"),
    [
        (events_pb2.TaskCreate, "containerd.events.TaskCreate"),
        (events_pb2.TaskStart, "containerd.events.TaskStart"),
        (events_pb2.TaskDelete, "containerd.events.TaskDelete"),
        (events_pb2.TaskOOM, "containerd.events.TaskOOM"),
        (events_pb2.TaskExecAdded, "containerd.events.TaskExecAdded"),
        (events_pb2.TaskExecStarted, "containerd.events.TaskExecStarted"),
        (events_pb2.TaskPaused, "containerd.events.TaskPaused"),
        (events_pb2.TaskResumed, "containerd.events.TaskResumed"),
        (events_pb2.TaskCheckpointed, "containerd.events.TaskCheckpointed"),
        (event_pb2.Envelope, "containerd.types.Envelope"),
        (oci_pb2.Options, "containerd.runc.v1.Options"),
        (oci_pb2.CheckpointOptions, "containerd.runc.v1.CheckpointOptions"),
        (oci_pb2.ProcessDetails, "containerd.runc.v1.ProcessDetails"),
        (runtimeoptions_pb2.Options, "runtimeoptions.v1.Options"),
        (cg1.Metrics, "io.containerd.cgroups.v1.Metrics"),
        (cg2.Metrics, "io.containerd.cgroups.v2.Metrics"),
        (types_pb2.ProcessInfo, "containerd.v1.types.ProcessInfo"),
        (mount_pb2.Mount, "containerd.types.Mount"),
    ],
)
def test_full_names(cls: type, name: str) -> None:
    assert cls.DESCRIPTOR.full_name == name  # type: ignore[attr-defined]


def test_task_create_and_event_fields() -> None:
    create = events_pb2.TaskCreate(
        container_id="c",
        rootfs=[mount_pb2.Mount(type="overlay", source="overlay", options=["ro"])],
        io=events_pb2.TaskIO(stdout="o", terminal=True),
        checkpoint="/cp",
        pid=7,
    )
    mount = ld(0x0A, b"overlay") + ld(0x12, b"overlay") + ld(0x22, b"ro")
    assert create.SerializeToString() == (
        ld(0x0A, b"c") + ld(0x1A, mount) + ld(0x22, ld(0x12, b"o") + b"\x20\x01")
        + ld(0x2A, b"/cp") + b"\x30\x07"
    )  # fmt: skip
    delete = events_pb2.TaskDelete(container_id="c", pid=1, exit_status=2, id="e")
    assert delete.SerializeToString() == ld(0x0A, b"c") + b"\x10\x01\x18\x02" + ld(0x2A, b"e")
    assert events_pb2.TaskCheckpointed(checkpoint="x").SerializeToString() == ld(0x12, b"x")
    assert events_pb2.TaskExecStarted(pid=3).SerializeToString() == b"\x18\x03"


def test_forward_request_bytes() -> None:
    oom = events_pb2.TaskOOM(container_id="c")
    req = forward_pb2.ForwardRequest(
        envelope=event_pb2.Envelope(
            timestamp=timestamp_pb2.Timestamp(seconds=5),
            namespace="k8s.io",
            topic="/tasks/oom",
            event=bare_any(oom),
        )
    )
    event = ld(0x0A, b"containerd.events.TaskOOM") + ld(0x12, ld(0x0A, b"c"))
    envelope = ld(0x0A, b"\x08\x05") + ld(0x12, b"k8s.io") + ld(0x1A, b"/tasks/oom") + ld(0x22, event)
    assert req.SerializeToString() == ld(0x0A, envelope)
    svc = forward_pb2.DESCRIPTOR.services_by_name["Events"]
    assert svc.full_name == "containerd.services.events.ttrpc.v1.Events"
    forward = svc.methods_by_name["Forward"]
    assert forward.input_type is forward_pb2.ForwardRequest.DESCRIPTOR
    assert forward.output_type is empty_pb2.Empty.DESCRIPTOR


@pytest.mark.parametrize("mod", [task_v2, task_v3], ids=["v2", "v3"])
def test_create_task_request_checkpoint(mod: object) -> None:
    opts = bare_any(oci_pb2.Options(root="/r"))
    req = mod.CreateTaskRequest(  # type: ignore[attr-defined]
        id="c",
        rootfs=[mount_pb2.Mount(type="bind")],
        checkpoint="/cp",
        parent_checkpoint="/p",
        options=opts,
    )
    data = req.SerializeToString()
    assert ld(0x42, b"/cp") in data  # checkpoint=8
    assert data == (
        ld(0x0A, b"c") + ld(0x1A, ld(0x0A, b"bind")) + ld(0x42, b"/cp") + ld(0x4A, b"/p")
        + ld(0x52, ld(0x0A, b"containerd.runc.v1.Options") + ld(0x12, ld(0x3A, b"/r")))
    )  # fmt: skip


@pytest.mark.parametrize("mod", [task_v2, task_v3], ids=["v2", "v3"])
def test_task_service(mod: object) -> None:
    fd = mod.DESCRIPTOR  # type: ignore[attr-defined]
    svc = fd.services_by_name["Task"]
    assert svc.full_name == f"{fd.package}.Task"
    assert fd.package in ("containerd.task.v2", "containerd.task.v3")
    assert [m.name for m in svc.methods] == TASK_RPCS
    empty = {m.name for m in svc.methods if m.output_type is empty_pb2.Empty.DESCRIPTOR}
    assert empty == set(TASK_RPCS) - {
        "State", "Create", "Start", "Delete", "Pids", "Wait", "Stats", "Connect",
    }  # fmt: skip


def _shape(fd: object) -> dict[str, dict[str, tuple[int, int, str]]]:
    out = {}
    for name, msg in fd.message_types_by_name.items():  # type: ignore[attr-defined]
        out[name] = {f.name: (f.number, f.type, f.message_type.name if f.message_type else "") for f in msg.fields}
    return out


def test_task_v2_v3_same_messages() -> None:
    assert _shape(task_v2.DESCRIPTOR) == _shape(task_v3.DESCRIPTOR)


def test_task_message_fields() -> None:
    state = task_v2.StateResponse(pid=9, status=types_pb2.RUNNING, terminal=True, exit_status=1, exec_id="e")
    assert state.SerializeToString() == b"\x18\x09\x20\x02\x40\x01\x48\x01" + ld(0x5A, b"e")
    assert task_v2.KillRequest(signal=15, all=True).SerializeToString() == b"\x18\x0f\x20\x01"
    assert task_v2.ConnectResponse(shim_pid=1, task_pid=2, version="3").SerializeToString() == (
        b"\x08\x01\x10\x02" + ld(0x1A, b"3")
    )
    assert task_v2.ShutdownRequest(id="c", now=True).SerializeToString() == ld(0x0A, b"c") + b"\x10\x01"
    assert task_v2.CheckpointTaskRequest(path="/x").SerializeToString() == ld(0x12, b"/x")
    upd = task_v2.UpdateTaskRequest(annotations={"k": "v"})
    assert upd.SerializeToString() == ld(0x1A, ld(0x0A, b"k") + ld(0x12, b"v"))
    pids = task_v2.PidsResponse(processes=[types_pb2.ProcessInfo(pid=5)])
    assert pids.SerializeToString() == ld(0x0A, b"\x08\x05")
    assert task_v2.ResizePtyRequest(width=80, height=24).SerializeToString() == b"\x18\x50\x20\x18"
    assert task_v2.CloseIORequest(stdin=True).SerializeToString() == b"\x18\x01"
    assert task_v2.ExecProcessRequest(terminal=True, stderr="e").SerializeToString() == (b"\x18\x01" + ld(0x32, b"e"))
    assert task_v2.StatsResponse(stats=any_pb2.Any(type_url="t")).SerializeToString() == ld(0x0A, ld(0x0A, b"t"))


def test_delete_response_zero_time_from_containerd_16() -> None:
    # containerd 1.6 (gogo, stdtime) encodes Go's zero time.Time, seconds -62135596800.
    zero = timestamp_pb2.Timestamp(seconds=-62135596800)
    resp = task_v2.DeleteResponse(pid=4, exit_status=137, exited_at=zero)
    data = resp.SerializeToString()
    assert data.startswith(b"\x08\x04\x10\x89\x01\x1a")
    assert task_v2.DeleteResponse.FromString(data).exited_at.seconds == -62135596800
    assert task_v2.WaitResponse(exit_status=3).SerializeToString() == b"\x08\x03"


def test_status_enum() -> None:
    assert dict(types_pb2.Status.items()) == {
        "UNKNOWN": 0, "CREATED": 1, "RUNNING": 2, "STOPPED": 3, "PAUSED": 4, "PAUSING": 5,
    }  # fmt: skip
    assert types_pb2.Status.DESCRIPTOR.full_name == "containerd.v1.types.Status"


def test_runc_checkpoint_options() -> None:
    opts = oci_pb2.CheckpointOptions(
        exit=True,
        open_tcp=True,
        external_unix_sockets=True,
        terminal=True,
        file_locks=True,
        empty_namespaces=["network"],
        cgroups_mode="soft",
        image_path="/i",
        work_path="/w",
    )
    assert opts.SerializeToString() == (
        b"\x08\x01\x10\x01\x18\x01\x20\x01\x28\x01" + ld(0x32, b"network") + ld(0x3A, b"soft")
        + ld(0x42, b"/i") + ld(0x4A, b"/w")
    )  # fmt: skip
    assert oci_pb2.CheckpointOptions(exit=True).SerializeToString() == b"\x08\x01"
    assert oci_pb2.ProcessDetails(exec_id="e").SerializeToString() == ld(0x0A, b"e")


def test_runc_options() -> None:
    # As sent by containerd 1.6/1.7 (criu_path=8 still a string there).
    data = (
        b"\x08\x01" + ld(0x1A, b"/cg") + b"\x20\x01\x28\x02" + ld(0x32, b"runc") + ld(0x3A, b"/r")
        + ld(0x42, b"criu") + b"\x48\x01" + ld(0x52, b"/ci") + ld(0x5A, b"/cw")
        + ld(0x62, b"ttrpc+unix:///s") + b"\x68\x03"
    )  # fmt: skip
    opts = oci_pb2.Options.FromString(data)
    assert opts.no_pivot_root and not opts.no_new_keyring
    assert (opts.shim_cgroup, opts.io_uid, opts.io_gid) == ("/cg", 1, 2)
    assert (opts.binary_name, opts.root, opts.criu_path) == ("runc", "/r", "criu")
    assert opts.systemd_cgroup
    assert (opts.criu_image_path, opts.criu_work_path) == ("/ci", "/cw")
    assert (opts.task_api_address, opts.task_api_version) == ("ttrpc+unix:///s", 3)
    assert opts.SerializeToString() == data


def test_runtimeoptions() -> None:
    opts = runtimeoptions_pb2.Options(type_url="t", config_path="/c", config_body=b"a=1")
    assert opts.SerializeToString() == ld(0x0A, b"t") + ld(0x12, b"/c") + ld(0x1A, b"a=1")


def test_cgroup_v1_metrics() -> None:
    m = cg1.Metrics(
        pids=cg1.PidsStat(current=3),
        cpu=cg1.CPUStat(usage=cg1.CPUUsage(total=10, per_cpu=[4, 6])),
        memory=cg1.MemoryStat(cache=1, usage=cg1.MemoryEntry(limit=100, usage=50)),
        memory_oom_control=cg1.MemoryOomControl(oom_kill=1),
    )
    assert m.SerializeToString() == (
        ld(0x12, b"\x08\x03")
        + ld(0x1A, ld(0x0A, b"\x08\x0a" + ld(0x22, b"\x04\x06")))  # packed per_cpu
        + ld(0x22, b"\x08\x01" + b"\x8a\x02" + bytes([4]) + b"\x08\x64\x10\x32")  # usage=33
        + ld(0x4A, b"\x18\x01")
    )
    numbers = {f.name: f.number for f in cg1.MemoryStat.DESCRIPTOR.fields}
    assert numbers["total_unevictable"] == 32
    assert numbers["kernel_tcp"] == 36
    assert len(numbers) == 36


def test_cgroup_v2_metrics() -> None:
    m = cg2.Metrics(
        memory=cg2.MemoryStat(usage=7, swap_usage=1),
        cpu=cg2.CPUStat(usage_usec=5),
        memory_events=cg2.MemoryEvents(oom_kill=2),
    )
    assert m.SerializeToString() == (
        ld(0x12, b"\x08\x05") + ld(0x22, b"\x80\x02\x07" + b"\x90\x02\x01") + ld(0x42, b"\x28\x02")
    )
    numbers = {f.name: f.number for f in cg2.Metrics.DESCRIPTOR.fields}
    assert numbers == {
        "pids": 1, "cpu": 2, "memory": 4, "rdma": 5, "io": 6, "hugetlb": 7,
        "memory_events": 8, "network": 9,
    }  # fmt: skip
