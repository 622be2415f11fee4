"""Brainformer causal language model task: next-token logits over the vocabulary."""

import keras
import numpy as np
from keras import ops
from keras_hub.models import CausalLM

from keras_brainformer.layers.routers import INFERENCE_ROUTING
from keras_brainformer.layers.validation import check_choice
from keras_brainformer.models.brainformer.brainformer_backbone import BrainformerBackbone
from keras_brainformer.models.brainformer.brainformer_causal_lm_preprocessor import (
    BrainformerCausalLMPreprocessor,
)
from keras_brainformer.utils.in_memory_shuffle import shuffled_fit_arguments
from keras_brainformer.utils.preset_loading import load_zoo_preset
from keras_brainformer.utils.task_data_checks import check_class_labels
from keras_brainformer.utils.task_data_checks import check_fit_arguments
from keras_brainformer.utils.task_data_checks import check_task_inputs
from keras_brainformer.utils.task_data_checks import uses_sparse_labels
from keras_brainformer.utils.task_quantization import quantize_task

ROUTING_METRICS = ("dropped_fraction", "load_cv", "router_entropy")


def _said(name, value):
    """How an argument is named in a message: `max_length=0` in Python,
    `--max-length 0` on the command line."""
    return f"{name} {value}" if name.startswith("--") else f"{name}={value!r}"


def _prompts(inputs):
    """The prompt strings of concrete text `inputs` (a string, a list of
    them, a string array or eager string tensor); None for what cannot be
    read here (a `tf.data.Dataset`, a symbolic tensor, a dict)."""
    if isinstance(inputs, (str, bytes)):
        return [inputs]
    if isinstance(inputs, (list, tuple)):
        return list(inputs)
    if isinstance(inputs, dict) or not hasattr(inputs, "shape"):
        return None
    try:
        array = np.asarray(inputs)
    except (TypeError, ValueError, NotImplementedError):
        return None  # symbolic
    if array.dtype.kind not in "OSU":
        return None
    return [v for v in array.reshape(-1)]


def check_generate_arguments(lm, inputs, max_length, name="max_length"):
    """Checks `generate(inputs, max_length)` of `lm` (a `BrainformerCausalLM`)
    before anything is tokenized for the model or compiled: raises a
    `ValueError` (a `TypeError` for a wrong type) naming the argument, the
    value and what is allowed, where keras-hub would silently truncate the
    prompt, ignore the length or fail on a shape.

    - `max_length`: None (the preprocessor's `sequence_length`) or an int in
      `[1, max_sequence_length]`; without a preprocessor, None or the length
      of the `token_ids` passed (keras-hub ignores it there).
    - with a preprocessor: at least one prompt, and each prompt (with its
      start token) shorter than the length to fill, so at least one token is
      generated.

    `name` names the length in messages (`"--max-length"` on the command line).
    """
    maximum = lm.backbone.max_sequence_length
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)):
            raise TypeError(
                f"`{name}` must be an int in [1, {maximum}] or None. Received: "
                f"{_said(name, max_length)} of type {type(max_length).__name__}."
            )
        max_length = int(max_length)
        if max_length > maximum:
            raise ValueError(
                f"{_said(name, max_length)} is longer than the model's max_sequence_length "
                f"{maximum}. Use at most {maximum}."
            )
        if max_length < 1:
            raise ValueError(
                f"{_said(name, max_length)}: the length of each output, prompt included, "
                f"must be an int in [1, {maximum}] (the model's max_sequence_length), or "
                "None for the preprocessor's sequence_length."
            )
    preprocessor = lm.preprocessor
    if preprocessor is None:
        token_ids = inputs.get("token_ids") if isinstance(inputs, dict) else None
        shape = getattr(token_ids, "shape", None)
        if max_length is not None and shape and shape[-1] not in (None, max_length):
            raise ValueError(
                f"Without a preprocessor, `generate` fills the `token_ids` passed (length "
                f"{shape[-1]}), so {_said(name, max_length)} would be ignored: pad "
                "`token_ids` to the length wanted, or leave the length out."
            )
        return
    prompts = _prompts(inputs)
    if prompts is None:
        return
    if not prompts:
        raise ValueError(
            "`inputs` holds no prompt: give a string or a non-empty list of strings. "
            f"Received: {inputs!r}."
        )
    length = max_length if max_length is not None else preprocessor.sequence_length
    said = _said(name, max_length)
    if max_length is None:
        said += f" (the preprocessor's sequence_length {length})"
    start = 1 if getattr(preprocessor, "add_start_token", True) else 0
    for prompt in prompts:
        if not isinstance(prompt, (str, bytes)):
            return  # the preprocessor's `check_text` names it
        text = prompt.decode("utf-8", "replace") if isinstance(prompt, bytes) else prompt
        shown = repr(text[:40]) + ("..." if len(text) > 40 else "")
        tokens = len(preprocessor.tokenizer(prompt)) + start
        with_start = " (with the start token)" if start else ""
        if tokens >= maximum:
            raise ValueError(
                f"The prompt {shown} is {tokens} tokens{with_start}, and the model's "
                f"max_sequence_length {maximum} leaves room for at most {maximum - 1}, so no "
                f"{name} can generate from it. Use a prompt of at most {maximum - 1 - start} "
                "tokens (for example its last part)."
            )
        if tokens >= length:
            raise ValueError(
                f"The prompt {shown} is {tokens} tokens{with_start}, so {said} leaves no "
                f"room to generate ({name} counts the prompt). Use a {name} above {tokens} "
                f"(at most {maximum}), or a shorter prompt."
            )


@keras.saving.register_keras_serializable(package="keras_brainformer")
class BrainformerCausalLM(CausalLM):
    """A `BrainformerBackbone` with a tied output projection to token logits,
    trainable with `fit` and sampling text with `generate()`.

    Causal inference: expert choice (and token choice with capacity dropping)
    lets a token's routing depend on later tokens of its sequence. At inference
    every MoE sublayer therefore routes causally by default (dropless token
    choice on the same router probabilities, see `layers/routers.py`), so
    `predict`, `evaluate` and `generate()` never look ahead, and cached
    generation equals uncached greedy decoding token for token.
    `set_inference_routing("as_trained")` evaluates with the training-time
    routing instead; `evaluate_routing_modes()` reports both losses. Training
    (`fit`) always uses the routing it was configured with.

    Training logs carry, besides loss and accuracy, the routing statistics
    averaged over all MoE layers: `moe_dropped_fraction` (share of
    token-choices that found no expert slot), `moe_load_cv` (coefficient of
    variation of the per-expert load; 0 is perfect balance) and
    `moe_router_entropy` (nats). Per-layer values:
    `backbone.routing_statistics()`. Auxiliary router losses (load balance,
    z-loss) are added to the training loss automatically.

    Args:
        backbone: a `BrainformerBackbone`.
        preprocessor: a `BrainformerCausalLMPreprocessor` (or any
            `keras_hub.models.CausalLMPreprocessor`) or None (feed
            `{"token_ids", "padding_mask"}`, labels and sample weights
            yourself; `generate()` then takes and returns token ids).

    Example:
    ```python
    import numpy as np
    from keras_brainformer.models import dense_transformer_layer
    from keras_brainformer.models import BrainformerBackbone, BrainformerCausalLM

    backbone = BrainformerBackbone(
        vocabulary_size=256, hidden_dim=32,
        blocks=dense_transformer_layer(num_heads=2, intermediate_dim=64),
        num_layers=2)
    lm = BrainformerCausalLM(backbone)
    lm.compile(optimizer="adam")
    tokens = np.random.randint(0, 256, (8, 17)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((8, 16), "int32")}
    lm.fit(x, tokens[:, 1:], batch_size=4, epochs=1)

    # Greedy generation from token ids (with a preprocessor: from strings).
    prompt = {"token_ids": np.zeros((1, 12), "int32"),
              "padding_mask": np.array([[1] * 4 + [0] * 8], "int32")}
    out = lm.generate(prompt, stop_token_ids=None)  # fills positions 4..11
    ```
    """

    backbone_cls = BrainformerBackbone
    preprocessor_cls = BrainformerCausalLMPreprocessor

    @classmethod
    def from_preset(cls, preset, *args, **kwargs):
        """keras-hub's `from_preset`; weightless zoo presets build a random init."""
        return load_zoo_preset(cls, super().from_preset, preset, *args, **kwargs)

    def __init__(self, backbone, preprocessor=None, **kwargs):
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor

        # === Functional Model ===
        inputs = backbone.input
        hidden_states = backbone(inputs)
        outputs = backbone.token_embedding(hidden_states, reverse=True)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Routing statistics shown in fit logs ===
        self.routing_trackers = {
            name: keras.metrics.Mean(name=f"moe_{name}")
            for name in ROUTING_METRICS
        } if backbone.moe_layers else {}

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        loss = super().compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )
        # The routers wrote their statistics into non-trainable variables
        # during the forward pass; read them here, where metric updates are
        # tracked on every backend.
        routers = [moe.router for moe in self.backbone.moe_layers]
        for name, tracker in self.routing_trackers.items():
            values = ops.stack([getattr(r, name).value for r in routers])
            tracker.update_state(ops.mean(values))
        return loss

    # === Inference routing ===

    def set_inference_routing(self, mode):
        """`"causal"` (default) or `"as_trained"` routing of every MoE
        sublayer at inference; resets compiled predict/evaluate/generate
        functions so the change takes effect. `generate()` always decodes
        causally."""
        check_choice("inference_routing", mode, INFERENCE_ROUTING)
        self.backbone.set_inference_routing(mode)
        self.predict_function = None
        self.test_function = None
        self.generate_function = None

    def evaluate_routing_modes(self, *args, **kwargs):
        """Runs `evaluate` in both inference routings and restores the mode.

        Returns:
            `{"causal": ..., "as_trained": ...}`, each what `evaluate` returns
            (pass `return_dict=True` for dicts). For dense models or dropless
            top-k routing the two are equal; for expert choice the gap is what
            looking ahead was worth.
        """
        previous = self.backbone.inference_routing
        results = {}
        try:
            for mode in INFERENCE_ROUTING:
                self.set_inference_routing(mode)
                results[mode] = self.evaluate(*args, **kwargs)
        finally:
            if previous in INFERENCE_ROUTING:
                self.set_inference_routing(previous)
        return results

    # === Input checks at the boundary ===

    def check_data(self, x, y=None):
        """Checks concrete `fit`/`evaluate` data before any step runs (see
        `fit`): token ids in `x`, and labels `y` in `[0, vocabulary_size)`
        when there is no preprocessor and the loss takes integer labels."""
        check_task_inputs(self, x)
        if (
            y is not None
            and self.preprocessor is None
            and uses_sparse_labels(getattr(self, "loss", None))
        ):
            check_class_labels(
                y, self.backbone.vocabulary_size, limit_name="vocabulary_size"
            )

    def fit(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.fit`, with concrete data checked first and in-memory
        data shuffled every epoch.

        NumPy arrays, lists and eager tensors in `x`/`y`, and the same in a
        `validation_data` tuple, go through `check_data` before training
        starts (`utils/task_data_checks.check_fit_arguments`): a bad value raises a
        `TypeError`/`ValueError` naming the field, the value and the allowed
        range, and nothing is trained. A `tf.data.Dataset`, generator or
        `keras.utils.PyDataset` passes unchecked; check such data when
        building it. In-memory data is shuffled every epoch when
        `shuffle=True` (the default), as `keras.Model.fit` does and keras-hub's
        preprocessing pipeline does not (`utils/in_memory_shuffle.py`); the order
        follows `keras.utils.set_random_seed`.
        """
        check_fit_arguments(super().fit, self.check_data, x, y, args, kwargs)
        x, y, kwargs = shuffled_fit_arguments(x, y, args, kwargs)
        return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.evaluate`, with concrete data checked first (`check_data`)."""
        self.check_data(x, y)
        return super().evaluate(x, y, *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        """`keras.Model.predict`, with concrete token ids checked first."""
        check_task_inputs(self, x)
        return super().predict(x, *args, **kwargs)

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """`keras.Model.quantize`. `"int8"` reaches every attention, dense
        FFN and expert kernel and the token embedding (routers and norms stay
        float32); it works straight after `from_preset` (`utils/task_quantization.py`).
        Quantize the task rather than its backbone, so the task's compiled
        functions are rebuilt."""
        return quantize_task(self, super().quantize, mode, config=config, filters=filters, **kwargs)
    def make_generate_function(self):
        if self.generate_function is not None:
            return self.generate_function
        generate_function = super().make_generate_function()

        def checked_generate_function(inputs, *args, **kwargs):
            # Called once per (preprocessed) batch with concrete tensors.
            check_task_inputs(self, inputs)
            return generate_function(inputs, *args, **kwargs)

        self.generate_function = checked_generate_function
        return checked_generate_function

    # === Generation ===

    def generate(self, inputs, max_length=None, stop_token_ids="auto", strip_prompt=False):
        """keras-hub's `CausalLM.generate`, with its arguments checked first
        (`check_generate_arguments`): `max_length` is None or an int in
        `[1, max_sequence_length]` counting the prompt, there is at least one
        prompt, and each prompt leaves room for a generated token. Each
        failure is a `ValueError` naming the argument, the value and what is
        allowed (keras-hub would return a truncated prompt, ignore the length
        or fail on a shape).

        Args:
            inputs: prompt strings (a string, a list of strings, a string
                tensor or a `tf.data.Dataset`) with a preprocessor; without
                one, `{"token_ids", "padding_mask"}` `[B, L]`, the prompt
                being each row's masked-in prefix.
            max_length: the length of each output, prompt included (default:
                the preprocessor's `sequence_length`). Without a
                preprocessor, the length of `token_ids`.
            stop_token_ids: `"auto"` (the tokenizer's end token), None or a
                tuple of ids.
            strip_prompt: return the generated text only.
        """
        check_generate_arguments(self, inputs, max_length)
        return super().generate(
            inputs,
            max_length=max_length,
            stop_token_ids=stop_token_ids,
            strip_prompt=strip_prompt,
        )

    def call_with_cache(self, token_ids, cache, cache_update_index):
        """Forward pass of new tokens against a decoding cache.

        Args:
            token_ids: int `[B, T]`, the tokens at positions
                `cache_update_index ... cache_update_index + T - 1`.
            cache: tuple with one cache per attention sublayer of the whole
                stack, in order (shapes from `CausalSelfAttention.cache_shape`).
            cache_update_index: int or scalar tensor.

        Returns:
            `(logits [B, T, vocab], hidden_states [B, T, d], cache)`. MoE
            sublayers route causally (dropless token choice).
        """
        backbone = self.backbone
        cache = list(cache)
        x = backbone.token_embedding(token_ids)
        updated, start = [], 0
        for block in backbone.transformer_blocks:
            count = len(block.attention_layers)
            x, block_cache = block(
                x,
                cache=cache[start : start + count],
                cache_update_index=cache_update_index,
            )
            updated.extend(block_cache)
            start += count
        hidden_states = backbone.final_norm(x)
        logits = backbone.token_embedding(hidden_states, reverse=True)
        return logits, hidden_states, tuple(updated)

    def _build_cache(self, token_ids):
        """Zero caches for `token_ids`' length, seeded with one forward pass."""
        batch_size, max_length = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        cache = tuple(
            ops.zeros(layer.cache_shape(batch_size, max_length), dtype=self.compute_dtype)
            for layer in self.backbone.attention_layers
        )
        _, hidden_states, cache = self.call_with_cache(token_ids, cache, 0)
        return hidden_states, cache

    def generate_step(self, inputs, stop_token_ids=None):
        """One compilable generation pass over a batch (keras-hub protocol).

        Args:
            inputs: dict with `"token_ids"` and `"padding_mask"` `[B, L]`; the
                prompt is the masked-in prefix of each row, `L` the total
                length to fill.
            stop_token_ids: tuple of ids that end a row, or None.
        """
        token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
        hidden_states, cache = self._build_cache(token_ids)
        row_lengths = ops.sum(ops.cast(padding_mask, "int32"), axis=-1)
        index = ops.min(row_lengths)  # the first position to generate

        def next(prompt, cache, index):
            # Feed the previous token; the logits predict position `index`.
            cache_update_index = index - 1
            batch_size = ops.shape(prompt)[0]
            prompt = ops.slice(prompt, [0, cache_update_index], [batch_size, 1])
            logits, hidden_states, cache = self.call_with_cache(
                prompt, cache, cache_update_index
            )
            return ops.squeeze(logits, axis=1), ops.squeeze(hidden_states, axis=1), cache

        token_ids = self.sampler(
            next=next,
            prompt=token_ids,
            cache=cache,
            index=index,
            mask=padding_mask,
            stop_token_ids=stop_token_ids,
            hidden_states=hidden_states,
            model=self,
        )

        if stop_token_ids is not None:
            # Mask out everything after the first generated stop token.
            generated = ops.logical_not(ops.cast(padding_mask, "bool"))
            is_stop = ops.zeros_like(generated)
            for stop in stop_token_ids:
                is_stop = ops.logical_or(is_stop, ops.equal(token_ids, stop))
            end_locations = ops.cast(ops.logical_and(is_stop, generated), "int32")
            after_end = ops.cumsum(end_locations, axis=-1) - end_locations
            padding_mask = ops.logical_not(ops.cast(after_end, "bool"))
        else:
            padding_mask = ops.ones_like(token_ids, dtype="bool")
        return {"token_ids": token_ids, "padding_mask": padding_mask}
