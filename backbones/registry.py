"""`--backbone NAME` -> its spec. Families register here as they are added."""
from __future__ import annotations

from .spec import BackboneSpec

_FACTORIES = {
    "wan_ti2v": lambda: __import__("backbones.wan.spec", fromlist=["WanTI2VSpec"]).WanTI2VSpec(),
}
_CACHE: dict[str, BackboneSpec] = {}


def backbone_names() -> list[str]:
    return sorted(_FACTORIES)


def get_backbone(name: str) -> BackboneSpec:
    if name not in _FACTORIES:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(backbone_names())}")
    if name not in _CACHE:
        _CACHE[name] = _FACTORIES[name]()
    return _CACHE[name]
