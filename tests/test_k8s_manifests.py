"""The Kubernetes manifests in k8s/: kustomize structure, schemas, KubeRay controller rules, policy.

What is checked, without a cluster or network:

- every YAML file in k8s/ parses; every resource a ``kustomization.yaml`` lists exists (and stays
  inside its kustomization root, as kustomize's default load restrictor demands); no manifest is
  left out of every kustomization unless it is a documented example (``*.example.yaml``);
- KubeRay kinds (RayCluster, RayJob, RayCronJob) and the PodMonitor validate strictly against
  their CRDs in ``tests/k8s-schemas`` (or ``$POSEFR_K8S_SCHEMAS``): unknown fields rejected,
  ``x-kubernetes-int-or-string``, int32/int64 ranges and ``x-kubernetes-list-type`` uniqueness
  enforced; built-in kinds validate with ``kubernetes-validate`` in strict mode;
- the rules the KubeRay controller (not the API server) enforces, re-implemented below from
  KubeRay's ``ValidateRayClusterSpec`` / ``ValidateRayJobSpec`` / ``ValidateRayCronJobSpec``;
- project policy: requests and limits on every container, non-root security contexts, no inline
  credentials, the cluster layout (head without CPUs/GPUs, GPU group autoscaling from 0), the job
  entrypoints, the two nightly variants submitting the same command, the PodMonitor targets;
- for each of those checks, a broken copy of a real manifest (or of the k8s/ tree) is reported.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import os
import re
import shlex
import shutil
import zoneinfo
from pathlib import Path
from typing import Any, Callable, Iterator

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"

#: Kubernetes version whose built-in schemas (bundled in kubernetes-validate) are used
K8S_VERSION = "1.33.0"
NAMESPACE = "posefr"
CLUSTER_NAME = "posefr"
IMAGE = "ghcr.io/posefr/posefr-dist:0.1.0"
STORAGE_SECRET = "posefr-object-storage"
AUTH_SECRET = "posefr-ray-auth"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

CRD_FILES = {
    ("ray.io/v1", "RayCluster"): "kuberay-v1.7.0/ray.io_rayclusters.yaml",
    ("ray.io/v1", "RayJob"): "kuberay-v1.7.0/ray.io_rayjobs.yaml",
    ("ray.io/v1", "RayCronJob"): "kuberay-v1.7.0/ray.io_raycronjobs.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"):
        "prometheus-operator-v0.93.0/monitoring.coreos.com_podmonitors.yaml",
}

#: kinds created by a kustomization that are cluster-scoped (no namespace is set on them)
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PriorityClass", "StorageClass"}

# limits from KubeRay (ray-operator/controllers/ray/utils/constant.go): a RayCluster name must
# leave room for "-serve-svc"; a RayJob name for the 6 characters added to its cluster's name
MAX_RAYCLUSTER_NAME = 53
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - 6
# A RayCronJob's RayJobs are named "<name>-<suffix>"; this bound keeps room for an 11-character
# suffix (as Kubernetes does for CronJob -> Job names) inside the RayJob limit.
MAX_RAYCRONJOB_NAME = MAX_RAYJOB_NAME - 11

# feature gates assumed on the operator: RayCronJob only (docs/operations.md installs it so)
ENABLED_GATES = {"RayCronJob"}


# =============================================================================================
# Loading
# =============================================================================================


def yaml_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml"))


def is_kustomization(path: Path) -> bool:
    return path.name in ("kustomization.yaml", "kustomization.yml", "Kustomization")


def is_example(path: Path) -> bool:
    return path.name.endswith((".example.yaml", ".example.yml"))


def load_docs(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=_Loader) if d is not None]


def parse_errors(root: Path) -> list[str]:
    """Every YAML file under root parses, and every document in it is a mapping."""
    errors = []
    for path in yaml_files(root):
        rel = path.relative_to(root)
        try:
            docs = load_docs(path)
        except yaml.YAMLError as e:
            errors.append(f"{rel}: does not parse: {e}")
            continue
        if not docs:
            errors.append(f"{rel}: no YAML document")
        for i, doc in enumerate(docs):
            if not isinstance(doc, dict):
                errors.append(f"{rel}[{i}]: a document is not a mapping")
            elif not is_kustomization(path) and not ({"apiVersion", "kind", "metadata"} <= doc.keys()):
                errors.append(f"{rel}[{i}]: apiVersion, kind and metadata are required")
    return errors


# =============================================================================================
# Kustomize: structure and a minimal build (resources, namespace)
# =============================================================================================

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "labels", "commonAnnotations",
                      "components", "namePrefix", "nameSuffix", "patches", "images"}


def kustomization_file(directory: Path) -> Path | None:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (directory / name).is_file():
            return directory / name
    return None


def kustomization_errors(root: Path) -> list[str]:
    """Listed resources exist and stay inside their root; no manifest is orphaned; no example
    file is listed; no Secret gets applied."""
    errors: list[str] = []
    listed: set[Path] = set()
    kfiles = [p for p in yaml_files(root) if is_kustomization(p)]
    if kustomization_file(root) is None:
        errors.append(f"{root.name}/: no kustomization.yaml at the top")
    for kfile in kfiles:
        kdir = kfile.parent
        rel = kfile.relative_to(root)
        try:
            (k,) = load_docs(kfile)
        except (ValueError, yaml.YAMLError) as e:
            errors.append(f"{rel}: not a single YAML document: {e}")
            continue
        if k.get("apiVersion") != "kustomize.config.k8s.io/v1beta1" or k.get("kind") != "Kustomization":
            errors.append(f"{rel}: apiVersion/kind must be kustomize.config.k8s.io/v1beta1 Kustomization")
        for key in sorted(set(k) - KUSTOMIZATION_KEYS):
            errors.append(f"{rel}: unknown or unsupported key {key!r}")
        if k.get("namespace", NAMESPACE) != NAMESPACE:
            errors.append(f"{rel}: namespace {k.get('namespace')!r}, expected {NAMESPACE!r}")
        resources = k.get("resources") or []
        if not resources:
            errors.append(f"{rel}: lists no resources")
        for dup in sorted({r for r in resources if resources.count(r) > 1}):
            errors.append(f"{rel}: lists {dup!r} twice")
        for entry in resources:
            target = (kdir / entry).resolve()
            if not target.exists():
                errors.append(f"{rel}: listed resource {entry!r} does not exist")
            elif target.is_dir():
                if kustomization_file(target) is None:
                    errors.append(f"{rel}: listed directory {entry!r} has no kustomization.yaml")
            else:
                listed.add(target)
                if kdir.resolve() not in target.parents:
                    errors.append(f"{rel}: listed file {entry!r} is outside the kustomization root "
                                  "(kustomize only loads files below it; list the directory instead)")
                if is_example(target):
                    errors.append(f"{rel}: lists the example file {entry!r}")
    for path in yaml_files(root):
        if is_kustomization(path):
            continue
        if is_example(path):
            if not path.read_text().lstrip().startswith("# EXAMPLE ONLY"):
                errors.append(f"{path.relative_to(root)}: an example must start with '# EXAMPLE ONLY'")
            continue
        if path.resolve() not in listed:
            errors.append(f"{path.relative_to(root)}: not listed in any kustomization.yaml")
    for kfile in kfiles:
        try:
            built = build(kfile.parent)
        except BuildError as e:
            errors.append(f"{kfile.relative_to(root)}: {e}")
            continue
        for doc in built:
            if doc.get("kind") == "Secret":
                errors.append(f"{kfile.relative_to(root)}: applies a Secret "
                              f"({doc['metadata'].get('name')}); Secrets are created out of band")
    return errors


class BuildError(Exception):
    pass


def build(directory: Path, _stack: tuple[Path, ...] = ()) -> list[dict]:
    """What ``kustomize build directory`` yields for the features used here (resources and
    namespace): the documents, each with its namespace set; duplicates are an error."""
    directory = directory.resolve()
    if directory in _stack:
        raise BuildError(f"cycle through {directory}")
    kfile = kustomization_file(directory)
    if kfile is None:
        raise BuildError(f"{directory} has no kustomization.yaml")
    (k,) = load_docs(kfile)
    docs: list[dict] = []
    for entry in k.get("resources") or []:
        target = (directory / entry).resolve()
        if target.is_dir():
            docs.extend(build(target, _stack + (directory,)))
        elif target.is_file():
            docs.extend(copy.deepcopy(d) for d in load_docs(target))
        else:
            raise BuildError(f"listed resource {entry!r} does not exist")
    if "namespace" in k:
        for doc in docs:
            if doc.get("kind") not in CLUSTER_SCOPED:
                doc.setdefault("metadata", {})["namespace"] = k["namespace"]
    seen = set()
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"), doc["metadata"].get("namespace"),
               doc["metadata"].get("name"))
        if key in seen:
            raise BuildError(f"{key[1]} {key[3]!r} is defined twice")
        seen.add(key)
    return docs


def manifests(root: Path = K8S) -> list[tuple[str, dict]]:
    """(label, document) for every Kubernetes object under root, examples included."""
    out = []
    for path in yaml_files(root):
        if is_kustomization(path):
            continue
        for i, doc in enumerate(load_docs(path)):
            out.append((f"{path.relative_to(root)}[{i}]", doc))
    return out


def the(kind: str, name: str | None = None) -> dict:
    """A deep copy of the one real manifest of this kind (and name; ``kind`` may be "Kind/name")."""
    if "/" in kind:
        kind, name = kind.split("/", 1)
    found = [d for _, d in manifests() if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in k8s/, found {len(found)}"
    return copy.deepcopy(found[0])


# =============================================================================================
# Schemas: CRDs (strict) and built-in kinds (kubernetes-validate, strict)
# =============================================================================================


def schemas_dir() -> Path | None:
    candidates = []
    if os.environ.get("POSEFR_K8S_SCHEMAS"):
        candidates.append(Path(os.environ["POSEFR_K8S_SCHEMAS"]))
    candidates.append(ROOT / "tests" / "k8s-schemas")  # the copy in the repository
    candidates.append(ROOT.parent / "shared" / "k8s-schemas")
    for c in candidates:
        if all((c / f).is_file() for f in CRD_FILES.values()):
            return c
    return None


needs_schemas = pytest.mark.skipif(
    schemas_dir() is None,
    reason="CRD schemas not found at tests/k8s-schemas, ../shared/k8s-schemas nor at $POSEFR_K8S_SCHEMAS",
)


def strict_schema(node: Any) -> Any:
    """A copy of a CRD's OpenAPI v3 schema that behaves like ``kubectl --validate=strict``:
    ``additionalProperties: false`` wherever ``properties`` is given without
    ``x-kubernetes-preserve-unknown-fields``; int-or-string and nullable made explicit."""
    if not isinstance(node, dict):
        return node
    node = dict(node)
    for key in ("properties", "patternProperties"):
        if key in node:
            node[key] = {name: strict_schema(sub) for name, sub in node[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            node[key] = strict_schema(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [strict_schema(sub) for sub in node[key]]
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        node["additionalProperties"] = False
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
        node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.pop("nullable", False):
        node = {"anyOf": [{"type": "null"}, node]}
    return node


def _list_type(validator, list_type, instance, schema):
    """``x-kubernetes-list-type``: items of a set are unique, items of a map unique by key."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        for i, item in enumerate(instance):
            if item in instance[:i]:
                yield jsonschema.ValidationError(f"duplicate entry {item!r} in a list of type set")
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys") or []
        props = (schema.get("items") or {}).get("properties") or {}
        seen = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = tuple(repr(item.get(k, (props.get(k) or {}).get("default"))) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(
                    f"duplicate entry for {', '.join(keys)} = {', '.join(key)} in a list of type map")
            seen.add(key)


_CRDValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type})

FORMATS = jsonschema.FormatChecker(())


@FORMATS.checks("int32")
def _int32(value) -> bool:
    return not isinstance(value, int) or -(2 ** 31) <= value < 2 ** 31


@FORMATS.checks("int64")
def _int64(value) -> bool:
    return not isinstance(value, int) or -(2 ** 63) <= value < 2 ** 63


@functools.lru_cache(maxsize=None)
def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    with open(schemas_dir() / CRD_FILES[(api_version, kind)]) as f:
        crd = yaml.load(f, Loader=_Loader)
    version = api_version.split("/")[-1]
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert v.get("served", True), f"{kind} {version} is not served by this CRD"
    return _CRDValidator(strict_schema(v["schema"]["openAPIV3Schema"]), format_checker=FORMATS)


def _where(error: jsonschema.ValidationError) -> str:
    return "/".join(str(p) for p in error.absolute_path) or "(top)"


def schema_errors(doc: dict) -> list[str]:
    """Strict schema validation: the CRD for KubeRay kinds and PodMonitor, kubernetes-validate
    for built-in kinds; anything else is an error (no schema to check it against)."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRD_FILES:
        errors = sorted(crd_validator(*key).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
        return [f"{_where(e)}: {e.message}" for e in errors]
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{_where(e)}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


# =============================================================================================
# Rules outside the schemas: metadata, cron, KubeRay controller
# =============================================================================================

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def label_errors(labels: dict | None, where: str) -> list[str]:
    errors = []
    for key, value in (labels or {}).items():
        prefix, _, name = str(key).rpartition("/")
        if (prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix))) \
                or len(name) > 63 or not LABEL_NAME.match(name):
            errors.append(f"{where}: invalid label key {key!r}")
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            errors.append(f"{where}: invalid label value {value!r} for {key!r}")
    return errors


OBJECT_META_FIELDS = {"name", "generateName", "namespace", "labels", "annotations", "finalizers",
                      "ownerReferences"}


def metadata_errors(doc: dict) -> list[str]:
    """ObjectMeta as a manifest may set it (CRD schemas leave metadata open, so it is checked here)."""
    meta = doc.get("metadata") or {}
    name = meta.get("name")
    errors = [f"metadata.{key}: unknown or server-managed field" for key in sorted(set(meta) - OBJECT_META_FIELDS)]
    if not isinstance(name, str) or len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        errors.append(f"metadata.name {name!r} is not a DNS-1123 subdomain")
    errors += label_errors(meta.get("labels"), "metadata.labels")
    return errors


CRON_FIELDS = [  # (name, low, high, names)
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, {m: i + 1 for i, m in enumerate(
        "jan feb mar apr may jun jul aug sep oct nov dec".split())}),
    ("day of week", 0, 6, {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}),
]
CRON_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def cron_errors(schedule: Any) -> list[str]:
    """The standard five-field cron syntax as parsed by robfig/cron ``ParseStandard`` (used by
    both the Kubernetes CronJob controller and KubeRay's RayCronJob controller)."""
    if not isinstance(schedule, str) or not schedule.strip():
        return [f"schedule {schedule!r} is not a cron expression"]
    text = schedule.strip()
    if text.startswith("@"):
        if text in CRON_DESCRIPTORS:
            return []
        m = re.fullmatch(r"@every\s+((\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+)", text)
        return [] if m else [f"schedule {schedule!r}: unknown descriptor"]
    fields = text.split()
    if len(fields) != 5:
        return [f"schedule {schedule!r}: expected 5 fields, found {len(fields)}"]
    errors = []

    def value(token: str, names: dict) -> int:
        token = token.lower()
        if token in names:
            return names[token]
        if not token.isdigit():
            raise ValueError(f"{token!r} is not a number")
        return int(token)

    for text_field, (fname, low, high, names) in zip(fields, CRON_FIELDS):
        for expr in text_field.split(","):
            try:
                rng, _, step = expr.partition("/")
                if rng in ("*", "?"):
                    start, end = low, high
                else:
                    a, dash, b = rng.partition("-")
                    start = value(a, names)
                    end = value(b, names) if dash else (high if step else start)
                if step and (not step.isdigit() or int(step) == 0):
                    raise ValueError(f"bad step {step!r}")
                if not (low <= start <= high and low <= end <= high):
                    raise ValueError(f"out of range {low}-{high}")
                if start > end:
                    raise ValueError("beginning of range after end")
            except ValueError as e:
                errors.append(f"schedule {schedule!r}: {fname} {expr!r}: {e}")
    return errors


def time_zone_errors(tz: Any) -> list[str]:
    if tz is None:
        return []
    if not isinstance(tz, str) or not tz:
        return ["timeZone must not be empty (omit it for the controller's local time)"]
    try:
        zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return [f"timeZone {tz!r} is not a valid IANA time zone"]
    return []


def _version_tuple(text: str) -> tuple[int, ...] | None:
    m = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    return tuple(int(x or 0) for x in m.groups()) if m else None


def _containers(pod_spec: dict | None) -> list[dict]:
    return list((pod_spec or {}).get("containers") or [])


def _env_names(container: dict) -> set[str]:
    return {e.get("name") for e in container.get("env") or []}


def raycluster_spec_errors(spec: dict, annotations: dict | None = None) -> list[str]:
    """KubeRay's ValidateRayClusterSpec (v1.7), for the fields a manifest can set."""
    errors = []
    head = spec.get("headGroupSpec") or {}
    head_pod = (head.get("template") or {}).get("spec") or {}
    groups = spec.get("workerGroupSpecs") or []
    if not _containers(head_pod):
        return ["headGroupSpec should have at least one container"]
    head_container = _containers(head_pod)[0]
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    options = spec.get("autoscalerOptions") or {}
    v2_env = next((e for e in head_container.get("env") or [] if e.get("name") == "RAY_enable_autoscaler_v2"), None)
    autoscaler_v2 = autoscaling and (options.get("version") == "v2"
                                     or (v2_env is not None and v2_env.get("value") in ("1", "true")))

    def group_rules(name: str, group: dict) -> None:
        params = group.get("rayStartParams") or {}
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
            errors.append(f"resource fields should not be set in both rayStartParams and Resources for {name} group")
        if "labels" in params:
            errors.append(f"rayStartParams['labels'] is not supported for {name} group; use the top-level labels field")
        errors.extend(label_errors(group.get("labels"), f"{name} group labels"))

    group_rules("Head", head)
    for group in groups:
        name = group.get("groupName")
        if not _containers((group.get("template") or {}).get("spec")):
            errors.append("workerGroupSpec should have at least one container")
            continue
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            errors.append(f"worker group {name} must set both minReplicas and maxReplicas when autoscaling is disabled")
        if lo is not None and lo < 0:
            errors.append(f"worker group {name} has negative minReplicas {lo}")
        if hi is not None and hi < 0:
            errors.append(f"worker group {name} has negative maxReplicas {hi}")
        if lo is not None and hi is not None and lo > hi:
            errors.append(f"worker group {name} has minReplicas {lo} greater than maxReplicas {hi}")
        group_rules(name, group)
        idle = group.get("idleTimeoutSeconds")
        if idle is not None:
            if idle < 0:
                errors.append(f"worker group {name}: idleTimeoutSeconds must be non-negative")
            elif not autoscaler_v2:
                errors.append(f"worker group {name}: idleTimeoutSeconds is set, but autoscaler v2 is not enabled "
                              "(set autoscalerOptions.version: v2)")
        if group.get("suspend"):
            if "RayJobDeletionPolicy" not in ENABLED_GATES:
                errors.append(f"worker group {name} can be suspended only when the RayJobDeletionPolicy feature gate is enabled")
            if autoscaling:
                errors.append(f"worker group {name} cannot be suspended with Autoscaler enabled")
    if (annotations or {}).get("ray.io/ft-enabled") and spec.get("gcsFaultToleranceOptions"):
        errors.append("ray.io/ft-enabled annotation and GcsFaultToleranceOptions are both set")
    if not autoscaling and v2_env is not None and v2_env.get("value") in ("1", "true"):
        errors.append("RAY_enable_autoscaler_v2 cannot be set when enableInTreeAutoscaling is false")
    if autoscaling and options.get("version") and v2_env is not None:
        errors.append("both .spec.autoscalerOptions.version and head Pod env var RAY_enable_autoscaler_v2 are set")
    if autoscaler_v2:
        if head_pod.get("restartPolicy") not in (None, "", "Never"):
            errors.append("restartPolicy for head Pod should be Never or unset when using autoscaler V2")
        for group in groups:
            if ((group.get("template") or {}).get("spec") or {}).get("restartPolicy") not in (None, "", "Never"):
                errors.append(f"restartPolicy for worker group {group.get('groupName')} should be Never or unset "
                              "when using autoscaler V2")
    if (options.get("idleTimeoutSeconds") or 0) < 0:
        errors.append("autoscalerOptions.idleTimeoutSeconds must be non-negative")
    if "KUBERAY_GEN_AUTOSCALER_START_CMD" in {e.get("name") for e in options.get("env") or []}:
        errors.append("autoscalerOptions.env must not contain KUBERAY_GEN_AUTOSCALER_START_CMD")
    auth = spec.get("authOptions")
    if auth is not None:
        k8s_auth = bool(auth.get("enableK8sTokenAuth"))
        if auth.get("mode") == "token":
            version = _version_tuple(spec.get("rayVersion", ""))
            if not spec.get("rayVersion"):
                errors.append("authOptions.mode is 'token' but rayVersion was not specified (Ray >= 2.52.0 is required)")
            elif version is None:
                errors.append(f"authOptions.mode is 'token' but rayVersion {spec['rayVersion']!r} is not a version")
            elif version < (2, 52, 0):
                errors.append(f"authOptions.mode is 'token' but minimum Ray version is 2.52.0, got {spec['rayVersion']}")
            elif k8s_auth and version < (2, 55, 0):
                errors.append("authOptions.enableK8sTokenAuth needs Ray >= 2.55.0")
            if k8s_auth and auth.get("secretName"):
                errors.append("authOptions.enableK8sTokenAuth is enabled and authOptions.secretName is also set")
        elif k8s_auth:
            errors.append("authOptions.enableK8sTokenAuth is enabled but authOptions.mode not set to 'token'")
    for field, gate in (("historyServerOptions", "RayClusterHistoryServer"),
                        ("networkPolicy", "RayClusterNetworkPolicy"), ("tlsOptions", "RayClusterMTLS")):
        if spec.get(field) is not None and gate not in ENABLED_GATES:
            errors.append(f"spec.{field} requires the {gate} feature gate to be enabled")
    managed_by = spec.get("managedBy")
    if managed_by is not None and managed_by not in ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"):
        errors.append("the managedBy field value must be either 'ray.io/kuberay-operator' or 'kueue.x-k8s.io/multikueue'")
    return errors


SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")


def rayjob_spec_errors(spec: dict, annotations: dict | None = None) -> list[str]:
    """KubeRay's ValidateRayJobSpec (v1.7)."""
    errors = []
    shutdown = bool(spec.get("shutdownAfterJobFinishes"))
    selector = spec.get("clusterSelector") or {}
    mode = spec.get("submissionMode", "K8sJobMode")
    backoff = spec.get("backoffLimit")
    if mode not in SUBMISSION_MODES:
        errors.append(f"submissionMode {mode!r} is not one of {', '.join(SUBMISSION_MODES)}")
    if spec.get("suspend") and not shutdown:
        errors.append("a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended")
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if ttl < 0:
        errors.append("TTLSecondsAfterFinished must be a non-negative integer")
    if not shutdown and ttl > 0:
        errors.append("a RayJob with shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished")
    if spec.get("deletionStrategy") is not None and "RayJobDeletionPolicy" not in ENABLED_GATES:
        errors.append("RayJobDeletionPolicy feature gate must be enabled to use DeletionStrategy")
    if selector:
        if spec.get("suspend"):
            errors.append("the ClusterSelector mode doesn't support the suspend operation")
        if not selector.get("ray.io/cluster"):
            errors.append("cluster name in ClusterSelector (key ray.io/cluster) should not be empty")
        if mode == "SidecarMode":
            errors.append("ClusterSelector is not supported in SidecarMode")
        if backoff is not None and backoff > 0:
            errors.append("BackoffLimit is incompatible with ClusterSelector mode")
        if spec.get("rayClusterSpec") is not None:
            # accepted by KubeRay, which then ignores rayClusterSpec; ambiguous, so refused here
            errors.append("both clusterSelector and rayClusterSpec are set (rayClusterSpec would be ignored)")
    elif spec.get("rayClusterSpec") is None:
        errors.append("one of RayClusterSpec or ClusterSelector must be set")
    if mode == "InteractiveMode" and backoff is not None and backoff > 0:
        errors.append("BackoffLimit is incompatible with InteractiveMode")
    if mode == "SidecarMode":
        if spec.get("submitterPodTemplate") is not None:
            errors.append("SidecarMode doesn't support SubmitterPodTemplate")
        if spec.get("submitterConfig") is not None:
            errors.append("SidecarMode doesn't support SubmitterConfig")
        head_pod = (((spec.get("rayClusterSpec") or {}).get("headGroupSpec") or {}).get("template") or {}).get("spec") or {}
        if head_pod.get("restartPolicy") not in (None, "", "Never"):
            errors.append("restartPolicy for head Pod should be Never or unset when using SidecarMode")
    if spec.get("submitterPodTemplate") is not None and not _containers(spec["submitterPodTemplate"].get("spec")):
        errors.append("submitterPodTemplate needs a container (the first one runs `ray job submit`)")
    if spec.get("rayClusterSpec") is not None:
        cluster = spec["rayClusterSpec"]
        if (cluster.get("authOptions") or {}).get("enableK8sTokenAuth"):
            errors.append("K8s token auth mode is currently not supported for RayJob")
        errors.extend(f"rayClusterSpec: {e}" for e in raycluster_spec_errors(cluster, annotations))
    if spec.get("runtimeEnvYAML"):
        try:
            runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        except yaml.YAMLError as e:
            errors.append(f"runtimeEnvYAML is not valid YAML: {e}")
        else:
            if not isinstance(runtime_env, dict):
                errors.append("runtimeEnvYAML must be a YAML mapping")
    for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if spec.get(field) is not None and spec[field] <= 0:
            errors.append(f"{field} must be a positive integer")
    if backoff is not None and backoff < 0:
        errors.append("backoffLimit must be a positive integer")
    managed_by = spec.get("managedBy")
    if managed_by is not None and managed_by not in ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"):
        errors.append("the managedBy field value must be either 'ray.io/kuberay-operator' or 'kueue.x-k8s.io/multikueue'")
    if not str(spec.get("entrypoint") or "").strip() and mode != "InteractiveMode":
        errors.append("entrypoint is empty")
    return errors


def controller_errors(doc: dict) -> list[str]:
    """Rules enforced by controllers rather than by the API server's schema validation."""
    kind = doc.get("kind")
    meta = doc.get("metadata") or {}
    name = str(meta.get("name", ""))
    spec = doc.get("spec") or {}
    errors = []
    if kind == "RayCluster":
        if len(name) > MAX_RAYCLUSTER_NAME:
            errors.append(f"RayCluster name should be no more than {MAX_RAYCLUSTER_NAME} characters")
        if not DNS1035_LABEL.match(name):
            errors.append("RayCluster name should be a valid DNS1035 label")
        errors += raycluster_spec_errors(spec, meta.get("annotations"))
    elif kind == "RayJob":
        if len(name) > MAX_RAYJOB_NAME:
            errors.append(f"RayJob name should be no more than {MAX_RAYJOB_NAME} characters")
        if not DNS1035_LABEL.match(name):
            errors.append("RayJob name should be a valid DNS1035 label")
        errors += rayjob_spec_errors(spec, meta.get("annotations"))
    elif kind == "RayCronJob":
        if len(name) > MAX_RAYCRONJOB_NAME:
            errors.append(f"RayCronJob name should be no more than {MAX_RAYCRONJOB_NAME} characters")
        if not DNS1035_LABEL.match(name):
            errors.append("RayCronJob name should be a valid DNS1035 label")
        if "concurrencyPolicy" in spec:
            errors.append("a RayCronJob has no concurrencyPolicy")
        if "TZ" in str(spec.get("schedule", "")):
            errors.append("cannot use TZ or CRON_TZ in schedule, use timeZone field instead")
        else:
            errors += cron_errors(spec.get("schedule"))
        errors += time_zone_errors(spec.get("timeZone"))
        errors += [f"invalid RayJob template: {e}" for e in rayjob_spec_errors(spec.get("jobTemplate") or {})]
    elif kind == "CronJob":
        if len(name) > 52:
            errors.append("CronJob name should be no more than 52 characters")
        if "TZ" in str(spec.get("schedule", "")):
            errors.append("cannot use TZ or CRON_TZ in schedule, use timeZone field instead")
        else:
            errors += cron_errors(spec.get("schedule"))
        errors += time_zone_errors(spec.get("timeZone"))
    return errors


# =============================================================================================
# Project policy: resources, security contexts, credentials
# =============================================================================================


def pod_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    """(where, pod spec) for every pod template in a document."""
    kind = doc.get("kind")
    spec = doc.get("spec") or {}

    def cluster(prefix: str, cspec: dict) -> Iterator[tuple[str, dict]]:
        yield f"{prefix}headGroupSpec", ((cspec.get("headGroupSpec") or {}).get("template") or {}).get("spec") or {}
        for g in cspec.get("workerGroupSpecs") or []:
            yield f"{prefix}workerGroupSpecs[{g.get('groupName')}]", (g.get("template") or {}).get("spec") or {}

    def job(prefix: str, jspec: dict) -> Iterator[tuple[str, dict]]:
        if jspec.get("rayClusterSpec"):
            yield from cluster(prefix + "rayClusterSpec.", jspec["rayClusterSpec"])
        if jspec.get("submitterPodTemplate"):
            yield f"{prefix}submitterPodTemplate", jspec["submitterPodTemplate"].get("spec") or {}

    if kind == "RayCluster":
        yield from cluster("", spec)
    elif kind == "RayJob":
        yield from job("", spec)
    elif kind == "RayCronJob":
        yield from job("jobTemplate.", spec.get("jobTemplate") or {})
    elif kind == "CronJob":
        yield "jobTemplate", (((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
    elif kind in ("Job", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        yield "template", (spec.get("template") or {}).get("spec") or {}
    elif kind == "Pod":
        yield "pod", spec


def cluster_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    if doc.get("kind") == "RayCluster":
        yield "", doc.get("spec") or {}
    elif doc.get("kind") == "RayJob" and (doc.get("spec") or {}).get("rayClusterSpec"):
        yield "rayClusterSpec.", doc["spec"]["rayClusterSpec"]
    elif doc.get("kind") == "RayCronJob" and ((doc.get("spec") or {}).get("jobTemplate") or {}).get("rayClusterSpec"):
        yield "jobTemplate.rayClusterSpec.", doc["spec"]["jobTemplate"]["rayClusterSpec"]


QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")
SUFFIX = {None: 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
          "E": 1e18, "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "Pi": 2 ** 50, "Ei": 2 ** 60}


def quantity(value: Any) -> float:
    m = QUANTITY.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    number, suffix = m.groups()
    if suffix and suffix[0] in "eE":
        return float(number + suffix)
    return float(number) * SUFFIX[suffix]


SENSITIVE_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|CREDENTIAL", re.I)


def container_policy_errors(where: str, c: dict, pod: dict | None) -> list[str]:
    errors = []
    res = c.get("resources") or {}
    for part in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if r not in (res.get(part) or {}):
                errors.append(f"{where}: resources.{part}.{r} is not set")
    for r, req in (res.get("requests") or {}).items():
        lim = (res.get("limits") or {}).get(r)
        try:
            if lim is not None and quantity(req) > quantity(lim):
                errors.append(f"{where}: resources.requests.{r} {req} exceeds the limit {lim}")
        except ValueError as e:
            errors.append(f"{where}: {e}")
    if "nvidia.com/gpu" in (res.get("requests") or {}) and "nvidia.com/gpu" not in (res.get("limits") or {}):
        errors.append(f"{where}: nvidia.com/gpu must be set in limits")
    sc = c.get("securityContext") or {}
    psc = (pod or {}).get("securityContext") or {}
    non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
    user = sc.get("runAsUser", psc.get("runAsUser"))
    if non_root is not True:
        errors.append(f"{where}: runAsNonRoot must be true")
    if not isinstance(user, int) or user <= 0:
        errors.append(f"{where}: runAsUser must be a non-zero user id, got {user!r}")
    if sc.get("allowPrivilegeEscalation") is not False:
        errors.append(f"{where}: allowPrivilegeEscalation must be false")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        errors.append(f"{where}: capabilities.drop must contain ALL")
    if (sc.get("capabilities") or {}).get("add"):
        errors.append(f"{where}: no capabilities may be added")
    if sc.get("privileged"):
        errors.append(f"{where}: privileged containers are not allowed")
    for env in c.get("env") or []:
        name = str(env.get("name", ""))
        if SENSITIVE_ENV.search(name):
            if "value" in env:
                errors.append(f"{where}: env {name} has an inline value; take it from a Secret (secretKeyRef)")
            elif "secretKeyRef" not in (env.get("valueFrom") or {}):
                errors.append(f"{where}: env {name} must come from a Secret (secretKeyRef)")
    return errors


def policy_errors(doc: dict) -> list[str]:
    """Requests and limits on every container, non-root security contexts, no inline secrets."""
    errors = []
    for where, pod in pod_specs(doc):
        psc = pod.get("securityContext") or {}
        if (psc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            errors.append(f"{where}: pod securityContext.seccompProfile.type must be RuntimeDefault")
        if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
            errors.append(f"{where}: host namespaces are not allowed")
        for v in pod.get("volumes") or []:
            if "hostPath" in v:
                errors.append(f"{where}: hostPath volume {v.get('name')} is not allowed")
        for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
            errors += container_policy_errors(f"{where}.{c.get('name')}", c, pod)
    for prefix, cspec in cluster_specs(doc):
        if cspec.get("enableInTreeAutoscaling"):
            # KubeRay injects the autoscaler sidecar with these settings
            options = cspec.get("autoscalerOptions") or {}
            errors += container_policy_errors(
                f"{prefix}autoscalerOptions",
                {"resources": options.get("resources"), "securityContext": options.get("securityContext"),
                 "env": options.get("env")},
                ((cspec.get("headGroupSpec") or {}).get("template") or {}).get("spec"))
    if doc.get("kind") == "RayJob":
        errors += runtime_env_secret_errors(doc["spec"].get("runtimeEnvYAML"))
    if doc.get("kind") == "RayCronJob":
        errors += runtime_env_secret_errors((doc["spec"].get("jobTemplate") or {}).get("runtimeEnvYAML"))
    return errors


def runtime_env_secret_errors(text: str | None) -> list[str]:
    env = ((yaml.safe_load(text) or {}) if text else {}).get("env_vars") or {}
    return [f"runtimeEnvYAML sets {k} inline; credentials come from the pods' Secret"
            for k in env if SENSITIVE_ENV.search(k)]


def all_errors(doc: dict) -> list[str]:
    return metadata_errors(doc) + schema_errors(doc) + controller_errors(doc) + policy_errors(doc)


# =============================================================================================
# Project layout checks (the cluster, the jobs, monitoring)
# =============================================================================================


def ray_container(pod: dict) -> dict:
    return _containers(pod)[0]


def gpu_limit(pod: dict) -> float:
    lim = (ray_container(pod).get("resources") or {}).get("limits") or {}
    return quantity(lim.get("nvidia.com/gpu", 0))


def raycluster_layout_errors(doc: dict) -> list[str]:
    """The cluster this project needs (see the header of k8s/base/raycluster.yaml)."""
    errors = []
    spec = doc["spec"]
    head = spec["headGroupSpec"]
    params = head.get("rayStartParams") or {}
    if params.get("num-gpus") != "0":
        errors.append('head: rayStartParams num-gpus must be "0"')
    if params.get("num-cpus") != "0":
        errors.append('head: rayStartParams num-cpus must be "0" (no tasks on the head)')
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        errors.append("head: the dashboard must stay on a ClusterIP service")
    if head.get("enableIngress"):
        errors.append("head: no Ingress to the dashboard")
    head_pod = head["template"]["spec"]
    ports = {p.get("name"): p.get("containerPort") for p in ray_container(head_pod).get("ports") or []}
    if ports.get("dashboard") != 8265:
        errors.append("head: containerPort 8265 named dashboard is missing")
    if gpu_limit(head_pod):
        errors.append("head: no GPU on the head pod")
    if spec.get("enableInTreeAutoscaling") is not True:
        errors.append("enableInTreeAutoscaling must be true")
    auth = spec.get("authOptions") or {}
    if auth.get("mode") != "token" or auth.get("secretName") != AUTH_SECRET:
        errors.append(f"authOptions must keep token auth with the token from Secret {AUTH_SECRET}")
    ray_version = importlib.metadata.version("ray")
    if spec.get("rayVersion") != ray_version:
        errors.append(f"rayVersion {spec.get('rayVersion')!r} differs from the project's Ray {ray_version}")
    groups = spec.get("workerGroupSpecs") or []
    names = [g.get("groupName") for g in groups]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"worker group name {dup!r} is used twice")
    gpu = [g for g in groups if gpu_limit(g["template"]["spec"])]
    cpu = [g for g in groups if not gpu_limit(g["template"]["spec"])]
    if not gpu:
        errors.append("no GPU worker group")
    if not cpu:
        errors.append("no CPU worker group for data work")
    for g in gpu:
        if g.get("minReplicas") != 0 or g.get("replicas", 0) != 0:
            errors.append(f"worker group {g['groupName']}: a GPU group starts at 0 (minReplicas and replicas 0)")
        if g.get("maxReplicas", 0) < 1:
            errors.append(f"worker group {g['groupName']}: maxReplicas must allow scaling up")
    for where, pod in pod_specs(doc):
        c = ray_container(pod)
        if not any((e.get("secretRef") or {}).get("name") == STORAGE_SECRET for e in c.get("envFrom") or []):
            errors.append(f"{where}: object-storage credentials must come from Secret {STORAGE_SECRET} via envFrom")
        if any(e.get("name", "").startswith("AWS_") for e in c.get("env") or []):
            errors.append(f"{where}: AWS_* variables come from the Secret, not from env")
    return errors


ENTRYPOINTS = {
    "train": re.compile(r"^python (/app/)?jobs/train\.py --config (/app/)?jobs/configs/paper-gpu\.yaml( \S+=\S+)*$"),
    "tune": re.compile(r"^python (/app/)?jobs/tune\.py --config (/app/)?jobs/configs/tune-paper-gpu\.yaml --num-samples \d+$"),
    "ablation": re.compile(r"^python (/app/)?benchmarks/reproduce\.py --preset paper --seeds \d+(,\d+)* "
                           r"--data s3://\S+ --pretrained s3://\S+ --out s3://\S+$"),
    "nightly": re.compile(r"^python (/app/)?jobs/nightly\.py --models s3://\S+ --data s3://\S+ --history s3://\S+"
                          r"( --pushgateway [\w.-]+:\d+)?$"),
}


def entrypoint_kind(entrypoint: str) -> str | None:
    text = " ".join(str(entrypoint).split())
    return next((k for k, rx in ENTRYPOINTS.items() if rx.match(text)), None)


def expand_k8s(text: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of container command/args: ``$(VAR)`` for a defined variable is
    replaced, ``$$`` becomes ``$``, anything else stays as written."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and ")" in text[i:]:
            j = text.index(")", i)
            name = text[i + 2:j]
            if name in env:
                out.append(env[name])
            else:
                out.append(text[i:j + 1])
            i = j + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def cronjob_submit_command(doc: dict) -> list[str]:
    """The `ray job submit ...` words of the CronJob's shell script, as the shell would see them."""
    (c,) = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in c.get("env") or [] if "value" in e}
    script = expand_k8s("\n".join(c.get("command", []) + c.get("args", [])), env)
    lines = [ln.strip() for ln in script.splitlines() if "ray job submit" in ln]
    assert len(lines) == 1, f"expected one `ray job submit` line, found {lines}"
    # keep each command substitution `$(...)` inside one word, as the shell does
    subs = re.findall(r"\$\([^()]*\)", lines[0])
    line = lines[0].removeprefix("exec ")
    for i, sub in enumerate(subs):
        line = line.replace(sub, f"@SUB{i}@", 1)
    words = shlex.split(line)
    for i, sub in enumerate(subs):
        words = [w.replace(f"@SUB{i}@", sub) for w in words]
    return words


def default_build() -> list[dict]:
    return build(K8S)


def only(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def selector_matches(selector: dict, labels: dict) -> bool:
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def pod_templates_with_labels(doc: dict) -> Iterator[tuple[str, dict, dict]]:
    """(where, labels, pod spec) for the pod templates of a document."""
    kind, spec = doc["kind"], doc.get("spec") or {}
    if kind == "RayCluster":
        yield "head", spec["headGroupSpec"]["template"].get("metadata", {}).get("labels", {}), \
            spec["headGroupSpec"]["template"]["spec"]
        for g in spec.get("workerGroupSpecs") or []:
            yield g["groupName"], g["template"].get("metadata", {}).get("labels", {}), g["template"]["spec"]
    elif kind in ("RayJob", "RayCronJob"):
        jspec = spec if kind == "RayJob" else spec["jobTemplate"]
        if jspec.get("submitterPodTemplate"):
            t = jspec["submitterPodTemplate"]
            yield "submitter", t.get("metadata", {}).get("labels", {}), t["spec"]
    elif kind == "CronJob":
        t = spec["jobTemplate"]["spec"]["template"]
        yield "cronjob", t.get("metadata", {}).get("labels", {}), t["spec"]


def podmonitor_errors(podmonitor: dict, docs: list[dict]) -> list[str]:
    """The PodMonitor selects the Ray pods (and only those), and every endpoint's port name is
    declared on a selected pod: "metrics" on 8080 everywhere, "posefr-metrics" on 9500."""
    errors = []
    selector = podmonitor["spec"]["selector"]
    selected = []
    for doc in docs:
        for where, labels, pod in pod_templates_with_labels(doc):
            hit = selector_matches(selector, labels)
            if doc["kind"] == "RayCluster" and not hit:
                errors.append(f"PodMonitor does not select the RayCluster's {where} pods")
            if doc["kind"] != "RayCluster" and hit:
                errors.append(f"PodMonitor selects {doc['kind']} {doc['metadata']['name']} {where} pods")
            if hit:
                selected.append((where, pod))
    declared: dict[str, set[int]] = {}
    for _, pod in selected:
        for c in _containers(pod):
            for p in c.get("ports") or []:
                declared.setdefault(p.get("name"), set()).add(p.get("containerPort"))
    wanted = {"metrics": {8080}, "posefr-metrics": {9500}}
    endpoints = {e.get("port") for e in podmonitor["spec"]["podMetricsEndpoints"]}
    for name, port in wanted.items():
        if name not in endpoints:
            errors.append(f"PodMonitor has no endpoint for port {name!r}")
        if declared.get(name) != port:
            errors.append(f"port {name!r} is declared as {declared.get(name)}, expected {port}")
    for name in endpoints - set(declared):
        errors.append(f"PodMonitor endpoint port {name!r} is not declared on any selected pod")
    for _, pod in selected:
        head_like = _containers(pod)[0]
        names = {p.get("name") for p in head_like.get("ports") or []}
        if "metrics" not in names:
            errors.append("every Ray pod must declare the metrics port")
    return errors


# =============================================================================================
# Tests: the real manifests
# =============================================================================================


def test_every_yaml_file_parses():
    assert yaml_files(K8S), "k8s/ holds no YAML"
    assert parse_errors(K8S) == []


def test_kustomizations_list_existing_resources_and_nothing_is_orphaned():
    assert kustomization_errors(K8S) == []


def test_examples_are_documented_and_hold_placeholders_only():
    examples = [p for p in yaml_files(K8S) if is_example(p)]
    assert examples, "k8s/secret.example.yaml is expected"
    for path in examples:
        for doc in load_docs(path):
            for key, value in (doc.get("stringData") or {}).items():
                if SENSITIVE_ENV.search(key) or key == "auth_token":
                    assert value == "REPLACE_ME", f"{path.name}: {key} must be a placeholder"
            assert "data" not in doc, f"{path.name}: use stringData placeholders, never encoded data"


def _manifest_labels() -> list[str]:
    try:
        return [label for label, _ in manifests()]
    except yaml.YAMLError:
        return []  # test_every_yaml_file_parses reports it


@pytest.mark.parametrize("label", _manifest_labels())
def test_manifest_validates(label):
    doc = dict(manifests())[label]
    if (doc.get("apiVersion"), doc.get("kind")) in CRD_FILES and schemas_dir() is None:
        pytest.skip("CRD schemas not found at tests/k8s-schemas, ../shared/k8s-schemas nor at $POSEFR_K8S_SCHEMAS")
    assert all_errors(doc) == []


def test_raycluster_layout():
    docs = only(default_build(), "RayCluster")
    assert len(docs) == 1 and docs[0]["metadata"]["name"] == CLUSTER_NAME
    assert raycluster_layout_errors(docs[0]) == []


def test_every_container_uses_the_project_image():
    for label, doc in manifests():
        for where, pod in pod_specs(doc):
            for c in _containers(pod):
                assert c.get("image") == IMAGE, f"{label} {where}.{c.get('name')}"


def test_builds_hold_the_right_pieces():
    """The default build and the fallback overlay each hold the cluster, the PodMonitor and
    exactly one nightly schedule; one-off RayJobs and Secrets are never part of them."""
    default = default_build()
    fallback = build(K8S / "overlays" / "cronjob-fallback")
    jobs = build(K8S / "jobs")
    for docs, nightly_kind, other in ((default, "RayCronJob", "CronJob"), (fallback, "CronJob", "RayCronJob")):
        kinds = [d["kind"] for d in docs]
        assert kinds.count("RayCluster") == 1
        assert kinds.count("PodMonitor") == 1
        assert kinds.count("ServiceAccount") == 1
        assert kinds.count(nightly_kind) == 1 and other not in kinds, "exactly one nightly variant"
        assert "RayJob" not in kinds and "Secret" not in kinds
        assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {NAMESPACE}
    assert sorted(d["kind"] for d in jobs) == ["RayJob", "RayJob", "RayJob"]
    assert {d["metadata"]["namespace"] for d in jobs} == {NAMESPACE}


def test_jobs_target_the_cluster_with_the_expected_entrypoints():
    found = {}
    for _, doc in manifests():
        if doc["kind"] == "RayJob":
            spec = doc["spec"]
        elif doc["kind"] == "RayCronJob":
            spec = doc["spec"]["jobTemplate"]
        else:
            continue
        assert spec.get("clusterSelector") == {"ray.io/cluster": CLUSTER_NAME}, doc["metadata"]["name"]
        assert spec.get("submissionMode") == "K8sJobMode"
        kind = entrypoint_kind(spec["entrypoint"])
        assert kind is not None, f"unexpected entrypoint {spec['entrypoint']!r}"
        found[kind] = doc["kind"]
        if kind == "train":
            # the exporter must listen where the gpu pods declare port posefr-metrics
            assert "train.metrics_port=9500" in spec["entrypoint"].split()
    assert found == {"train": "RayJob", "tune": "RayJob", "ablation": "RayJob", "nightly": "RayCronJob"}


def nightly_variant_errors(raycron: dict, cron: dict) -> list[str]:
    """The CronJob fallback submits what the RayCronJob runs, on the same schedule, with the
    cluster's token, under a per-day submission id."""
    errors = []
    for field in ("schedule", "timeZone"):
        if raycron["spec"].get(field) != cron["spec"].get(field):
            errors.append(f"{field} differs: {raycron['spec'].get(field)!r} != {cron['spec'].get(field)!r}")
    if cron["spec"].get("concurrencyPolicy") != "Forbid":
        errors.append("the CronJob must not start a second run while one is active (concurrencyPolicy: Forbid)")
    words = cronjob_submit_command(cron)
    if "--" not in words:
        return errors + ["no `--` before the entrypoint in `ray job submit`"]
    sep = words.index("--")
    expected = ["ray", "job", "submit", "--address", f"http://{CLUSTER_NAME}-head-svc:8265",
                "--submission-id", "nightly-$(date -u +%F)"]
    if words[:sep] != expected:
        errors.append(f"submit command {' '.join(words[:sep])!r}, expected {' '.join(expected)!r}")
    if " ".join(words[sep + 1:]) != " ".join(raycron["spec"]["jobTemplate"]["entrypoint"].split()):
        errors.append("the CronJob's entrypoint differs from the RayCronJob's")
    (c,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c.get("env") or []}
    if (env.get("RAY_AUTH_MODE") or {}).get("value") != "token":
        errors.append("RAY_AUTH_MODE must be token")
    if ((env.get("RAY_AUTH_TOKEN") or {}).get("valueFrom") or {}).get("secretKeyRef") != \
            {"name": AUTH_SECRET, "key": "auth_token"}:
        errors.append(f"RAY_AUTH_TOKEN must come from Secret {AUTH_SECRET}, key auth_token")
    return errors


def test_the_two_nightly_variants_submit_the_same_job():
    assert nightly_variant_errors(the("RayCronJob"), the("CronJob")) == []


def test_k8s_expansion_leaves_the_shell_substitution_to_the_shell():
    assert expand_k8s("nightly-$$(date -u +%F)", {}) == "nightly-$(date -u +%F)"
    assert expand_k8s("nightly-$(date -u +%F)", {}) == "nightly-$(date -u +%F)"
    assert expand_k8s("$(HOME)/x $$(HOME)", {"HOME": "/tmp"}) == "/tmp/x $(HOME)"


def test_podmonitor_scrapes_ray_and_the_training_exporter():
    docs = default_build()
    (pm,) = only(docs, "PodMonitor")
    assert podmonitor_errors(pm, docs) == []
    (cluster,) = only(docs, "RayCluster")
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["metrics-export-port"] == "8080"


def test_cron_parser_accepts_standard_and_rejects_bad_schedules():
    for ok in ("0 2 * * *", "*/15 0-6 1,15 jan-mar MON-FRI", "@daily", "@every 1h30m", "5/10 * ? * *"):
        assert cron_errors(ok) == [], ok
    for bad in ("0 2 * *", "60 * * * *", "0 24 * * *", "0 2 0 * *", "0 2 * 13 *", "0 2 * * 7",
                "0 2 * * mon-sun-x", "5-1 * * * *", "*/0 * * * *", "@fortnightly", "", 5):
        assert cron_errors(bad), bad


# =============================================================================================
# Tests: broken copies are reported
# =============================================================================================


def _set(doc: dict, path: str, value: Any) -> dict:
    """Set a dotted path (``a.b[0].c``; ``[name=x]`` selects a list item by name/groupName)."""
    *parents, last = _parse_path(path)
    node = doc
    for key in parents:
        node = _step(node, key)
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


_DELETE = object()


def _parse_path(path: str) -> list:
    keys = []
    for part in re.findall(r"[^.\[\]]+|\[[^\]]+\]", path):
        if part.startswith("["):
            inner = part[1:-1]
            keys.append(int(inner) if inner.isdigit() else ("by", *inner.split("=", 1)))
        else:
            keys.append(part)
    return keys


def _step(node, key):
    if isinstance(key, tuple):
        _, field, value = key
        return next(item for item in node if item.get(field) == value)
    return node[key]


GPU = "spec.workerGroupSpecs[groupName=gpu]"
HEAD_C = "spec.headGroupSpec.template.spec.containers[0]"
SUB = "spec.submitterPodTemplate.spec.containers[0]"
CRON_C = "spec.jobTemplate.spec.template.spec.containers[0]"

# (case id, kind, [(path, value)], the check that must report it, expected words in a message)
BROKEN: list[tuple[str, str, list[tuple[str, Any]], Callable[[dict], list[str]], str]] = [
    # --- unknown fields (strict schema)
    ("raycluster-unknown-field", "RayCluster", [("spec.headGroupSpec.rayStartParam", {})], schema_errors,
     "'rayStartParam' was unexpected"),
    ("raycluster-unknown-field-in-pod-template", "RayCluster", [(HEAD_C + ".imagePullPolicyy", "Always")],
     schema_errors, "'imagePullPolicyy' was unexpected"),
    ("raycluster-unknown-field-in-template-metadata", "RayCluster",
     [("spec.headGroupSpec.template.metadata.label", {})], schema_errors, "'label' was unexpected"),
    ("rayjob-unknown-field", "RayJob/posefr-train", [("spec.entrypointt", "x")], schema_errors, "'entrypointt' was unexpected"),
    ("rayjob-unknown-field-in-submitter", "RayJob/posefr-train", [(SUB + ".securityContext.runAsNonroot", True)],
     schema_errors, "'runAsNonroot' was unexpected"),
    ("raycronjob-unknown-field", "RayCronJob", [("spec.concurrencyPolicy", "Forbid")], schema_errors,
     "'concurrencyPolicy' was unexpected"),
    ("raycronjob-unknown-field-in-job-template", "RayCronJob", [("spec.jobTemplate.clusterSelectors", {})],
     schema_errors, "'clusterSelectors' was unexpected"),
    ("podmonitor-unknown-field", "PodMonitor", [("spec.podMetricsEndpoints[0].portName", "metrics")],
     schema_errors, "'portName' was unexpected"),
    ("cronjob-unknown-field", "CronJob", [(CRON_C + ".commands", ["sh"])], schema_errors, "'commands' was unexpected"),
    ("serviceaccount-unknown-field", "ServiceAccount", [("automountToken", False)], schema_errors,
     "'automountToken' was unexpected"),
    ("namespace-unknown-metadata-field", "Namespace", [("metadata.label", {})], schema_errors,
     "'label' was unexpected"),
    # --- wrong types, enums, formats, list semantics (schema)
    ("namespace-wrong-type", "Namespace", [("metadata.labels", ["baseline"])], schema_errors,
     "is not of type 'object'"),
    ("secret-example-unknown-field", "Secret/posefr-ray-auth", [("stringdata", {})], schema_errors,
     "'stringdata' was unexpected"),
    ("secret-example-wrong-type", "Secret/posefr-ray-auth", [("stringData.auth_token", 5)], schema_errors,
     "is not of type 'string'"),
    ("raycluster-wrong-type", "RayCluster", [(GPU + ".maxReplicas", "4")], schema_errors,
     "is not of type 'integer'"),
    ("raycluster-int32-overflow", "RayCluster", [(GPU + ".maxReplicas", 2 ** 40)], schema_errors, "int32"),
    ("raycluster-bad-quantity", "RayCluster", [(GPU + ".template.spec.containers[0].resources.limits.memory", "64 GB")],
     schema_errors, "does not match"),
    ("raycluster-duplicate-port", "RayCluster", [(HEAD_C + ".ports[1].containerPort", 6379)], schema_errors,
     "duplicate entry for containerPort"),
    ("raycluster-bad-enum", "RayCluster", [("spec.authOptions.mode", "password")], schema_errors,
     "is not one of"),
    ("raycluster-unknown-metadata-field", "RayCluster", [("metadata.label", {})], metadata_errors,
     "metadata.label: unknown"),
    ("raycluster-bad-label", "RayCluster", [("metadata.labels.app/x/y", "z")], metadata_errors,
     "invalid label key"),
    ("rayjob-wrong-type", "RayJob/posefr-train", [("spec.shutdownAfterJobFinishes", "false")], schema_errors,
     "is not of type 'boolean'"),
    ("raycronjob-wrong-type", "RayCronJob", [("spec.schedule", 5)], schema_errors, "is not of type 'string'"),
    ("podmonitor-wrong-type", "PodMonitor", [("spec.podMetricsEndpoints[0].interval", 30)], schema_errors,
     "is not of type 'string'"),
    ("cronjob-wrong-type", "CronJob", [("spec.successfulJobsHistoryLimit", "7")], schema_errors,
     "is not of type 'integer'"),
    ("serviceaccount-wrong-type", "ServiceAccount", [("automountServiceAccountToken", "false")], schema_errors,
     "is not of type 'boolean'"),
    # --- KubeRay controller rules
    ("rayjob-bad-submission-mode", "RayJob/posefr-train", [("spec.submissionMode", "K8sMode")], controller_errors,
     "submissionMode 'K8sMode' is not one of"),
    ("rayjob-backofflimit-with-clusterselector", "RayJob/posefr-train", [("spec.backoffLimit", 2)], controller_errors,
     "BackoffLimit is incompatible with ClusterSelector"),
    ("rayjob-neither-cluster-nor-selector", "RayJob/posefr-train", [("spec.clusterSelector", _DELETE)], controller_errors,
     "one of RayClusterSpec or ClusterSelector must be set"),
    ("rayjob-ttl-without-shutdown", "RayJob/posefr-train", [("spec.ttlSecondsAfterFinished", 600)], controller_errors,
     "cannot have TTLSecondsAfterFinished"),
    ("rayjob-suspend-with-selector", "RayJob/posefr-train", [("spec.suspend", True)], controller_errors,
     "doesn't support the suspend operation"),
    ("rayjob-selector-without-cluster-name", "RayJob/posefr-train", [("spec.clusterSelector", {"app": "x"})], controller_errors,
     "cluster name in ClusterSelector"),
    ("rayjob-bad-runtime-env", "RayJob/posefr-train", [("spec.runtimeEnvYAML", "env_vars: [a, b")], controller_errors,
     "runtimeEnvYAML is not valid YAML"),
    ("rayjob-name-too-long", "RayJob/posefr-train", [("metadata.name", "posefr-train-" + "x" * 40)], controller_errors,
     "no more than 47 characters"),
    ("rayjob-deletion-strategy-without-gate", "RayJob/posefr-train",
     [("spec.deletionStrategy", {"deletionRules": [{"policy": "DeleteSelf", "condition": {"jobStatus": "SUCCEEDED"}}]})],
     controller_errors, "RayJobDeletionPolicy feature gate"),
    ("raycronjob-tz-in-schedule", "RayCronJob", [("spec.schedule", "CRON_TZ=UTC 0 2 * * *")], controller_errors,
     "cannot use TZ or CRON_TZ"),
    ("raycronjob-bad-schedule", "RayCronJob", [("spec.schedule", "0 25 * * *")], controller_errors,
     "hour '25'"),
    ("raycronjob-bad-time-zone", "RayCronJob", [("spec.timeZone", "Mars/Olympus_Mons")], controller_errors,
     "not a valid IANA time zone"),
    ("raycronjob-concurrency-policy", "RayCronJob", [("spec.concurrencyPolicy", "Forbid")], controller_errors,
     "has no concurrencyPolicy"),
    ("raycronjob-template-backofflimit", "RayCronJob", [("spec.jobTemplate.backoffLimit", 1)], controller_errors,
     "invalid RayJob template: BackoffLimit"),
    ("raycluster-min-above-max", "RayCluster", [(GPU + ".minReplicas", 5)], controller_errors,
     "minReplicas 5 greater than maxReplicas 4"),
    ("raycluster-resources-twice", "RayCluster", [("spec.headGroupSpec.resources", {"CPU": "0"})],
     controller_errors, "both rayStartParams and Resources"),
    ("raycluster-idle-timeout-without-v2", "RayCluster", [("spec.autoscalerOptions.version", _DELETE)],
     controller_errors, "autoscaler v2 is not enabled"),
    ("raycluster-token-auth-old-ray", "RayCluster", [("spec.rayVersion", "2.40.0")], controller_errors,
     "minimum Ray version is 2.52.0"),
    ("raycluster-restart-policy-with-v2", "RayCluster", [("spec.headGroupSpec.template.spec.restartPolicy", "Always")],
     controller_errors, "restartPolicy for head Pod"),
    ("raycluster-labels-in-start-params", "RayCluster", [(GPU + ".rayStartParams.labels", "a=b")],
     controller_errors, "rayStartParams['labels']"),
    ("raycluster-gated-field", "RayCluster", [("spec.tlsOptions", {})], controller_errors,
     "RayClusterMTLS feature gate"),
    ("cronjob-bad-schedule", "CronJob", [("spec.schedule", "0 2 * *")], controller_errors, "expected 5 fields"),
    ("cronjob-bad-time-zone", "CronJob", [("spec.timeZone", "UTC+2")], controller_errors, "not a valid IANA"),
    # --- project policy
    ("gpu-worker-without-limits", "RayCluster", [(GPU + ".template.spec.containers[0].resources.limits", _DELETE)],
     policy_errors, "resources.limits.cpu is not set"),
    ("autoscaler-without-resources", "RayCluster", [("spec.autoscalerOptions.resources", _DELETE)], policy_errors,
     "autoscalerOptions: resources.requests.cpu is not set"),
    ("request-above-limit", "RayCluster", [(HEAD_C + ".resources.requests.memory", "32Gi")], policy_errors,
     "exceeds the limit"),
    ("inline-secret-value", "RayCluster", [(HEAD_C + ".env", [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}])],
     policy_errors, "inline value"),
    ("secret-from-configmap", "CronJob",
     [(CRON_C + ".env[1].valueFrom", {"configMapKeyRef": {"name": "c", "key": "k"}})], policy_errors,
     "must come from a Secret"),
    ("inline-secret-in-runtime-env", "RayJob/posefr-train", [("spec.runtimeEnvYAML", "env_vars:\n  AWS_SECRET_ACCESS_KEY: x\n")],
     policy_errors, "sets AWS_SECRET_ACCESS_KEY inline"),
    ("root-user", "CronJob", [(CRON_C + ".securityContext.runAsUser", 0)], policy_errors,
     "runAsUser must be a non-zero user id"),
    ("run-as-root-allowed", "RayJob/posefr-train", [(SUB + ".securityContext.runAsNonRoot", False)], policy_errors,
     "runAsNonRoot must be true"),
    ("privilege-escalation", "RayJob/posefr-train", [(SUB + ".securityContext.allowPrivilegeEscalation", True)], policy_errors,
     "allowPrivilegeEscalation must be false"),
    ("capabilities-kept", "RayCronJob",
     [("spec.jobTemplate.submitterPodTemplate.spec.containers[0].securityContext.capabilities", _DELETE)],
     policy_errors, "capabilities.drop must contain ALL"),
    ("no-seccomp", "RayCluster", [(GPU + ".template.spec.securityContext.seccompProfile", _DELETE)], policy_errors,
     "seccompProfile"),
    # --- cluster layout
    ("head-with-gpus", "RayCluster", [("spec.headGroupSpec.rayStartParams.num-gpus", "1")], raycluster_layout_errors,
     'num-gpus must be "0"'),
    ("head-with-cpus", "RayCluster", [("spec.headGroupSpec.rayStartParams.num-cpus", _DELETE)],
     raycluster_layout_errors, 'num-cpus must be "0"'),
    ("dashboard-exposed", "RayCluster", [("spec.headGroupSpec.serviceType", "LoadBalancer")], raycluster_layout_errors,
     "ClusterIP"),
    ("gpu-group-not-from-zero", "RayCluster", [(GPU + ".minReplicas", 1)], raycluster_layout_errors,
     "starts at 0"),
    ("no-autoscaling", "RayCluster", [("spec.enableInTreeAutoscaling", False)], raycluster_layout_errors,
     "enableInTreeAutoscaling must be true"),
    ("auth-disabled", "RayCluster", [("spec.authOptions", {"mode": "disabled"})], raycluster_layout_errors,
     "token auth"),
    ("duplicate-worker-group", "RayCluster", [(GPU + ".groupName", "cpu")], raycluster_layout_errors,
     "worker group name 'cpu' is used twice"),
    ("storage-secret-missing", "RayCluster", [(GPU + ".template.spec.containers[0].envFrom", [])],
     raycluster_layout_errors, "via envFrom"),
]


@pytest.mark.parametrize("case_id,kind,edits,check,expected", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_manifest_is_reported(case_id, kind, edits, check, expected):
    doc = the(kind)
    if check is schema_errors and schemas_dir() is None and kind.split("/")[0] in {k for _, k in CRD_FILES}:
        pytest.skip("CRD schemas not available")
    assert expected not in " | ".join(check(doc)), "the real manifest must not show this error"
    for path, value in edits:
        _set(doc, path, value)
    errors = check(doc)
    assert any(expected in e for e in errors), f"{case_id}: {expected!r} not in {errors}"


def test_broken_podmonitor_is_reported():
    docs = default_build()
    (pm,) = only(docs, "PodMonitor")
    bad = copy.deepcopy(pm)
    bad["spec"]["selector"]["matchLabels"] = {"app.kubernetes.io/name": "other"}
    assert any("does not select" in e for e in podmonitor_errors(bad, docs))
    bad = copy.deepcopy(pm)
    bad["spec"]["podMetricsEndpoints"][1]["port"] = "train-metrics"
    errors = podmonitor_errors(bad, docs)
    assert any("'train-metrics' is not declared" in e for e in errors)
    assert any("no endpoint for port 'posefr-metrics'" in e for e in errors)
    bad = copy.deepcopy(pm)
    bad["spec"]["selector"] = {"matchLabels": {"app.kubernetes.io/name": "posefr-dist"}}
    assert any("selects CronJob" in e or "selects RayCronJob" in e
               for e in podmonitor_errors(bad, docs + build(K8S / "nightly" / "cronjob")))


def test_broken_entrypoints_are_reported():
    assert entrypoint_kind("python jobs/train.py --config jobs/configs/paper-gpu.yaml train.epochs=3") == "train"
    assert entrypoint_kind("python jobs/train.py --cfg jobs/configs/paper-gpu.yaml") is None
    assert entrypoint_kind("python jobs/tune.py --config jobs/configs/tune-paper-gpu.yaml") is None
    assert entrypoint_kind("python benchmarks/reproduce.py --preset cpu --seeds 0 --data s3://b/d "
                           "--pretrained s3://b/m --out s3://b/o") is None
    assert entrypoint_kind("python benchmarks/reproduce.py --preset paper --seeds 0,1,2 --data s3://b/d "
                           "--pretrained s3://b/m --out s3://b/o") == "ablation"
    # the paper preset has no pretraining of its own: without --pretrained the script refuses
    assert entrypoint_kind("python benchmarks/reproduce.py --preset paper --seeds 0,1,2 --data s3://b/d "
                           "--out s3://b/o") is None
    assert entrypoint_kind("python jobs/nightly.py --models /local --data s3://b/d --history s3://b/h") is None


@pytest.mark.parametrize("change,expected", [
    (("--submission-id nightly-$$(date -u +%F)", "--submission-id nightly"), "submit command"),
    (("--data s3://posefr/shards", "--data s3://posefr/other"), "entrypoint differs"),
    (("http://posefr-head-svc:8265 --submission-id", "http://localhost:8265 --submission-id"), "submit command"),
])
def test_changed_cronjob_command_is_reported(change, expected):
    cron = the("CronJob")
    c = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert change[0] in c["args"][0]
    c["args"][0] = c["args"][0].replace(*change)
    assert any(expected in e for e in nightly_variant_errors(the("RayCronJob"), cron))


def test_changed_nightly_schedule_or_token_is_reported():
    raycron, cron = the("RayCronJob"), the("CronJob")
    cron["spec"]["schedule"] = "0 3 * * *"
    cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"][1]["valueFrom"] = {
        "secretKeyRef": {"name": "other", "key": "auth_token"}}
    errors = nightly_variant_errors(raycron, cron)
    assert any("schedule differs" in e for e in errors)
    assert any("RAY_AUTH_TOKEN must come from Secret" in e for e in errors)


@pytest.fixture
def k8s_copy(tmp_path) -> Path:
    root = tmp_path / "k8s"
    shutil.copytree(K8S, root)
    assert kustomization_errors(root) == []
    return root


def test_missing_listed_resource_is_reported(k8s_copy):
    (k8s_copy / "base" / "raycluster.yaml").unlink()
    errors = kustomization_errors(k8s_copy)
    assert any("base/kustomization.yaml: listed resource 'raycluster.yaml' does not exist" in e for e in errors)


def test_missing_listed_directory_is_reported(k8s_copy):
    shutil.rmtree(k8s_copy / "monitoring")
    errors = kustomization_errors(k8s_copy)
    assert any("listed resource 'monitoring' does not exist" in e for e in errors)


def test_orphaned_manifest_is_reported(k8s_copy):
    shutil.copy(k8s_copy / "jobs" / "rayjob-train.yaml", k8s_copy / "jobs" / "rayjob-extra.yaml")
    errors = kustomization_errors(k8s_copy)
    assert any("jobs/rayjob-extra.yaml: not listed" in e for e in errors)


def test_file_outside_kustomization_root_is_reported(k8s_copy):
    kfile = k8s_copy / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    k["resources"] = ["base/raycluster.yaml" if r == "base" else r for r in k["resources"]]
    kfile.write_text(yaml.safe_dump(k))
    assert kustomization_errors(k8s_copy) == []  # a file below the root is fine ...
    k = yaml.safe_load((k8s_copy / "jobs" / "kustomization.yaml").read_text())
    k["resources"].append("../base/serviceaccount.yaml")
    (k8s_copy / "jobs" / "kustomization.yaml").write_text(yaml.safe_dump(k))
    errors = kustomization_errors(k8s_copy)  # ... one above it is not
    assert any("'../base/serviceaccount.yaml' is outside the kustomization root" in e for e in errors)


def test_directory_without_kustomization_is_reported(k8s_copy):
    (k8s_copy / "monitoring" / "kustomization.yaml").unlink()
    errors = kustomization_errors(k8s_copy)
    assert any("listed directory 'monitoring' has no kustomization.yaml" in e for e in errors)


def test_listed_secret_example_is_reported(k8s_copy):
    kfile = k8s_copy / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    k["resources"].append("secret.example.yaml")
    kfile.write_text(yaml.safe_dump(k))
    errors = kustomization_errors(k8s_copy)
    assert any("lists the example file" in e for e in errors)
    assert any("applies a Secret" in e for e in errors)


def test_both_nightly_variants_in_one_build_is_reported(k8s_copy):
    kfile = k8s_copy / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    k["resources"].append("nightly/cronjob")
    kfile.write_text(yaml.safe_dump(k))
    kinds = [d["kind"] for d in build(k8s_copy)]
    assert "CronJob" in kinds and "RayCronJob" in kinds  # what test_builds_hold_the_right_pieces forbids


def test_duplicate_resource_in_a_build_is_reported(k8s_copy):
    k = yaml.safe_load((k8s_copy / "nightly" / "raycronjob" / "kustomization.yaml").read_text())
    k["resources"] = ["../../base"] + k["resources"]
    (k8s_copy / "nightly" / "raycronjob" / "kustomization.yaml").write_text(yaml.safe_dump(k))
    errors = kustomization_errors(k8s_copy)
    assert any("defined twice" in e for e in errors)


def test_unparsable_manifest_is_reported(k8s_copy):
    (k8s_copy / "monitoring" / "podmonitor.yaml").write_text("spec: [unclosed\n")
    errors = parse_errors(k8s_copy)
    assert any("monitoring/podmonitor.yaml: does not parse" in e for e in errors)


@needs_schemas
def test_schema_check_rejects_unknown_kinds():
    assert schema_errors({"apiVersion": "ray.io/v1", "kind": "RayServe", "metadata": {"name": "x"}})
