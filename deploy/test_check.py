#!/usr/bin/env python3
"""Proof that deploy/check.py catches broken manifests.

    test_check.py --crds DIR --kura BIN RENDERING.yaml

Checks the rendering as it is (it must pass), then mutated copies, one mistake each
(a typo'd field, an unpinned image, a wrong driver name, ...): each must fail, naming
the mistake. The rendering as it is and the first three mutations run through
check.py's command line (exit 0, then exit 1 each); the rest call its checks
in-process, which is the same code without a Python start-up per case. Ends with
`N passed, N failed`.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import check  # noqa: E402


def find(objects, kind, name):
    for o in objects:
        if o.get("kind") == kind and o["metadata"]["name"] == name:
            return o
    raise KeyError(f"{kind}/{name} not in the rendering")


def container(objects, kind, name, container_name):
    for c in find(objects, kind, name)["spec"]["template"]["spec"]["containers"]:
        if c["name"] == container_name:
            return c
    raise KeyError(container_name)


def mount(c, path):
    for m in c["volumeMounts"]:
        if m["mountPath"] == path:
            return m
    raise KeyError(path)


def typo_field(objects):
    c = container(objects, "Deployment", "kura-controller", "kura")
    c["imagePullPolcy"] = c.pop("imagePullPolicy")


def unpinned_image(objects):
    container(objects, "Deployment", "kura-controller", "csi-provisioner")["image"] = (
        "registry.k8s.io/sig-storage/csi-provisioner:latest"
    )


def untagged_image(objects):
    container(objects, "DaemonSet", "kura-node", "liveness-probe")["image"] = (
        "registry.k8s.io/sig-storage/livenessprobe"
    )


def wrong_driver_name(objects):
    find(objects, "StorageClass", "kura-xfs")["provisioner"] = "kura.csi.io"


def wrong_snapshot_driver(objects):
    find(objects, "VolumeSnapshotClass", "kura")["driver"] = "kura.csi.io"


def snapshot_class_schema(objects):
    find(objects, "VolumeSnapshotClass", "kura")["deletionPolicy"] = "Remove"


def snapshot_class_unknown_field(objects):
    find(objects, "VolumeSnapshotClass", "kura")["parameter"] = {"x": "y"}


def registrar_path(objects):
    c = container(objects, "DaemonSet", "kura-node", "node-driver-registrar")
    c["args"] = [
        "--kubelet-registration-path=/var/lib/kubelet/plugins/kura/csi.sock"
        if a.startswith("--kubelet-registration-path") else a
        for a in c["args"]
    ]


def not_bidirectional(objects):
    del mount(container(objects, "DaemonSet", "kura-node", "kura"), "/var/lib/kura")["mountPropagation"]


def propagation_enum(objects):
    mount(container(objects, "DaemonSet", "kura-node", "kura"), "/var/lib/kubelet")["mountPropagation"] = (
        "BiDirectional"
    )


def privileged_controller(objects):
    c = container(objects, "Deployment", "kura-controller", "csi-resizer")
    c["securityContext"]["privileged"] = True


def unknown_node_flag(objects):
    c = container(objects, "DaemonSet", "kura-node", "kura")
    c["args"] = [a.replace("--pool-size=", "--pool-sise=") for a in c["args"]]


def bad_node_flag_value(objects):
    c = container(objects, "DaemonSet", "kura-node", "kura")
    c["args"] = [a.replace("--pool-size=8Gi", "--pool-size=8Gb") for a in c["args"]]


def unknown_controller_flag(objects):
    container(objects, "Deployment", "kura-controller", "kura")["args"].append("--agent-port=9810")


def no_liveness_probe(objects):
    del container(objects, "DaemonSet", "kura-node", "kura")["livenessProbe"]


def missing_provisioner_flag(objects):
    c = container(objects, "Deployment", "kura-controller", "csi-provisioner")
    c["args"].remove("--strict-topology")


def agents_service_port(objects):
    find(objects, "Service", "kura-agents")["spec"]["ports"][0]["port"] = 9811


def node_rbac(objects):
    objects.append({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "kura-node"},
        "subjects": [{"kind": "ServiceAccount", "name": "kura-node", "namespace": "kura"}],
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
    })


def unknown_kind(objects):
    objects.append({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})


def committed_secret(objects):
    objects.append({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kura-node-tls", "namespace": "kura"},
        "type": "kubernetes.io/tls", "data": {"tls.crt": "", "tls.key": ""},
    })


def wrong_metrics_annotation(objects):
    ds = find(objects, "DaemonSet", "kura-node")
    ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] = "9090"


# (mutation, a piece of the message check.py must print)
MUTATIONS = [
    (typo_field, "'imagePullPolcy' was unexpected"),
    (unpinned_image, "uses :latest"),
    (untagged_image, "has no tag"),
    (wrong_driver_name, "provisioner 'kura.csi.io' is not kura.csi.dev"),
    (wrong_snapshot_driver, "driver 'kura.csi.io' is not kura.csi.dev"),
    (snapshot_class_schema, "'Remove' is not one of"),
    (snapshot_class_unknown_field, "'parameter' was unexpected"),
    (registrar_path, "--kubelet-registration-path"),
    (not_bidirectional, "the pool mount /var/lib/kura needs mountPropagation: Bidirectional"),
    (propagation_enum, "'BiDirectional' is not one of"),
    (privileged_controller, "only the node plugin's kura container may be"),
    (unknown_node_flag, "kura node has no flag --pool-sise"),
    (bad_node_flag_value, "kura refuses the arguments"),
    (unknown_controller_flag, "kura controller has no flag --agent-port"),
    (no_liveness_probe, "kura container without a livenessProbe"),
    (missing_provisioner_flag, "csi-provisioner lacks --strict-topology"),
    (agents_service_port, "--agents port 9810"),
    (node_rbac, "the node needs no API access"),
    (unknown_kind, "no schema for example.com/v1 Widget"),
    (committed_secret, "never committed"),
    (wrong_metrics_annotation, "scrape annotations do not name port 9820"),
]


# Mutations only the snapshot CRD schemas catch.
NEEDS_CRDS = {snapshot_class_schema, snapshot_class_unknown_field}


def run_check(args, path: Path) -> subprocess.CompletedProcess:
    crds = ["--crds", str(args.crds)] if args.crds else []
    return subprocess.run(
        [sys.executable, str(HERE / "check.py"), *crds, "--kura", args.kura, str(path)],
        capture_output=True, text=True,
    )


# Mutations also run through the command line, to show the exit code.
COMMAND_LINE = {typo_field, unpinned_image, wrong_driver_name}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--crds", type=Path)
    parser.add_argument("--kura", required=True)
    parser.add_argument("rendering", type=Path)
    args = parser.parse_args()
    objects = [o for o in yaml.safe_load_all(args.rendering.read_text()) if o]
    crds = check.load_crds(args.crds) if args.crds else {}
    check.cache_schemas()
    versions = check.versions_checked()
    version = check.crate_version(HERE.parent / "Cargo.toml")
    passed = failed = 0

    def verdict(ok: bool, message: str) -> None:
        nonlocal passed, failed
        if ok:
            passed += 1
            print(f"ok   {message}")
        else:
            failed += 1
            print(f"FAIL {message}")

    with tempfile.TemporaryDirectory(prefix="kura-check-") as tmp:
        clean = run_check(args, args.rendering)
        verdict(clean.returncode == 0, f"the rendering as it is passes (exit {clean.returncode})"
                + ("" if clean.returncode == 0 else f":\n{clean.stdout}{clean.stderr}"))
        for mutate, expected in MUTATIONS:
            if mutate in NEEDS_CRDS and not crds:
                print(f"skip {mutate.__name__}: needs the snapshot CRDs")
                continue
            mutated = copy.deepcopy(objects)
            mutate(mutated)
            path = Path(tmp) / f"{mutate.__name__}.yaml"
            path.write_text(yaml.safe_dump_all(mutated, sort_keys=False))
            if mutate in COMMAND_LINE:
                result = run_check(args, path)
                ok = result.returncode == 1 and expected in result.stdout
                verdict(ok, f"{mutate.__name__}: check.py exits {result.returncode} naming it"
                        + ("" if ok else f", expected 1 and {expected!r}:\n{result.stdout}{result.stderr}"))
            else:
                problems = check.check_rendering(path, crds, versions, args.kura, version)
                ok = any(expected in p for p in problems)
                verdict(ok, f"{mutate.__name__}: {len(problems)} problem(s), naming it"
                        + ("" if ok else f"; expected {expected!r} in {problems}"))
    print(f"manifests: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
