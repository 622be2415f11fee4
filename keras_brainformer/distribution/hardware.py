"""Accelerators the step-time model (`step_time.py`) knows: matmul peak,
memory bandwidth and interconnect of one chip, from published figures.

Each entry is a `Hardware`. Figures are per chip, dense (no structured
sparsity), in FLOP/s and bytes/s (10^9 bytes = 1 GB). Sources:

- `tpu-v4`: cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM at
  1200 GB/s, all-reduce bandwidth 1.1 PB/s per 4096-chip pod (268.6 GB/s a
  chip, used as its link bandwidth).
- `tpu-v5e`: cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB at
  819 GB/s, 1600 Gbps ICI (200 GB/s; also 51.2 TB/s all-reduce / 256 chips).
- `tpu-v5p`: cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB at
  2765 GB/s, 4800 Gbps ICI (600 GB/s).
- `a100`: NVIDIA A100 80GB SXM datasheet: 312 TFLOP/s bf16, 156 TF32,
  2039 GB/s, NVLink 600 GB/s both directions (300 one way); DGX A100: 8 GPUs
  a node, one 200 Gb/s InfiniBand port a GPU (25 GB/s).
- `h100`: NVIDIA H100 SXM datasheet: 989 TFLOP/s bf16 dense, 494.5 TF32,
  3.35 TB/s, NVLink 900 GB/s both directions; DGX H100: 8 GPUs, 400 Gb/s
  InfiniBand a GPU (50 GB/s).
- `h200`: NVIDIA H200 SXM datasheet: as H100, with 141 GB at 4.8 TB/s; DGX
  H200 as DGX H100.
- `cpu-here`: this project's 2-core CPU, measured by
  `python benchmarks/machine_peak.py --bandwidth` (docs/performance_model.md).

The float32 column is what a float32 matmul runs at under JAX's default
precision: bf16 passes on TPU (the same peak), TF32 tensor cores on Ampere
and Hopper GPUs. The per-collective latency (`collective_latency_s`) is not a
published figure: it is an assumed order of magnitude (a few microseconds a
ring step), stated here so that it can be changed in one place.
"""

import dataclasses

GB = 10**9
GIB = 2**30
TERA = 10**12


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One accelerator chip and its links.

    Attributes:
        name: the `--hardware` name.
        matmul_flops: dict compute dtype (`"bfloat16"`, `"float32"`) -> peak
            matmul FLOP/s of one chip.
        memory_bandwidth: bytes/s between the chip and its memory.
        memory_bytes: memory of one chip (bytes).
        link_bandwidth: bytes/s one chip sends (one direction) to its
            neighbours in a collective inside a node (TPU: the whole slice).
        network_bandwidth: bytes/s across nodes (GPUs); None where the chip's
            own links reach every chip of the slice (TPU).
        chips_per_node: chips joined by `link_bandwidth`; None for all.
        collective_latency_s: seconds per ring step of a collective (assumed).
        source: where the figures come from.
    """

    name: str
    matmul_flops: dict
    memory_bandwidth: float
    memory_bytes: int
    link_bandwidth: float
    network_bandwidth: float = None
    chips_per_node: int = None
    collective_latency_s: float = 5e-6
    source: str = ""

    def peak(self, dtype):
        """Matmul FLOP/s for compute dtype `dtype`."""
        return self.matmul_flops[dtype]


HARDWARE = {
    "tpu-v4": Hardware(
        "tpu-v4", {"bfloat16": 275 * TERA, "float32": 275 * TERA}, 1200 * GB, 32 * GIB,
        link_bandwidth=1.1e15 / 4096, collective_latency_s=2e-6,
        source="cloud.google.com/tpu/docs/v4 (275 TFLOPs bf16, 32 GiB at 1200 GBps, "
        "1.1 PB/s all-reduce bandwidth per 4096-chip pod)",
    ),
    "tpu-v5e": Hardware(
        "tpu-v5e", {"bfloat16": 197 * TERA, "float32": 197 * TERA}, 819 * GB, 16 * GB,
        link_bandwidth=200 * GB, collective_latency_s=2e-6,
        source="cloud.google.com/tpu/docs/v5e (197 TFLOPs bf16, 16 GB at 819 GBps, "
        "1600 Gbps ICI, 51.2 TB/s all-reduce per 256-chip pod)",
    ),
    "tpu-v5p": Hardware(
        "tpu-v5p", {"bfloat16": 459 * TERA, "float32": 459 * TERA}, 2765 * GB, 95 * GIB,
        link_bandwidth=600 * GB, collective_latency_s=2e-6,
        source="cloud.google.com/tpu/docs/v5p (459 TFLOPs bf16, 95 GiB at 2765 GBps, "
        "4800 Gbps ICI: 1200 GBps both directions)",
    ),
    "a100": Hardware(
        "a100", {"bfloat16": 312 * TERA, "float32": 156 * TERA}, 2039 * GB, 80 * GB,
        link_bandwidth=300 * GB, network_bandwidth=25 * GB, chips_per_node=8,
        source="NVIDIA A100 80GB SXM datasheet (312 TFLOPS bf16, 156 TF32, 2039 GB/s, "
        "NVLink 600 GB/s bidirectional); DGX A100: 8 GPUs, 200 Gb/s InfiniBand per GPU",
    ),
    "h100": Hardware(
        "h100", {"bfloat16": 989 * TERA, "float32": 494.5 * TERA}, 3350 * GB, 80 * GB,
        link_bandwidth=450 * GB, network_bandwidth=50 * GB, chips_per_node=8,
        source="NVIDIA H100 SXM datasheet (989 TFLOPS bf16 dense, 494.5 TF32, 3.35 TB/s, "
        "NVLink 900 GB/s bidirectional); DGX H100: 8 GPUs, 400 Gb/s InfiniBand per GPU",
    ),
    "h200": Hardware(
        "h200", {"bfloat16": 989 * TERA, "float32": 494.5 * TERA}, 4800 * GB, 141 * GB,
        link_bandwidth=450 * GB, network_bandwidth=50 * GB, chips_per_node=8,
        source="NVIDIA H200 SXM datasheet (989 TFLOPS bf16 dense, 494.5 TF32, 141 GB at "
        "4.8 TB/s, NVLink 900 GB/s bidirectional); DGX H200: 8 GPUs, 400 Gb/s InfiniBand",
    ),
    # This project's 2-core CPU (2026-11-30): the matmul peak of the idle machine
    # (float32 2048^3, benchmarks/README.md: 200.6 GFLOP/s) and the donated copy
    # bandwidth of `python benchmarks/machine_peak.py --bandwidth` (256 MiB
    # float32, read + write: 21.6 GB/s at load 9.9). One device: no links.
    "cpu-here": Hardware(
        "cpu-here", {"bfloat16": 200e9, "float32": 200e9}, 21.6 * GB, 23 * GIB,
        link_bandwidth=10 * GB, chips_per_node=1, collective_latency_s=0.0,
        source="measured here: benchmarks/machine_peak.py (matmul peak, copy bandwidth)",
    ),
}
HARDWARE_NAMES = tuple(HARDWARE)


def get_hardware(name):
    """The `Hardware` entry called `name` (a `ValueError` naming the allowed
    names otherwise).

    Example:
    >>> get_hardware("tpu-v4").peak("bfloat16") / 1e12
    275.0
    """
    if name not in HARDWARE:
        raise ValueError(
            f"Unknown hardware {name!r}. Allowed values: {', '.join(HARDWARE_NAMES)}."
        )
    return HARDWARE[name]
