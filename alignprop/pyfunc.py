"""The MLflow pyfunc model of a registered adapter: base model + LoRA weights -> images.

    model = mlflow.pyfunc.load_model("models:/NAME@production")
    images = model.predict({"prompt": ["a cat", "two dogs"], "seed": 0})   # float32 (B, H, W, 3) in [0, 1]

Image i is drawn from its own generator seeded with `seed + i` (DDIM, eta and guidance from the training config,
overridable per call), so a prompt's image does not depend on the rest of the batch, and a given (prompt, seed)
always gives the same image. The pipeline is diffusers' StableDiffusionPipeline with the DDIM scheduler and the
LoRA loaded by `load_lora_weights` and fused into the weights (same images as the unfused adapter to ~1e-6,
without its per-layer overhead); an adapter trained with `adapter_min_timestep` stays unfused and is gated to the
steps it was trained on.

Artifacts of the model: `adapter` (pytorch_lora_weights.safetensors), `train_config` (config.json), and either
`base_model` (the base pipeline directory itself, when it is small enough to embed: the version is then
self-contained) or `base_manifest` (a model-cache manifest), else the `base_model` reference in model_config
(a hub id or path), resolved by `alignprop.models.resolve_model_dir` when loaded.

This file is logged as MLflow "model from code": MLflow executes it under its own module name and it registers
the model with `mlflow.models.set_model`; nothing is pickled. Imported as `alignprop.pyfunc` it has no side
effect. Keep its top-level imports to mlflow and the standard library.
"""

from __future__ import annotations

import os

import mlflow.pyfunc

PREDICT_OPTIONS = ("num_inference_steps", "guidance_scale", "eta", "negative_prompt")


class AlignPropModel(mlflow.pyfunc.PythonModel):
    """Text-to-image with a LoRA-adapted Stable-Diffusion-family pipeline."""

    def load_context(self, context):
        import torch
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        config = dict(context.model_config or {})
        base = context.artifacts.get("base_model")
        if not base:  # not embedded: a cache manifest travels with the model, else the recorded reference
            from alignprop.models import resolve_model_dir

            base = resolve_model_dir(context.artifacts.get("base_manifest") or config["base_model"])
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if self.device == "cuda" and config.get("fp16_on_cuda", True) else torch.float32
        pipe = StableDiffusionPipeline.from_pretrained(base, dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the sampler training used
        adapter = context.artifacts["adapter"]
        pipe.load_lora_weights(os.path.dirname(adapter), weight_name=os.path.basename(adapter))
        min_timestep = int(config.get("adapter_min_timestep") or 0)
        if min_timestep:  # trained with a timestep gate: it needs the LoRA unfused, to switch it off per step
            from alignprop.models import gate_lora

            gate_lora(pipe.unet, min_timestep)
        else:
            pipe.fuse_lora()  # merge W + BA once: serving then costs what the base model costs
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self.defaults = {k: config[k] for k in PREDICT_OPTIONS if config.get(k) is not None}

    def predict(self, context, model_input, params=None):
        import torch

        prompts, seed, options = parse_request(model_input, params)
        options = {**self.defaults, **options}
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
        negative = options.pop("negative_prompt", None)
        out = self.pipe(prompts, generator=generators, output_type="np",
                        negative_prompt=[negative] * len(prompts) if negative else None, **options)
        return out.images


def parse_request(model_input, params=None) -> tuple[list[str], int, dict]:
    """Accept {"prompt": str | [str], "seed": int, ...options} or a DataFrame with those columns (what the
    MLflow scoring server passes); `params` may carry the seed and options too."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # pandas DataFrame
        columns = model_input.to_dict(orient="list")
        request = {k: (v if k == "prompt" else v[0]) for k, v in columns.items()}
    elif isinstance(model_input, dict):
        request = dict(model_input)
    elif isinstance(model_input, (list, tuple, str)):
        request = {"prompt": model_input}
    else:
        raise TypeError(f"expected {{'prompt': [...], 'seed': 0}}, got {type(model_input).__name__}")
    request.update(params or {})
    prompts = request.get("prompt")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("'prompt' must be a string or a non-empty list of strings")
    seed = int(_scalar(request.get("seed", 0)))
    options = {k: _scalar(request[k]) for k in PREDICT_OPTIONS if request.get(k) is not None}
    if "num_inference_steps" in options:
        options["num_inference_steps"] = int(options["num_inference_steps"])
    return prompts, seed, options


def _scalar(value):
    if isinstance(value, (list, tuple)):
        return value[0]
    return value.item() if hasattr(value, "item") else value


if __name__ != "alignprop.pyfunc":  # executed by MLflow as a model-from-code file
    mlflow.models.set_model(AlignPropModel())
