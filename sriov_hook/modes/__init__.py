"""Mode handlers: how a reserved VF is handed to a container and taken back.

Each handler's ``attach`` is a composition of journal steps; release (and
the rollback of a failed attach) is the journal replayed (hook.release).
"""
from __future__ import annotations

import importlib
from typing import Dict

from .base import Mode

_MODULES = {"netdev": "netdev", "vfio": "vfio", "kata": "kata", "dpdk": "dpdk"}
_cache: Dict[str, Mode] = {}


def get(name: str) -> Mode:
    if name not in _cache:
        from ..errors import ConfigError
        if name not in _MODULES:
            raise ConfigError(f"mode {name!r} is not implemented in this version")
        mod = importlib.import_module(f".{_MODULES[name]}", __name__)
        _cache[name] = mod.MODE
    return _cache[name]
