"""A stand-in for comfyui-frontend-package on the offline GPU machine, where the real wheel (19 MB of
web assets) does not fit the carry: ComfyUI's server refuses to start without a frontend folder to
serve, and the HTTP tests use its API alone. tests/integration/device_run.sh puts this folder on
PYTHONPATH only when the real package is missing there."""
