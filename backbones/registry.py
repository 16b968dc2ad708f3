"""`--backbone NAME` -> its spec. Families register here; tests and plug-ins may `register` their own."""
from __future__ import annotations

from collections.abc import Callable

from .spec import BackboneSpec

DEFAULT_BACKBONE = "wan_ti2v"   # what train.py / infer.py use when --backbone is not given


def _wan() -> BackboneSpec:
    from .wan.spec import WanTI2VSpec
    return WanTI2VSpec()


def _sd15() -> BackboneSpec:
    from .sd.sd15 import SD15Spec
    return SD15Spec()


def _animatediff() -> BackboneSpec:
    from .sd.animatediff import AnimateDiffSpec
    return AnimateDiffSpec()


def _cogvideox() -> BackboneSpec:
    from .cogvideox.spec import CogVideoXSpec
    return CogVideoXSpec()


def _svd() -> BackboneSpec:
    from .svd.spec import SVDSpec
    return SVDSpec()


def _framer() -> BackboneSpec:
    from .svd.spec import FramerSpec
    return FramerSpec()


_FACTORIES: dict[str, Callable[[], BackboneSpec]] = {"wan_ti2v": _wan, "sd15": _sd15, "animatediff": _animatediff,
                                                     "cogvideox": _cogvideox, "svd": _svd, "framer": _framer}
_CACHE: dict[str, BackboneSpec] = {}


def register(name: str, factory: Callable[[], BackboneSpec], *, replace: bool = False) -> None:
    """Make `--backbone name` available (a factory, so registering imports nothing heavy)."""
    if name in _FACTORIES and not replace:
        raise ValueError(f"backbone {name!r} is already registered")
    _FACTORIES[name] = factory
    _CACHE.pop(name, None)


def unregister(name: str) -> None:
    _FACTORIES.pop(name, None)
    _CACHE.pop(name, None)


def backbone_names() -> list[str]:
    return sorted(_FACTORIES)


def get_backbone(name: str | None) -> BackboneSpec:
    name = name or DEFAULT_BACKBONE
    if name not in _FACTORIES:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(backbone_names())}")
    if name not in _CACHE:
        _CACHE[name] = _FACTORIES[name]()
    return _CACHE[name]
