"""The core must import without heavy frameworks (checked in a fresh interpreter)."""

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    return set(out)


def test_import_core_pulls_no_framework():
    mods = _modules_after("import tucker_peft, tucker_peft.ranks, tucker_peft.backends")
    heavy = {"torch", "cupy", "jax", "tensorflow", "hypothesis", "tensorly", "safetensors"}
    assert not (heavy & {m.split(".")[0] for m in mods}), heavy & mods


def test_testing_module_is_the_one_that_imports_hypothesis():
    mods = _modules_after("import tucker_peft.testing")
    assert "hypothesis" in mods
    assert "torch" not in mods


def test_public_names_are_exported():
    import tucker_peft

    for name in tucker_peft.__all__:
        assert hasattr(tucker_peft, name), name
    assert {"Tucker", "CP", "LoRA", "hosvd", "ranks", "TuckerPeftError"} <= set(tucker_peft.__all__)
