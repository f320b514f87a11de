"""Each replica's metrics as its own Prometheus target, labelled by replica.

Requests through Ray's proxy reach any replica, so scraping `/metrics` through the proxy
would read a different replica each time. Instead every replica serves its registry (the same
`stt_*` families as `/metrics`) on a port of its own on its node's address, and records where
in Ray's key-value store. `python -m service.scale` writes the live replicas' addresses as a
Prometheus `file_sd_configs` file (service/deploy/ray/prometheus.yml reads it), each target
labelled `replica`, `deployment` and `node`: the dashboard sums over them, so the same queries
serve one process and a cluster.
"""

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from prometheus_client import CollectorRegistry, start_http_server
from ray import serve
from ray.experimental import internal_kv

log = logging.getLogger(__name__)

KV_NAMESPACE = "speech-serve"
KV_PREFIX = "metrics-target/"
REPLICA_ACTOR_PREFIX = "SERVE_REPLICA::"


@dataclass
class Target:
    """A replica's metrics endpoint; `close` stops serving it and forgets it."""

    replica: str  # Serve's full replica id, also its actor's name
    address: str
    server: Any

    def close(self) -> None:
        self.server.shutdown()
        try:
            internal_kv._internal_kv_del(KV_PREFIX + self.replica, namespace=KV_NAMESPACE)
        except Exception:  # the cluster may be going away with the replica
            log.debug("could not unregister %s", self.replica, exc_info=True)


def serve_replica_metrics(registry: CollectorRegistry) -> Target:
    """Serve `registry` on a free port of this node (inside a replica) and register it."""
    host = ray.util.get_node_ip_address()
    server, _ = start_http_server(0, addr=host, registry=registry)
    address = f"{host}:{server.server_port}"
    context = serve.get_replica_context()
    replica = context.replica_id.to_full_id_str()
    record = {
        "address": address,
        "replica": context.replica_tag,
        "deployment": context.deployment,
        "app": context.app_name,
        "node": host,
    }
    internal_kv._internal_kv_put(
        KV_PREFIX + replica, json.dumps(record), overwrite=True, namespace=KV_NAMESPACE
    )
    return Target(replica=replica, address=address, server=server)


def live_targets() -> list[dict[str, Any]]:
    """Prometheus `file_sd` groups for the replicas alive now (from a driver connected to the
    cluster). A replica killed without a graceful stop leaves its record behind; only replicas
    whose actor still exists are listed, and the stale records are removed."""
    alive = {
        entry["name"]
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["name"].startswith(REPLICA_ACTOR_PREFIX)
    }
    groups = []
    for raw_key in internal_kv._internal_kv_list(KV_PREFIX, namespace=KV_NAMESPACE):
        key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
        replica = key[len(KV_PREFIX) :]
        if replica not in alive:
            internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)
            continue
        raw = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        if raw is None:
            continue
        record = json.loads(raw)
        labels = {k: record[k] for k in ("replica", "deployment", "app", "node")}
        groups.append({"targets": [record["address"]], "labels": labels})
    return sorted(groups, key=lambda g: g["labels"]["replica"])


def write_sd_file(path: Path) -> list[dict[str, Any]]:
    """Write the live targets to `path` atomically (Prometheus re-reads it on change)."""
    groups = live_targets()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".targets-")
    with os.fdopen(fd, "w") as f:
        json.dump(groups, f, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return groups
