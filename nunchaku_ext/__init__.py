"""ComfyUI-SVDQuant's engine: SVDQuant numerics, quantized layers, backends, checkpoint format and
quantizer. Plain torch; it never imports ComfyUI, so it can be used and tested without it."""
