"""Placeholders for any PyAV name: classes that can be subclassed and used in annotations at import
time, and that raise when instantiated or called."""


class _Placeholder(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__name__}.{name}")

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"PyAV is not installed here (a stand-in for tests): av.{cls.__name__} is unavailable")


def _placeholder(name):
    return _Placeholder(name, (), {})


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _placeholder(name)
