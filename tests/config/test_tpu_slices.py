"""TPU slices as users name them: Ray's names, topologies, hosts and chips per host, and one-line errors."""

import typing

import pytest

from runner.config.loading import load_experiment
from runner.config.schema import ClusterConfig
from runner.config.tpu_slices import TPU_GENERATIONS, tpu_slice_shape
from tests.config.experiment_files import MINIMAL, error_of, write


def with_cluster(cluster: str) -> str:
    return MINIMAL + f"cluster: {cluster}\n"


@pytest.mark.parametrize(
    ("generation", "topology", "chips_per_host", "expected"),
    [
        # Cloud TPU's published shapes: v5litepod-16 is 4 VMs of 4 chips, v4-16 and v5p-16 are 2 VMs of 4 chips.
        ("v5e", "4x4", 4, ("v5litepod", "v5litepod-16", 16, 4, 4)),
        ("v5litepod", "4x8", None, ("v5litepod", "v5litepod-32", 32, 4, 8)),
        ("v6e", "2x4", 4, ("v6e", "v6e-8", 8, 4, 2)),  # the two-VM v6e-8 (Ray's chips_per_vm=4)
        ("v6e", "16x16", 4, ("v6e", "v6e-256", 256, 4, 64)),
        ("v4", "2x2x2", 4, ("v4", "v4-16", 8, 4, 2)),
        ("v5p", "2x2x4", None, ("v5p", "v5p-32", 16, 4, 4)),
    ],
)
def test_a_slice_is_measured_with_rays_names_and_chips_per_host(generation, topology, chips_per_host, expected):
    shape = tpu_slice_shape(generation, topology, chips_per_host)
    assert (shape.ray_version, shape.pod_type, shape.chips, shape.chips_per_host, shape.hosts) == expected
    assert shape.head_resource == f"TPU-{expected[1]}-head"
    assert shape.accelerator_type == f"TPU-{expected[0].upper()}"


def test_the_generations_users_may_write_are_the_ones_the_schema_allows():
    allowed = typing.get_args(typing.get_args(ClusterConfig.model_fields["accelerator_version"].annotation)[0])
    assert set(allowed) == set(TPU_GENERATIONS)
    from ray._private.accelerators.tpu import VALID_TPU_TYPES

    assert set(TPU_GENERATIONS.values()) <= set(VALID_TPU_TYPES), "every name maps to one Ray knows"


def test_a_v5e_16_slice_validates_and_names_its_hosts(tmp_path):
    config = load_experiment(write(tmp_path, with_cluster(
        "{replica: slice, slice_topology: 4x4, accelerator_version: v5e, resources: {TPU: 4}, workers: 2}")))
    shape = config.cluster.tpu_slice()
    assert (shape.hosts, shape.chips_per_host, shape.ray_version) == (4, 4, "v5litepod")
    assert config.cluster.host_bundle() == {"CPU": 0.0, "TPU": 4.0}


@pytest.mark.parametrize(
    ("cluster", "expected"),
    [
        (
            "{replica: slice, slice_topology: 4x4x4, accelerator_version: v5e, resources: {TPU: 4}}",
            "cluster.slice_topology: '4x4x4' is not a v5e topology (allowed for v5e: 2x4, 2x8, 4x4, 4x8, 8x8, "
            "8x16, 16x16)",
        ),
        (
            "{replica: slice, slice_topology: 4x4, accelerator_version: v5p, resources: {TPU: 4}}",
            "cluster.slice_topology: '4x4' is not a v5p topology (allowed for v5p: 2x2x2, 2x2x4, 2x4x4, 4x4x4, "
            "4x4x8, 4x8x4, 8x4x4, 4x4x12, 4x12x4, 12x4x4, 4x4x16, 4x8x8, ... (99 in all, up to 16x16x24))",
        ),
        (
            "{replica: slice, slice_topology: 4x4, accelerator_version: v5e, resources: {TPU: 8}}",
            "cluster.resources.TPU: 8 is not the chips of one host of a v5e 4x4 slice (allowed: 4)",
        ),
        (
            "{replica: slice, slice_topology: 2x4, accelerator_version: v6e, resources: {TPU: 8}}",
            "cluster.slice_topology: '2x4' with 8 chips per host is one v6e host, which is replica: host with "
            "resources: {TPU: 8} (allowed: resources.TPU 4 for two hosts of 4 chips, or a multi-host topology: 2x4, "
            "2x8, 4x4, 4x8, 8x8, 8x16, 16x16)",
        ),
        (
            "{replica: slice, slice_topology: 4x4, accelerator_version: v5e}",
            "cluster.resources: needs TPU: the chips of one host of the v5e 4x4 slice (v5litepod-16): 4 hosts x 4 "
            "chips (allowed: resources: {TPU: 4}, plus any custom resource of those hosts)",
        ),
        (
            "{replica: slice, slice_topology: 4x4, resources: {TPU: 4}}",
            "cluster.accelerator_version: is required with slice_topology (allowed: v4, v5e, v5litepod, v5p, v6e)",
        ),
        (
            "{replica: slice, slice_topology: big, accelerator_version: v6e, resources: {TPU: 4}}",
            "cluster.slice_topology: 'big' is not a v6e topology (allowed for v6e: 2x4, 2x8, 4x4, 4x8, 8x8, 8x16, "
            "16x16)",
        ),
    ],
)
def test_a_wrong_slice_gets_one_line_naming_what_is_allowed(tmp_path, cluster, expected):
    assert error_of(write(tmp_path, with_cluster(cluster))) == expected
