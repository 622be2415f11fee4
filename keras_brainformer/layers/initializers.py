"""`clone_initializer`: a fresh initializer per weight.

In Keras 3 an initializer created without a seed fixes its seed when it is
created, so calling one object for two weights of the same shape gives them
the same values (Q = K = V, identical experts). Every weight therefore gets
its own clone, which draws its own seed.
"""

import keras


def clone_initializer(initializer):
    """Returns a new initializer with the same config as `initializer`.

    Example:
    >>> import numpy as np
    >>> init = keras.initializers.GlorotUniform()
    >>> a, b = clone_initializer(init)((4, 4)), clone_initializer(init)((4, 4))
    >>> bool(np.array_equal(np.asarray(a), np.asarray(b)))
    False
    """
    initializer = keras.initializers.get(initializer)
    if isinstance(initializer, keras.initializers.Initializer):
        return initializer.__class__.from_config(initializer.get_config())
    return initializer
