"""`keras-brainformer compile` with the fsdp layout as it was before c3e73c0 (no embedding-output
rule), for the before row of docs/performance_model.md's fsdp table:

    KERAS_BACKEND=jax python docs/tpu_evidence/fsdp_fix/compile_with_old_layout.py compile \
        --preset glam_100m_32e --topology v4:4x4x4 --mesh batch=32,model=2 --fsdp \
        --batch-size 64 --seq-len 1024 --dtype mixed_bfloat16
"""
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
from keras_brainformer.cli import main  # noqa: E402
from keras_brainformer.models.brainformer import brainformer_layout_map  # noqa: E402

brainformer_layout_map.FSDP_TENSOR_RULES = ()
sys.exit(main(sys.argv[1:]))
