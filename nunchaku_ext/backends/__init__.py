"""Backends run the quantized layers' forward. Each is a module with `w4a4_linear(layer, x)` and
`w4a16_linear(layer, x)`; 'reference' (plain torch, any device) is the spec the others are tested
against. A backend module is imported on first use, so an unavailable one never breaks import."""
import importlib

# Relative to this package, so the engine works under whatever name it is imported.
_MODULES = {
    "reference": ".reference",
    "cuda": ".cuda",
}


def names() -> tuple:
    return tuple(_MODULES)


def get(name: str):
    try:
        module = _MODULES[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(_MODULES)}") from None
    return importlib.import_module(module, __package__)
