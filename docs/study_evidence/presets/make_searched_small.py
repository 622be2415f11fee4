"""Builds `searched_small/`: the 30-minute search's best block
(`docs/search_evidence/rank1.block.json`, found at d=64) at the `*_small`
tier's scale, for `keras-brainformer compare` against the small families.

Scaling: d=100; every FFN/expert width x100/64 (192 -> 300, 256 -> 400,
96 -> 150); attention keeps the searched 12 heads, head_dim 6 (the searched
4 scaled, rounded to an even size for rotary embeddings); 2 blocks. That
gives 1,074,100 activated parameters, inside the tier's 1.06M-1.09M
(brainformer1_small 1,062,396, glam_small 1,085,880, dense_small 1,082,496).
Tokenizer and preprocessor: the small tier's byte-level ones.

    python docs/study_evidence/presets/make_searched_small.py
"""

import copy
import json
import pathlib
import shutil

from keras_brainformer.models import BlockSpec
from keras_brainformer.zoo.preset_recipes import backbone_config
from keras_brainformer.search.results import write_preset_folder

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[2]
D, HEAD_DIM, NUM_BLOCKS = 100, 6, 2


def main():
    block = json.loads((ROOT / "docs/search_evidence/rank1.block.json").read_text())
    scaled = copy.deepcopy(block)
    for sublayer in scaled["sublayers"]:
        if "hidden_dim" in sublayer:
            sublayer["hidden_dim"] = round(sublayer["hidden_dim"] * D / 64)
        if sublayer["kind"] == "attention":
            sublayer["head_dim"] = HEAD_DIM
    config = backbone_config(BlockSpec.from_dict(scaled), NUM_BLOCKS, D, "small")
    out = HERE / "searched_small"
    description = (
        "The 30-minute search's best block (docs/search_evidence/rank1.block.json, trial 25, "
        f"found at d=64) at the small tier: d={D}, widths x{D}/64, 12 heads of {HEAD_DIM}, "
        f"{NUM_BLOCKS} blocks, byte-level. Random initialisation (architecture preset)."
    )
    write_preset_folder(config, {"description": description, "family": "searched"}, out)
    for name in ("tokenizer.json", "preprocessor.json"):
        shutil.copy(ROOT / "presets/brainformer1_small" / name, out / name)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
