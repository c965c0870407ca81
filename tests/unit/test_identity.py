"""A container's workload identity from its pod's labels, as the kubelet sets them."""

from __future__ import annotations

import pytest

from hotrestart.checkpoint import identity
from hotrestart.store.manifest import Identity

POD = Identity("shop", "web-7d4b9c8f6d-x2x9q", "app")
UID = "0f8e5a4c-2b1d-4c3e-9f7a-1b2c3d4e5f60"
JOB = "batch.kubernetes.io/job-name"
JOB_UID = "batch.kubernetes.io/controller-uid"
INDEX = "batch.kubernetes.io/job-completion-index"


def test_a_deployment_replica_joins_its_templates_pool() -> None:
    got = identity.from_labels(POD, {"app": "web", "pod-template-hash": "7d4b9c8f6d"})
    assert (got.key, got.pool) == ("@template/7d4b9c8f6d/app", True)
    assert got.canonical() == "shop//@template/7d4b9c8f6d/app"
    assert "pod template 7d4b9c8f6d" in got.source
    renamed = identity.from_labels(Identity("shop", "web-7d4b9c8f6d-q8r2m", "app"), {"pod-template-hash": "7d4b9c8f6d"})
    assert renamed.same(got), "a new replica finds the old ones' checkpoints"
    changed = identity.from_labels(POD, {"pod-template-hash": "5f6a7b8c9d"})
    assert not changed.same(got), "a new template starts cold"


def test_a_job_pod_is_its_job_run() -> None:
    labels = {JOB: "train", JOB_UID: UID, "job-name": "train"}
    got = identity.from_labels(Identity("ml", "train-8k2lp", "trainer"), labels)
    assert got.key == f"@job/train/{UID}/trainer" and got.pool
    again = identity.from_labels(Identity("ml", "train-z4n7c", "trainer"), labels)
    assert again.same(got)
    other_run = identity.from_labels(Identity("ml", "train-a1b2c", "trainer"), {**labels, JOB_UID: "x" + UID[1:]})
    assert not other_run.same(got), "a Job made again under the same name is a new run"


def test_an_indexed_job_pod_is_its_index() -> None:
    labels = {
        JOB: "train",
        JOB_UID: UID,
        INDEX: "1",
    }
    one = identity.from_labels(Identity("ml", "train-1-abcde", "trainer"), labels)
    two = identity.from_labels(Identity("ml", "train-2-fghij", "trainer"), {**labels, INDEX: "2"})
    assert one.key == f"@job/train/{UID}/1/trainer" and not one.pool
    assert not one.same(two)


def test_older_job_labels_are_understood() -> None:
    got = identity.from_labels(POD, {"job-name": "train", "controller-uid": UID})
    assert got.key == f"@job/train/{UID}/app"


def test_a_statefulset_pod_keeps_its_name() -> None:
    got = identity.from_labels(
        Identity("db", "pg-0", "postgres"),
        {identity.STATEFULSET_POD: "pg-0", "controller-revision-hash": "pg-5d8f"},
    )
    assert (got.key, got.pool) == ("", False) and got.canonical() == "db/pg-0/postgres"
    assert got.source.startswith("StatefulSet")


def test_other_pods_go_by_name() -> None:
    got = identity.from_labels(POD, {"app": "web"})
    assert got.canonical() == "shop/web-7d4b9c8f6d-x2x9q/app" and "no workload labels" in got.source


def test_the_annotation_overrides_the_labels() -> None:
    keyed = Identity("shop", "web-1", "app", key="cache")
    got = identity.from_annotation(keyed)
    assert got is not None and got.key == "cache" and "annotation" in got.source
    assert identity.from_annotation(POD) is None


@pytest.mark.parametrize(
    "labels",
    [
        {"pod-template-hash": "../../etc"},
        {"pod-template-hash": "a" * 64},
        {"pod-template-hash": ""},
        {JOB: "train"},  # no controller uid
        {JOB: "tr/ain", JOB_UID: UID},
        {
            JOB: "train",
            JOB_UID: UID,
            INDEX: "-1",
        },
        {
            JOB: "train",
            JOB_UID: UID,
            INDEX: "01",
        },
    ],
)
def test_labels_that_are_not_label_values_fall_back_to_the_pod_name(labels: dict[str, str]) -> None:
    got = identity.from_labels(POD, labels)
    assert got.key == "" and not got.pool and got.canonical() == "shop/web-7d4b9c8f6d-x2x9q/app"
    assert got.source.startswith("pod name (")


def test_identity_and_its_source_travel_in_the_manifest() -> None:
    from storekit import base_manifest

    from hotrestart.store.manifest import Manifest

    got = identity.from_labels(POD, {"pod-template-hash": "7d4b9c8f6d"})
    manifest = Manifest.from_json(base_manifest())
    manifest.identity = got
    back = Manifest.from_json(manifest.to_json())
    assert back.identity == got
