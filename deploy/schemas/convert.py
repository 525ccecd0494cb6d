#!/usr/bin/env python3
"""Converts one version of an upstream CustomResourceDefinition to a strict JSON Schema.

    python3 deploy/schemas/convert.py CRD.yaml VERSION OUT.json --source "repo path@tag (commit)"

Run by hand when a vendored schema is updated (deploy/schemas/README.md lists the sources);
scripts/check-deploy only reads the JSON it wrote, so the check needs no network.

What it does to the CRD's `openAPIV3Schema`:
- `apiVersion` and `kind` become constants (`GROUP/VERSION`, the CRD's kind), so an object of
  another version or a misspelled kind does not pass;
- every object schema with `properties` and no `additionalProperties` gets
  `additionalProperties: false`, as the API server prunes (drops) unknown fields there: a typo
  in a field name would be silently lost on a real cluster, here it is an error. Objects marked
  `x-kubernetes-preserve-unknown-fields: true` stay open;
- `metadata` (which CRDs leave as a bare `type: object`) gets ObjectMeta's fields, closed;
- `x-kubernetes-int-or-string` becomes `integer | string`, `nullable` adds `null`,
  `format: int32 / int64` become numeric bounds;
- descriptions, defaults and the `x-kubernetes-*` annotations are dropped. CEL rules
  (`x-kubernetes-validations`) cannot be evaluated by a JSON Schema validator: they are the one
  part of the CRD this check does not enforce (deploy/schemas/README.md says so).
"""

import argparse
import json
import sys

import yaml

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)

# ObjectMeta as Kubernetes defines it (k8s.io/apimachinery/pkg/apis/meta/v1), closed: these are
# all its fields.
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "selfLink": {"type": "string"},
        "uid": {"type": "string"},
        "resourceVersion": {"type": "string"},
        "generation": {"type": "integer"},
        "creationTimestamp": {"type": ["string", "null"]},
        "deletionTimestamp": {"type": ["string", "null"]},
        "deletionGracePeriodSeconds": {"type": "integer"},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
        "ownerReferences": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["apiVersion", "kind", "name", "uid"],
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "name": {"type": "string"},
                    "uid": {"type": "string"},
                    "controller": {"type": "boolean"},
                    "blockOwnerDeletion": {"type": "boolean"},
                },
            },
        },
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "managedFields": {"type": "array", "items": {"type": "object"}},
    },
}

DROP = {"description", "default", "example"}


def convert(node):
    """Returns a JSON Schema for one OpenAPI v3 (structural) schema node."""
    if isinstance(node, list):
        return [convert(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in DROP or key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {k: convert(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = convert(value) if isinstance(value, dict) else value
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [convert(v) for v in value]
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        # (CRDs often spell the same alternatives in an anyOf already: replaced, not added to.)
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    fmt = out.get("format")
    if out.get("type") == "integer" and fmt in ("int32", "int64"):
        low, high = INT32 if fmt == "int32" else INT64
        out.setdefault("minimum", low)
        out.setdefault("maximum", high)
        del out["format"]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else out["type"] + ["null"]
    is_object = out.get("type") == "object" or (
        isinstance(out.get("type"), list) and "object" in out["type"]
    )
    if (
        is_object
        and "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crd", help="the upstream CRD YAML")
    parser.add_argument("version", help="the API version to convert, e.g. v1")
    parser.add_argument("out", help="the JSON Schema to write")
    parser.add_argument("--source", required=True, help="where the CRD came from (recorded in the schema)")
    args = parser.parse_args()

    with open(args.crd) as f:
        crd = yaml.safe_load(f)
    if crd.get("kind") != "CustomResourceDefinition":
        sys.exit(f"{args.crd}: not a CustomResourceDefinition")
    group = crd["spec"]["group"]
    kind = crd["spec"]["names"]["kind"]
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if args.version not in versions:
        sys.exit(f"{args.crd}: no version {args.version}; it has {', '.join(versions)}")
    version = versions[args.version]
    if not version.get("served", False):
        sys.exit(f"{args.crd}: version {args.version} is not served")

    schema = convert(version["schema"]["openAPIV3Schema"])
    schema.setdefault("properties", {})
    schema["properties"]["apiVersion"] = {"const": f"{group}/{args.version}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["properties"]["metadata"] = OBJECT_META
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
    schema["additionalProperties"] = False
    document = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": (
            f"{kind} {group}/{args.version}, converted by deploy/schemas/convert.py from the CRD "
            f"{args.source}. Do not edit by hand: convert again."
        ),
        "title": f"{kind} ({group}/{args.version})",
        **schema,
    }
    with open(args.out, "w") as f:
        json.dump(document, f, indent=1, sort_keys=False)
        f.write("\n")
    print(f"{args.out}: {kind} {group}/{args.version}")


if __name__ == "__main__":
    main()
