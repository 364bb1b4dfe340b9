#!/usr/bin/env python3
"""Checks kura's rendered Kubernetes manifests without a cluster.

    check.py --crds DIR --kura BIN [--promtool BIN] [--namespace NS] RENDERING.yaml...

Each RENDERING is a multi-document YAML file (a `kubectl kustomize` output, or a file
of examples). Every object is checked:

- strictly (unknown fields are errors) against the schemas of the oldest Kubernetes
  version kura supports and the newest kubernetes-validate knows;
- a kind without a built-in schema must be one of the CRDs in DIR (snapshots, the
  Prometheus Operator's) and is checked against that CRD's schema, made strict the
  same way (and its CEL rules that apply on create); any other kind fails;
- enum values the schemas leave open (mountPropagation, hostPath types, ...);
- kura's invariants: one driver name everywhere, images pinned (no `:latest`,
  sidecars at vX.Y.Z, kura at the crate's version), privileged only in the node
  plugin and spc_t for its sidecars, Bidirectional on the kubelet and pool mounts, a
  liveness probe on every kura container wired to a livenessprobe sidecar, the
  sidecars' required flags (the snapshotter's group snapshot gate), kura's command
  line and KURA_* environment (from its ConfigMap) run through the binary's own
  parser, one pool source where the pod sees it, one namespace everywhere (RBAC
  subjects and --agents included), the headless Service the controller resolves,
  the nodes' --peers naming that same Service, the TLS Secrets mounted at
  --tls-dir, scrape annotations matching --metrics-listen, no RBAC for the node;
- with components/snapshot-metadata: the SnapshotMetadataService named after the
  driver, its address naming the Service in the controller's namespace whose port
  leads to the sidecar, the sidecar on kura's socket with its TLS from the Secret the
  README names, a base64 PEM caCert (or the empty placeholder), its RBAC granted;
- the monitoring kit (check_monitoring.py): PodMonitors, alert rules through promtool,
  the dashboard, and every metric name they use against what is exported.

Prints every problem found and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import copy
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from check_monitoring import check_monitoring, exported_names  # noqa: E402,F401

# The oldest Kubernetes minor kura supports (README, "Install"): the CSIDriver and the
# sidecars' needs are all GA there.
OLDEST = "1.30.0"
DRIVER = "kura.csi.dev"
KURA_IMAGE = "kura"
SIDECAR_REGISTRY = "registry.k8s.io/sig-storage/"
PROVISIONER_FLAGS = [
    "--strict-topology",
    "--enable-capacity",
    "--capacity-ownerref-level=2",
    "--extra-create-metadata",
    "--leader-election",
    "--timeout=60s",
]
HEALTH_MONITOR = "csi-external-health-monitor-controller"
GROUP_SNAPSHOT_GATE = "CSIVolumeGroupSnapshot=true"
NODE_TLS_SECRET = "kura-node-tls"
CONTROLLER_TLS_SECRET = "kura-controller-tls"
# The components/snapshot-metadata sidecar, and the Secret the README tells users to
# make for it.
SNAPSHOT_METADATA = "csi-snapshot-metadata"
SNAPSHOT_METADATA_TLS_SECRET = "kura-snapshot-metadata-tls"
# What the sidecar asks the API server (external-snapshot-metadata v1.1.0): (group,
# resource, verb).
SNAPSHOT_METADATA_RBAC = [
    ("authentication.k8s.io", "tokenreviews", "create"),
    ("authorization.k8s.io", "subjectaccessreviews", "create"),
    ("snapshot.storage.k8s.io", "volumesnapshots", "get"),
    ("snapshot.storage.k8s.io", "volumesnapshotcontents", "get"),
    ("cbt.storage.k8s.io", "snapshotmetadataservices", "get"),
]

ENUMS = {
    "mountPropagation": {"None", "HostToContainer", "Bidirectional"},
    "imagePullPolicy": {"Always", "IfNotPresent", "Never"},
    "hostPath.type": {
        "", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket",
        "CharDevice", "BlockDevice",
    },
    "protocol": {"TCP", "UDP", "SCTP"},
    "volumeBindingMode": {"Immediate", "WaitForFirstConsumer"},
    "reclaimPolicy": {"Delete", "Retain"},
    "fsGroupPolicy": {"None", "ReadWriteOnceWithFSType", "File"},
    "volumeLifecycleModes": {"Persistent", "Ephemeral"},
    "accessModes": {"ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"},
    "volumeMode": {"Filesystem", "Block"},
    "restartPolicy": {"Always", "OnFailure", "Never"},
}

# Kinds that carry a pod template, and where.
POD_SPEC_PATHS = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
}


class Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")


def name_of(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{obj.get('kind')}/{(ns + '/') if ns else ''}{meta.get('name')}"


def dig(obj, *path, default=None):
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return default
        obj = obj[key]
    return obj


# --- schemas ------------------------------------------------------------------------

def cache_schemas() -> None:
    """kubernetes-validate reads and parses its schema files on every call: cache them."""
    kv_utils.schema_contents = functools.lru_cache(maxsize=None)(kv_utils.schema_contents)


def builtin_schema(obj: dict, version: str, problems: Problems, where: str) -> bool:
    """Validates against the built-in schema; False when there is none for the kind."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return False
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path) or "(top)"
        problems.add(where, f"Kubernetes {version}: {path}: {e.message}")
    return True


def strict(schema):
    """The schema with unknown fields forbidden wherever it lists the known ones, as the
    API server's strict field validation (kubectl's default) rejects them."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def load_crds(directory: Path) -> dict:
    """(group, kind) -> {version: (schema, served)} for every CRD in the directory."""
    crds = {}
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            versions = {
                v["name"]: (v["schema"]["openAPIV3Schema"], v.get("served", False))
                for v in spec["versions"]
            }
            crds[(spec["group"], spec["names"]["kind"])] = {
                "versions": versions,
                "scope": spec["scope"],
            }
    return crds


class Cel:
    """The few CEL rules the snapshot CRDs apply on create: `has(self.f)`, `!`, `&&`,
    `||`, parentheses and `size(self) > N`. Rules that compare with `oldSelf` apply only
    to updates and are skipped; anything else is reported as not understood, so no rule
    passes unchecked."""

    TOKEN = re.compile(r"\s*(has\(self\.\w+\)|size\(self\)\s*>\s*\d+|&&|\|\||!|\(|\))")

    def __init__(self, rule: str, value) -> None:
        self.tokens = []
        pos = 0
        rule = rule.strip()
        while pos < len(rule):
            m = self.TOKEN.match(rule, pos)
            if not m:
                raise ValueError(f"CEL rule not understood by the checker: {rule}")
            self.tokens.append(m.group(1))
            pos = m.end()
        self.value = value

    def evaluate(self) -> bool:
        result = self.expr()
        if self.tokens:
            raise ValueError("trailing tokens in CEL rule")
        return result

    def expr(self) -> bool:
        left = self.term()
        while self.tokens and self.tokens[0] == "||":
            self.tokens.pop(0)
            right = self.term()
            left = left or right
        return left

    def term(self) -> bool:
        left = self.factor()
        while self.tokens and self.tokens[0] == "&&":
            self.tokens.pop(0)
            right = self.factor()
            left = left and right
        return left

    def factor(self) -> bool:
        token = self.tokens.pop(0)
        if token == "!":
            return not self.factor()
        if token == "(":
            inner = self.expr()
            if not self.tokens or self.tokens.pop(0) != ")":
                raise ValueError("unbalanced parentheses in CEL rule")
            return inner
        m = re.fullmatch(r"has\(self\.(\w+)\)", token)
        if m:
            return isinstance(self.value, dict) and m.group(1) in self.value
        m = re.fullmatch(r"size\(self\)\s*>\s*(\d+)", token)
        if m:
            return len(self.value) > int(m.group(1))
        raise ValueError(f"unexpected CEL token {token!r}")


def cel_rules(schema, value, path, problems: Problems, where: str) -> None:
    if not isinstance(schema, dict):
        return
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue
        try:
            if not Cel(rule["rule"], value).evaluate():
                problems.add(where, f"{path or '(top)'}: {rule.get('message', rule['rule'])}")
        except ValueError as e:
            problems.add(where, f"{path or '(top)'}: {e}")
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                cel_rules(sub, value[key], f"{path}.{key}" if path else key, problems, where)
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            cel_rules(schema["items"], item, f"{path}[{i}]", problems, where)


OBJECT_META_FIELDS = {"name", "namespace", "labels", "annotations", "generateName", "finalizers"}


def crd_schema(obj: dict, crds: dict, overlay_namespace: str | None, problems: Problems, where: str) -> bool:
    """Validates a custom resource against its CRD; False when no CRD names the kind."""
    api_version = obj.get("apiVersion", "")
    group, _, version = api_version.rpartition("/")
    crd = crds.get((group, obj.get("kind")))
    if crd is None:
        return False
    if version not in crd["versions"] or not crd["versions"][version][1]:
        problems.add(where, f"{api_version} is not a served version of {obj['kind']}")
        return True
    schema = crd["versions"][version][0]
    validator = jsonschema.Draft7Validator(strict(schema))
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.path)):
        path = ".".join(str(p) for p in error.path) or "(top)"
        problems.add(where, f"CRD schema: {path}: {error.message}")
    cel_rules(schema, obj, "", problems, where)
    meta = obj.get("metadata") or {}
    for key in meta:
        if key not in OBJECT_META_FIELDS:
            problems.add(where, f"metadata.{key} is not an ObjectMeta field kura uses")
    for key in ("labels", "annotations"):
        for k, v in (meta.get(key) or {}).items():
            if not isinstance(v, str):
                problems.add(where, f"metadata.{key}.{k} must be a string")
    # kustomize cannot tell a custom resource's scope, so an overlay's `namespace:`
    # lands on cluster-scoped ones too; the API server drops it. Anywhere else a
    # namespace there is a mistake.
    if crd["scope"] == "Cluster" and "namespace" in meta and meta["namespace"] != overlay_namespace:
        problems.add(where, f"{obj['kind']} is cluster-scoped but has a namespace")
    if not meta.get("name"):
        problems.add(where, "metadata.name is missing")
    return True


# --- enums --------------------------------------------------------------------------

def enums(value, problems: Problems, where: str, path: str = "") -> None:
    """Enum fields anywhere in the object (the built-in schemas leave them open)."""
    if isinstance(value, dict):
        for key, sub in value.items():
            here = f"{path}.{key}" if path else key
            allowed = ENUMS.get(key)
            if key == "type" and path.endswith("hostPath"):
                allowed = ENUMS["hostPath.type"]
            if allowed is not None:
                values = sub if isinstance(sub, list) else [sub]
                for v in values:
                    if isinstance(v, str) and v not in allowed:
                        problems.add(where, f"{here}: {v!r} is not one of {sorted(allowed)}")
            enums(sub, problems, where, here)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            enums(item, problems, where, f"{path}[{i}]")


# --- invariants ---------------------------------------------------------------------

def pod_spec(obj: dict):
    path = POD_SPEC_PATHS.get(obj.get("kind"))
    return dig(obj, *path) if path else None


def containers(spec: dict):
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def image_name(image: str) -> tuple[str, str | None]:
    """(repository, tag) of an image reference; the tag is None when there is none."""
    if "@" in image:
        image = image.split("@", 1)[0]
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        repo, tag = image.rsplit(":", 1)
        return repo, tag
    return image, None


def is_kura(container: dict) -> bool:
    return image_name(container.get("image", ""))[0] == KURA_IMAGE


def flag_values(args: list[str], flag: str) -> list[str]:
    """Values of `--flag=value` or `--flag value` in args."""
    values = []
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
        elif arg == flag and i + 1 < len(args):
            values.append(args[i + 1])
    return values


def port_of(address: str) -> int | None:
    m = re.search(r":(\d+)$", address)
    return int(m.group(1)) if m else None


def check_images(spec: dict, version: str, problems: Problems, where: str) -> None:
    for c in containers(spec):
        image = c.get("image", "")
        repo, tag = image_name(image)
        here = f"{where} container {c.get('name')}"
        if tag is None:
            problems.add(here, f"image {image!r} has no tag (pin a version)")
        elif tag == "latest":
            problems.add(here, f"image {image!r} uses :latest (pin a version)")
        if repo == KURA_IMAGE:
            if tag not in (None, "latest") and tag != version:
                problems.add(here, f"kura image tag {tag!r} is not the crate's version {version!r}")
        elif repo.startswith(SIDECAR_REGISTRY):
            if tag is not None and not re.fullmatch(r"v\d+\.\d+\.\d+", tag):
                problems.add(here, f"sidecar image {image!r} is not pinned to vX.Y.Z")


def check_security(obj: dict, spec: dict, problems: Problems, where: str) -> None:
    node_plugin = obj.get("kind") == "DaemonSet" and dig(obj, "metadata", "name") == "kura-node"
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            problems.add(where, f"{key}: true (kura needs none of them)")
    for c in containers(spec):
        here = f"{where} container {c.get('name')}"
        sc = c.get("securityContext") or {}
        privileged = bool(sc.get("privileged"))
        if privileged and not (node_plugin and is_kura(c)):
            problems.add(here, "privileged: only the node plugin's kura container may be")
        if not privileged and sc.get("allowPrivilegeEscalation") is not False:
            problems.add(here, "allowPrivilegeEscalation must be false")
        if sc.get("readOnlyRootFilesystem") is not True and obj.get("kind") != "Pod":
            problems.add(here, "readOnlyRootFilesystem must be true")
        for mount in c.get("volumeMounts") or []:
            if mount.get("mountPropagation") == "Bidirectional" and not privileged:
                problems.add(here, f"Bidirectional mount {mount.get('mountPath')} needs privileged")


# --- kura's containers as the kubelet starts them -------------------------------------

# What the kubelet puts in the downward-API fields kura's pods read; a stand-in where
# the real value is only known in the cluster.
FIELD_STAND_INS = {"spec.nodeName": "node-1", "metadata.name": "pod-1", "status.podIP": "10.0.0.1"}


def expand(text: str, env: dict) -> str:
    """The kubelet's $(VAR) expansion: a defined variable is replaced, $$ escapes, an
    undefined reference stays as it is."""
    def one(m):
        if m.group(0).startswith("$$"):
            return m.group(0)[1:]
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$\(?|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, text)


def env_var(flag: str) -> str:
    """The variable kura reads a flag from (src/cli.rs: KURA_ and the flag's name)."""
    return "KURA_" + flag.removeprefix("--").upper().replace("-", "_")


class Started:
    """A container as the kubelet starts it: its arguments with $(VAR) expanded and its
    environment (envFrom ConfigMaps, then env, downward-API fields). Problems
    resolving them (a ConfigMap not in the rendering) are reported."""

    def __init__(self, obj: dict, container: dict, objects: list, problems: Problems, where: str) -> None:
        namespace = dig(obj, "metadata", "namespace")
        config_maps = {
            (dig(o, "metadata", "namespace"), dig(o, "metadata", "name")): o.get("data") or {}
            for o in objects if o.get("kind") == "ConfigMap"
        }
        self.env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            name = dig(source, "configMapRef", "name")
            if (namespace, name) not in config_maps:
                problems.add(where, f"envFrom names the ConfigMap {name}, which is not in the rendering")
                continue
            self.env.update({source.get("prefix", "") + k: str(v) for k, v in config_maps[(namespace, name)].items()})
        for var in container.get("env") or []:
            field = dig(var, "valueFrom", "fieldRef", "fieldPath")
            key_ref = dig(var, "valueFrom", "configMapKeyRef", default={})
            if "value" in var:
                self.env[var["name"]] = expand(str(var["value"]), self.env)
            elif field == "metadata.namespace":
                self.env[var["name"]] = namespace or ""
            elif field in FIELD_STAND_INS:
                self.env[var["name"]] = FIELD_STAND_INS[field]
            elif key_ref and key_ref.get("key") in config_maps.get((namespace, key_ref.get("name")), {}):
                self.env[var["name"]] = str(config_maps[(namespace, key_ref["name"])][key_ref["key"]])
            else:
                problems.add(where, f"env {var.get('name')}: cannot resolve {var.get('valueFrom')}")
        self.args = [expand(str(a), self.env) for a in container.get("args") or []]

    def setting(self, flag: str) -> list[str]:
        """A kura flag's value(s) as kura sees them: the command line wins over the
        KURA_* variable."""
        values = flag_values(self.args, flag)
        if values:
            return values
        var = env_var(flag)
        return [self.env[var]] if var in self.env else []


@functools.lru_cache(maxsize=None)
def kura_help(kura: str, role: str) -> str:
    return subprocess.run(
        [kura, role, "--help"], check=True, capture_output=True, text=True, env={}
    ).stdout


# An endpoint kura refuses as soon as it has parsed its arguments, before it touches
# anything: reaching that refusal proves the rest was accepted.
CHECK_ENDPOINT = "tcp://parse-only.invalid"


def run_kura_parse(kura: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    """Runs kura with the container's arguments and environment and the endpoint above,
    as nobody when run as root (so a kura that went further could change nothing)."""
    args = [f"--endpoint={CHECK_ENDPOINT}" if a.startswith("--endpoint=") else a for a in args]
    env = dict(env, KURA_ENDPOINT=CHECK_ENDPOINT)
    drop = {"user": 65534, "group": 65534, "extra_groups": []} if os.geteuid() == 0 else {}
    try:
        return subprocess.run([kura, *args], env=env, capture_output=True, text=True, timeout=20, **drop)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(e.cmd, -1, "", "did not exit within 20 s")


def check_kura_flags(kura_bin: str, role: str, kura: Started, problems: Problems, where: str) -> None:
    """Every flag and KURA_* variable is one `kura ROLE --help` lists, and the binary
    accepts the whole command line and environment (values, conflicts, requirements)."""
    help_text = kura_help(kura_bin, role)
    known = set(re.findall(r"(--[a-z][a-z0-9-]*)", help_text))
    variables = set(re.findall(r"\[env: (KURA_[A-Z0-9_]+)=", help_text))
    args = kura.args
    if not args or args[0] != role:
        problems.add(where, f"kura's first argument must be the role {role!r}, not {args[:1]}")
        return
    for arg in args[1:]:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            if flag not in known:
                problems.add(where, f"kura {role} has no flag {flag}")
    for var in kura.env:
        if var.startswith("KURA_") and var not in variables:
            problems.add(where, f"kura {role} reads no variable {var}")
    result = run_kura_parse(kura_bin, args, kura.env)
    if result.returncode != 1 or "endpoint" not in result.stderr:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()] or ["(no message)"]
        problems.add(where, f"kura refuses the arguments and environment (exit {result.returncode}): {lines[0]}")


def check_liveness(spec: dict, problems: Problems, where: str) -> None:
    """Each kura container has a livenessProbe on a port the livenessprobe sidecar
    serves, and that sidecar watches kura's socket."""
    probe_ports = {}
    for c in containers(spec):
        if image_name(c.get("image", ""))[0] == SIDECAR_REGISTRY + "livenessprobe":
            args = c.get("args") or []
            for endpoint in flag_values(args, "--http-endpoint"):
                probe_ports[port_of(endpoint)] = flag_values(args, "--csi-address")
    for c in containers(spec):
        if not is_kura(c):
            continue
        here = f"{where} container {c.get('name')}"
        probe = c.get("livenessProbe")
        if not probe:
            problems.add(here, "kura container without a livenessProbe")
            continue
        port = dig(probe, "httpGet", "port")
        if isinstance(port, str):
            named = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
            port = named.get(port)
        if port not in probe_ports:
            problems.add(here, f"livenessProbe port {port} is not a livenessprobe sidecar's --http-endpoint")
            continue
        endpoint = flag_values(c.get("args") or [], "--endpoint")
        socket = [e.removeprefix("unix://") for e in endpoint]
        if probe_ports[port] != socket:
            problems.add(here, f"the livenessprobe watches {probe_ports[port]}, kura serves {socket}")


def check_tls(spec: dict, kura: dict, settings: Started, secret: str, problems: Problems, where: str) -> None:
    tls_dirs = settings.setting("--tls-dir")
    volumes = {v.get("name"): v for v in spec.get("volumes") or []}
    mounted = [
        m for m in kura.get("volumeMounts") or []
        if dig(volumes.get(m.get("name"), {}), "secret", "secretName") == secret
    ]
    if not mounted:
        problems.add(where, f"kura does not mount the Secret {secret}")
    elif [m.get("mountPath") for m in mounted] != tls_dirs:
        problems.add(where, f"Secret {secret} is mounted at {[m.get('mountPath') for m in mounted]}, --tls-dir is {tls_dirs}")


def check_metrics(obj: dict, kura: dict, settings: Started, problems: Problems, where: str) -> None:
    listen = settings.setting("--metrics-listen")
    annotations = dig(obj, "spec", "template", "metadata", "annotations", default={}) or {}
    named = {p.get("name"): p.get("containerPort") for p in kura.get("ports") or []}
    if not listen:
        problems.add(where, "kura has no --metrics-listen")
        return
    port = port_of(listen[0])
    if named.get("metrics") != port:
        problems.add(where, f"port 'metrics' is {named.get('metrics')}, --metrics-listen {listen[0]}")
    if annotations.get("prometheus.io/scrape") != "true" or annotations.get("prometheus.io/port") != str(port):
        problems.add(where, f"scrape annotations do not name port {port}")
    if annotations.get("prometheus.io/path") != "/metrics":
        problems.add(where, "prometheus.io/path is not /metrics")


def check_driver_name(settings: Started, role: str, problems: Problems, where: str) -> None:
    if settings.setting("--driver-name") != [DRIVER]:
        problems.add(where, f"kura {role} --driver-name is {settings.setting('--driver-name')}, not {DRIVER}")


def check_pool(settings: Started, state: str, problems: Problems, where: str) -> None:
    """One pool source, where the pod sees it: an image under the state directory's
    mount, a device under the host's /dev. A pool size with anything but an image is
    a mistake kura does not refuse when it comes from the environment (it ignores it)."""
    image = settings.setting("--pool-image")
    device = settings.setting("--pool-device")
    directory = settings.setting("--pool-dir")
    if len(image + device + directory) != 1:
        problems.add(where, f"kura node needs exactly one pool source, has --pool-image {image}, "
                            f"--pool-device {device}, --pool-dir {directory}")
    if settings.setting("--pool-size") and not image:
        problems.add(where, "--pool-size (KURA_POOL_SIZE) is set without --pool-image: remove it with the image")
    for path in image + directory:
        if not path.startswith(state.rstrip("/") + "/"):
            problems.add(where, f"the pool {path} is not under the state directory {state} (the hostPath mount)")
    for path in device:
        if not path.startswith("/dev/"):
            problems.add(where, f"the pool device {path} is not under /dev (the host's /dev mount)")


def check_node(obj: dict, objects: list, kura_bin: str, problems: Problems):
    """Checks the node DaemonSet; returns its agent ports and pod labels."""
    where = name_of(obj)
    spec = pod_spec(obj)
    kuras = [c for c in spec.get("containers") or [] if is_kura(c)]
    if len(kuras) != 1:
        problems.add(where, f"expected one kura container, found {len(kuras)}")
        return
    kura = kuras[0]
    settings = Started(obj, kura, objects, problems, where)
    check_kura_flags(kura_bin, "node", settings, problems, f"{where} container kura")
    check_driver_name(settings, "node", problems, where)
    volumes = {v.get("name"): v for v in spec.get("volumes") or []}
    mounts = {m.get("mountPath"): m for m in kura.get("volumeMounts") or []}
    kubelet_dirs = [
        m for m in kura.get("volumeMounts") or []
        if dig(volumes.get(m.get("name"), {}), "hostPath", "path") == m.get("mountPath")
        and m.get("mountPath", "").rstrip("/").endswith("/kubelet")
    ]
    if len(kubelet_dirs) != 1:
        problems.add(where, "kura must mount the kubelet directory at its own host path")
    kubelet = kubelet_dirs[0]["mountPath"] if kubelet_dirs else "/var/lib/kubelet"
    for m in kubelet_dirs:
        if m.get("mountPropagation") != "Bidirectional":
            problems.add(where, f"the kubelet directory {m.get('mountPath')} needs mountPropagation: Bidirectional")
    state = (settings.setting("--state-dir") or ["/var/lib/kura"])[0]
    pool = mounts.get(state)
    if pool is None or dig(volumes.get(pool.get("name"), {}), "hostPath") is None:
        problems.add(where, f"the state directory {state} must be a hostPath mount")
    elif pool.get("mountPropagation") != "Bidirectional":
        problems.add(where, f"the pool mount {state} needs mountPropagation: Bidirectional")
    if dig(volumes.get((mounts.get("/dev") or {}).get("name"), {}), "hostPath", "path") != "/dev":
        problems.add(where, "kura must mount the host's /dev at /dev")
    socket_dir = f"{kubelet}/plugins/{DRIVER}"
    check_pool(settings, state, problems, where)
    endpoint = (settings.setting("--endpoint") or [""])[0].removeprefix("unix://")
    csi_mount = mounts.get(os.path.dirname(endpoint))
    if csi_mount is None or dig(volumes.get(csi_mount.get("name"), {}), "hostPath", "path") != socket_dir:
        problems.add(where, f"kura's socket directory must be the host's {socket_dir}")
    registrars = [
        c for c in spec.get("containers") or []
        if image_name(c.get("image", ""))[0] == SIDECAR_REGISTRY + "csi-node-driver-registrar"
    ]
    if len(registrars) != 1:
        problems.add(where, "expected one node-driver-registrar")
    for r in registrars:
        paths = flag_values(Started(obj, r, objects, problems, where).args, "--kubelet-registration-path")
        if paths != [f"{socket_dir}/csi.sock"]:
            problems.add(where, f"registrar --kubelet-registration-path is {paths}, not {socket_dir}/csi.sock")
        if not r.get("livenessProbe"):
            problems.add(where, "the registrar has no livenessProbe")
    # The sidecars talk to the privileged kura container's socket (and the registrar
    # to the kubelet's directory): on SELinux-enforcing nodes only spc_t may.
    for c in spec.get("containers") or []:
        if not is_kura(c) and dig(c, "securityContext", "seLinuxOptions", "type") != "spc_t":
            problems.add(f"{where} container {c.get('name')}", "seLinuxOptions.type must be spc_t (SELinux nodes)")
    check_tls(spec, kura, settings, NODE_TLS_SECRET, problems, where)
    check_metrics(obj, kura, settings, problems, where)
    if spec.get("priorityClassName") != "system-node-critical":
        problems.add(where, "priorityClassName must be system-node-critical")
    if not any(t.get("operator") == "Exists" and not t.get("key") for t in spec.get("tolerations") or []):
        problems.add(where, "the node plugin must tolerate every taint (operator: Exists)")
    update = dig(obj, "spec", "updateStrategy", default={})
    rolling = update.get("rollingUpdate") or {}
    if update.get("type") != "RollingUpdate" or rolling.get("maxUnavailable") != 1 or rolling.get("maxSurge") != 0:
        problems.add(where, "updateStrategy must be RollingUpdate with maxUnavailable 1, maxSurge 0")
    if spec.get("automountServiceAccountToken") is not False:
        problems.add(where, "the node pod must not mount a service account token")
    sa = spec.get("serviceAccountName")
    for o in objects:
        if o.get("kind") in ("RoleBinding", "ClusterRoleBinding"):
            for s in o.get("subjects") or []:
                if s.get("kind") == "ServiceAccount" and s.get("name") == sa:
                    problems.add(name_of(o), f"binds the node's ServiceAccount {sa}: the node needs no API access")
        if o.get("kind") == "ServiceAccount" and dig(o, "metadata", "name") == sa:
            if o.get("automountServiceAccountToken") is not False:
                problems.add(name_of(o), "automountServiceAccountToken must be false")
    agent_ports = [port_of(a) for a in settings.setting("--agent-listen")]
    peers = settings.setting("--peers")
    if len(peers) != 1:
        problems.add(where, "kura node needs one --peers NAME:PORT (the agents' Service: how replicas find their nodes)")
    return agent_ports, dig(obj, "spec", "template", "metadata", "labels", default={}), peers


def check_controller(obj: dict, objects: list, node_info, kura_bin: str, problems: Problems) -> None:
    where = name_of(obj)
    spec = pod_spec(obj)
    kuras = [c for c in spec.get("containers") or [] if is_kura(c)]
    if len(kuras) != 1:
        problems.add(where, f"expected one kura container, found {len(kuras)}")
        return
    kura = kuras[0]
    settings = Started(obj, kura, objects, problems, where)
    check_kura_flags(kura_bin, "controller", settings, problems, f"{where} container kura")
    check_driver_name(settings, "controller", problems, where)
    if dig(obj, "spec", "replicas") != 2:
        problems.add(where, "the controller runs 2 replicas")
    if dig(spec, "securityContext", "runAsNonRoot") is not True:
        problems.add(where, "the controller pod must run as non-root")
    by_repo = {image_name(c.get("image", ""))[0]: c for c in spec.get("containers") or []}
    provisioner = by_repo.get(SIDECAR_REGISTRY + "csi-provisioner")
    if provisioner is None:
        problems.add(where, "no csi-provisioner")
    else:
        for flag in PROVISIONER_FLAGS:
            if flag not in (provisioner.get("args") or []):
                problems.add(where, f"csi-provisioner lacks {flag}")
    for sidecar in ("csi-snapshotter", "csi-resizer", HEALTH_MONITOR):
        c = by_repo.get(SIDECAR_REGISTRY + sidecar)
        if c is None:
            problems.add(where, f"no {sidecar}")
        elif "--leader-election" not in (c.get("args") or []):
            problems.add(where, f"{sidecar} lacks --leader-election")
    snapshotter = by_repo.get(SIDECAR_REGISTRY + "csi-snapshotter") or {}
    gates = ",".join(flag_values(snapshotter.get("args") or [], "--feature-gates")).split(",")
    if snapshotter and GROUP_SNAPSHOT_GATE not in gates:
        problems.add(where, f"csi-snapshotter lacks --feature-gates={GROUP_SNAPSHOT_GATE} (group snapshots are off without it)")
    check_tls(spec, kura, settings, CONTROLLER_TLS_SECRET, problems, where)
    check_metrics(obj, kura, settings, problems, where)
    check_snapshot_metadata(obj, kura, settings, objects, problems)
    # --agents NAME:PORT must be the headless Service that selects the node pods.
    agents = settings.setting("--agents")
    if len(agents) != 1:
        problems.add(where, "kura controller needs one --agents NAME:PORT")
        return
    host, _, port = agents[0].rpartition(":")
    parts = host.split(".")
    namespace = dig(obj, "metadata", "namespace")
    services = [
        o for o in objects
        if o.get("kind") == "Service" and dig(o, "metadata", "name") == parts[0]
        and dig(o, "metadata", "namespace") == (parts[1] if len(parts) > 1 else namespace)
    ]
    if len(parts) > 2 and parts[2] != "svc":
        problems.add(where, f"--agents {agents[0]}: expected NAME.NAMESPACE.svc:PORT")
    if len(parts) > 1 and parts[1] != namespace:
        problems.add(where, f"--agents {agents[0]} names the namespace {parts[1]}, the controller runs in {namespace}")
    if not services:
        problems.add(where, f"--agents {agents[0]} names no Service in the rendering")
        return
    service = services[0]
    if dig(service, "spec", "clusterIP") != "None":
        problems.add(name_of(service), "the agents' Service must be headless (clusterIP: None)")
    if node_info is None:
        problems.add(where, "no node DaemonSet to find agents in")
        return
    agent_ports, labels, peers = node_info
    # The nodes find each other (for replicas) through the same Service, in the same
    # namespace, as the controller finds them.
    if peers and peers != agents:
        problems.add(where, f"node --peers {peers[0]} is not the controller's --agents {agents[0]}")
    if not selects(service, labels):
        problems.add(name_of(service), "its selector does not select the node pods")
    service_ports = [p.get("port") for p in dig(service, "spec", "ports", default=[])]
    if int(port) not in service_ports or int(port) not in agent_ports:
        problems.add(where, f"--agents port {port}: Service ports {service_ports}, node --agent-listen ports {agent_ports}")


def selects(service: dict, labels: dict) -> bool:
    selector = dig(service, "spec", "selector", default={}) or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def allowed(role: dict, group: str, resource: str, verb: str) -> bool:
    return any(
        group in r.get("apiGroups", []) and resource in r.get("resources", []) and verb in r.get("verbs", [])
        for r in role.get("rules") or []
    )


def check_snapshot_metadata(obj: dict, kura: dict, settings: Started, objects: list, problems: Problems) -> None:
    """The SnapshotMetadata sidecar (components/snapshot-metadata) and what a backup
    tool follows to it: the SnapshotMetadataService named after the driver, whose
    address names the Service in the controller's namespace and, through it, the port
    the sidecar serves; the sidecar on kura's own socket, its TLS from the Secret the
    README has users make; its RBAC bound to the pod's ServiceAccount."""
    where = name_of(obj)
    spec = pod_spec(obj)
    sidecars = [c for c in spec.get("containers") or []
                if image_name(c.get("image", ""))[0] == SIDECAR_REGISTRY + SNAPSHOT_METADATA]
    services = [o for o in objects if o.get("kind") == "SnapshotMetadataService"]
    if not sidecars and not services:
        return
    if len(sidecars) != 1 or len(services) != 1:
        problems.add(where, f"{len(sidecars)} {SNAPSHOT_METADATA} sidecar(s) and {len(services)} "
                            "SnapshotMetadataService(s): expected one of each, or neither")
        return
    sidecar, sms = sidecars[0], services[0]
    here = f"{where} container {sidecar.get('name')}"
    args = sidecar.get("args") or []
    if dig(sms, "metadata", "name") != DRIVER:
        problems.add(name_of(sms), f"a SnapshotMetadataService must be named after the driver, {DRIVER}")
    # The same socket, through the same volume, as kura's container.
    socket = (settings.setting("--endpoint") or [""])[0].removeprefix("unix://")
    if flag_values(args, "--csi-address") != [socket]:
        problems.add(here, f"--csi-address is {flag_values(args, '--csi-address')}, kura serves {socket}")
    kura_dir = {m.get("mountPath"): m.get("name") for m in kura.get("volumeMounts") or []}.get(os.path.dirname(socket))
    sidecar_dir = {m.get("mountPath"): m.get("name") for m in sidecar.get("volumeMounts") or []}.get(os.path.dirname(socket))
    if kura_dir is None or sidecar_dir != kura_dir:
        problems.add(here, f"mounts volume {sidecar_dir} at {os.path.dirname(socket)}, kura's socket is on volume {kura_dir}")
    # TLS: both files from the Secret the README says to make.
    volumes = {v.get("name"): v for v in spec.get("volumes") or []}
    secret_dirs = [m.get("mountPath") for m in sidecar.get("volumeMounts") or []
                   if dig(volumes.get(m.get("name"), {}), "secret", "secretName") == SNAPSHOT_METADATA_TLS_SECRET]
    for flag in ("--tls-cert", "--tls-key"):
        files = flag_values(args, flag)
        if len(files) != 1 or os.path.dirname(files[0]) not in secret_dirs:
            problems.add(here, f"{flag} {files} is not a file of the Secret {SNAPSHOT_METADATA_TLS_SECRET} "
                               f"(mounted at {secret_dirs})")
    # Ready means serving: the probe asks the sidecar's --http-endpoint.
    probe_port = dig(sidecar, "readinessProbe", "httpGet", "port")
    named = {p.get("name"): p.get("containerPort") for p in sidecar.get("ports") or []}
    http = [port_of(e) for e in flag_values(args, "--http-endpoint")]
    if named.get(probe_port, probe_port) not in http:
        problems.add(here, f"readinessProbe port {probe_port} is not its --http-endpoint {http}")
    check_sms_address(obj, sidecar, sms, objects, problems)
    check_ca_cert(sms, problems)
    # RBAC: what the sidecar calls, granted to the pod's ServiceAccount.
    account = (spec.get("serviceAccountName"), dig(obj, "metadata", "namespace"))
    roles = {dig(o, "metadata", "name"): o for o in objects if o.get("kind") == "ClusterRole"}
    granted = [
        roles.get(dig(o, "roleRef", "name"), {}) for o in objects
        if o.get("kind") == "ClusterRoleBinding" and dig(o, "roleRef", "kind") == "ClusterRole"
        and any(s.get("kind") == "ServiceAccount" and (s.get("name"), s.get("namespace")) == account
                for s in o.get("subjects") or [])
    ]
    for group, resource, verb in SNAPSHOT_METADATA_RBAC:
        if not any(allowed(role, group, resource, verb) for role in granted):
            problems.add(here, f"ServiceAccount {account[0]} may not {verb} {resource}.{group} (no ClusterRoleBinding grants it)")


def check_sms_address(obj: dict, sidecar: dict, sms: dict, objects: list, problems: Problems) -> None:
    """The address is NAME.NAMESPACE[.svc]:PORT of a Service in the controller's
    namespace that selects the controller pods, and its port leads to the sidecar's
    --port."""
    address = dig(sms, "spec", "address", default="")
    host, _, port = address.rpartition(":")
    parts = host.split(".")
    namespace = dig(obj, "metadata", "namespace")
    if len(parts) not in (2, 3) or parts[2:] not in ([], ["svc"]) or not port.isdigit():
        problems.add(name_of(sms), f"address {address!r} is not NAME.NAMESPACE.svc:PORT")
        return
    if parts[1] != namespace:
        problems.add(name_of(sms), f"address {address} names the namespace {parts[1]}, the controller runs in {namespace}")
    service = next((o for o in objects if o.get("kind") == "Service" and dig(o, "metadata", "name") == parts[0]
                    and dig(o, "metadata", "namespace") == namespace), None)
    if service is None:
        problems.add(name_of(sms), f"address {address} names no Service {parts[0]} in {namespace}")
        return
    if not selects(service, dig(obj, "spec", "template", "metadata", "labels", default={}) or {}):
        problems.add(name_of(service), "its selector does not select the controller pods")
    named = {p.get("name"): p.get("containerPort") for p in sidecar.get("ports") or []}
    target = next((p.get("targetPort", p.get("port")) for p in dig(service, "spec", "ports", default=[])
                   if str(p.get("port")) == port), None)
    served = flag_values(sidecar.get("args") or [], "--port") or ["50051"]  # the sidecar's default
    if named.get(target, target) != int(served[0]):
        problems.add(name_of(sms), f"address port {port} leads to the pod's port {target}, "
                                   f"the sidecar serves --port {served[0]}")


def check_ca_cert(sms: dict, problems: Problems) -> None:
    """caCert: empty until the user sets it (README), else base64 of PEM certificates."""
    ca = dig(sms, "spec", "caCert", default="")
    if ca:
        try:
            pem = base64.b64decode(ca, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            pem = ""
        if "-----BEGIN CERTIFICATE-----" not in pem:
            problems.add(name_of(sms), "caCert is not the base64 of a PEM CA certificate")


def check_driver_names(objects: list, problems: Problems) -> None:
    for o in objects:
        kind = o.get("kind")
        where = name_of(o)
        if kind == "CSIDriver" and dig(o, "metadata", "name") != DRIVER:
            problems.add(where, f"CSIDriver name is not {DRIVER}")
        if kind == "StorageClass" and o.get("provisioner") != DRIVER:
            problems.add(where, f"provisioner {o.get('provisioner')!r} is not {DRIVER}")
        if kind in ("VolumeSnapshotClass", "VolumeGroupSnapshotClass") and o.get("driver") != DRIVER:
            problems.add(where, f"driver {o.get('driver')!r} is not {DRIVER}")


# Kinds without a namespace; every other object of an install is in kura's namespace.
CLUSTER_KINDS = {
    "Namespace", "CSIDriver", "StorageClass", "ClusterRole", "ClusterRoleBinding",
    "VolumeSnapshotClass", "VolumeGroupSnapshotClass", "VolumeAttributesClass", "PriorityClass",
    "SnapshotMetadataService",
}


def check_namespaces(objects: list, namespace: str, expected: str | None, problems: Problems) -> None:
    """One namespace everywhere a namespace is named: the objects, the Namespace
    itself, the RBAC subjects (the controller's --agents is checked with it)."""
    if expected and namespace != expected:
        problems.add("install", f"the controller is in namespace {namespace}, the overlay asks for {expected}")
    for o in objects:
        where = name_of(o)
        if o.get("kind") == "Namespace" and dig(o, "metadata", "name") != namespace:
            problems.add(where, f"a Namespace other than kura's {namespace}")
        elif o.get("kind") not in CLUSTER_KINDS and dig(o, "metadata", "namespace") != namespace:
            problems.add(where, f"is in namespace {dig(o, 'metadata', 'namespace')}, not kura's {namespace}")
        for subject in o.get("subjects") or []:
            if subject.get("kind") == "ServiceAccount" and subject.get("namespace") != namespace:
                problems.add(where, f"subject ServiceAccount {subject.get('name')} is in namespace "
                                    f"{subject.get('namespace')}, not kura's {namespace}")


def check_install(objects: list, ctx: Context, problems: Problems) -> None:
    """Cross-object invariants of a whole install (a rendering with the CSIDriver)."""
    by_kind = {}
    for o in objects:
        by_kind.setdefault(o.get("kind"), []).append(o)
    nodes = [o for o in by_kind.get("DaemonSet", []) if dig(o, "metadata", "name") == "kura-node"]
    controllers = [o for o in by_kind.get("Deployment", []) if dig(o, "metadata", "name") == "kura-controller"]
    if len(nodes) != 1 or len(controllers) != 1:
        problems.add("install", "expected the DaemonSet kura-node and the Deployment kura-controller")
    node_info = check_node(nodes[0], objects, ctx.kura, problems) if nodes else None
    for c in controllers:
        check_controller(c, objects, node_info, ctx.kura, problems)
        check_namespaces(objects, dig(c, "metadata", "namespace"), ctx.namespace, problems)
    if by_kind.get("Secret"):
        problems.add("install", "the rendering holds Secrets: TLS keys are made at install time, never committed")
    driver = (by_kind.get("CSIDriver") or [{}])[0]
    if dig(driver, "spec", "attachRequired") is not False:
        problems.add(name_of(driver), "attachRequired must be false (nothing to attach)")
    for ns in by_kind.get("Namespace", []):
        if dig(ns, "metadata", "labels", "pod-security.kubernetes.io/enforce") != "privileged":
            problems.add(name_of(ns), "pod-security.kubernetes.io/enforce must be privileged")
    default = [s for s in by_kind.get("StorageClass", []) if dig(s, "metadata", "name") == "kura"]
    if not default:
        problems.add("install", "no StorageClass kura")
    for s in default:
        if s.get("volumeBindingMode") != "WaitForFirstConsumer" or s.get("allowVolumeExpansion") is not True:
            problems.add(name_of(s), "must be WaitForFirstConsumer with allowVolumeExpansion")


# --- main ---------------------------------------------------------------------------

def crate_version(cargo_toml: Path) -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', cargo_toml.read_text(), re.M)
    if not m:
        raise SystemExit(f"{cargo_toml}: no version")
    return m.group(1)


def versions_checked() -> list[str]:
    """The oldest Kubernetes kura supports and the newest kubernetes-validate knows."""
    return [OLDEST, kv_utils.latest_version()]


# The API groups of the CRDs (snapshots, the Prometheus Operator's): without the CRD
# directory their objects are checked by kura's invariants only (see main).
CRD_GROUPS = {"snapshot.storage.k8s.io", "groupsnapshot.storage.k8s.io", "monitoring.coreos.com", "cbt.storage.k8s.io"}


# Kinds newer than the oldest Kubernetes kura supports, with the release that made them
# GA: only examples use them (a cluster without them simply does not offer the
# feature), and they are checked against the newest schema only.
NEWER_KINDS = {("storage.k8s.io/v1", "VolumeAttributesClass"): "1.34"}


class Context:
    """What every rendering is checked against."""

    def __init__(self, crds: dict, kura: str, promtool: str, exported: set[str], namespace: str | None = None,
                 cargo_toml: Path = HERE.parent / "Cargo.toml") -> None:
        self.crds = crds
        self.kura = kura
        self.promtool = promtool
        self.exported = exported
        self.namespace = namespace
        self.versions = versions_checked()
        self.version = crate_version(cargo_toml)


def check_rendering(path: Path, ctx: Context) -> list[str]:
    problems = Problems()
    try:
        objects = [o for o in yaml.safe_load_all(path.read_text()) if o]
    except yaml.YAMLError as e:
        return [f"{path}: not YAML: {e}"]
    if not objects:
        problems.add(str(path), "no objects")
    for obj in objects:
        where = f"{path.name}: {name_of(obj)}"
        if not isinstance(obj, dict) or "kind" not in obj or "apiVersion" not in obj:
            problems.add(where, "not a Kubernetes object")
            continue
        newer = (obj["apiVersion"], obj["kind"]) in NEWER_KINDS
        if newer and path.name != "examples.yaml":
            problems.add(where, f"{obj['kind']} is newer than Kubernetes {OLDEST}: examples only")
        checked = ctx.versions[-1:] if newer else ctx.versions
        has_builtin = [builtin_schema(obj, v, problems, where) for v in checked]
        if not all(has_builtin):
            unchecked = not ctx.crds and obj["apiVersion"].rpartition("/")[0] in CRD_GROUPS
            if not unchecked and not crd_schema(obj, ctx.crds, ctx.namespace, problems, where):
                problems.add(where, f"no schema for {obj['apiVersion']} {obj['kind']} (and no CRD in the CRD directory)")
        enums(obj, problems, where)
        spec = pod_spec(obj)
        if spec is not None:
            check_images(spec, ctx.version, problems, where)
            check_security(obj, spec, problems, where)
            check_liveness(spec, problems, where)
    check_driver_names(objects, problems)
    if any(o.get("kind") == "CSIDriver" for o in objects):
        check_install(objects, ctx, problems)
    check_monitoring(objects, ctx.promtool, ctx.exported, problems.add)
    return [f"{path.name}: {p}" if not p.startswith(path.name) else p for p in problems.items]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crds", type=Path, help="directory of snapshot CRDs (without it, snapshot classes are not schema-checked)")
    parser.add_argument("--kura", required=True, help="the kura binary (for --help and flag parsing)")
    parser.add_argument("--cargo-toml", type=Path, default=HERE.parent / "Cargo.toml")
    parser.add_argument("--promtool", default="promtool", help="Prometheus's promtool (for the alert rules)")
    parser.add_argument("--src", type=Path, default=HERE.parent / "src", help="kura's sources (the metric names it exports)")
    parser.add_argument("--sidecar-metrics", type=Path, default=HERE / "monitoring" / "sidecar-metrics.txt")
    parser.add_argument("--namespace", help="the namespace the renderings must be in (an overlay's namespace:)")
    parser.add_argument("renderings", nargs="+", type=Path)
    args = parser.parse_args()
    crds = {}
    if args.crds is None:
        print("check.py: WARNING: no CRD directory given: snapshot classes are checked by "
              "kura's invariants only, not against the snapshot CRD schemas", file=sys.stderr)
    elif not args.crds.is_dir():
        print(f"check.py: the CRD directory {args.crds} does not exist", file=sys.stderr)
        return 2
    else:
        crds = load_crds(args.crds)
        if not crds:
            print(f"check.py: no CustomResourceDefinitions in {args.crds}", file=sys.stderr)
            return 2
    cache_schemas()
    exported = exported_names(args.src, args.sidecar_metrics)
    ctx = Context(crds, args.kura, args.promtool, exported, args.namespace, args.cargo_toml)
    failures = []
    for path in args.renderings:
        failures.extend(check_rendering(path, ctx))
    for f in failures:
        print(f"FAIL {f}")
    names = ", ".join(p.name for p in args.renderings)
    if failures:
        print(f"check.py: {len(failures)} problem(s) in {names}")
        return 1
    print(f"check.py: {names}: valid for Kubernetes {' and '.join(ctx.versions)}, invariants hold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
