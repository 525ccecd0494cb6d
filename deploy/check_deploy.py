#!/usr/bin/env python3
"""Offline validation of deploy/kubernetes, run by scripts/check-deploy (in target/deploy-venv).

Every object of every YAML file in the folder is validated, and nothing is skipped silently:
- core kinds (Deployment, Service, ConfigMap, ...) with kubernetes-validate, strict (unknown
  fields are errors), against one Kubernetes version;
- every other kind with check-jsonschema against the schemas vendored in deploy/schemas/ (found
  by their apiVersion and kind constants); a kind with neither is an error naming file and
  object;
- the endpoint picker's config (inside its ConfigMap) against deploy/schemas/endpointpickerconfig;
- the llm-pool config: the ConfigMap's config.toml with the example Secret's tenants.toml and
  the Deployment's environment, run through the real `llm-pool serve` as the pod would run it
  (paths mapped to this checkout), which must load both models and answer /ready, refuse
  /v1/models without a key, and export every metric the picker's config names;
- references between objects (selectors, ports, names, grace periods) that no schema sees.

--self-test breaks copies of the manifests in a temporary folder and requires each break to be
reported, naming its file and object: proof that the checks can fail.
"""

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import yaml
import kubernetes_validate
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "deploy" / "schemas"
EPP_SCHEMA = SCHEMAS / "endpointpickerconfig-v1alpha1.json"
# The example Secret's keys, published in its comments: a hash that matches one of these is
# the example, and the check then also sends an authenticated request.
EXAMPLE_KEYS = ["example-team-a-key-CHANGE-ME", "example-admin-key-CHANGE-ME"]


class Objects:
    """Every object of the folder, with the file it came from."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.items = []  # (file name, object)
        self.errors = []
        self.resources = []

    def label(self, fname, obj):
        meta = obj.get("metadata") or {}
        return f"{fname}: {obj.get('kind', '?')}/{meta.get('name', '?')}"

    def find(self, kind, name=None):
        return [(f, o) for f, o in self.items
                if o.get("kind") == kind and (name is None or o.get("metadata", {}).get("name") == name)]

    def one(self, kind, name):
        found = self.find(kind, name)
        if len(found) != 1:
            self.errors.append(f"expected one {kind}/{name}, found {len(found)}")
            return None, None
        return found[0]


def load(folder, errors):
    """Reads every *.yaml of the folder; checks kustomization.yaml lists every manifest."""
    objs = Objects(folder)
    objs.errors = errors  # Objects.one reports into the same list
    kustomization = objs.folder / "kustomization.yaml"
    if not kustomization.is_file():
        errors.append(f"{kustomization}: missing")
        return objs
    with open(kustomization) as f:
        kust = yaml.safe_load(f)
    resources = kust.get("resources") or []
    files = sorted(p.name for p in objs.folder.glob("*.yaml") if p.name != "kustomization.yaml")
    for name in resources:
        if not (objs.folder / name).is_file():
            errors.append(f"kustomization.yaml: resource {name} does not exist")
    for name in files:
        if name.endswith(".example.yaml"):
            continue
        if name not in resources:
            errors.append(f"{name}: not listed in kustomization.yaml resources (list it, or name it *.example.yaml)")
    for name in files:
        with open(objs.folder / name) as f:
            try:
                docs = [d for d in yaml.safe_load_all(f) if d is not None]
            except yaml.YAMLError as e:
                errors.append(f"{name}: not valid YAML: {e}")
                continue
        if not docs:
            errors.append(f"{name}: no objects")
        for d in docs:
            if not isinstance(d, dict) or "apiVersion" not in d or "kind" not in d:
                errors.append(f"{name}: a document without apiVersion and kind")
                continue
            objs.items.append((name, d))
    objs.resources = resources
    return objs


def check_kustomize(objs, errors, notes):
    """With kubectl present, `kubectl kustomize` must render exactly the listed files' objects."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        notes.append("kubectl not found: `kubectl kustomize` rendering NOT checked (the resources list was)")
        return
    out = subprocess.run([kubectl, "kustomize", str(objs.folder)], capture_output=True, text=True)
    if out.returncode != 0:
        errors.append(f"kubectl kustomize {objs.folder} failed: {out.stderr.strip()}")
        return
    rendered = sorted((d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(out.stdout) if d)
    listed = sorted((o["kind"], o["metadata"]["name"]) for f, o in objs.items if f in objs.resources)
    if rendered != listed:
        errors.append(f"kubectl kustomize renders {rendered}, the listed files hold {listed}")
    else:
        notes.append(f"kubectl kustomize renders the {len(rendered)} objects of the listed files")


def schema_index():
    """(apiVersion, kind) -> vendored schema file, from the schemas' own constants."""
    index = {}
    for path in sorted(SCHEMAS.glob("*.json")):
        with open(path) as f:
            schema = json.load(f)
        props = schema.get("properties", {})
        api, kind = props.get("apiVersion", {}).get("const"), props.get("kind", {}).get("const")
        if api and kind:
            index[(api, kind)] = path
    return index


def check_jsonschema(schema, instances, errors):
    """Runs check-jsonschema on instance files; a failure adds its report to errors."""
    exe = Path(sys.executable).parent / "check-jsonschema"
    out = subprocess.run([str(exe), "--schemafile", str(schema), *map(str, instances)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        errors.append(f"check-jsonschema against {schema.relative_to(ROOT)}:\n"
                      + (out.stdout + out.stderr).strip())
    return out.returncode == 0


def safe(text):
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def validate_objects(objs, k8s_version, work, errors):
    """Core kinds with kubernetes-validate, the others with check-jsonschema. Returns the count."""
    index = schema_index()
    by_schema = {}
    count = 0
    for fname, obj in objs.items:
        label = objs.label(fname, obj)
        key = (obj["apiVersion"], obj["kind"])
        if key in index:
            inst = work / f"{safe(fname)}--{safe(obj['kind'])}--{safe(obj.get('metadata', {}).get('name', '?'))}.json"
            inst.write_text(json.dumps(obj))
            by_schema.setdefault(index[key], []).append(inst)
            count += 1
            continue
        try:
            kubernetes_validate.validate(obj, k8s_version, strict=True)
            count += 1
        except SchemaNotFoundError:
            errors.append(f"{label}: no validator for apiVersion {obj['apiVersion']} kind {obj['kind']}: "
                          f"not a Kubernetes {k8s_version} kind and no schema in deploy/schemas/ "
                          "(vendor one with deploy/schemas/convert.py)")
        except ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{label}: invalid against Kubernetes {e.version} (strict): {path}: {e.message}")
    for schema, instances in by_schema.items():
        check_jsonschema(schema, instances, errors)
    return count


# ---------------------------------------------------------------------------------------------
# References between objects


def pod_template(dep):
    return dep["spec"]["template"]


def container(dep, name=None):
    cs = pod_template(dep)["spec"]["containers"]
    return cs[0] if name is None else next(c for c in cs if c["name"] == name)


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def deployments_selected(objs, selector):
    return [(f, d) for f, d in objs.find("Deployment")
            if matches(selector, pod_template(d)["metadata"].get("labels", {}))]


def config_file_of(dep, arg_flag):
    args = container(dep).get("args", [])
    if arg_flag in args and args.index(arg_flag) + 1 < len(args):
        return args[args.index(arg_flag) + 1]
    for a in args:
        if a.startswith(arg_flag + "="):
            return a.split("=", 1)[1]
    return None


def mounted_file(objs, dep, path, errors, label):
    """The (kind, object, key) of the ConfigMap / Secret key that `path` is in the pod."""
    c = container(dep)
    vols = {v["name"]: v for v in pod_template(dep)["spec"].get("volumes", [])}
    for m in c.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        vol = vols.get(m["name"])
        if vol is None:
            errors.append(f"{label}: volumeMount {m['name']} has no volume")
            continue
        if m.get("subPath"):
            if path != mp:
                continue
            rel = m["subPath"]
        elif path.startswith(mp + "/"):
            rel = path[len(mp) + 1:]
        else:
            continue
        for kind, field, name_key in (("ConfigMap", "configMap", "name"), ("Secret", "secret", "secretName")):
            if field in vol:
                src = vol[field]
                items = {i["path"]: i["key"] for i in src.get("items", [])}
                if items and rel not in items:
                    return None  # the volume holds only its items
                return kind, src[name_key], items.get(rel, rel)
        return None
    return None


def data_of(obj, key):
    """A ConfigMap's or Secret's value for key (a Secret's `data` decoded from base64)."""
    if key in (obj.get("stringData") or {}):
        return obj["stringData"][key]
    if key in (obj.get("data") or {}):
        value = obj["data"][key]
        return base64.b64decode(value).decode() if obj.get("kind") == "Secret" else value
    return None


def check_references(objs, errors):
    """What no schema sees: the objects must fit together."""
    ctx = {}
    pools = objs.find("InferencePool")
    if not pools:
        errors.append("no InferencePool")
    for fname, pool in pools:
        label = objs.label(fname, pool)
        spec = pool["spec"]
        deps = deployments_selected(objs, spec["selector"]["matchLabels"])
        if len(deps) != 1:
            errors.append(f"{label}: its selector matches {len(deps)} Deployments' pods, expected 1")
            continue
        dfile, dep = deps[0]
        dlabel = objs.label(dfile, dep)
        ctx["server"] = (dfile, dep)
        ports = {p["containerPort"]: p.get("name") for c in pod_template(dep)["spec"]["containers"]
                 for p in c.get("ports", [])}
        for tp in spec["targetPorts"]:
            if tp["number"] not in ports:
                errors.append(f"{label}: targetPort {tp['number']} is not a container port of {dlabel}")
        ref = spec["endpointPickerRef"]
        if ref.get("kind", "Service") != "Service":
            errors.append(f"{label}: endpointPickerRef is not a Service")
            continue
        sfile, svc = objs.one("Service", ref["name"])
        if svc is None:
            errors.append(f"{label}: endpointPickerRef names Service {ref['name']}, which is not here")
            continue
        if ref["port"]["number"] not in [p["port"] for p in svc["spec"]["ports"]]:
            errors.append(f"{label}: endpointPickerRef port {ref['port']['number']} is not a port of {objs.label(sfile, svc)}")
        epps = deployments_selected(objs, svc["spec"]["selector"])
        if len(epps) != 1:
            errors.append(f"{objs.label(sfile, svc)}: selects {len(epps)} Deployments, expected the picker's")
            continue
        efile, epp = epps[0]
        elabel = objs.label(efile, epp)
        ctx["picker"] = (efile, epp)
        if config_file_of(epp, "--pool-name") != pool["metadata"]["name"]:
            errors.append(f"{elabel}: --pool-name is {config_file_of(epp, '--pool-name')!r}, the pool is {pool['metadata']['name']!r}")
        if epp["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30) < \
                dep["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30):
            errors.append(f"{elabel}: its grace period is shorter than the model servers' ({dlabel})")
        epp_ports = {p["containerPort"] for p in container(epp).get("ports", [])} | \
            {p.get("name") for p in container(epp).get("ports", [])}
        for p in svc["spec"]["ports"]:
            if p.get("targetPort", p["port"]) not in epp_ports:
                errors.append(f"{objs.label(sfile, svc)}: port {p['port']} is not a container port of {elabel}")
        # The picker's config file.
        cfg_path = config_file_of(epp, "--config-file")
        where = mounted_file(objs, epp, cfg_path or "", errors, elabel)
        if where is None:
            errors.append(f"{elabel}: --config-file {cfg_path} is not in a mounted ConfigMap")
        else:
            kind, name, key = where
            cfile, cm = objs.one(kind, name)
            text = data_of(cm, key) if cm else None
            if text is None:
                errors.append(f"{elabel}: --config-file {cfg_path}: {kind} {name} has no key {key}")
            else:
                ctx["epp_config"] = (objs.label(cfile, cm) + f" key {key}", yaml.safe_load(text))
        # The model servers' engine label must name an engine the picker knows.
        plabels = pod_template(dep)["metadata"].get("labels", {})
        engine = plabels.get("llm-d.ai/engine-type") or plabels.get("inference.networking.k8s.io/engine-type")
        if engine is None:
            errors.append(f"{dlabel}: pods have no llm-d.ai/engine-type label: the picker would use its default mapping")
        ctx["engine"] = engine

    for fname, route in objs.find("HTTPRoute"):
        label = objs.label(fname, route)
        for parent in route["spec"].get("parentRefs", []):
            if parent.get("kind", "Gateway") == "Gateway" and not objs.find("Gateway", parent["name"]):
                errors.append(f"{label}: parentRef Gateway {parent['name']} is not here")
        for rule in route["spec"].get("rules", []):
            for b in rule.get("backendRefs", []):
                kind = b.get("kind", "Service")
                found = objs.find(kind, b["name"])
                if not found:
                    errors.append(f"{label}: backendRef {kind} {b['name']} is not here")
                elif kind == "Service" and b.get("port") not in [p["port"] for p in found[0][1]["spec"]["ports"]]:
                    errors.append(f"{label}: backendRef Service {b['name']} has no port {b.get('port')}")
                elif kind == "InferencePool" and b.get("group") != "inference.networking.k8s.io":
                    errors.append(f"{label}: backendRef InferencePool needs group inference.networking.k8s.io")

    for fname, svc in objs.find("Service"):
        label = objs.label(fname, svc)
        deps = deployments_selected(objs, svc["spec"].get("selector"))
        if not deps:
            errors.append(f"{label}: selects no Deployment's pods")
        for _, d in deps:
            names = {p.get("name") for c in pod_template(d)["spec"]["containers"] for p in c.get("ports", [])}
            nums = {p["containerPort"] for c in pod_template(d)["spec"]["containers"] for p in c.get("ports", [])}
            for p in svc["spec"]["ports"]:
                t = p.get("targetPort", p["port"])
                if t not in names and t not in nums:
                    errors.append(f"{label}: targetPort {t} is not a port of {objs.label(_, d)}")

    for fname, hpa in objs.find("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        if not objs.find(ref["kind"], ref["name"]):
            errors.append(f"{objs.label(fname, hpa)}: scaleTargetRef {ref['kind']} {ref['name']} is not here")

    for fname, pm in objs.find("PodMonitor"):
        label = objs.label(fname, pm)
        deps = deployments_selected(objs, pm["spec"]["selector"].get("matchLabels"))
        if not deps:
            errors.append(f"{label}: selects no Deployment's pods")
        for _, d in deps:
            names = {p.get("name") for c in pod_template(d)["spec"]["containers"] for p in c.get("ports", [])}
            for ep in pm["spec"].get("podMetricsEndpoints", []):
                if ep.get("port") not in names:
                    errors.append(f"{label}: port {ep.get('port')} is not a named port of {objs.label(_, d)}")
    return ctx


def check_epp_config(ctx, work, errors):
    """The picker's EndpointPickerConfig: its schema, and every plugin reference resolves."""
    if "epp_config" not in ctx:
        return []
    label, cfg = ctx["epp_config"]
    inst = work / f"{safe(label)}.json"
    inst.write_text(json.dumps(cfg))
    if not check_jsonschema(EPP_SCHEMA, [inst], errors):
        return []
    names = {p.get("name") or p["type"]: p["type"] for p in cfg["plugins"]}
    refs = [r["pluginRef"] for prof in cfg["schedulingProfiles"] for r in prof["plugins"]]
    for src in (cfg.get("dataLayer") or {}).get("sources", []):
        refs.append(src["pluginRef"])
        refs += [e["pluginRef"] for e in src["extractors"]]
    for r in refs:
        if r not in names:
            errors.append(f"{label}: pluginRef {r!r} names no plugin of the config")
    specs = []
    engines = set()
    for p in cfg["plugins"]:
        if p["type"] == "core-metrics-extractor":
            for ec in (p.get("parameters") or {}).get("engineConfigs", []):
                engines.add(ec["name"])
                for k, v in ec.items():
                    if k.endswith("Spec") and v:
                        specs.append((f"{label}: engine {ec['name']} {k}", v))
                for cm in ec.get("customMetrics", []):
                    specs.append((f"{label}: engine {ec['name']} custom {cm['attributeKey']}", cm["metricSpec"]))
    builtin = {"vllm", "sglang", "trtllm-serve", "triton-tensorrt-llm", "triton"}
    if ctx.get("engine") and ctx["engine"] not in engines | builtin:
        errors.append(f"{label}: the pods' engine type {ctx['engine']!r} has no engine config")
    return specs


# ---------------------------------------------------------------------------------------------
# The llm-pool config, through the real binary


def parse_spec(spec):
    m = re.fullmatch(r"\s*([^{\s]+)\s*(?:\{([^}]*)\})?\s*", spec)
    labels = {}
    for pair in filter(None, (m.group(2) or "").split(",")):
        k, v = pair.split("=", 1)
        labels[k.strip()] = v.strip().strip('"')
    return m.group(1), labels


def series_present(metrics_text, spec):
    name, labels = parse_spec(spec)
    for line in metrics_text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return True
    return False


def http_get(url, headers=None, timeout=5):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, OSError):
        return None, ""


def check_server_config(objs, ctx, specs, binary, models_dir, work, errors, serve, notes):
    """Checks the model servers' config against the Deployment, then (with a binary) runs
    `llm-pool serve` as the pod would: same args, mounted files, environment."""
    if "server" not in ctx:
        return
    dfile, dep = ctx["server"]
    dlabel = objs.label(dfile, dep)
    c = container(dep)
    pod = work / "pod"
    pod.mkdir(exist_ok=True)
    # Files the args name, from the ConfigMaps and Secrets they are mounted from.
    args = list(c.get("args", []))
    files = {}
    local_paths = {}
    for i, a in enumerate(args):
        if not a.startswith("/"):
            continue
        where = mounted_file(objs, dep, a, errors, dlabel)
        if where is None:
            errors.append(f"{dlabel}: argument {a} is not a file of a mounted ConfigMap or Secret")
            continue
        kind, name, key = where
        ofile, obj = objs.one(kind, name)
        if obj is None:
            errors.append(f"{dlabel}: {a} comes from {kind} {name}, which is not here (nor as *.example.yaml)")
            continue
        text = data_of(obj, key)
        if text is None:
            errors.append(f"{dlabel}: {a}: {kind} {name} has no key {key}")
            continue
        files[a] = (objs.label(ofile, obj) + f" key {key}", text)
        local = pod / f"{i}-{Path(a).name}"
        local.write_text(text)
        local_paths[a] = local
        args[i] = str(local)
    config_arg = config_file_of(dep, "--config")
    if config_arg not in files:
        errors.append(f"{dlabel}: no --config file found")
        return
    clabel, ctext = files[config_arg]
    try:
        config = tomllib.loads(ctext)
    except tomllib.TOMLDecodeError as e:
        errors.append(f"{clabel}: not valid TOML: {e}")
        return
    # The models volume: model paths in the config must be under its mount, and map to models/.
    vols = {v["name"]: v for v in pod_template(dep)["spec"].get("volumes", [])}
    model_mounts = [m["mountPath"].rstrip("/") for m in c.get("volumeMounts", [])
                    if "persistentVolumeClaim" in vols.get(m["name"], {})]
    if len(model_mounts) != 1:
        errors.append(f"{dlabel}: expected one PersistentVolumeClaim mount (the models), found {len(model_mounts)}")
        return
    mount = model_mounts[0]
    for m in config.get("models", []):
        if not str(m.get("path", "")).startswith(mount + "/"):
            errors.append(f"{clabel}: model {m.get('name')} path {m.get('path')} is not under the models volume {mount}")
    # The copy the binary reads has the model paths of this checkout.
    local_paths[config_arg].write_text(ctext.replace(f'"{mount}/', f'"{models_dir}/'))

    # What the config must agree with.
    server = config.get("server", {})
    listen_port = int(str(server.get("listen", "127.0.0.1:8080")).rsplit(":", 1)[1])
    http_port = next((p["containerPort"] for p in c.get("ports", []) if p.get("name") == "http"), None)
    if listen_port != http_port:
        errors.append(f"{clabel}: server.listen port {listen_port} is not the container port 'http' ({http_port}) of {dlabel}")
    grace = pod_template(dep)["spec"].get("terminationGracePeriodSeconds", 30)
    pre_stop = ((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
    drain = server.get("shutdown_timeout_secs", 30)
    if grace <= pre_stop + drain:
        errors.append(f"{dlabel}: terminationGracePeriodSeconds {grace} must exceed preStop sleep {pre_stop} s "
                      f"+ server.shutdown_timeout_secs {drain} s ({clabel})")
    if ctx.get("engine") == "vllm" and not config.get("metrics", {}).get("vllm_compatible_names"):
        errors.append(f"{clabel}: the pods are labelled engine-type vllm but [metrics] vllm_compatible_names is not true")
    for probe, path in (("startupProbe", "/ready"), ("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        got = (c.get(probe) or {}).get("httpGet", {})
        if got.get("path") != path or got.get("port") not in ("http", http_port):
            errors.append(f"{dlabel}: {probe} should GET {path} on port http, not {got}")

    # The environment: literal values, Secret keys (from the Secret or its example), the CPU limit.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_POOL__")}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in (e.get("valueFrom") or {}):
            ref = e["valueFrom"]["secretKeyRef"]
            sfile, secret = objs.one("Secret", ref["name"])
            value = data_of(secret, ref["key"]) if secret else None
            if value is None and not ref.get("optional"):
                errors.append(f"{dlabel}: env {e['name']}: Secret {ref['name']} has no key {ref['key']}")
            elif value is not None:
                env[e["name"]] = value
        elif "resourceFieldRef" in (e.get("valueFrom") or {}):
            ref = e["valueFrom"]["resourceFieldRef"]
            kind, res = ref["resource"].split(".", 1)
            value = str((c.get("resources") or {}).get(kind, {}).get(res, ""))
            if res != "cpu" or not re.fullmatch(r"\d+m?", value):
                errors.append(f"{dlabel}: env {e['name']}: expected a CPU quantity in {ref['resource']}, got {value!r}")
            else:
                # As the kubelet gives it with divisor 1: whole cores, rounded up.
                millis = int(value[:-1]) if value.endswith("m") else int(value) * 1000
                env[e["name"]] = str(-(-millis // 1000))
    # Only the address differs from the pod: a free loopback port (environment overrides win).
    env["LLM_POOL__SERVER__LISTEN"] = "127.0.0.1:0"
    env["RUST_BACKTRACE"] = env["RUST_LIB_BACKTRACE"] = "0"  # errors as the pod logs them
    if binary is None or errors:
        return
    out_path, err_path = work / "serve.out", work / "serve.err"
    started = time.time()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen([str(binary), *args], stdout=out, stderr=err, env=env, cwd=str(work))
    try:
        base = None
        deadline = time.time() + 180
        while time.time() < deadline:
            if proc.poll() is not None:
                errors.append(f"{clabel}: llm-pool {' '.join(c.get('args', []))} refused it (exit {proc.returncode}):\n"
                              + err_path.read_text().strip())
                return
            if base is None:
                m = re.search(r"^listening on (\S+)", out_path.read_text(), re.M)
                base = m.group(1) if m else None
                if base and not serve:
                    return  # the config was accepted; nothing more to see
            if base:
                status, body = http_get(base + "/ready")
                if status == 200:
                    notes.append(f"llm-pool serve took {clabel} with {', '.join(Path(a).name for a in files)} "
                                 f"and the pod's environment; /ready 200 after {time.time() - started:.1f} s")
                    break
            time.sleep(0.2)
        else:
            errors.append(f"{clabel}: llm-pool did not become ready in 180 s: {err_path.read_text()[-2000:]}")
            return
        status, _ = http_get(base + "/v1/models")
        if status != 401:
            errors.append(f"{clabel}: /v1/models without an API key answered {status}, not 401: are tenants configured?")
        else:
            notes.append("/v1/models without an API key: 401")
        secret_text = "\n".join(t for l, t in files.values() if "[[tenants]]" in t)
        for key in EXAMPLE_KEYS:
            if hashlib.sha256(key.encode()).hexdigest() in secret_text:
                status, body = http_get(base + "/v1/models", {"Authorization": f"Bearer {key}"})
                names = sorted(m["id"] for m in json.loads(body)["data"]) if status == 200 else None
                want = sorted(m["name"] for m in config.get("models", []))
                if names != want:
                    errors.append(f"{clabel}: /v1/models with the example tenant key gave {status} {names}, expected {want}")
                else:
                    notes.append(f"/v1/models with the example key {key!r}: {names}")
        admin_hash = env.get("LLM_POOL__SERVER__ADMIN_KEY_SHA256")
        status, _ = http_get(base + "/admin/models")
        if admin_hash and status != 401:
            errors.append(f"{dlabel}: /admin/models without the admin key answered {status}, not 401")
        for key in EXAMPLE_KEYS:
            if admin_hash == hashlib.sha256(key.encode()).hexdigest():
                status, _ = http_get(base + "/admin/models", {"Authorization": f"Bearer {key}"})
                if status != 200:
                    errors.append(f"{dlabel}: /admin/models with the example admin key (from the "
                                  f"environment, LLM_POOL__SERVER__ADMIN_KEY_SHA256) answered {status}")
                else:
                    notes.append("/admin/models: 401 without a key, 200 with the example admin key "
                                 "(its hash from the environment)")
        status, metrics = http_get(base + "/metrics")
        missing = [(w, s) for w, s in specs if not series_present(metrics, s)]
        for where, spec in missing:
            errors.append(f"{where}: {spec!r} matches no series of llm-pool's /metrics")
        if specs and not missing:
            notes.append(f"the picker's {len(specs)} metric specs each match a series of /metrics")
        proc.send_signal(signal.SIGTERM)
        try:
            stopping = time.time()
            rc = proc.wait(timeout=drain + 15)
            if rc != 0:
                errors.append(f"{clabel}: llm-pool exited {rc} on SIGTERM: {err_path.read_text()[-2000:]}")
            else:
                notes.append(f"SIGTERM: exit 0 in {time.time() - stopping:.1f} s")
        except subprocess.TimeoutExpired:
            errors.append(f"{clabel}: llm-pool did not exit within shutdown_timeout_secs + 15 s of SIGTERM")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------


def check(folder, k8s_version, binary, models_dir, serve=True, notes=None):
    """All the checks on one folder; returns (objects validated, errors). What was run is
    appended to notes."""
    notes = [] if notes is None else notes
    errors = []
    with tempfile.TemporaryDirectory(prefix="check-deploy-") as tmp:
        work = Path(tmp)
        objs = load(folder, errors)
        check_kustomize(objs, errors, notes)
        count = validate_objects(objs, k8s_version, work, errors)
        if errors:
            # References between malformed objects would only add noise.
            notes.append("references and the llm-pool config NOT checked: fix the errors above first")
            return count, errors
        ctx = check_references(objs, errors)
        specs = check_epp_config(ctx, work, errors)
        check_server_config(objs, ctx, specs, binary, models_dir, work, errors, serve, notes)
    return count, errors


# Each break: (file, text to replace, replacement, text the report must contain, what of the
# binary it needs: None, "parse" (start it until it listens or refuses) or "serve" (all of it)).
SELF_TESTS = [
    ("llm-pool.yaml", "terminationGracePeriodSeconds: 90", "terminationGracePeriodSecond: 90",
     "llm-pool.yaml: Deployment/llm-pool: invalid", None),
    ("gateway.yaml", "  targetPorts:\n", "  targetPort:\n",
     "gateway.yaml--InferencePool--llm-pool.json", None),
    ("gateway.yaml", "      kind: Gateway\n      name: inference-gateway", "      kind: Gateway\n      nme: inference-gateway",
     "gateway.yaml--HTTPRoute--llm-pool.json", None),
    ("llm-pool.yaml", "  podMetricsEndpoints:", "  podMetricEndpoints:",
     "llm-pool.yaml--PodMonitor--llm-pool.json", None),
    ("endpoint-picker.yaml", "          engineConfigs:", "          engineConfig:",
     "endpoint-picker.yaml__ConfigMap_llm-pool-epp_key_llm-pool-plugins.yaml.json", None),
    ("gateway.yaml", "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool",
     "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePools",
     "gateway.yaml: InferencePools/llm-pool: no validator", None),
    ("llm-pool.yaml", "shutdown_timeout_secs = 60", "shutdown_timeout_secs = 85",
     "must exceed preStop sleep", None),
    ("llm-pool.yaml", "    max_loaded_models = 0\n", "    max_loaded_model = 0\n",
     "unknown field `max_loaded_model`", "parse"),
    ("endpoint-picker.yaml", "vllm:kv_cache_usage_perc{model_name=smollm2}", "vllm:kv_cache_usage_perc{model_name=smollm3}",
     "'vllm:kv_cache_usage_perc{model_name=smollm3}' matches no series of llm-pool's /metrics", "serve"),
]


def self_test(folder, k8s_version, binary, models_dir):
    failures = []
    for fname, old, new, expect, mode in SELF_TESTS:
        with tempfile.TemporaryDirectory(prefix="check-deploy-self-test-") as tmp:
            copy_dir = Path(tmp) / "kubernetes"
            shutil.copytree(folder, copy_dir)
            path = copy_dir / fname
            text = path.read_text()
            if text.count(old) != 1:
                failures.append(f"self-test: {fname} has {text.count(old)} copies of {old!r}, expected 1")
                continue
            path.write_text(text.replace(old, new))
            _, errors = check(copy_dir, k8s_version, binary if mode else None, models_dir,
                              serve=mode == "serve", notes=[])
            report = "\n".join(errors)
            if expect not in report:
                failures.append(f"self-test: breaking {fname} ({old!r} -> {new!r}) was not reported as "
                                f"{expect!r}; the report was:\n{report or '(no errors)'}")
            else:
                print(f"check-deploy: self-test: {fname}: {old.strip()!r} -> {new.strip()!r} rejected")
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=str(ROOT / "deploy" / "kubernetes"))
    parser.add_argument("--k8s-version", required=True)
    parser.add_argument("--binary", required=True, help="the llm-pool binary")
    parser.add_argument("--models-dir", default=str(ROOT / "models"))
    parser.add_argument("--self-test", action="store_true", help="also require that broken copies fail")
    args = parser.parse_args()
    binary = Path(args.binary).resolve()
    notes = []
    count, errors = check(args.folder, args.k8s_version, binary, Path(args.models_dir).resolve(), notes=notes)
    for e in errors:
        print(f"check-deploy: ERROR {e}", file=sys.stderr)
    for n in notes:
        print(f"check-deploy: {n}", file=sys.stderr if errors else sys.stdout)
    if errors:
        print(f"check-deploy: {len(errors)} problem(s) in {args.folder}", file=sys.stderr)
        return 1
    if args.self_test:
        failures = self_test(args.folder, args.k8s_version, binary, Path(args.models_dir).resolve())
        for f in failures:
            print(f"check-deploy: ERROR {f}", file=sys.stderr)
        if failures:
            return 1
    print(f"check-deploy: {count} objects valid (Kubernetes {args.k8s_version} strict, "
          f"CRD schemas in deploy/schemas), the picker config valid, the llm-pool config served by the real binary")
    return 0


if __name__ == "__main__":
    sys.exit(main())
