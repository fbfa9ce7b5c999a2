"""A real ComfyUI inside the pytest process, for tests that must see ComfyUI's Python state (its
ModelPatcher, comfy.model_management's accounting, torch.cuda.memory_allocated) while it runs a graph.

What ComfyUI's main.py does for a prompt, without the HTTP server: its folder_paths pointed at the
session's base directory, nodes.init_extra_nodes() (ComfyUI's extra nodes and this pack from
custom_nodes/), execution.validate_prompt() and execution.PromptExecutor.execute(). The result has
the shape of the server's /history entry, so test_comfyui.run_outputs() works with either client.
ComfyUI keeps global state (loaded models, node classes): one instance per test session.
"""
import asyncio
import gc
import sys
import uuid
from pathlib import Path


class _Server:
    """What PromptExecutor asks of ComfyUI's PromptServer: no client is connected."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def __init__(self):
        self.sockets_metadata = {}

    def send_sync(self, event, data, sid=None):
        pass

    def queue_updated(self):
        pass


def _point_folder_paths(folder_paths, base, output):
    """Models and custom_nodes from the session's base directory (as --base-directory would), outputs
    in their own folder (the session's HTTP server writes to base/output)."""
    old, new = folder_paths.models_dir, str(base / "models")
    for name, (paths, exts) in list(folder_paths.folder_names_and_paths.items()):
        paths = [new + p[len(old):] if p.startswith(old) else p for p in paths]
        if name == "custom_nodes":
            paths = [str(base / "custom_nodes")]
        folder_paths.folder_names_and_paths[name] = (paths, exts)
    folder_paths.models_dir = new
    folder_paths.filename_list_cache.clear()
    for kind in ("output", "temp", "input", "user"):
        path = output / kind
        path.mkdir(parents=True, exist_ok=True)
        getattr(folder_paths, f"set_{kind}_directory")(str(path))


class InProcessComfy:
    def __init__(self, comfyui_dir, base):
        comfyui_dir = str(Path(comfyui_dir).resolve())
        # ComfyUI's top-level modules (nodes, execution, server, utils, ...) before anything that
        # could shadow them: this repository has a nodes/ package of its own.
        while comfyui_dir in sys.path:
            sys.path.remove(comfyui_dir)
        sys.path.insert(0, comfyui_dir)
        import comfy.cli_args
        import folder_paths
        # ComfyUI's utils package, imported as main.py does before nodes.py puts comfy/ (with its
        # utils.py) first on sys.path; server.py and app/ import utils.* later.
        import utils.install_util  # noqa: F401
        import utils.json_util  # noqa: F401

        self.base = Path(base)
        self.out = self.base / "inprocess"
        _point_folder_paths(folder_paths, self.base, self.out)

        import comfy.model_management
        import execution
        import nodes

        if Path(nodes.__file__).resolve().parent != Path(comfyui_dir):
            raise RuntimeError(f"'nodes' is {nodes.__file__}, not ComfyUI's nodes.py")
        self.args = comfy.cli_args.args
        self.mm = comfy.model_management
        self.execution, self.nodes = execution, nodes
        self.extras_failed = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        if "SVDQuantFluxLoader" not in nodes.NODE_CLASS_MAPPINGS:
            raise RuntimeError("the SVDQuant pack did not load from custom_nodes/ (see the captured log)")
        loader = nodes.NODE_CLASS_MAPPINGS["SVDQuantFluxLoader"]
        self.loader_node = loader
        self.pack = sys.modules[loader.__module__.rsplit(".", 1)[0]]  # the pack's nodes package
        self.ops = sys.modules[self.pack.__name__ + ".ops"]
        self.client_id = str(uuid.uuid4())
        self.executor = execution.PromptExecutor(_Server(), cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0})

    def run(self, graph):
        """Validate and execute an API graph -> (status dict, outputs dict), as the server's /history."""
        prompt_id = str(uuid.uuid4())
        valid, error, outputs, node_errors = asyncio.run(self.execution.validate_prompt(prompt_id, graph, None))
        if not valid:
            raise AssertionError(f"prompt rejected: {error} {node_errors}")
        e = self.executor
        # With a client (as the tests' HTTP client is), cached output nodes report their outputs too.
        e.execute(graph, prompt_id, {"client_id": self.client_id}, outputs)
        status = {"status_str": "success" if e.success else "error", "completed": e.success,
                  "messages": e.status_messages}
        return status, e.history_result["outputs"]

    def output_file(self, item):
        return self.out / "output" / item.get("subfolder", "") / item["filename"]

    def reset(self):
        """As after ComfyUI's "free memory" request: models unloaded, node outputs dropped (the next
        graph loads its models anew), the CUDA cache emptied."""
        self.mm.unload_all_models()
        self.executor.reset()
        gc.collect()
        self.mm.soft_empty_cache(force=True)

    def svdquant_layers(self, model):
        """(name, module) of the 4-bit layers (whole layers and split-linear parts) of a BaseModel."""
        return [(n, m) for n, m in model.diffusion_model.named_modules()
                if isinstance(m, self.ops._ComfyQuantizedLinear)]

    def is_svdquant(self, patcher):
        model = getattr(getattr(patcher, "model", None), "diffusion_model", None)
        return model is not None and any(isinstance(m, self.ops._ComfyQuantizedLinear) for m in model.modules())

    def loaded_svdquant(self):
        """comfy.model_management's LoadedModel entries of SVDQuant models."""
        return [lm for lm in self.mm.current_loaded_models if lm.model is not None and self.is_svdquant(lm.model)]
