"""Every ```python Example block in the model and training modules' docstrings runs.

(`>>>` examples run through pytest's `--doctest-modules`.)"""

import re
import textwrap

import pytest

from keras_brainformer.models.brainformer import brainformer_backbone
from keras_brainformer.models.brainformer import brainformer_byte_tokenizer
from keras_brainformer.models.brainformer import brainformer_causal_lm
from keras_brainformer.models.brainformer import brainformer_causal_lm_preprocessor
from keras_brainformer.models.brainformer import brainformer_text_classifier
from keras_brainformer.models.brainformer import brainformer_text_classifier_preprocessor
from keras_brainformer.models.brainformer import brainformer_tokenizer
from keras_brainformer.training import callbacks
from keras_brainformer.training import classification_data
from keras_brainformer.zoo import keras_hub_conversion

MODULES = [
    brainformer_backbone,
    brainformer_causal_lm,
    brainformer_tokenizer,
    brainformer_byte_tokenizer,
    brainformer_causal_lm_preprocessor,
    brainformer_text_classifier,
    brainformer_text_classifier_preprocessor,
    classification_data,
    callbacks,
    keras_hub_conversion,
]


def python_examples(module):
    """The ```python blocks of a module's docstring and of its classes' and
    functions'."""
    docstrings = [module.__doc__ or ""] + [
        obj.__doc__
        for obj in vars(module).values()
        if callable(obj) and getattr(obj, "__module__", None) == module.__name__ and obj.__doc__
    ]
    return [
        block for doc in docstrings for block in re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    ]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_docstring_examples_run(module):
    examples = python_examples(module)
    assert examples
    for example in examples:
        exec(compile(textwrap.dedent(example), module.__name__, "exec"), {})
