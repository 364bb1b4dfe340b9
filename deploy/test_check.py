#!/usr/bin/env python3
"""Proof that deploy/check.py catches broken manifests.

    test_check.py --crds DIR --kura BIN --promtool BIN --install KIND.yaml \
        --pool-device KIND_POOL_DEVICE.yaml --other-namespace NS.yaml --namespace NS \
        --monitoring MONITORING.yaml --snapshot-metadata SNAPSHOT_METADATA.yaml

Checks each rendering as it is (it must pass), then mutated copies, one mistake each
(a typo'd field, an unpinned image, a pool size beside a pool device, a RBAC subject
left in the kura namespace, an alert on a metric nobody exports, a
SnapshotMetadataService address naming the wrong namespace, ...): each must
fail, naming the mistake. The install as it is and the first three mutations run
through check.py's command line (exit 0, then exit 1 each); the rest call its checks
in-process, which is the same code without a Python start-up per case. Ends with
`N passed, N failed`.
"""

from __future__ import annotations

import argparse
import copy
import json
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


def snapshot_class_namespaced(objects):
    find(objects, "VolumeSnapshotClass", "kura")["metadata"]["namespace"] = "kura"


def registrar_path(objects):
    c = container(objects, "DaemonSet", "kura-node", "node-driver-registrar")
    c["args"] = [
        "--kubelet-registration-path=/var/lib/kubelet/plugins/kura/csi.sock"
        if a.startswith("--kubelet-registration-path") else a
        for a in c["args"]
    ]


def registrar_variable(objects):
    c = container(objects, "DaemonSet", "kura-node", "node-driver-registrar")
    c["env"][0]["value"] = "/var/lib/kubelet/plugins/kura/csi.sock"


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
    c["args"] = [a.replace("--agent-listen=", "--agent-lisen=") for a in c["args"]]


def bad_node_setting_value(objects):
    node_settings(objects)["KURA_POOL_SIZE"] = "8Gb"


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


def node_settings(objects) -> dict:
    """The data of the node's ConfigMap (its name carries kustomize's hash)."""
    for o in objects:
        if o.get("kind") == "ConfigMap" and o["metadata"]["name"].startswith("kura-node"):
            return o["data"]
    raise KeyError("the ConfigMap kura-node")


def unknown_node_variable(objects):
    node_settings(objects)["KURA_POOL_SIZ"] = "8Gi"


def blank_pool_image(objects):
    node_settings(objects)["KURA_POOL_IMAGE"] = ""


def unresolvable_env(objects):
    container(objects, "Deployment", "kura-controller", "kura")["env"][0]["valueFrom"] = {
        "secretKeyRef": {"name": "kura-settings", "key": "namespace"}}


def no_node_config_map(objects):
    objects.remove(next(o for o in objects if o.get("kind") == "ConfigMap"
                        and o["metadata"]["name"].startswith("kura-node")))


def pool_image_outside_state_dir(objects):
    node_settings(objects)["KURA_POOL_IMAGE"] = "/var/tmp/pool.img"


def no_group_snapshot_gate(objects):
    c = container(objects, "Deployment", "kura-controller", "csi-snapshotter")
    c["args"] = [a for a in c["args"] if not a.startswith("--feature-gates")]


def no_health_monitor(objects):
    spec = find(objects, "Deployment", "kura-controller")["spec"]["template"]["spec"]
    spec["containers"] = [c for c in spec["containers"] if c["name"] != "csi-external-health-monitor-controller"]


def registrar_without_spc_t(objects):
    del container(objects, "DaemonSet", "kura-node", "node-driver-registrar")["securityContext"]["seLinuxOptions"]


def agents_in_other_namespace(objects):
    c = container(objects, "Deployment", "kura-controller", "kura")
    c["args"] = [a if not a.startswith("--agents=") else "--agents=kura-agents.other.svc:9810" for a in c["args"]]


def node_without_peers(objects):
    c = container(objects, "DaemonSet", "kura-node", "kura")
    c["args"] = [a for a in c["args"] if not a.startswith("--peers=")]


def subject_in_default(objects):
    find(objects, "ClusterRoleBinding", "kura-provisioner")["subjects"][0]["namespace"] = "default"


# On the pool-device rendering.

def pool_size_with_device(objects):
    node_settings(objects)["KURA_POOL_SIZE"] = "8Gi"


def image_and_device(objects):
    node_settings(objects)["KURA_POOL_IMAGE"] = "/var/lib/kura/pool.img"


def device_outside_dev(objects):
    node_settings(objects)["KURA_POOL_DEVICE"] = "/var/lib/kura/disk"


# On the rendering in another namespace: what an overlay's namespace: used to leave.

def subject_left_in_kura(objects):
    find(objects, "RoleBinding", "kura-resizer")["subjects"][0]["namespace"] = "kura"


def agents_left_in_kura(objects):
    c = container(objects, "Deployment", "kura-controller", "kura")
    c["args"] = [a if not a.startswith("--agents=") else "--agents=kura-agents.kura.svc:9810" for a in c["args"]]


def peers_left_in_kura(objects):
    c = container(objects, "DaemonSet", "kura-node", "kura")
    c["args"] = [a if not a.startswith("--peers=") else "--peers=kura-agents.kura.svc:9810" for a in c["args"]]


def service_left_in_kura(objects):
    find(objects, "Service", "kura-agents")["metadata"]["namespace"] = "kura"


def namespace_not_applied(objects):
    for o in objects:
        if "namespace" in o["metadata"] or o["kind"] == "Namespace":
            o["metadata"]["namespace" if o["kind"] != "Namespace" else "name"] = "kura"
        for subject in o.get("subjects") or []:
            subject["namespace"] = "kura"


# On the rendering with components/snapshot-metadata.

def sms(objects):
    return find(objects, "SnapshotMetadataService", "kura.csi.dev")


def metadata_sidecar(objects):
    return container(objects, "Deployment", "kura-controller", "csi-snapshot-metadata")


def replace_arg(c, flag, value):
    c["args"] = [f"{flag}={value}" if a.startswith(flag + "=") else a for a in c["args"]]


def sms_address_namespace(objects):
    sms(objects)["spec"]["address"] = "kura-snapshot-metadata.default.svc:6443"


def sms_address_service(objects):
    sms(objects)["spec"]["address"] = "kura-metadata.kura.svc:6443"


def sms_address_port(objects):
    replace_arg(metadata_sidecar(objects), "--port", "50052")


def sms_misnamed(objects):
    sms(objects)["metadata"]["name"] = "kura"


def sms_without_audience(objects):
    del sms(objects)["spec"]["audience"]


def sms_unknown_field(objects):
    sms(objects)["spec"]["caCerts"] = ""


def sms_ca_not_base64(objects):
    sms(objects)["spec"]["caCert"] = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def sms_missing(objects):
    objects.remove(sms(objects))


def metadata_other_socket(objects):
    replace_arg(metadata_sidecar(objects), "--csi-address", "/csi/snapshot-metadata.sock")


def metadata_own_socket_dir(objects):
    spec = find(objects, "Deployment", "kura-controller")["spec"]["template"]["spec"]
    spec["volumes"].append({"name": "metadata-socket-dir", "emptyDir": {}})
    mount(metadata_sidecar(objects), "/csi")["name"] = "metadata-socket-dir"


def metadata_other_secret(objects):
    spec = find(objects, "Deployment", "kura-controller")["spec"]["template"]["spec"]
    for v in spec["volumes"]:
        if v["name"] == "snapshot-metadata-tls":
            v["secret"]["secretName"] = "csi-snapshot-metadata-certs"


def metadata_probe_port(objects):
    replace_arg(metadata_sidecar(objects), "--http-endpoint", ":8080")


def metadata_no_token_reviews(objects):
    role = find(objects, "ClusterRole", "kura-snapshot-metadata")
    role["rules"] = [r for r in role["rules"] if "tokenreviews" not in r["resources"]]


def metadata_subject_left_in_kura(objects):
    find(objects, "ClusterRoleBinding", "kura-snapshot-metadata")["subjects"][0]["namespace"] = "kura"


def sms_address_left_in_kura(objects):
    sms(objects)["spec"]["address"] = "kura-snapshot-metadata.kura.svc:6443"


# On the monitoring kit's rendering.

def rule(objects, alert):
    for group in find(objects, "PrometheusRule", "kura")["spec"]["groups"]:
        for r in group["rules"]:
            if r.get("alert") == alert:
                return r
    raise KeyError(alert)


def dashboard(objects):
    return find(objects, "ConfigMap", "kura-dashboard")["data"]


def edit_dashboard(objects, edit):
    data = dashboard(objects)
    board = json.loads(data["kura-dashboard.json"])
    edit(board)
    data["kura-dashboard.json"] = json.dumps(board)


def alert_syntax(objects):
    rule(objects, "KuraPoolNearlyFull")["expr"] = "kura_pool_available_bytes / < 0.10"


def alert_unknown_metric(objects):
    rule(objects, "KuraVolumesAbnormal")["expr"] = 'kura_volume{condition="abnormal"} > 0'


def alert_bad_template(objects):
    rule(objects, "KuraPoolNearlyFull")["annotations"]["summary"] = "pool on {{ $labels.node }"


def alert_bad_duration(objects):
    rule(objects, "KuraAgentDown")["for"] = "2 minutes"


def panel_unknown_metric(objects):
    def edit(board):
        board["panels"][2]["targets"][0]["expr"] = "kura_pool_free_bytes"
    edit_dashboard(objects, edit)


def panel_not_promql(objects):
    def edit(board):
        board["panels"][2]["targets"][0]["expr"] = "sum by (node) kura_pool_size_bytes"
    edit_dashboard(objects, edit)


def panel_datasource(objects):
    def edit(board):
        board["panels"][2]["datasource"] = {"type": "prometheus", "uid": "prometheus"}
    edit_dashboard(objects, edit)


def variable_unknown_metric(objects):
    def edit(board):
        board["templating"]["list"][1]["query"]["query"] = "label_values(kura_info, namespace)"
    edit_dashboard(objects, edit)


def dashboard_not_json(objects):
    data = dashboard(objects)
    data["kura-dashboard.json"] = data["kura-dashboard.json"][:-10]


def pod_monitor_port_typo(objects):
    find(objects, "PodMonitor", "kura-node")["spec"]["podMetricsEndpoints"][0]["port"] = "metric"


def pod_monitor_misses_sidecar(objects):
    spec = find(objects, "PodMonitor", "kura-controller")["spec"]
    spec["podMetricsEndpoints"] = [e for e in spec["podMetricsEndpoints"] if e["port"] != "http-monitor"]


def pod_monitor_selects_nothing(objects):
    find(objects, "PodMonitor", "kura-node")["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] = "nodes"


def pod_monitor_unknown_field(objects):
    find(objects, "PodMonitor", "kura-node")["spec"]["podMetricsEndpoints"][0]["intervall"] = "30s"


def rule_unknown_field(objects):
    find(objects, "PrometheusRule", "kura")["spec"]["groups"][0]["rule"] = []


# (mutation, the rendering it applies to, a piece of the message check.py must print)
MUTATIONS = [
    (typo_field, "install", "'imagePullPolcy' was unexpected"),
    (unpinned_image, "install", "uses :latest"),
    (untagged_image, "install", "has no tag"),
    (wrong_driver_name, "install", "provisioner 'kura.csi.io' is not kura.csi.dev"),
    (wrong_snapshot_driver, "install", "driver 'kura.csi.io' is not kura.csi.dev"),
    (snapshot_class_schema, "install", "'Remove' is not one of"),
    (snapshot_class_unknown_field, "install", "'parameter' was unexpected"),
    (snapshot_class_namespaced, "install", "VolumeSnapshotClass is cluster-scoped but has a namespace"),
    (registrar_path, "install", "--kubelet-registration-path"),
    (registrar_variable, "install", "registrar --kubelet-registration-path is ['/var/lib/kubelet/plugins/kura/csi.sock']"),
    (not_bidirectional, "install", "the pool mount /var/lib/kura needs mountPropagation: Bidirectional"),
    (propagation_enum, "install", "'BiDirectional' is not one of"),
    (privileged_controller, "install", "only the node plugin's kura container may be"),
    (unknown_node_flag, "install", "kura node has no flag --agent-lisen"),
    (bad_node_setting_value, "install", "kura refuses the arguments and environment (exit 2)"),
    (unknown_controller_flag, "install", "kura controller has no flag --agent-port"),
    (no_liveness_probe, "install", "kura container without a livenessProbe"),
    (missing_provisioner_flag, "install", "csi-provisioner lacks --strict-topology"),
    (agents_service_port, "install", "--agents port 9810"),
    (node_rbac, "install", "the node needs no API access"),
    (unknown_kind, "install", "no schema for example.com/v1 Widget"),
    (committed_secret, "install", "never committed"),
    (wrong_metrics_annotation, "install", "scrape annotations do not name port 9820"),
    (unknown_node_variable, "install", "kura node reads no variable KURA_POOL_SIZ"),
    (blank_pool_image, "install", "kura refuses the arguments and environment (exit 2)"),
    (no_node_config_map, "install", "envFrom names the ConfigMap"),
    (unresolvable_env, "install", "env POD_NAMESPACE: cannot resolve"),
    (pool_image_outside_state_dir, "install", "is not under the state directory /var/lib/kura"),
    (no_group_snapshot_gate, "install", "csi-snapshotter lacks --feature-gates=CSIVolumeGroupSnapshot=true"),
    (no_health_monitor, "install", "no csi-external-health-monitor-controller"),
    (registrar_without_spc_t, "install", "seLinuxOptions.type must be spc_t"),
    (agents_in_other_namespace, "install", "names the namespace other, the controller runs in kura"),
    (subject_in_default, "install", "is in namespace default, not kura's kura"),
    (node_without_peers, "install", "kura node needs one --peers NAME:PORT"),
    (pool_size_with_device, "pool-device", "--pool-size (KURA_POOL_SIZE) is set without --pool-image"),
    (image_and_device, "pool-device", "kura refuses the arguments and environment (exit 2)"),
    (device_outside_dev, "pool-device", "is not under /dev"),
    (subject_left_in_kura, "other-namespace", "is in namespace kura, not kura's storage-system"),
    (agents_left_in_kura, "other-namespace", "names the namespace kura, the controller runs in storage-system"),
    (peers_left_in_kura, "other-namespace",
     "node --peers kura-agents.kura.svc:9810 is not the controller's --agents kura-agents.storage-system.svc:9810"),
    (service_left_in_kura, "other-namespace", "Service/kura/kura-agents: is in namespace kura"),
    (namespace_not_applied, "other-namespace", "the controller is in namespace kura, the overlay asks for storage-system"),
    (alert_syntax, "monitoring", "promtool check rules fails"),
    (alert_unknown_metric, "monitoring", "kura_volume is exported neither by kura"),
    (alert_bad_template, "monitoring", "promtool check rules fails"),
    (alert_bad_duration, "monitoring", "'2 minutes' does not match"),
    (panel_unknown_metric, "monitoring", "kura_pool_free_bytes is exported neither by kura"),
    (panel_not_promql, "monitoring", "PromQL 'sum by (node) kura_pool_size_bytes'"),
    (panel_datasource, "monitoring", "datasource is not the dashboard's ${datasource}"),
    (variable_unknown_metric, "monitoring", "kura_info is exported neither by kura"),
    (dashboard_not_json, "monitoring", "not JSON"),
    (pod_monitor_port_typo, "monitoring", "port 'metric' is not a named port of DaemonSet/kura-node"),
    (pod_monitor_misses_sidecar, "monitoring", "port 'http-monitor' serves metrics but no PodMonitor scrapes it"),
    (pod_monitor_selects_nothing, "monitoring", "selects no pod of the rendering"),
    (pod_monitor_unknown_field, "monitoring", "'intervall' was unexpected"),
    (rule_unknown_field, "monitoring", "'rule' was unexpected"),
    (sms_address_namespace, "snapshot-metadata", "names the namespace default, the controller runs in kura"),
    (sms_address_service, "snapshot-metadata", "names no Service kura-metadata in kura"),
    (sms_address_port, "snapshot-metadata", "the sidecar serves --port 50052"),
    (sms_misnamed, "snapshot-metadata", "must be named after the driver, kura.csi.dev"),
    (sms_without_audience, "snapshot-metadata", "'audience' is a required property"),
    (sms_unknown_field, "snapshot-metadata", "'caCerts' was unexpected"),
    (sms_ca_not_base64, "snapshot-metadata", "caCert is not the base64 of a PEM CA certificate"),
    (sms_missing, "snapshot-metadata", "1 csi-snapshot-metadata sidecar(s) and 0 SnapshotMetadataService(s)"),
    (metadata_other_socket, "snapshot-metadata", "--csi-address is ['/csi/snapshot-metadata.sock'], kura serves /csi/csi.sock"),
    (metadata_own_socket_dir, "snapshot-metadata", "mounts volume metadata-socket-dir at /csi, kura's socket is on volume socket-dir"),
    (metadata_other_secret, "snapshot-metadata", "is not a file of the Secret kura-snapshot-metadata-tls"),
    (metadata_probe_port, "snapshot-metadata", "readinessProbe port http-metadata is not its --http-endpoint [8080]"),
    (metadata_no_token_reviews, "snapshot-metadata", "may not create tokenreviews.authentication.k8s.io"),
    (metadata_subject_left_in_kura, "other-namespace", "subject ServiceAccount kura-controller is in namespace kura"),
    (sms_address_left_in_kura, "other-namespace", "names the namespace kura, the controller runs in storage-system"),
]


# Mutations only the CRD schemas catch.
NEEDS_CRDS = {snapshot_class_schema, snapshot_class_unknown_field, snapshot_class_namespaced, pod_monitor_unknown_field,
              rule_unknown_field, alert_bad_duration, sms_without_audience, sms_unknown_field}


def run_check(args, path: Path) -> subprocess.CompletedProcess:
    crds = ["--crds", str(args.crds)] if args.crds else []
    return subprocess.run(
        [sys.executable, str(HERE / "check.py"), *crds, "--kura", args.kura, "--promtool", args.promtool,
         "--src", str(args.src), str(path)],
        capture_output=True, text=True,
    )


# Mutations also run through the command line, to show the exit code.
COMMAND_LINE = {typo_field, unpinned_image, wrong_driver_name}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--crds", type=Path)
    parser.add_argument("--kura", required=True)
    parser.add_argument("--promtool", default="promtool")
    parser.add_argument("--install", type=Path, required=True, help="a whole install (the kind overlay)")
    parser.add_argument("--pool-device", type=Path, required=True, help="an install with components/pool-device")
    parser.add_argument("--other-namespace", type=Path, required=True, help="an install in another namespace")
    parser.add_argument("--namespace", required=True, help="that other namespace")
    parser.add_argument("--monitoring", type=Path, required=True, help="an install with deploy/monitoring")
    parser.add_argument("--snapshot-metadata", type=Path, required=True,
                        help="an install with components/snapshot-metadata")
    parser.add_argument("--src", type=Path, default=HERE.parent / "src", help="kura's sources (the metric names it exports)")
    args = parser.parse_args()
    renderings = {"install": args.install, "pool-device": args.pool_device,
                  "other-namespace": args.other_namespace, "monitoring": args.monitoring,
                  "snapshot-metadata": args.snapshot_metadata}
    crds = check.load_crds(args.crds) if args.crds else {}
    check.cache_schemas()
    exported = check.exported_names(args.src, HERE / "monitoring" / "sidecar-metrics.txt")
    contexts = {
        key: check.Context(crds, args.kura, args.promtool, exported,
                           args.namespace if key == "other-namespace" else None)
        for key in renderings
    }
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
        clean = run_check(args, args.install)
        verdict(clean.returncode == 0, f"the install as it is passes (exit {clean.returncode})"
                + ("" if clean.returncode == 0 else f":\n{clean.stdout}{clean.stderr}"))
        for key, path in renderings.items():
            if key != "install":
                problems = check.check_rendering(path, contexts[key])
                verdict(not problems, f"the {key} rendering as it is passes" + ("" if not problems else f": {problems}"))
        objects = {key: [o for o in yaml.safe_load_all(path.read_text()) if o] for key, path in renderings.items()}
        for mutate, key, expected in MUTATIONS:
            if mutate in NEEDS_CRDS and not crds:
                print(f"skip {mutate.__name__}: needs the CRDs")
                continue
            mutated = copy.deepcopy(objects[key])
            mutate(mutated)
            path = Path(tmp) / renderings[key].name
            path.write_text(yaml.safe_dump_all(mutated, sort_keys=False))
            if mutate in COMMAND_LINE:
                result = run_check(args, path)
                ok = result.returncode == 1 and expected in result.stdout
                verdict(ok, f"{mutate.__name__}: check.py exits {result.returncode} naming it"
                        + ("" if ok else f", expected 1 and {expected!r}:\n{result.stdout}{result.stderr}"))
            else:
                problems = check.check_rendering(path, contexts[key])
                ok = any(expected in p for p in problems)
                verdict(ok, f"{mutate.__name__} ({key}): {len(problems)} problem(s), naming it"
                        + ("" if ok else f"; expected {expected!r} in {problems}"))
    print(f"manifests: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
