"""A stand-in for PyAV (`av`) on the offline GPU machine, where the real wheel (36 MB of FFmpeg) does
not fit the carry: ComfyUI imports `av` at start for its video and audio nodes, which the FLUX image
graphs of these tests never run. Every name is a placeholder class; using one raises.
tests/integration/device_run.sh puts this folder on PYTHONPATH only when `import av` fails there."""
from av._stub import __getattr__  # noqa: F401

# ComfyUI's API nodes check the version at import (comfy_api_nodes/canary.py: 14.2 or newer): the
# version of ComfyUI's requirements-era PyAV that this stands in for.
__version__ = "18.1.0"
