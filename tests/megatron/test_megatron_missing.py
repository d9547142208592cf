"""Without megatron-core the package imports and the engine fails with the install command."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
from megatron_helpers import hf_model

from areal_agents.errors import ConfigError
from areal_agents.trainers.megatron import MegatronEngine, MegatronNotInstalled, availability


def _hide_megatron(monkeypatch):
    for name in [m for m in sys.modules if m == "megatron" or m.startswith("megatron.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "megatron", None)  # `import megatron...` raises ImportError


def test_missing_megatron_raises_config_error_naming_the_install(monkeypatch):
    _hide_megatron(monkeypatch)
    with pytest.raises(MegatronNotInstalled) as info:
        MegatronEngine(hf_model("qwen3"))
    err = info.value
    assert isinstance(err, ConfigError) and isinstance(err, ImportError)
    text = str(err)
    assert 'pip install "areal-agents[megatron]"' in text
    assert "megatron-core>=0.12,<0.17" in text and "Python >= 3.12" in text
    assert "backend='fsdp'" in text


def test_unsupported_megatron_version_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron", types.ModuleType("megatron"))
    monkeypatch.setitem(sys.modules, "megatron.core", types.ModuleType("megatron.core"))
    monkeypatch.setattr(availability.importlib, "import_module", lambda name: sys.modules[name]
                        if name.startswith("megatron") else None)
    monkeypatch.setattr(availability, "megatron_version", lambda: "0.17.0")
    with pytest.raises(MegatronNotInstalled, match=r"megatron-core 0\.17\.0 is installed; .*>=0\.12,<0\.17"):
        availability.require_megatron()
    monkeypatch.setattr(availability, "megatron_version", lambda: "0.16.1")
    availability.require_megatron()  # in range: no error

    def api_mismatch(name):
        if name.startswith("megatron"):
            return sys.modules[name]
        raise ImportError("cannot import name 'GPTModel' from 'megatron.core.models.gpt'")

    monkeypatch.setattr(availability.importlib, "import_module", api_mismatch)
    with pytest.raises(MegatronNotInstalled, match=r"0\.16\.1 is installed but lacks an API .*GPTModel"):
        availability.require_megatron()


@pytest.mark.slow
def test_package_import_does_not_import_megatron():
    code = ("import sys, areal_agents.trainers.megatron as m; "
            "from areal_agents.trainers.trainer import backend_factory; "
            "assert backend_factory('megatron') is m.MegatronEngine; "
            "print(any(k == 'megatron' or k.startswith('megatron.') for k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
