from av._stub import __getattr__  # noqa: F401
