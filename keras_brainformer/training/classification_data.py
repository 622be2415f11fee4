"""A text-classification data set every Python install has: standard-library
docstrings labelled by the module (or package) they come from.

The docstrings are read with `ast` from the modules' SOURCE files under
`sysconfig.get_paths()["stdlib"]` (nothing is imported, so frozen or C-backed
modules and side effects do not matter): module, class and function
docstrings (`ast.get_docstring`, cleaned), at least `min_chars` long. A
package contributes every `.py` file below it except test folders.

Deduplication: a text that occurs in two or more modules is dropped (its
label is ambiguous), repeats within one module are kept once. The split is
deterministic: a text goes to validation when the first byte of its
SHA-256 falls in the last `validation_fraction` of 256 (so about 80 / 20 by
default, stable across runs, machines and module orders).

Example:
```python
from keras_brainformer.training.classification_data import stdlib_docstring_dataset

data = stdlib_docstring_dataset(modules=("json", "tarfile"))
assert data.label_names == ("json", "tarfile")
assert len(data.train_texts) == len(data.train_labels)
print(data.summary())
```
"""

import ast
import collections
import dataclasses
import hashlib
import pathlib
import sysconfig

# Eight modules with many docstrings on clearly different topics (counts of
# distinct docstrings >= 40 characters, CPython 3.11: about 280, 270, 220,
# 200, 160, 150, 120 and 90).
DEFAULT_MODULES = (
    "asyncio",
    "email",
    "logging",
    "xml",
    "turtle",
    "unittest",
    "http",
    "tarfile",
)


@dataclasses.dataclass(frozen=True)
class TextClassificationData:
    """Texts and integer labels, split into training and validation."""

    train_texts: tuple
    train_labels: tuple
    validation_texts: tuple
    validation_labels: tuple
    label_names: tuple

    @property
    def num_classes(self):
        return len(self.label_names)

    def class_counts(self, split="train"):
        labels = self.train_labels if split == "train" else self.validation_labels
        counts = collections.Counter(labels)
        return {name: counts.get(i, 0) for i, name in enumerate(self.label_names)}

    def majority_baseline(self):
        """Validation accuracy of always predicting the training set's most
        frequent class (ties: the lowest label)."""
        counts = collections.Counter(self.train_labels)
        majority = min(counts, key=lambda label: (-counts[label], label))
        hits = sum(label == majority for label in self.validation_labels)
        return hits / max(len(self.validation_labels), 1)

    def summary(self):
        train, val = self.class_counts("train"), self.class_counts("validation")
        rows = [f"{len(self.train_texts)} training / {len(self.validation_texts)} validation texts"]
        rows += [f"  {name}: {train[name]} / {val[name]}" for name in self.label_names]
        return "\n".join(rows)


def stdlib_root():
    """The folder of the running interpreter's standard-library sources."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def module_source_files(name, root=None):
    """The `.py` files of standard-library module or package `name` (test
    folders of a package excluded), sorted; raises ValueError when the module
    has no Python source (a C extension or an unknown name)."""
    root = pathlib.Path(root) if root is not None else stdlib_root()
    single = root / f"{name}.py"
    if single.is_file():
        return [single]
    package = root / name
    if (package / "__init__.py").is_file():
        return sorted(
            path
            for path in package.rglob("*.py")
            if not any(
                part.startswith("test") or part == "idle_test"
                for part in path.relative_to(package).parts[:-1]
            )
        )
    raise ValueError(
        f"No Python source for standard-library module {name!r} under {root} "
        "(a built-in or C module, or not a module name)."
    )


def source_docstrings(path, min_chars=40):
    """Module, class and function docstrings of one source file, in order."""
    try:
        tree = ast.parse(pathlib.Path(path).read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docstrings = []
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            text = ast.get_docstring(node, clean=True)
            if text and len(text.strip()) >= min_chars:
                docstrings.append(text.strip())
    return docstrings


def in_validation(text, validation_fraction=0.2):
    """Deterministic split: by the first byte of the text's SHA-256."""
    first_byte = hashlib.sha256(text.encode("utf-8")).digest()[0]
    return first_byte >= round(256 * (1.0 - validation_fraction))


def stdlib_docstring_dataset(
    modules=DEFAULT_MODULES, min_chars=40, validation_fraction=0.2, root=None
):
    """Builds the docstring → module classification data set.

    Args:
        modules: standard-library module or package names; label `i` is
            `modules[i]`.
        min_chars: shortest docstring kept (shorter ones are mostly
            "Return x." and carry little signal).
        validation_fraction: float in (0, 1), share of texts (by hash) in the
            validation split.
        root: the standard-library folder (default: this interpreter's).

    Returns:
        A `TextClassificationData`.
    """
    modules = tuple(modules)
    if len(set(modules)) != len(modules) or len(modules) < 2:
        raise ValueError(f"`modules` must be 2 or more distinct names. Received: {modules}")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(
            f"`validation_fraction` must be in (0, 1). Received: {validation_fraction!r}"
        )
    owners = collections.defaultdict(set)
    order = []
    for label, name in enumerate(modules):
        for path in module_source_files(name, root):
            for text in source_docstrings(path, min_chars):
                if text not in owners:
                    order.append(text)
                owners[text].add(label)
    split = {"train": ([], []), "validation": ([], [])}
    for text in order:
        if len(owners[text]) != 1:
            continue  # the same text in two modules: ambiguous
        (label,) = owners[text]
        texts, labels = split["validation" if in_validation(text, validation_fraction) else "train"]
        texts.append(text)
        labels.append(label)
    return TextClassificationData(
        train_texts=tuple(split["train"][0]),
        train_labels=tuple(split["train"][1]),
        validation_texts=tuple(split["validation"][0]),
        validation_labels=tuple(split["validation"][1]),
        label_names=modules,
    )


if __name__ == "__main__":
    print(stdlib_docstring_dataset().summary())
