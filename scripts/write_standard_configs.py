"""Write the standard model configs sdserve ships for single-file
checkpoints (crates/sd-models/configs/): the published diffusers configs of
stable-diffusion-v1-5, stable-diffusion-2-1 (768², v-prediction),
stable-diffusion-xl-base-1.0 and stable-diffusion-xl-refiner-1.0, written
from their values (nothing can be fetched here). Tokenizer folders carry
only their settings; the vocabulary is CLIP's BPE (configs/clip-merges.txt,
from the open-clip-torch wheel: the first 48,894 merges, as CLIP uses),
from which sd-models derives vocab.json when it writes a config out.

Usage: python scripts/write_standard_configs.py [OUT]   (default: crates/sd-models/configs)
"""

import gzip
import importlib.util
import json
import sys
from pathlib import Path

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "crates/sd-models/configs")


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def unet(**over):
    base = {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "use_linear_projection": False, "upcast_attention": False, "transformer_layers_per_block": 1,
    }
    base.update(over)
    return base


def vae(**over):
    base = {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
        "sample_size": 512, "scaling_factor": 0.18215, "force_upcast": True,
    }
    base.update(over)
    return base


def clip(cls="CLIPTextModel", **over):
    base = {
        "architectures": [cls], "model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 768,
        "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05, "projection_dim": 768,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "attention_dropout": 0.0,
        "initializer_factor": 1.0, "initializer_range": 0.02,
    }
    base.update(over)
    return base


def tokenizer(path, pad):
    config = {"tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "pad_token": pad, "model_max_length": 77, "do_lower_case": True,
              "add_prefix_space": False, "errors": "replace"}
    write(path / "tokenizer_config.json", config)
    write(path / "special_tokens_map.json", {k: config[k] for k in ["bos_token", "eos_token", "unk_token", "pad_token"]})


SCHED = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
         "steps_offset": 1, "set_alpha_to_one": False, "skip_prk_steps": True, "clip_sample": False,
         "trained_betas": None}


def sd_index(cls, te="text_encoder"):
    idx = {"_class_name": cls, "scheduler": ["diffusers", None], "unet": ["diffusers", "UNet2DConditionModel"],
           "vae": ["diffusers", "AutoencoderKL"], "feature_extractor": [None, None], "safety_checker": [None, None],
           "requires_safety_checker": False}
    return idx


def sd1(out):
    idx = sd_index("StableDiffusionPipeline")
    idx.update(scheduler=["diffusers", "PNDMScheduler"], text_encoder=["transformers", "CLIPTextModel"],
               tokenizer=["transformers", "CLIPTokenizer"])
    write(out / "model_index.json", idx)
    write(out / "scheduler/scheduler_config.json", dict(SCHED, _class_name="PNDMScheduler", prediction_type="epsilon",
                                                        timestep_spacing="leading"))
    write(out / "unet/config.json", unet())
    write(out / "vae/config.json", vae())
    write(out / "text_encoder/config.json", clip())
    tokenizer(out / "tokenizer", "<|endoftext|>")


def sd2(out):
    idx = sd_index("StableDiffusionPipeline")
    idx.update(scheduler=["diffusers", "DDIMScheduler"], text_encoder=["transformers", "CLIPTextModel"],
               tokenizer=["transformers", "CLIPTokenizer"])
    write(out / "model_index.json", idx)
    write(out / "scheduler/scheduler_config.json", dict(SCHED, _class_name="DDIMScheduler",
                                                        prediction_type="v_prediction", timestep_spacing="leading"))
    write(out / "unet/config.json", unet(attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                                         use_linear_projection=True, upcast_attention=True, sample_size=96))
    write(out / "vae/config.json", vae(sample_size=768))
    write(out / "text_encoder/config.json", clip(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                                 num_attention_heads=16, hidden_act="gelu", projection_dim=512))
    tokenizer(out / "tokenizer", "!")


XL_SCHED = dict(SCHED, _class_name="EulerDiscreteScheduler", prediction_type="epsilon", interpolation_type="linear",
                timestep_spacing="leading", use_karras_sigmas=False, sample_max_value=1.0)
BIGG = clip("CLIPTextModelWithProjection", hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
            num_attention_heads=20, hidden_act="gelu", projection_dim=1280)


def sdxl_base(out):
    write(out / "model_index.json", {
        "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]})
    write(out / "scheduler/scheduler_config.json", XL_SCHED)
    write(out / "unet/config.json", unet(
        addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
        attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
        use_linear_projection=True))
    write(out / "vae/config.json", vae(sample_size=1024, scaling_factor=0.13025))
    write(out / "text_encoder/config.json", clip())
    write(out / "text_encoder_2/config.json", BIGG)
    tokenizer(out / "tokenizer", "<|endoftext|>")
    tokenizer(out / "tokenizer_2", "!")


def sdxl_refiner(out):
    write(out / "model_index.json", {
        "_class_name": "StableDiffusionXLImg2ImgPipeline", "force_zeros_for_empty_prompt": False,
        "requires_aesthetics_score": True, "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": [None, None], "tokenizer": [None, None],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]})
    write(out / "scheduler/scheduler_config.json", XL_SCHED)
    write(out / "unet/config.json", unet(
        addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
        attention_head_dim=[6, 12, 12, 12], block_out_channels=[384, 768, 1536, 1536], cross_attention_dim=1280,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        projection_class_embeddings_input_dim=2560, sample_size=128, transformer_layers_per_block=4,
        use_linear_projection=True))
    write(out / "vae/config.json", vae(sample_size=1024, scaling_factor=0.13025))
    write(out / "text_encoder_2/config.json", BIGG)
    tokenizer(out / "tokenizer_2", "!")


def merges(out):
    spec = importlib.util.find_spec("open_clip")
    lines = gzip.open(Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8").split("\n")
    (out / "clip-merges.txt").write_text("#version: 0.2\n" + "\n".join(lines[1: 49152 - 256 - 2 + 1]) + "\n")


if __name__ == "__main__":
    for name, f in [("sd-v1", sd1), ("sd-v2", sd2), ("sdxl-base", sdxl_base), ("sdxl-refiner", sdxl_refiner)]:
        f(OUT / name)
    merges(OUT)
    print(f"wrote {OUT}")
