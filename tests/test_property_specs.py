"""Property tests over block specs and backbone arguments (hypothesis).

Every generated configuration is either accepted, and then builds a model
whose forward pass is finite (inference and training routing), or rejected
with a `ValueError` / `TypeError` that names one of the fields it was given;
never an error from deep inside a backend. Values are drawn from pools of
valid and invalid ones (zero, negatives, floats for ints, bools, None,
unknown strings, unknown keys, wrong kinds); a configuration with any
individually invalid value must be rejected.
"""

import math
import re

import keras
import numpy as np
import pytest
from conftest import to_numpy
from hypothesis import HealthCheck
from hypothesis import event
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_brainformer.models import BlockSpec
from keras_brainformer.models import BrainformerBackbone

ABSENT = object()  # the key is left out of the dict

NAN, INF = float("nan"), float("inf")

# field -> (valid values, invalid values); ABSENT means "use the default".
ATTENTION_FIELDS = {
    "num_heads": ((1, 2, 4), (0, -2, 2.0, True, None, "2")),
    "head_dim": ((ABSENT, None, 4, 8), (0, -4, 4.5, True, "4")),
    "depthwise_conv_kernel": ((ABSENT, 0, 3), (-1, 1.5, True, None)),
}
FFN_FIELDS = {
    "intermediate_dim": ((8, 24), (0, -8, 8.0, True, None, "8")),
    "activation": (
        (ABSENT, "gelu", "relu", "gated_gelu", "swiglu", "squared_relu"),
        ("nope", "", 3, None),
    ),
}
MOE_FIELDS = {
    "num_experts": ((1, 2, 4), (0, -1, 2.5, True, None)),
    "intermediate_dim": ((8, 24), (0, -8, 8.0, False, None)),
    "activation": ((ABSENT, "relu", "gated_gelu"), ("gated_nope", 1)),
    "router": ((ABSENT, "top_k", "expert_choice"), ("hash", None, 1)),
    "top_k": ((ABSENT, 1, 2), (0, -1, 1.0, True, None)),
    "capacity_factor": ((ABSENT, None, 0.5, 1.0, 2), (0, -1.0, NAN, INF, "1", True)),
    "eval_capacity_factor": ((ABSENT, "same", None, 1.0, 3), (0.0, -2, NAN, "auto", False)),
    "load_balance_loss_weight": ((ABSENT, None, 0.0, 0.01), (-0.1, INF, "0", True)),
    "z_loss_weight": ((ABSENT, 0.0, 1e-3), (-1e-3, NAN, None, True)),
    "group_size": ((ABSENT, None, 3, 4, 8, 16), (0, -4, 4.0, True, "8")),
    "jitter": ((ABSENT, 0.0, 0.1), (1.0, -0.1, NAN, None, True)),
    "batch_prioritized": ((ABSENT, False, True), (0, 1, "yes", None)),
}
KINDS = {"attention": ATTENTION_FIELDS, "ffn": FFN_FIELDS, "moe": MOE_FIELDS}
# Fields that may be individually valid but invalid together (k > experts,
# heads not dividing the width, dropless expert choice, ...): a rejection
# may name any of these.
RELATIONAL = {
    "num_heads", "head_dim", "top_k", "num_experts", "router", "capacity_factor",
    "eval_capacity_factor", "batch_prioritized", "hidden_dim", "group_size",
}

HIDDEN, VOCAB, BATCH, LENGTH = 16, 32, 2, 8


@st.composite
def field_values(draw, fields, bad_rate):
    """A dict of field values, and the set of fields given invalid values."""
    config, bad = {}, set()
    for name, (good_values, bad_values) in fields.items():
        if draw(st.floats(0, 1)) < bad_rate:
            value = draw(st.sampled_from(bad_values))
            bad.add(name)
        else:
            value = draw(st.sampled_from(good_values))
        if value is not ABSENT:
            config[name] = value
    return config, bad


@st.composite
def sublayer_dicts(draw, bad_rate):
    kind = draw(st.sampled_from(sorted(KINDS)))
    config, bad = draw(field_values(KINDS[kind], bad_rate))
    if kind == "ffn" and "hidden_dim" not in config:
        config["hidden_dim"] = 16  # required field
    mutations = ["none"] + (["none"] * 7 + ["unknown_key", "bad_kind", "no_kind"]) * (bad_rate > 0)
    mutation = draw(st.sampled_from(mutations))
    if mutation == "unknown_key":
        config["dropout_rate"] = 0.1
        bad.add("dropout_rate")
    if mutation == "bad_kind":
        config["kind"] = draw(st.sampled_from(["conv", "Attention", None, 3]))
        bad.add("kind")
    elif mutation != "no_kind":
        config = {"kind": kind, **config}
    else:
        bad.add("kind")
    return config, bad


@st.composite
def block_dicts(draw, bad_rate=0.15):
    """`(block spec dict, invalid field names)`; half of them drawn from
    valid values only."""
    if draw(st.booleans()):
        bad_rate = 0.0
    layers = draw(st.lists(sublayer_dicts(bad_rate), min_size=1, max_size=3))
    sublayers = [config for config, _ in layers]
    bad = set().union(*(b for _, b in layers))
    shapes = ["list"] + (["list"] * 9 + ["empty", "string", "dict", "extra_key"]) * (bad_rate > 0)
    shape = draw(st.sampled_from(shapes))
    if shape == "empty":
        return {"sublayers": []}, {"sublayers"}
    if shape == "string":
        return {"sublayers": "attention"}, {"sublayers"}
    if shape == "dict":
        return {"sublayers": sublayers[0]}, {"sublayers"}
    if shape == "extra_key":
        return {"sublayers": sublayers, "num_layers": 2}, {"sublayers"}
    return {"sublayers": sublayers}, bad


# Context prefixes added around a sublayer's own message.
PREFIX = re.compile(r"(In `)?sublayers\[\d+\]`? \(\w+\): ")


def names_a_field(message, names):
    message = PREFIX.sub("", message)
    return any(re.search(rf"(?<!\w){re.escape(n)}(?!\w)", message) for n in names)


def given_names(block):
    """Every field name (and structural key) that appears in `block`."""
    names = {"sublayers", "kind"}
    sublayers = block.get("sublayers")
    if isinstance(sublayers, list):
        for sub in sublayers:
            names.update(sub)
    elif isinstance(sublayers, dict):
        names.update(sublayers)
    return names


def check_rejection(error, bad, allowed_names):
    assert isinstance(error, (ValueError, TypeError)), repr(error)
    message = str(error)
    assert names_a_field(message, bad | (allowed_names & RELATIONAL)), (
        f"{type(error).__name__} does not name an offending field {sorted(bad)}: {message}"
    )


@settings(max_examples=300, deadline=None, derandomize=True)
@given(block_dicts())
def test_block_spec_dicts_accepted_or_rejected_by_name(case):
    """Spec construction alone (no model): accepted specs round-trip."""
    block, bad = case
    try:
        spec = BlockSpec.from_dict(block)
    except Exception as error:  # noqa: BLE001 - the assertion checks the type
        check_rejection(error, bad, given_names(block))
        event("rejected")
        return
    event("accepted")
    assert not bad, f"accepted a spec with invalid {sorted(bad)}: {block}"
    assert BlockSpec.from_json(spec.to_json()) == spec
    for sub in spec.sublayers:
        if sub.kind == "moe" and sub.router == "expert_choice":
            assert sub.capacity_factor is not None and not sub.batch_prioritized


BACKBONE_ARGS = {
    "vocabulary_size": ((VOCAB,), (0, -1, 32.0, True, None, "32")),
    "num_layers": ((None, 1), (0, -1, 1.0, True, "1")),
    "max_sequence_length": ((LENGTH, 64), (0, -8, 8.5, None)),
    "norm": (("rms", "layer"), ("batch", None)),
    "dropout": ((0.0, 0.1), (1.0, -0.5, NAN, None)),
    "rope_max_wavelength": ((10000,), (0, -1, 1e4, None)),
    "tie_embeddings": ((True, False), (1, "yes", None)),
}


@st.composite
def backbone_cases(draw):
    block, bad = draw(block_dicts(bad_rate=0.1))
    args, bad_args = draw(field_values(BACKBONE_ARGS, bad_rate=0.05 * draw(st.booleans())))
    # Keep the width fixed (JAX compiles each new shape) except for a few
    # widths that some head counts do not divide.
    args["hidden_dim"], valid = draw(
        st.sampled_from([(HIDDEN, True)] * 6 + [(12, True), (0, False), (16.0, False)])
    )
    if not valid:
        bad_args.add("hidden_dim")
    return block, args, bad | bad_args


@pytest.mark.slow
@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(backbone_cases())
def test_backbone_accepts_and_runs_or_rejects_by_name(case):
    block, args, bad = case
    allowed = given_names(block) | set(args) | {"blocks"}
    try:
        backbone = BrainformerBackbone(blocks=block, **args)
    except Exception as error:  # noqa: BLE001 - the assertion checks the type
        check_rejection(error, bad, allowed)
        event("rejected")
        return
    event("accepted")
    assert not bad, f"accepted invalid {sorted(bad)}: {block} {args}"
    rng = np.random.default_rng(0)
    inputs = {
        "token_ids": rng.integers(0, VOCAB, (BATCH, LENGTH)).astype("int32"),
        "padding_mask": np.ones((BATCH, LENGTH), "int32"),
    }
    for training in (False, True):
        try:
            hidden = backbone(inputs, training=training)
        except ValueError as error:
            # The only batch-dependent constraint: groups must tile the batch.
            assert "group_size" in str(error), str(error)
            return
        hidden = to_numpy(hidden)
        assert hidden.shape == (BATCH, LENGTH, args["hidden_dim"])
        assert np.all(np.isfinite(hidden)), f"non-finite output for {block} {args}"
    assert math.isfinite(float(sum(to_numpy(loss).sum() for loss in backbone.losses) or 0.0))
    keras.backend.clear_session()
