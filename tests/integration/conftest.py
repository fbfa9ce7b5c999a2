"""Integration tests against a real ComfyUI: skipped unless COMFYUI_DIR names a ComfyUI checkout.

Run them with the Python of that ComfyUI's environment (torch, ComfyUI's requirements, requests,
pytest), e.g.  COMFYUI_DIR=~/ComfyUI ~/ComfyUI/venv/bin/python -m pytest tests/integration

The session builds a ComfyUI base directory (--base-directory) in a temporary folder: this pack
linked into its custom_nodes/, random tiny models in its models/, then starts ComfyUI headless on
the CPU (on the GPU with SVDQ_COMFY_SERVER_DEVICE=gpu) and talks to it over HTTP on 127.0.0.1.
test_comfyui_gpu.py runs ComfyUI inside the pytest process instead (comfy_inprocess.py), on the GPU.
"""
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")


def pytest_collection_modifyitems(config, items):
    if COMFYUI_DIR:
        return
    skip = pytest.mark.skip(reason="set COMFYUI_DIR to a ComfyUI checkout to run the integration tests")
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory):
    """A ComfyUI base directory with this pack and the tiny test models."""
    import torch

    sys.path.insert(0, COMFYUI_DIR)
    import comfy.cli_args

    # The models are made with ComfyUI's classes, on the CPU. ComfyUI's device state is fixed when
    # comfy.model_management is first imported (here): on a machine with CUDA it is the GPU, for the
    # in-process GPU tests (test_comfyui_gpu.py); elsewhere --cpu, as a CUDA build of torch on a
    # machine without a GPU needs.
    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    from safetensors.torch import save_file

    from nunchaku_ext.format import save_checkpoint
    from nunchaku_ext.models import quantize_flux1_state_dict
    import tiny_models as tm
    from tiny_nunchaku import nunchaku_tiny_flux

    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ComfyUI-SVDQuant").symlink_to(REPO, target_is_directory=True)
    models = base / "models"
    for sub in ("diffusion_models", "text_encoders", "vae_approx", "loras"):
        (models / sub).mkdir(parents=True)

    # A dev model and a schnell one: the same weights without the guidance embedder.
    dense = tm.dense_flux_state_dict()
    info, tensors = quantize_flux1_state_dict(dense, tm.FLUX_CONFIG, rank=32, precision="int4")
    # The dev model quantized as Nunchaku's files are: in Nunchaku's single-file and folder forms,
    # and in our format with the same quantized tensors.
    nunchaku, (split_info, split_tensors) = nunchaku_tiny_flux(dense, tm.FLUX_CONFIG, info, tensors)
    nunchaku.save_file(models / "diffusion_models" / "tiny-flux-nunchaku-int4.safetensors")
    nunchaku.save_folder(models / "diffusion_models" / "tiny-flux-nunchaku-folder")
    save_checkpoint(models / "diffusion_models" / "tiny-flux-split-svdq-int4.safetensors", split_info, split_tensors)
    del nunchaku, split_tensors
    for variant, guidance in (("", True), ("-schnell", False)):
        keep = (lambda k: True) if guidance else (lambda k: not k.startswith("guidance_in."))
        save_file({k: v.to(torch.bfloat16) for k, v in dense.items() if keep(k)},
                  str(models / "diffusion_models" / f"tiny-flux{variant}-bf16.safetensors"))
        info.model_config = dict(tm.FLUX_CONFIG, guidance_embed=guidance)
        save_checkpoint(models / "diffusion_models" / f"tiny-flux{variant}-svdq-int4.safetensors", info,
                        {k: v for k, v in tensors.items() if keep(k)})
    del dense, tensors

    tm.save_clip_l(models / "text_encoders" / "clip_l_random.safetensors")
    tm.save_taef1(models / "vae_approx" / "taef1_encoder.safetensors", models / "vae_approx" / "taef1_decoder.safetensors")
    for name, make in [("kohya", tm.kohya_lora), ("diffusers", tm.diffusers_lora), ("lokr", tm.lokr_lora),
                       ("split", tm.split_lora)]:
        save_file(make(), str(models / "loras" / f"tiny-{name}.safetensors"))
    return base


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyClient:
    def __init__(self, url, base, log_path):
        import requests

        self.http = requests.Session()
        self.url, self.base, self.log_path = url, base, log_path

    def get(self, path):
        r = self.http.get(self.url + path, timeout=60)
        r.raise_for_status()
        return r.json()

    def run(self, graph, timeout=900):
        """Queue an API graph and wait: -> (status dict, outputs dict)."""
        r = self.http.post(self.url + "/prompt", json={"prompt": graph, "client_id": str(uuid.uuid4())}, timeout=60)
        if r.status_code != 200:
            raise AssertionError(f"prompt rejected: {r.status_code} {r.text}")
        pid = r.json()["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                entry = hist[pid]
                if entry["status"].get("status_str") == "error" or entry["status"]["completed"] is False:
                    return entry["status"], entry.get("outputs", {})
                if entry["status"]["completed"]:
                    return entry["status"], entry["outputs"]
            time.sleep(0.5)
        raise TimeoutError(f"prompt {pid} did not finish in {timeout} s")

    def output_file(self, item):
        return self.base / "output" / item.get("subfolder", "") / item["filename"]

    def log(self):
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def comfy(comfy_base):
    port = _free_port()
    log_path = comfy_base / "comfyui.log"
    log = open(log_path, "w")
    # SVDQ_COMFY_SERVER_DEVICE=gpu: the server on ComfyUI's default device (the GPU) instead of --cpu.
    device = [] if os.environ.get("SVDQ_COMFY_SERVER_DEVICE") == "gpu" else ["--cpu"]
    proc = subprocess.Popen(
        [sys.executable, "main.py", *device, "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
         "--base-directory", str(comfy_base), "--database-url", "sqlite:///:memory:"],
        cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT)
    client = ComfyClient(f"http://127.0.0.1:{port}", comfy_base, log_path)
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited ({proc.returncode}):\n{client.log()[-4000:]}")
            try:
                client.get("/system_stats")
                break
            except Exception:
                if time.time() > deadline:
                    raise RuntimeError(f"ComfyUI did not start:\n{client.log()[-4000:]}")
                time.sleep(1)
        yield client
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


RESULTS = {}  # measurements the tests record, shown in the session summary


def pytest_terminal_summary(terminalreporter):
    if RESULTS:
        terminalreporter.section("SVDQuant integration measurements")
        for key, value in RESULTS.items():
            terminalreporter.write_line(f"{key}: {value}")


def load_api_workflow(name):
    return json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
