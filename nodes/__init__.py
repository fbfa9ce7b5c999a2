"""The ComfyUI layer of ComfyUI-SVDQuant: node classes and ComfyUI glue (imports ComfyUI)."""
from .loader import SVDQuantFluxLoader

NODE_CLASS_MAPPINGS = {"SVDQuantFluxLoader": SVDQuantFluxLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"SVDQuantFluxLoader": "Load SVDQuant FLUX Model"}
