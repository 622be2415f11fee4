"""Device meshes and distributions from a short text spec (`batch=2,expert=4`)."""

import contextlib
import re

import keras

from keras_brainformer.models.brainformer.brainformer_layout_map import get_layout_map

MESH_AXES = ("batch", "expert", "model")
_AXIS = re.compile(r"^\s*([a-z_]+)\s*=\s*(\d+)\s*$")


def parse_mesh_spec(spec):
    """Parses `"batch=2,expert=4"` into `{"batch": 2, "expert": 4}`.

    Axis names must be among `MESH_AXES` (`batch`, `expert`, `model`), each
    at most once, sizes positive integers; `batch` is always present (the
    input is split along it; added as `batch=1` if missing). The result keeps
    `MESH_AXES` order.

    Example:
    >>> parse_mesh_spec("expert=4, batch=2")
    {'batch': 2, 'expert': 4}
    >>> parse_mesh_spec("model=2")
    {'batch': 1, 'model': 2}
    """
    if not isinstance(spec, str):
        raise TypeError(f"`mesh` must be a str like 'batch=2,expert=4'. Received: {spec!r}")
    sizes = {}
    for part in spec.split(","):
        match = _AXIS.match(part)
        if not match:
            raise ValueError(
                f"Invalid mesh spec {spec!r}: {part!r} is not `axis=size` "
                f"(axes: {MESH_AXES}), for example 'batch=2,expert=4'."
            )
        name, size = match.group(1), int(match.group(2))
        if name not in MESH_AXES:
            raise ValueError(
                f"Invalid mesh spec {spec!r}: unknown axis {name!r}; allowed: {MESH_AXES}."
            )
        if name in sizes:
            raise ValueError(f"Invalid mesh spec {spec!r}: axis {name!r} appears twice.")
        if size < 1:
            raise ValueError(f"Invalid mesh spec {spec!r}: size of {name!r} must be >= 1.")
        sizes[name] = size
    sizes.setdefault("batch", 1)
    return {name: sizes[name] for name in MESH_AXES if name in sizes}


def mesh_size(sizes):
    """Number of devices a parsed mesh spec needs."""
    total = 1
    for size in sizes.values():
        total *= size
    return total


EXPERTS_ON = ("expert", "batch")


def expert_axis(sizes, experts_on=None, fsdp=False):
    """The mesh axis `make_distribution` splits expert banks along: `experts_on`
    if given, else `expert` when the mesh has it, else `batch` (GShard) —
    except for a batch-only mesh without `fsdp`, which is plain data
    parallelism (None: everything replicated).

    Example:
    >>> expert_axis({"batch": 2, "expert": 4}), expert_axis({"batch": 8})
    ('expert', None)
    >>> expert_axis({"batch": 8}, experts_on="batch")
    'batch'
    """
    if experts_on is not None:
        if experts_on not in EXPERTS_ON:
            raise ValueError(
                f"`experts_on`={experts_on!r} must be one of {EXPERTS_ON} or None."
            )
        if experts_on not in sizes:
            raise ValueError(
                f"`experts_on`={experts_on!r} is not an axis of the mesh {sizes}."
            )
        return experts_on
    if set(sizes) == {"batch"} and not fsdp:
        return None
    return "expert" if "expert" in sizes else "batch"


def make_distribution(mesh, experts_on=None, fsdp=False, devices=None):
    """A `keras.distribution` for a mesh spec, with Brainformer's layout map.

    Args:
        mesh: a spec like `"batch=2,expert=4"` (see `parse_mesh_spec`) or its
            parsed dict. The product of the sizes must equal the number of
            devices (all processes' devices in a multi-host run).
        experts_on: mesh axis the expert banks are split along: `"expert"`
            (the default when the mesh has an `expert` axis) or `"batch"`
            (GShard: experts live on the data axis, tokens travel to them by
            all-to-all; the default for a batch-only mesh with `fsdp` or a
            `model` axis). A batch-only mesh without either gives plain
            `DataParallel` unless `experts_on="batch"`.
        fsdp: also split weights along the batch axis (ZeRO-3 style).
        devices: devices to use (default: `keras.distribution.list_devices()`).

    Returns:
        A `keras.distribution.DataParallel` or `ModelParallel`; use it with
        `keras.distribution.set_distribution(d)` or `with d.scope():` *before*
        creating the model.

    Example:
    >>> import keras
    >>> one_device = keras.distribution.list_devices()[:1]
    >>> type(make_distribution("batch=1", devices=one_device)).__name__
    'DataParallel'
    """
    sizes = parse_mesh_spec(mesh) if isinstance(mesh, str) else dict(mesh)
    expert_axis(sizes, experts_on, fsdp)  # validates `experts_on`
    if devices is None:
        devices = keras.distribution.list_devices()
    needed = mesh_size(sizes)
    if needed != len(devices):
        raise ValueError(
            f"The mesh {sizes} needs {needed} devices but {len(devices)} are "
            f"available ({', '.join(map(str, devices[:4]))}{', ...' if len(devices) > 4 else ''})."
        )
    axis = expert_axis(sizes, experts_on, fsdp)
    if axis is None:
        return keras.distribution.DataParallel(devices=devices)
    device_mesh = keras.distribution.DeviceMesh(
        shape=tuple(sizes.values()), axis_names=tuple(sizes), devices=devices
    )
    layout_map = get_layout_map(device_mesh, expert_dim_name=axis, fsdp=fsdp)
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")


@contextlib.contextmanager
def distribution_scope(distribution):
    """`distribution.scope()`, or nothing for None."""
    if distribution is None:
        yield
        return
    with distribution.scope():
        yield
