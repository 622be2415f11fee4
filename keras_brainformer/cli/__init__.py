"""The command line: `keras-brainformer ...` (`commands.py`) and the byte-level
demo `keras-brainformer-demo` (`demo.py`)."""

from keras_brainformer.cli.commands import EXIT_BAD_INPUT
from keras_brainformer.cli.commands import EXIT_NON_FINITE_LOSS
from keras_brainformer.cli.commands import build_parser
from keras_brainformer.cli.commands import main

__all__ = ["EXIT_BAD_INPUT", "EXIT_NON_FINITE_LOSS", "build_parser", "main"]
