# Ray image with runner installed, for the KubeRay manifests in infra/k8s/.
# Build from the repository root (the build context is the checkout):
#
#   docker build -f infra/docker/ray-runner.Dockerfile --build-arg RUNNER_EXTRA=tpu  -t "$RUNNER_RAY_IMAGE" .
#   docker build -f infra/docker/ray-runner.Dockerfile --build-arg RUNNER_EXTRA=cuda -t "$RUNNER_RAY_GPU_IMAGE" .
#
# Ray and Python must match across head, workers and any `ray://` client: Ray 2.60.0, Python 3.12.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py312
FROM ${RAY_IMAGE}

# tpu -> jax[tpu] (libtpu); cuda -> jax[cuda12] (CUDA from pip wheels; the GKE node provides the driver).
ARG RUNNER_EXTRA=tpu

COPY --chown=ray:users . /home/ray/runner
RUN pip install --no-cache-dir "ray[default]==2.60.0" "/home/ray/runner[${RUNNER_EXTRA}]"

WORKDIR /home/ray/runner
