"""Vendor the parts of KServe's CRD schemas that bnexport's manifests use.

Usage (from the repository root, with a clone of github.com/kserve/kserve)::

    python tests/serve/kserve_crds/vendor_crds.py /path/to/kserve v0.14.1 v0.15.2 v0.16.0

For each tag it reads ``config/crd/full/serving.kserve.io_{inferenceservices,
clusterservingruntimes}.yaml`` with ``git show`` and writes
``<tag>/{inferenceservice,clusterservingruntime}.json``: the ``openAPIV3Schema`` of the
served version, pruned. Pruning keeps every property *name* of every object the
manifests reach (so an unknown field still fails) and the whole schema of every
property they use; a property they do not use keeps its name with an empty schema
``{}``. Rerun it when a manifest starts using a new field. The manifests are those of
``bnexport.serve.kserve`` (the docs example and the GPU variants).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRDS = {
    "InferenceService": ("serving.kserve.io_inferenceservices.yaml", "inferenceservice.json"),
    "ClusterServingRuntime": (
        "serving.kserve.io_clusterservingruntimes.yaml",
        "clusterservingruntime.json",
    ),
}


def manifests() -> list[dict]:
    """Every document bnexport ships or writes, CPU and GPU variants."""
    from bnexport.serve import kserve

    uri = "s3://b/m"
    texts = [
        kserve.docs_example_yaml(),
        kserve.bnexport_isvc_yaml("g", uri, gpu=True),
        kserve.custom_container_isvc_yaml("g", uri, gpu=True),
        kserve.triton_isvc_yaml("g", uri, gpu=True),
    ]
    return [d for t in texts for d in yaml.safe_load_all(t)]


def prune(schema: dict, values: list) -> dict:
    """``schema`` with the subtrees no value in ``values`` reaches replaced by ``{}``."""
    out = dict(schema)
    props = schema.get("properties")
    if props is not None:
        dicts = [v for v in values if isinstance(v, dict)]
        out["properties"] = {
            name: prune(sub, [d[name] for d in dicts if name in d])
            if any(name in d for d in dicts)
            else {}
            for name, sub in props.items()
        }
    items = schema.get("items")
    if isinstance(items, dict):
        out["items"] = prune(items, [x for v in values if isinstance(v, list) for x in v])
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        out["additionalProperties"] = prune(
            extra, [x for v in values if isinstance(v, dict) for x in v.values()]
        )
    return out


def main(argv: list[str]) -> int:
    repo, tags = Path(argv[0]), argv[1:]
    docs = manifests()
    for tag in tags:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-list", "-n1", tag], capture_output=True, text=True
        ).stdout.strip()
        for kind, (src, dst) in CRDS.items():
            text = subprocess.run(
                ["git", "-C", str(repo), "show", f"{tag}:config/crd/full/{src}"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            crd = yaml.safe_load(text)
            (version,) = [v for v in crd["spec"]["versions"] if v.get("served", True)]
            schema = version["schema"]["openAPIV3Schema"]
            used = [d for d in docs if d["kind"] == kind]
            out = {
                "source": f"github.com/kserve/kserve {tag} ({commit}) config/crd/full/{src}",
                "apiVersion": f"{crd['spec']['group']}/{version['name']}",
                "kind": kind,
                "openAPIV3Schema": prune(schema, used),
            }
            path = HERE / tag / dst
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
            print(f"{path}: {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
