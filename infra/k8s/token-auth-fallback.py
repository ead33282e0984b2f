#!/usr/bin/env python3
"""Ray token authentication for a KubeRay operator older than v1.5.1, which lacks `spec.authOptions`.

Reads rendered RayCluster manifests on stdin and writes them to stdout with `spec.authOptions` taken out and, in
every Ray container (the first container of the head's and of each worker group's pod), what KubeRay v1.5.1 sets
itself: `RAY_AUTH_MODE=token` and `RAY_AUTH_TOKEN` from key `auth_token` of the Secret named after the RayCluster
(the fallback of Ray's "Configure Ray clusters to use token authentication" guide). KubeRay copies these variables
into the `wait-gcs-ready` init container it injects. Create the Secret first (infra/README.md, "Ray token"):

    kubectl -n runner create secret generic runner-v5e-8 --from-literal=auth_token="$(openssl rand -base64 32)"
    envsubst '${RUNNER_RAY_IMAGE}' < infra/k8s/raycluster-tpu-v5e-8.yaml \
        | python3 infra/k8s/token-auth-fallback.py | kubectl apply -f -

Needs PyYAML (installed with `ray[default]`).
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

TOKEN_KEY = "auth_token"


def with_token_env(cluster: dict[str, Any]) -> dict[str, Any]:
    """`cluster` (a RayCluster) with token auth set through environment variables instead of `authOptions`."""
    spec = cluster["spec"]
    spec.pop("authOptions", None)
    secret = cluster["metadata"]["name"]
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    for group in groups:
        container = group["template"]["spec"]["containers"][0]  # KubeRay: the Ray container is the first
        env = [entry for entry in container.get("env", []) if entry["name"] not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")]
        env.append({"name": "RAY_AUTH_MODE", "value": "token"})
        env.append({"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": TOKEN_KEY}}})
        container["env"] = env
    return cluster


def main() -> None:
    """Rewrites every RayCluster of the manifests on stdin; other objects pass unchanged."""
    documents = [doc for doc in yaml.safe_load_all(sys.stdin) if doc is not None]
    converted = [with_token_env(doc) if doc.get("kind") == "RayCluster" else doc for doc in documents]
    yaml.safe_dump_all(converted, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
