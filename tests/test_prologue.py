"""What a stage does before its work: here, the Keras extras refused while TensorFlow loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from charrnn import prologue


def test_keras_extras_are_refused_while_tensorflow_loads_and_importable_after(tmp_path, monkeypatch):
    (tmp_path / "extra_plots.py").write_text("NAME = 'plots'\n")
    (tmp_path / "extra_models").mkdir()
    (tmp_path / "extra_models" / "__init__.py").write_text("")
    (tmp_path / "extra_models" / "wrappers.py").write_text("NAME = 'wrappers'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import extra_models  # loaded before the block: stays usable in it

    monkeypatch.setattr(prologue, "KERAS_EXTRAS_UNUSED", ("extra_plots", "extra_models"))
    for name in ("extra_plots", "extra_models.wrappers"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with prologue.without_keras_extras():
        with pytest.raises(ImportError):  # what Keras' `except ImportError` catches
            import extra_plots  # noqa: F401
        with pytest.raises(ImportError):
            import extra_plots.sub  # noqa: F401
        import extra_models.wrappers
        assert extra_models.wrappers.NAME == "wrappers"
    assert "extra_plots" not in sys.modules  # nothing left behind: a later import loads it
    import extra_plots

    assert extra_plots.NAME == "plots" and sys.modules["extra_models"] is extra_models


def test_the_refused_extras_are_keras_optional_imports():
    """Keras guards each refused name with `except ImportError` (a refusal it does not catch would
    stop every stage)."""
    import keras

    root = keras.__path__[0]
    guarded = {"sklearn": Path(root, "src/wrappers/fixes.py"),
               "matplotlib": Path(root, "src/visualization/plot_image_gallery.py")}
    assert set(guarded) == set(prologue.KERAS_EXTRAS_UNUSED)
    for name, path in guarded.items():
        text = path.read_text()
        block = text[text.index("try:"):text.index("except ImportError")]
        assert f"import {name}" in block, (name, path)


def test_stages_load_tensorflow_with_the_bfc_allocator_unless_the_user_says_otherwise():
    script = ("from charrnn.prologue import loading_tensorflow\n"
              "with loading_tensorflow():\n"
              "    import tensorflow as tf\n"
              "tf.matmul(tf.ones([256, 256]), tf.ones([256, 256]))\n"
              "try:\n"
              "    print(tf.config.experimental.get_memory_info('CPU:0')['peak'] > 0)\n"
              "except ValueError:\n"  # the default allocator keeps no statistics
              "    print('no allocator statistics')\n")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPU_ALLOCATOR_USE_BFC"}
    by_default = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert by_default.stdout.split() == ["True"], by_default.stderr[-2000:]
    refused = subprocess.run([sys.executable, "-c", script], env={**env, "TF_CPU_ALLOCATOR_USE_BFC": "false"},
                             capture_output=True, text=True, check=True)
    assert refused.stdout.strip() == "no allocator statistics", refused.stderr[-2000:]
