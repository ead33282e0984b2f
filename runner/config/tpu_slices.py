"""Multi-host TPU slices as users name them, checked and measured with Ray's own TPU functions.

Users (and Cloud TPU's docs) name generations `v4`, `v5e`, `v5p`, `v6e`; Ray names v5e `v5litepod`
(`ray._private.accelerators.tpu.VALID_TPU_TYPES`), and so does Cloud TPU's accelerator type (`v5litepod-16`).
`tpu_slice_shape` maps the user's name to Ray's and asks Ray, as `ray.util.tpu.slice_placement_group` will, whether
the topology exists for that generation, how many chips a host has and how many hosts (bundles) the slice spans.
Ray's TPU tables are imported only here, and only for a config that names a slice topology.
"""

from __future__ import annotations

import dataclasses
from typing import Any

#: TPU generations as users write them -> Ray's accelerator version (`VALID_TPU_TYPES`).
TPU_GENERATIONS: dict[str, str] = {"v4": "v4", "v5e": "v5litepod", "v5litepod": "v5litepod", "v5p": "v5p",
                                   "v6e": "v6e"}
#: Most topologies listed in an error message.
_LISTED_TOPOLOGIES = 12


@dataclasses.dataclass(frozen=True)
class TpuSliceShape:
    """One multi-host TPU slice, as Ray reserves it.

    Attributes:
      generation: The generation as the user wrote it (`v5e`).
      ray_version: Ray's name of it (`v5litepod`), what `slice_placement_group` takes.
      topology: The chip topology (`4x4`).
      chips: Chips of the slice.
      chips_per_host: Chips of each host (VM); Ray's `chips_per_vm`.
      hosts: Hosts of the slice: one bundle, one gang member each.
      pod_type: Ray's and Cloud TPU's pod type (`v5litepod-16`: generation and TensorCores).
    """

    generation: str
    ray_version: str
    topology: str
    chips: int
    chips_per_host: int
    hosts: int
    pod_type: str

    @property
    def accelerator_type(self) -> str:
        """Ray's accelerator type of the slice's hosts (`TPU-V5LITEPOD`)."""
        return f"TPU-{self.ray_version.upper()}"

    @property
    def head_resource(self) -> str:
        """The resource only worker 0 of such a slice has (`TPU-v5litepod-16-head`)."""
        return f"TPU-{self.pod_type}-head"

    def describe(self) -> str:
        """The slice in words, e.g. `v5e 4x4 slice (v5litepod-16): 4 hosts x 4 chips`."""
        return (f"{self.generation} {self.topology} slice ({self.pod_type}): {self.hosts} hosts x "
                f"{self.chips_per_host} chips")


def tpu_slice_shape(generation: str, topology: str, chips_per_host: float | None) -> TpuSliceShape:
    """The slice of `topology` chips of a TPU `generation` whose hosts have `chips_per_host` chips each.

    Args:
      generation: A key of `TPU_GENERATIONS`.
      topology: A chip topology such as `4x4` or `2x2x2`.
      chips_per_host: What one host's worker requests (`cluster.resources.TPU`); None: Ray's default for the
        topology.

    Raises:
      ValueError: A message that names the field at fault (`slice_topology:` or `resources.TPU:`) and what is
        allowed: a topology Ray does not know for the generation, chips per host a host of it cannot have, or a
        topology that fits on one host (which is `replica: host`).
    """
    from ray._private.accelerators import tpu as ray_tpu
    from ray.util import tpu as ray_util_tpu

    version = ray_util_tpu.get_tpu_version_from_type(TPU_GENERATIONS[generation])
    topology = topology.strip().lower()
    if not ray_tpu.TPUAcceleratorManager.is_valid_tpu_accelerator_topology(version, topology):
        raise ValueError(f"slice_topology: {topology!r} is not a {generation} topology (allowed for {generation}: "
                         f"{_multi_host_topologies(generation)})")
    default = ray_tpu.get_chips_per_host(topology, version)
    # Ray's `chips_per_vm`: a topology of 8 chips on v5e/v6e is one 8-chip VM by default, or two VMs of 4 chips.
    allowed = sorted({default, ray_tpu.DEFAULT_TPU_NUM_CHIPS_PER_HOST} if default == 8 else {default})
    per_host = default if chips_per_host is None else chips_per_host
    if per_host not in allowed:
        raise ValueError(f"resources.TPU: {_number(per_host)} is not the chips of one host of a {generation} "
                         f"{topology} slice (allowed: {' or '.join(map(str, allowed))})")
    hosts, _ = ray_util_tpu.get_tpu_worker_resources(topology, version, resources_per_worker={"TPU": int(per_host)},
                                                     chips_per_vm=int(per_host), tpu_resource_per_chip=1)
    if hosts < 2:
        two_vms = "resources.TPU 4 for two hosts of 4 chips, or " if len(allowed) > 1 else ""
        raise ValueError(f"slice_topology: {topology!r} with {_number(per_host)} chips per host is one {generation} "
                         f"host, which is replica: host with resources: {{TPU: {_number(per_host)}}} (allowed: "
                         f"{two_vms}a multi-host topology: {_multi_host_topologies(generation)})")
    return TpuSliceShape(
        generation=generation,
        ray_version=version,
        topology=topology,
        chips=ray_tpu.get_num_chips_from_topology(topology),
        chips_per_host=int(per_host),
        hosts=hosts,
        pod_type=ray_tpu.infer_tpu_pod_type_from_topology(topology, f"TPU-{version.upper()}"),
    )


def _multi_host_topologies(generation: str) -> str:
    """The topologies of `generation` that span several hosts, smallest first, the longest lists cut short."""
    from ray._private.accelerators import tpu as ray_tpu

    version = TPU_GENERATIONS[generation]
    # More chips than a 4-chip host has: several hosts (a v5e/v6e 2x4 only with resources.TPU 4).
    multi = sorted((topology for topology in ray_tpu.VALID_TPU_TOPOLOGY[version]
                    if ray_tpu.get_num_chips_from_topology(topology) > ray_tpu.DEFAULT_TPU_NUM_CHIPS_PER_HOST),
                   key=_topology_order)
    if len(multi) <= _LISTED_TOPOLOGIES:
        return ", ".join(multi)
    return f"{', '.join(multi[:_LISTED_TOPOLOGIES])}, ... ({len(multi)} in all, up to {multi[-1]})"


def _topology_order(topology: str) -> tuple[Any, ...]:
    dims = tuple(int(d) for d in topology.split("x"))
    product = 1
    for dim in dims:
        product *= dim
    return product, dims


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
