"""Name tables the schema and the cross-field rules share: rewards, backbones and their latent multiples,
default LoRA targets, Ray's built-in resources. Plain data, no imports from the rest of rtdmd_ray."""

from __future__ import annotations

from typing import Literal

# Copied from rtdmd_ray.rewards.KNOWN_REWARDS / DIFFERENTIABLE_REWARDS (names only; a parity test keeps them
# equal) so that `rtdmd-ray validate` does not import torch.
KNOWN_REWARDS: frozenset[str] = frozenset({
    "pickscore", "hpsv2", "hpsv3", "clipscore", "aesthetic", "imagereward", "ocr", "geneval", "geneval2",
    "shapes_geneval", "brightness", "latency",
})
DIFFERENTIABLE_REWARDS: frozenset[str] = frozenset(
    {"pickscore", "hpsv2", "clipscore", "imagereward", "brightness"})

Backbone = Literal["sd3", "sd35", "flux1", "flux2", "shapes", "tiny_sd3", "tiny_flux1", "tiny_flux2"]
# The sampler/schedule family of each backbone (spec §1.1); ShapeWorld's teacher is an SD3 transformer.
BACKBONE_FAMILY: dict[str, str] = {
    "sd3": "sd3", "sd35": "sd3", "shapes": "sd3", "tiny_sd3": "sd3",
    "flux1": "flux1", "tiny_flux1": "flux1", "flux2": "flux2", "tiny_flux2": "flux2",
}
# Pixels per latent cell side that the resolution must divide (models/*.py `latent_divisor`): the real VAEs
# downsample 8x, FLUX.1 packs the latent 2x2, FLUX.2 latents are 2x2-patchified; ShapeWorld is a 2x
# pixel-unshuffle. The tiny VAEs downsample 2x (models/tiny.py) and their latents must be even.
RESOLUTION_MULTIPLE_PX: dict[str, int] = {
    "sd3": 8, "sd35": 8, "flux1": 16, "flux2": 16, "shapes": 4,
    "tiny_sd3": 4, "tiny_flux1": 4, "tiny_flux2": 4,
}
# Backbones whose weights come from `model.pretrained_path` (tiny ones are built in code).
NEEDS_PRETRAINED_PATH = frozenset({"sd3", "sd35", "flux1", "flux2", "shapes"})

# LoRA targets per family (spec §4.3): the image- and text-stream attention projections of the joint blocks.
# FLUX.2-klein adds `to_qkv_mlp_proj` and, in the shipped configs, the single blocks' bare `attn.to_out`
# listed one by one (their count depends on the model size, 20 for 4B and 24 for 9B).
DEFAULT_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "sd3": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"),
    "flux1": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
              "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"),
    "flux2": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
              "to_qkv_mlp_proj"),
}

# Ray's own resources: set through cpus_per_actor / gpus_per_actor (or not per role), never `custom`.
RAY_BUILTIN_RESOURCES: frozenset[str] = frozenset({"CPU", "GPU", "memory", "object_store_memory"})

PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]

# the per-reward fields of a Ray Serve reward deployment (rewards.serve and rewards.serve.per_reward.<name>)
# The GenEval2 judge app's fields (rewards.serve.judge; roles/judge_serve.start_judge_app); others are typos
JUDGE_APP_FIELDS = {
    "engine": "transformers (Serve deployment running geneval2's TransformersJudge) or vllm (Ray Serve LLM)",
    "model": "judge directory or hub id",
    "dtype": "transformers engine: model dtype (the reference casts to float16)",
    "device": "transformers engine: torch device inside a replica (cpu, cuda)",
    "min_replicas": "replicas kept while idle",
    "max_replicas": "replicas autoscaling may grow to",
    "target_ongoing_requests": "queued + running requests per replica autoscaling aims for",
    "cpus_per_replica": "transformers engine: logical CPUs per replica",
    "gpus_per_replica": "transformers engine: GPUs per replica",
    "max_batch_size": "transformers engine: requests one replica judges per model call batch",
    "engine_kwargs": "vllm engine: vLLM engine arguments (merged over the judge defaults)",
    "accelerator_type": "vllm engine (and transformers replicas): e.g. H100; unset = any accelerator",
}
SERVE_DEPLOYMENT_FIELDS: tuple[str, ...] = (
    "min_replicas", "max_replicas", "target_ongoing_requests", "cpus_per_replica", "gpus_per_replica",
    "batch_wait_timeout_s", "upscale_delay_s", "downscale_delay_s",
)
