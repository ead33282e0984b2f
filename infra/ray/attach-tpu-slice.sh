#!/usr/bin/env bash
# Joins a hand-made multi-host TPU slice to the running `ray up` cluster of infra/ray/tpu-cluster.yaml.
#
# Every host of the slice gets what the launcher gives the hosts of an autoscaled slice, read from the rendered
# config (so nothing here is a second copy of it): the token and the secrets file, the config's
# initialization_commands, setup_commands and worker_setup_commands, then its worker_start_ray_commands with RAY_HEAD_IP set and the node type's
# `resources` in RAY_OVERRIDE_RESOURCES (what the launcher sets), so the hosts carry the type's custom resource
# (tpu-v5e-16) that runner's cluster.resources names. Ray itself adds TPU-<pod type>-head to worker 0 and the
# ray.io/tpu-* labels of every host from the TPU VM's metadata.
#
# Usage: infra/ray/attach-tpu-slice.sh TPU_NAME [NODE_TYPE]
#   TPU_NAME    the slice (gcloud compute tpus tpu-vm create TPU_NAME ..., infra/README.md section 3A)
#   NODE_TYPE   its node type in the config (default tpu_v5e_16_slice)
# Environment (infra/README.md, section 0): GCP_ZONE, RAY_AUTH_TOKEN_FILE, RUNNER_SECRETS_ENV;
#   RUNNER_TPU_CONFIG  the rendered config (default /tmp/runner-tpu.yaml);
#   HEAD_INTERNAL_IP   the head's internal IP (default: asked of the head with `ray exec`);
#   DRY_RUN=1          print the commands instead of running them.
set -euo pipefail

TPU_NAME=${1:?usage: attach-tpu-slice.sh TPU_NAME [NODE_TYPE]}
NODE_TYPE=${2:-tpu_v5e_16_slice}
CONFIG=${RUNNER_TPU_CONFIG:-/tmp/runner-tpu.yaml}
: "${GCP_ZONE:?set GCP_ZONE (infra/README.md, section 0)}"
: "${RAY_AUTH_TOKEN_FILE:?set RAY_AUTH_TOKEN_FILE (infra/README.md, section 0)}"
: "${RUNNER_SECRETS_ENV:?set RUNNER_SECRETS_ENV (infra/README.md, section 0)}"
[ -f "$CONFIG" ] || { echo "no rendered config at $CONFIG (render it: infra/README.md, section 3A, step 3)" >&2; exit 1; }

run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [ -z "${HEAD_INTERNAL_IP:-}" ]; then
  HEAD_INTERNAL_IP=$(ray exec "$CONFIG" 'hostname -I' 2>/dev/null | tail -1 | awk '{print $1}')
fi
case "$HEAD_INTERNAL_IP" in
  10.*|172.1[6-9].*|172.2[0-9].*|172.3[01].*|192.168.*) ;;
  *) echo "the head's internal IP '$HEAD_INTERNAL_IP' is not a private address; set HEAD_INTERNAL_IP" >&2; exit 1 ;;
esac

# The commands every host runs, from the config itself.
REMOTE=$(python3 - "$CONFIG" "$NODE_TYPE" "$HEAD_INTERNAL_IP" <<'PY'
import json, shlex, sys

import yaml

config_path, node_type, head_ip = sys.argv[1:]
with open(config_path) as handle:
    config = yaml.safe_load(handle)
if node_type not in config["available_node_types"]:
    sys.exit(f"{config_path}: no node type {node_type!r} (there are: {', '.join(config['available_node_types'])})")
resources = json.dumps(config["available_node_types"][node_type]["resources"], separators=(",", ":"))
lines = ["set -e", *config.get("initialization_commands", []), *config["setup_commands"],
         *config["worker_setup_commands"]]
lines += [f"export RAY_HEAD_IP={shlex.quote(head_ip)} RAY_OVERRIDE_RESOURCES={shlex.quote(resources)}"]
lines += config["worker_start_ray_commands"]
print("\n".join(lines))
PY
)

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$GCP_ZONE" --worker=all --command "$1"
}
ssh_all 'mkdir -p ~/.ray ~/.runner'
run gcloud compute tpus tpu-vm scp "$RAY_AUTH_TOKEN_FILE" "$TPU_NAME:~/.ray/auth_token" --zone "$GCP_ZONE" --worker=all
run gcloud compute tpus tpu-vm scp "$RUNNER_SECRETS_ENV" "$TPU_NAME:~/.runner/secrets.env" --zone "$GCP_ZONE" --worker=all
ssh_all "$REMOTE"
echo "joined $TPU_NAME to the cluster at $HEAD_INTERNAL_IP; check: ray exec $CONFIG 'ray status'"
