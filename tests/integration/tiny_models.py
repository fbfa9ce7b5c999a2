"""Random models that a real ComfyUI loads, small enough for a CPU: a FLUX.1 of ComfyUI's own
architecture (through ComfyUI's class, so its state-dict names are ComfyUI's), a full-size
random CLIP-L, a random taef1 VAE, and LoRAs in the formats ComfyUI maps onto FLUX."""
import torch
from safetensors.torch import save_file

# UNETLoader's model detection fixes hidden_size 3072 (24 heads x 128); the smallest FLUX it
# accepts has one block of each kind. context/vec dims 768 fit a CLIP-L text encoder.
FLUX_CONFIG = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=768, hidden_size=3072,
                   mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
                   theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
LORA_RANK = 8


def _randomize(module, seed):
    """N(0, 1/fan_in) weights, zero biases, unit norm scales: activations stay O(1) through depth."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif name.endswith("scale") or p.dim() == 1:
                p.fill_(1.0)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def dense_flux_state_dict(config=FLUX_CONFIG, seed=0):
    import comfy.ldm.flux.model
    import comfy.ops

    model = comfy.ldm.flux.model.Flux(**config, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    _randomize(model, seed)
    with torch.no_grad():  # small random biases so bias handling is exercised too
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def save_clip_l(path, seed=0):
    import transformers

    cfg = transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                      num_hidden_layers=12, projection_dim=768, max_position_embeddings=77,
                                      vocab_size=49408, hidden_act="quick_gelu")
    torch.manual_seed(seed)
    model = transformers.CLIPTextModelWithProjection(cfg)
    save_file({k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()}, str(path))


def save_taef1(encoder_path, decoder_path, seed=0):
    import comfy.taesd.taesd as taesd

    for i, (make, path) in enumerate([(taesd.Encoder, encoder_path), (taesd.Decoder, decoder_path)]):
        net = make(latent_channels=16)
        _randomize(net, seed + i)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


def lora_factors(rows, cols, seed, rank=LORA_RANK, magnitude=2.0):
    """up [rows, r], down [r, cols] whose product has entries ~ magnitude / sqrt(cols)."""
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(rows, rank, generator=g) * (magnitude / rank) ** 0.5
    down = torch.randn(rank, cols, generator=g) * (magnitude / cols) ** 0.5
    return up, down


def kohya_lora(config=FLUX_CONFIG, seed=1):
    """kohya-style keys (lora_unet_*) on a double block's qkv and MLP, the single block's linear2 and
    a modulation linear; alpha = rank/2."""
    h = config["hidden_size"]
    m = int(h * config["mlp_ratio"])
    targets = {"double_blocks_0_img_attn_qkv": (3 * h, h), "double_blocks_0_txt_mlp_2": (h, m),
               "single_blocks_0_linear2": (h, h + m), "double_blocks_0_img_mod_lin": (6 * h, h),
               "img_in": (h, 64)}
    sd = {}
    for i, (name, (n, k)) in enumerate(targets.items()):
        up, down = lora_factors(n, k, seed * 100 + i)
        sd[f"lora_unet_{name}.lora_up.weight"] = up.to(torch.bfloat16)
        sd[f"lora_unet_{name}.lora_down.weight"] = down.to(torch.bfloat16)
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(LORA_RANK / 2)
    return sd


def split_lora(config=FLUX_CONFIG, seed=4):
    """kohya-style keys on the single block's linear1 and linear2 (split linears in a Nunchaku
    checkpoint), each with a bias difference (diff_b), and on a double block's qkv."""
    h = config["hidden_size"]
    m = int(h * config["mlp_ratio"])
    targets = {"single_blocks_0_linear1": (3 * h + m, h), "single_blocks_0_linear2": (h, h + m),
               "double_blocks_0_txt_attn_qkv": (3 * h, h)}
    g = torch.Generator().manual_seed(seed * 100 + 99)
    sd = {}
    for i, (name, (n, k)) in enumerate(targets.items()):
        up, down = lora_factors(n, k, seed * 100 + i)
        sd[f"lora_unet_{name}.lora_up.weight"] = up.to(torch.bfloat16)
        sd[f"lora_unet_{name}.lora_down.weight"] = down.to(torch.bfloat16)
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(float(LORA_RANK))
        if name.startswith("single_blocks"):
            sd[f"lora_unet_{name}.diff_b"] = (torch.randn(n, generator=g) * 0.5).to(torch.bfloat16)
    return sd


def diffusers_lora(config=FLUX_CONFIG, seed=2):
    """diffusers/PEFT keys (transformer.*, lora_A/lora_B): separate q/k/v of a double block's image
    stream and of the single block, which ComfyUI maps to row slices of the fused qkv / linear1."""
    h = config["hidden_size"]
    m = int(h * config["mlp_ratio"])
    targets = {"transformer_blocks.0.attn.to_q": (h, h), "transformer_blocks.0.attn.to_v": (h, h),
               "transformer_blocks.0.attn.add_k_proj": (h, h),
               "single_transformer_blocks.0.attn.to_k": (h, h), "single_transformer_blocks.0.proj_mlp": (m, h),
               "transformer_blocks.0.ff.net.0.proj": (m, h)}
    sd = {}
    for i, (name, (n, k)) in enumerate(targets.items()):
        up, down = lora_factors(n, k, seed * 100 + i)
        sd[f"transformer.{name}.lora_B.weight"] = up.to(torch.bfloat16)
        sd[f"transformer.{name}.lora_A.weight"] = down.to(torch.bfloat16)
    return sd


def lokr_lora(config=FLUX_CONFIG, seed=3):
    """A LoKr adapter on a quantized layer: not low-rank, must be refused with a clear error."""
    h = config["hidden_size"]
    g = torch.Generator().manual_seed(seed)
    return {"lora_unet_double_blocks_0_img_attn_proj.lokr_w1": torch.randn(8, 8, generator=g) * 0.01,
            "lora_unet_double_blocks_0_img_attn_proj.lokr_w2": torch.randn(h // 8, h // 8, generator=g) * 0.01}
