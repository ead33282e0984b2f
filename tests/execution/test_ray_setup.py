"""Joining Ray: what each worker actor asks of its host."""

from __future__ import annotations

from runner.config.schema import ClusterConfig
from runner.execution.ray_setup import ray_actor_options


def test_worker_actors_request_the_whole_host_and_leave_retries_to_the_controller() -> None:
    options = ray_actor_options(ClusterConfig(resources={"CPU": 8, "TPU": 4}), max_restarts=-1)
    assert (options["num_cpus"], options["num_gpus"], options["resources"]) == (8, 0, {"TPU": 4})
    assert (options["max_restarts"], options["max_task_retries"]) == (-1, 0)
    assert options["runtime_env"]["env_vars"] == {"JAX_PLATFORMS": "tpu"}, "auto: TPU requested -> tpu"

    gpu = ray_actor_options(ClusterConfig(resources={"GPU": 8}), max_restarts=3)
    assert (gpu["num_gpus"], gpu["num_cpus"], "resources" in gpu) == (8, 0, False)
    assert gpu["runtime_env"]["env_vars"] == {"JAX_PLATFORMS": "cuda"}
    cpu = ray_actor_options(ClusterConfig(resources={"TPU": 4}, platform="cpu"), max_restarts=3)
    assert cpu["runtime_env"]["env_vars"] == {"JAX_PLATFORMS": "cpu"}, "an explicit platform wins"
