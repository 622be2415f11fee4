"""LoRA adapters and int8 quantization for the projection kernels of a layer.

Keras gives `enable_lora` and `quantize("int8")` to `Dense` and `EinsumDense`;
our attention, dense FFN and expert-bank layers hold their kernels directly
(`w_query [d, H, k]`, `w_in [d, h]`, `w_in [E, d, h]`, ...) so they get the
same two capabilities from this mixin, with the same semantics:

* **LoRA** (`layer.enable_lora(rank)`): every kernel is frozen and gets a
  trainable low-rank pair, `A [..., n_in, r]` (random) and `B [..., r, n_out]`
  (zeros), so training starts from the unchanged function. The output becomes
  `x·W + (alpha / r)·(x·A)·B`. Expert banks get one pair *per expert*
  (`A [E, d, r]`, `B [E, r, h]`), so every expert adapts on its own tokens.
  Saving writes the merged kernel `W + (alpha / r)·A·B` in place of `W` and no
  adapters (as Keras' `Dense` does): a saved model reloads without LoRA and
  computes the same function. Loading into a LoRA-enabled layer resets `B` to
  zero (the loaded kernel already holds the adaptation).
* **int8** (`layer.quantize("int8")`, reached by `model.quantize("int8")`):
  each kernel is replaced by an int8 copy with one float scale per output
  channel (per expert for expert banks), abs-max over the contracted axes;
  at call time the inputs are quantized per token the same way, the matmul
  runs int8 x int8 -> int32, and the result is rescaled (Keras' `Dense` int8
  scheme). The gradient with respect to the inputs goes through the
  de-quantized kernel, so LoRA adapters on top of an int8 model train (QLoRA
  style). The dtype policy becomes `int8_from_<policy>`, which keras-hub's
  `Backbone.get_config` records so a saved quantized backbone reloads
  quantized.

A layer using the mixin calls `self._add_kernel(...)` in `build` for each
kernel, then `self._build_lora()`, and computes every product with
`self._project(name, x)`.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_brainformer.layers.validation import check_optional_positive_int
from keras_brainformer.layers.validation import check_positive_int

_HE_UNIFORM = "he_uniform"


def int8_matmul(x, kernel, kernel_scale, compute_dtype):
    """`x [..., N, n_in]` (float) times int8 `kernel [..., n_in, n_out]`.

    Inputs are abs-max quantized per row; the gradient w.r.t. `x` uses the
    de-quantized kernel (rounding has no useful gradient).
    """

    @ops.custom_gradient
    def matmul(x, kernel, kernel_scale):
        def grad_fn(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            float_kernel = ops.divide(ops.cast(kernel, compute_dtype), kernel_scale)
            rank = len(float_kernel.shape)
            perm = tuple(range(rank - 2)) + (rank - 1, rank - 2)
            return (
                ops.matmul(upstream, ops.transpose(float_kernel, perm)),
                None,
                None,
            )

        x_q, x_scale = keras.quantizers.abs_max_quantize(x, axis=-1)
        y = ops.cast(ops.matmul(x_q, kernel), compute_dtype)
        return ops.divide(y, ops.multiply(x_scale, kernel_scale)), grad_fn

    return matmul(x, kernel, ops.cast(kernel_scale, compute_dtype))


def _is_default_int8_config(config):
    """None, or an `Int8QuantizationConfig` with Keras' default quantizers."""
    if config is None:
        return True
    if not isinstance(config, keras.quantizers.Int8QuantizationConfig):
        return False
    if config.weight_quantizer is not None:
        return False
    activation = config.activation_quantizer
    return isinstance(activation, keras.quantizers.AbsMaxQuantizer) and tuple(
        activation.value_range
    ) == (-127, 127)


def _check_alpha(lora_alpha):
    if lora_alpha is None:
        return None
    if (
        isinstance(lora_alpha, bool)
        or not isinstance(lora_alpha, (int, float))
        or not lora_alpha > 0
    ):
        raise ValueError(
            "`lora_alpha` must be a positive number or None. Received: "
            f"lora_alpha={lora_alpha!r}"
        )
    return lora_alpha


class AdaptableKernels:
    """Mixin giving a layer's projection kernels LoRA and int8 (see module).

    The layer's constructor takes `lora_rank=None, lora_alpha=None` and calls
    `self._init_adaptable(lora_rank, lora_alpha)`; `get_config` includes
    `self._adaptable_config()`.
    """

    def _init_adaptable(self, lora_rank=None, lora_alpha=None):
        self.lora_rank = check_optional_positive_int("lora_rank", lora_rank)
        if _check_alpha(lora_alpha) is not None:
            if lora_rank is None:
                raise ValueError(
                    "`lora_alpha` needs `lora_rank`. Received: "
                    f"lora_alpha={lora_alpha!r}, lora_rank=None"
                )
        self.lora_alpha = lora_alpha
        self.lora_enabled = False
        # name -> (shape, batch_dims, in_dims); plain tuples, not state.
        self._kernel_specs = {}

    def _adaptable_config(self):
        return {"lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha}

    # --- building -----------------------------------------------------------

    def _flat_shape(self, name):
        shape, batch_dims, in_dims = self._kernel_specs[name]
        batch = shape[:batch_dims]
        n_in = math.prod(shape[batch_dims : batch_dims + in_dims])
        n_out = math.prod(shape[batch_dims + in_dims :])
        return batch, n_in, n_out

    def _add_kernel(self, name, shape, initializer, batch_dims=0, in_dims=1):
        """Adds kernel `name` (float, or int8 + scale under an int8 policy)."""
        self._kernel_specs[name] = (tuple(shape), batch_dims, in_dims)
        mode = self.quantization_mode
        if mode is None:
            setattr(
                self, name, self.add_weight(name=name, shape=shape, initializer=initializer)
            )
        elif mode == "int8":
            self._add_int8_variables(name)
            self._is_quantized = True
        else:
            raise NotImplementedError(
                f"Layer {self.name!r} ({type(self).__name__}) supports the "
                f"'int8' quantization mode only. Received dtype policy "
                f"{self.dtype_policy.name!r} (mode {mode!r})."
            )

    def _add_int8_variables(self, name):
        shape = self._kernel_specs[name][0]
        batch, _, n_out = self._flat_shape(name)
        setattr(
            self,
            name,
            self.add_weight(
                name=name, shape=shape, initializer="zeros", dtype="int8", trainable=False
            ),
        )
        setattr(
            self,
            f"{name}_scale",
            self.add_weight(
                name=f"{name}_scale",
                shape=(*batch, 1, n_out),
                initializer="ones",
                trainable=False,
            ),
        )

    def _build_lora(self):
        """Call at the end of `build`: adds adapters if `lora_rank` is set."""
        if self.lora_rank:
            self._add_lora(self.lora_rank, self.lora_alpha, _HE_UNIFORM, "zeros")

    def _add_lora(self, rank, alpha, a_initializer, b_initializer):
        for name in self._kernel_specs:
            getattr(self, name).trainable = False
            batch, n_in, n_out = self._flat_shape(name)
            if a_initializer == _HE_UNIFORM:
                # He-uniform with each expert's own fan-in (Keras would count
                # the expert axis into the fan-in of a 3-D shape).
                limit = math.sqrt(6.0 / n_in)
                a_init = keras.initializers.RandomUniform(-limit, limit)
            else:
                a_init = keras.initializers.get(a_initializer)
            setattr(
                self,
                f"{name}_lora_a",
                self.add_weight(
                    name=f"{name}_lora_a", shape=(*batch, n_in, rank), initializer=a_init
                ),
            )
            setattr(
                self,
                f"{name}_lora_b",
                self.add_weight(
                    name=f"{name}_lora_b",
                    shape=(*batch, rank, n_out),
                    initializer=keras.initializers.get(b_initializer),
                ),
            )
        self.lora_rank = rank
        self.lora_alpha = alpha
        self.lora_enabled = True

    def _adapter_variables(self):
        if not self.lora_enabled:
            return []
        return [
            getattr(self, f"{name}_lora_{part}")
            for name in self._kernel_specs
            for part in ("a", "b")
        ]

    # --- public API ---------------------------------------------------------

    def enable_lora(
        self, rank, lora_alpha=None, a_initializer=_HE_UNIFORM, b_initializer="zeros"
    ):
        """Freezes this layer's kernels and adds trainable low-rank adapters.

        Args:
            rank: int, the adapters' rank `r`.
            lora_alpha: the update is scaled by `lora_alpha / rank` (default
                `rank`, a scale of 1).
            a_initializer: initializer of `A` (default He-uniform with each
                kernel's own fan-in).
            b_initializer: initializer of `B` (default zeros: the layer's
                function is unchanged until `B` trains).
        """
        if not self.built:
            raise ValueError(
                f"Cannot enable LoRA on layer {self.name!r} before it is built: "
                "call the model (or `build`) first."
            )
        if self.lora_enabled:
            raise ValueError(
                f"LoRA is already enabled on layer {self.name!r} (rank "
                f"{self.lora_rank}); `enable_lora` can be called once."
            )
        rank = check_positive_int("rank", rank)
        _check_alpha(lora_alpha)
        self._tracker.unlock()
        try:
            self._add_lora(rank, lora_alpha, a_initializer, b_initializer)
        finally:
            self._tracker.lock()

    def quantize(self, mode=None, type_check=True, config=None):
        """Quantizes the kernels in place. Only `mode="int8"` is supported
        (other modes raise `NotImplementedError`, which `Model.quantize`
        turns into a warning, as for any Keras layer without that mode)."""
        if mode != "int8":
            raise NotImplementedError(
                f"Layer {self.name!r} ({type(self).__name__}) supports "
                f"quantize('int8') only. Received: mode={mode!r}"
            )
        if not _is_default_int8_config(config):
            raise NotImplementedError(
                f"Layer {self.name!r} ({type(self).__name__}) uses the default "
                "int8 scheme (per-channel abs-max weights, per-token abs-max "
                f"inputs); a custom quantization config is not supported. "
                f"Received: config={config!r}"
            )
        self._check_quantize_args(mode, self.compute_dtype)
        # Compute everything first: nothing changes if a step fails.
        values = {}
        for name in self._kernel_specs:
            batch, n_in, n_out = self._flat_shape(name)
            kernel = ops.convert_to_numpy(getattr(self, name).value).astype("float32")
            q, scale = keras.quantizers.abs_max_quantize(
                kernel.reshape(*batch, n_in, n_out), axis=-2, to_numpy=True
            )
            values[name] = (
                ops.convert_to_numpy(q).reshape(kernel.shape),
                ops.convert_to_numpy(scale),
            )
        policy = keras.dtype_policies.get(f"int8_from_{self.dtype_policy.name}")
        self._tracker.unlock()
        try:
            for name in self._kernel_specs:
                _drop_variable(self, name)
                self._add_int8_variables(name)
                getattr(self, name).assign(values[name][0])
                getattr(self, f"{name}_scale").assign(values[name][1])
        finally:
            self._tracker.lock()
        self._is_quantized = True
        self.dtype_policy = policy

    def _int8_call(self, *args, **kwargs):
        # `Layer.__call__` routes quantized layers here; `call` already
        # dispatches on the kernels' dtype through `_project`.
        return self.call(*args, **kwargs)

    # --- computing ----------------------------------------------------------

    def _project(self, name, x, batch_index=None):
        """`x [..., *in_shape]` (or `[*batch, ..., *in_shape]` for batched
        kernels) times kernel `name`, LoRA and int8 applied.

        `batch_index` (int `[n]`, kernels with one batch axis only): `x` is
        `[n, ..., *in_shape]` and its row `i` is multiplied by batch entry
        `batch_index[i]` of the kernel (and of its scale and adapters), which
        are gathered along the batch axis; `MoEFeedForward`'s block-sparse
        dropless path uses it (`layers/dropless_blocks.py`).
        """
        shape, batch_dims, in_dims = self._kernel_specs[name]
        batch, n_in, n_out = self._flat_shape(name)

        def per_row(tensor):
            return tensor if batch_index is None else ops.take(tensor, batch_index, axis=0)

        if batch_index is not None:
            batch = (ops.shape(batch_index)[0],)
        x_shape = ops.shape(x)
        lead = x_shape[: len(x.shape) - in_dims]
        x2 = ops.reshape(x, (*batch, -1, n_in))
        kernel = per_row(getattr(self, name))
        if self.quantization_mode == "int8":
            y = int8_matmul(
                x2,
                ops.reshape(kernel, (*batch, n_in, n_out)),
                per_row(getattr(self, f"{name}_scale")),
                self.compute_dtype,
            )
        else:
            y = ops.matmul(x2, ops.reshape(kernel, (*batch, n_in, n_out)))
        if self.lora_enabled:
            a = ops.cast(per_row(getattr(self, f"{name}_lora_a")), x2.dtype)
            b = ops.cast(per_row(getattr(self, f"{name}_lora_b")), x2.dtype)
            y = y + (self._lora_scale()) * ops.matmul(ops.matmul(x2, a), b)
        return ops.reshape(y, (*lead, *shape[batch_dims + in_dims :]))

    def _lora_scale(self):
        alpha = self.lora_alpha if self.lora_alpha is not None else self.lora_rank
        return alpha / self.lora_rank

    # --- saving -------------------------------------------------------------

    def _merged_values(self):
        """Kernel name -> values to save: LoRA merged in (and re-quantized
        for int8 kernels, with their new scales)."""
        merged = {}
        for name in self._kernel_specs:
            batch, n_in, n_out = self._flat_shape(name)
            kernel = getattr(self, name)
            a = ops.convert_to_numpy(getattr(self, f"{name}_lora_a").value).astype("float32")
            b = ops.convert_to_numpy(getattr(self, f"{name}_lora_b").value).astype("float32")
            delta = self._lora_scale() * np.matmul(a, b)
            if self.quantization_mode == "int8":
                scale = ops.convert_to_numpy(getattr(self, f"{name}_scale").value)
                w = ops.convert_to_numpy(kernel.value).astype("float32")
                w = w.reshape(*batch, n_in, n_out) / scale + delta
                q, new_scale = keras.quantizers.abs_max_quantize(
                    w, axis=-2, to_numpy=True
                )
                merged[id(kernel)] = ops.convert_to_numpy(q).reshape(kernel.shape)
                merged[id(getattr(self, f"{name}_scale"))] = ops.convert_to_numpy(
                    new_scale
                )
            else:
                w = ops.convert_to_numpy(kernel.value)
                merged[id(kernel)] = (
                    w.astype("float32") + delta.reshape(kernel.shape)
                ).astype(w.dtype)
        return merged

    def _saved_variables(self):
        adapters = {id(v) for v in self._adapter_variables()}
        return [
            v
            for v in self._trainable_variables + self._non_trainable_variables
            if id(v) not in adapters
        ]

    def save_own_variables(self, store):
        merged = self._merged_values() if self.lora_enabled else {}
        for i, v in enumerate(self._saved_variables()):
            store[f"{i}"] = merged.get(id(v), v)

    def load_own_variables(self, store):
        saved = self._saved_variables()
        if len(store.keys()) != len(saved):
            raise ValueError(
                f"Layer {self.name!r} ({type(self).__name__}) expects "
                f"{len(saved)} variables ({[v.name for v in saved]}), but the "
                f"weights file lists {len(store.keys())}. Was the file saved "
                "from a model with another configuration or quantization mode?"
            )
        for i, v in enumerate(saved):
            value = store[f"{i}"]
            if tuple(value.shape) != tuple(v.shape):
                raise ValueError(
                    f"Layer {self.name!r}: variable {v.name!r} has shape "
                    f"{tuple(v.shape)} but the weights file holds "
                    f"{tuple(value.shape)}."
                )
        for i, v in enumerate(saved):
            v.assign(store[f"{i}"])
        if self.lora_enabled:
            for name in self._kernel_specs:
                b = getattr(self, f"{name}_lora_b")
                b.assign(ops.zeros(b.shape, b.dtype))


def _drop_variable(layer, name):
    """`delattr(layer, name)` for a variable attribute, minus the full
    `gc.collect()` that Keras' `Layer.__delattr__` runs on every variable
    deletion (about 0.6 s each with JAX and TensorFlow loaded: 15 of the 16 s
    of quantizing a one-block Brainformer). The float buffer is freed by
    reference counting once `values` above is dropped; the collector only
    matters for reference cycles. Uses Keras' `_untrack_variable`,
    a private method; without it (an upstream change), plain `delattr`.
    `tests/test_lora_quantization.py` checks the old variable is untracked."""
    untrack = getattr(layer, "_untrack_variable", None)
    if untrack is None:
        delattr(layer, name)
        return
    untrack(getattr(layer, name))
    super(keras.layers.Layer, layer).__delattr__(name)
