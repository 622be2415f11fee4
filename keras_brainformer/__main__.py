"""`python -m keras_brainformer ...` runs the `keras-brainformer` command line."""

import sys

from keras_brainformer.cli import main

sys.exit(main())
