"""Preset folders that are incomplete or corrupted fail before anything is
built, with an error naming the file: missing files, a truncated or
bit-flipped weights file, an unreadable or malformed config.json, a trained
preset without its weights. Sound presets (trained ones, with recorded
checksums; architecture ones, without) still load."""

import json
import os
import shutil
import subprocess
import sys
import warnings

import h5py
import numpy as np
import pytest

from keras_brainformer import cli
from keras_brainformer.errors import PresetError
from keras_brainformer.errors import PresetWarning
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.utils.preset_integrity import record_checksums
from keras_brainformer.utils.preset_integrity import verify_preset
from keras_brainformer.utils.preset_loading import resolve_preset
from keras_brainformer.utils.preset_loading import trained_presets

TRAINED = "dense_tiny_stdlib"  # the smallest shipped trained preset (3.5 MB)


@pytest.fixture
def copy(tmp_path):
    target = tmp_path / "preset"
    shutil.copytree(resolve_preset(TRAINED), target)
    return target


@pytest.fixture
def built(monkeypatch):
    """Counts backbones constructed, to prove a refused preset built none."""
    calls = []
    original = BrainformerBackbone.__init__

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BrainformerBackbone, "__init__", spy)
    return calls


def test_shipped_trained_presets_record_and_match_their_checksums():
    for name in trained_presets():
        folder = resolve_preset(name)
        with open(os.path.join(folder, "metadata.json")) as f:
            files = json.load(f)["files"]
        assert {"model.weights.h5", "config.json", "tokenizer.json"} <= set(files)
        verify_preset(folder)


def _refused(folder, match, built):
    with pytest.raises(PresetError, match=match):
        BrainformerCausalLM.from_preset(str(folder))
    assert not built, "a model was built from a refused preset"


def test_truncated_weights(copy, built):
    weights = copy / "model.weights.h5"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _refused(copy, r"model\.weights\.h5: corrupted or truncated", built)


def test_bit_flipped_weights(copy, built):
    weights = copy / "model.weights.h5"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: h5py would load it silently
    weights.write_bytes(bytes(data))
    _refused(copy, r"model\.weights\.h5: corrupted or truncated", built)


@pytest.mark.parametrize("name", ["model.weights.h5", "tokenizer.json", "task.json"])
def test_missing_file(copy, built, name):
    (copy / name).unlink()
    _refused(copy, rf"{name.replace('.', '[.]')}: missing", built)


def test_trained_preset_without_weights_or_checksums_is_not_randomly_initialised(copy, built):
    metadata = json.loads((copy / "metadata.json").read_text())
    del metadata["files"]
    (copy / "metadata.json").write_text(json.dumps(metadata))
    (copy / "model.weights.h5").unlink()
    _refused(copy, r"model\.weights\.h5: missing, but metadata\.json records a training run",
             built)


@pytest.mark.parametrize(
    "text, match",
    [
        ("{ not json", r"config\.json: the backbone config is not readable JSON"),
        ('["a", "list"]', r"config\.json: expected a serialized Keras object"),
        ('{"config": {}}', r"config\.json: expected a serialized Keras object"),
    ],
)
def test_malformed_config(copy, built, text, match):
    (copy / "config.json").write_text(text)
    _refused(copy, match, built)


def test_config_edited_after_saving(copy, built):
    config = json.loads((copy / "config.json").read_text())
    config["config"]["hidden_dim"] += 2
    (copy / "config.json").write_text(json.dumps(config))
    _refused(copy, r"config\.json: corrupted or truncated", built)


def test_unreadable_weights_without_checksums_name_the_preset(copy):
    metadata = json.loads((copy / "metadata.json").read_text())
    del metadata["files"]
    (copy / "metadata.json").write_text(json.dumps(metadata))
    weights = copy / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(PresetError, match=str(copy)):
        BrainformerCausalLM.from_preset(str(copy))


def test_sound_presets_still_load(copy, tmp_path):
    lm = BrainformerCausalLM.from_preset(str(copy))
    reference = BrainformerCausalLM.from_preset(TRAINED)
    for a, b in zip(lm.backbone.weights, reference.backbone.weights):
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value))
    # An architecture preset (no weights, no checksums) builds a random init.
    assert BrainformerBackbone.from_preset("glam_tiny").count_params() > 0
    # Re-recording after a deliberate edit makes the folder sound again.
    config = json.loads((copy / "config.json").read_text())
    config["config"]["name"] = "renamed"
    (copy / "config.json").write_text(json.dumps(config))
    record_checksums(copy)
    verify_preset(copy)


# === Folders without checksums (issue 32, row 4) ===


def _drop_checksums(folder):
    metadata = json.loads((folder / "metadata.json").read_text())
    del metadata["files"]
    (folder / "metadata.json").write_text(json.dumps(metadata))


def _flip_400_bytes_of_the_embedding(folder):
    """Flips 400 bytes inside the embedding's data: the file stays a valid
    HDF5 file that h5py reads without complaint."""
    weights = folder / "model.weights.h5"
    with h5py.File(weights, "r") as f:
        dataset = f["layers/reversible_embedding/vars/0"]
        offset, size = dataset.id.get_offset(), dataset.id.get_storage_size()
    data = bytearray(weights.read_bytes())
    for i in range(400):
        data[offset + (i * 997) % size] ^= 0xFF
    weights.write_bytes(bytes(data))


def test_weights_without_checksums_load_only_with_a_warning_naming_the_folder(copy):
    _drop_checksums(copy)
    _flip_400_bytes_of_the_embedding(copy)
    with pytest.warns(PresetWarning) as caught:
        lm = BrainformerCausalLM.from_preset(str(copy))
    message = str(caught[0].message)
    assert str(copy) in message and "records no checksum for model.weights.h5" in message
    assert f"keras-brainformer checksum {copy}" in message
    reference = BrainformerCausalLM.from_preset(TRAINED)
    embedding = np.asarray(lm.backbone.token_embedding.embeddings.value)
    assert not np.array_equal(
        embedding, np.asarray(reference.backbone.token_embedding.embeddings.value)
    ), "the flipped bytes should have changed the embedding (the test would prove nothing)"


def test_checksummed_and_weightless_presets_do_not_warn(copy):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PresetWarning)
        BrainformerCausalLM.from_preset(str(copy))
        BrainformerBackbone.from_preset("glam_tiny")  # architecture preset: no weights


@pytest.mark.parametrize("checksums", ["removed", "recorded after the swap"])
def test_weights_saved_from_another_config_are_one_preset_error(copy, checksums):
    _drop_checksums(copy)
    shutil.copy(resolve_preset("glam_tiny_stdlib") + "/model.weights.h5", copy)
    if checksums != "removed":
        record_checksums(copy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(PresetError) as error:
            BrainformerCausalLM.from_preset(str(copy))
    message = str(error.value)
    assert message.startswith(f"{copy / 'model.weights.h5'}: does not fit the model that "
                              "config.json describes (A total of"), message
    assert "another configuration" in message and "\n" not in message
    # Keras' warnings about each unmatched group are not shown for a refused file.
    assert not [w for w in caught if "no matching group" in str(w.message)]


def test_an_interrupted_write_left_as_partial_is_refused(tmp_path, built):
    partial = tmp_path / "preset.partial"
    shutil.copytree(resolve_preset(TRAINED), partial)
    _drop_checksums(partial)  # the writer records them last, then renames
    (partial / "tokenizer.json").unlink()
    _refused(partial, r"preset\.partial: an incomplete preset, left by a write that was "
             r"interrupted.*write the preset again", built)
    shutil.copytree(resolve_preset(TRAINED), tmp_path / "preset")
    _refused(partial, "the complete preset is '.*preset'", built)


def test_cli_refusals_are_one_error_line_and_checksum_records_them(copy, tmp_path, capsys):
    _drop_checksums(copy)
    # A folder without checksums: one warning line, then `checksum` records them.
    assert cli.main(["checksum", str(copy)]) == 0
    assert "Recorded the sha256 of 6 files" in capsys.readouterr().out
    verify_preset(copy)
    weights = copy / "model.weights.h5"
    shutil.copy(weights, tmp_path / "sound.h5")
    # Now a flipped byte is caught before loading, by name.
    _flip_400_bytes_of_the_embedding(copy)
    assert cli.main(["generate", "--preset", str(copy), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {weights}: corrupted or truncated") and err.count("\n") == 1
    # `checksum` refuses to bless a file that changed since it was recorded.
    assert cli.main(["checksum", str(copy)]) == 2
    assert "corrupted or truncated" in capsys.readouterr().err
    # Foreign weights without checksums: the warning line, then one error line.
    shutil.copy(tmp_path / "sound.h5", weights)
    _drop_checksums(copy)
    shutil.copy(resolve_preset("glam_tiny_stdlib") + "/model.weights.h5", weights)
    for argv in (["generate", "--preset", str(copy), "hi"], ["checksum", str(copy)]):
        assert cli.main(argv) == 2
        lines = capsys.readouterr().err.splitlines()
        assert lines[-1].startswith(f"error: {weights}: does not fit the model"), lines
        assert all(line.startswith(("warning: ", "error: ")) for line in lines), lines
    partial = tmp_path / "run" / "preset.partial"
    shutil.copytree(copy, partial)
    assert cli.main(["generate", "--preset", str(partial), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "an incomplete preset" in err and err.count("\n") == 1


@pytest.mark.slow
def test_cli_subprocess_without_checksums_warns_and_refuses_foreign_weights(copy):
    """As issue 32 measured it: `keras-brainformer generate` in its own
    process. Flipped bytes in a folder without checksums: generates, with
    one `warning:` line. Weights of another config: exit 2, one `error:`
    line after the warning, no traceback (was exit 1 and a traceback)."""
    _drop_checksums(copy)
    _flip_400_bytes_of_the_embedding(copy)

    def generate():
        argv = [sys.executable, "-m", "keras_brainformer", "generate", "--preset", str(copy),
                "--max-length", "8", "def "]
        return subprocess.run(argv, capture_output=True, text=True, timeout=600)

    done = generate()
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: Preset folder '{copy}'"), lines
    assert done.stdout.startswith("def")
    shutil.copy(resolve_preset("glam_tiny_stdlib") + "/model.weights.h5", copy)
    done = generate()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("warning: "), lines
    assert lines[1].startswith(f"error: {copy / 'model.weights.h5'}: does not fit the model")
