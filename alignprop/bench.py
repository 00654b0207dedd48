"""`alignprop bench`: memory and speed of the differentiable sampler. Prints figures; asserts nothing.

Memory: on CUDA, the true peak (`torch.cuda.max_memory_allocated`) of one training step. On CPU, PyTorch keeps
no allocator statistics, so each configuration runs in a fresh process and the figure is that process's peak
resident set size (`ru_maxrss`: weights, runtime and activations). Both also report the memory the autograd graph
holds when the backward pass starts (every tensor saved for backward, deduplicated by storage, weights excluded):
the term that grows with the number of steps that keep their graph, and that checkpointing keeps small.

Speed: the time of one training step (forward with graph through the last K steps, VAE decode, reward,
backward) divided by the time of no-grad sampling of the same batch. With per-step checkpointing the floor is
about 3 (forward, recompute, backward), see benchmarks/model-configs/README.md.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from alignprop import models, sampling
from alignprop.rewards.simple import brightness

logger = logging.getLogger(__name__)

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks (vendor data sheets)


@contextmanager
def graph_memory(exclude: set[int]):
    """Yields a dict whose 'bytes' is the storage saved for backward inside the block (weights excluded)."""
    seen: set[int] = set()
    result = {"bytes": 0}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and ptr not in exclude:
            seen.add(ptr)
            result["bytes"] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result


def _build(model: str, unet_config: str | None, device, dtype, resolution: int | None = None):
    if unet_config:  # random-init weights at a real architecture's size: speed and memory do not depend on values
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        config = json.loads(Path(unet_config).read_text())
        if resolution:  # the VAE downsamples 8x
            config["sample_size"] = resolution // 8
        unet = UNet2DConditionModel.from_config(config)
        vae_config = Path(unet_config).with_name("sd15_vae.json")
        vae = AutoencoderKL.from_config(json.loads(vae_config.read_text())) if vae_config.exists() else None
        if vae is None:
            raise FileNotFoundError(f"{vae_config} not found next to {unet_config}")
        for m in (unet, vae):
            m.requires_grad_(False).to(device, dtype)
        scheduler = DDIMScheduler(**models.SD_SCHEDULER_CONFIG)
        return unet, vae, scheduler, unet.config.cross_attention_dim
    if model == "tiny":
        directory = Path(tempfile.mkdtemp()) / "tiny"
        models.make_tiny_model(directory)
        model = str(directory)
    parts = models.load_parts(model, device=device, dtype=dtype)
    return parts.unet, parts.vae, parts.scheduler, parts.unet.config.cross_attention_dim


def _step(unet, vae, scheduler, embeds, negative, num_steps, grad_steps, use_checkpoint, seed=0, train=True):
    generator = torch.Generator().manual_seed(seed)
    latents = sampling.initial_latents(embeds.shape[0], unet.config, scheduler, generator, embeds.device, embeds.dtype)
    with torch.set_grad_enabled(train):
        latents = sampling.denoise(unet, scheduler, latents, embeds, negative, num_steps, 7.5, eta=0.0,
                                   grad_steps=grad_steps, use_checkpoint=use_checkpoint)
        images = sampling.decode(vae, latents, use_checkpoint=use_checkpoint)
        loss = -brightness()(images.float(), [""] * len(images)).mean()
    return loss


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(unet, vae, scheduler, dim, batch_size, num_steps, grad_steps, use_checkpoint, device, dtype, repeats):
    embeds = torch.randn(batch_size, 77, dim, device=device, dtype=dtype)
    negative = torch.randn(1, 77, dim, device=device, dtype=dtype)
    weights = {p.untyped_storage().data_ptr() for m in (unet, vae) for p in m.parameters()}
    cuda = torch.device(device).type == "cuda"
    times = []
    for r in range(repeats + 1):  # the first run warms up
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        with graph_memory(weights) as graph:
            loss = _step(unet, vae, scheduler, embeds, negative, num_steps, grad_steps, use_checkpoint, seed=r)
        loss.backward()
        _sync(device)
        times.append(time.perf_counter() - start)
        unet.zero_grad(set_to_none=True)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"grad_steps": grad_steps, "checkpointing": use_checkpoint, "train_step_s": min(times[1:]),
            "graph_gib": graph["bytes"] / 2**30, "peak_gib": peak}


def sample_time(unet, vae, scheduler, dim, batch_size, num_steps, device, dtype, repeats):
    embeds = torch.randn(batch_size, 77, dim, device=device, dtype=dtype)
    negative = torch.randn(1, 77, dim, device=device, dtype=dtype)
    times = []
    for r in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        _step(unet, vae, scheduler, embeds, negative, num_steps, 0, False, seed=r, train=False)
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def unet_flops(unet, batch_size, dim, device, dtype) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    latents = torch.randn(batch_size, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                          device=device, dtype=dtype)
    embeds = torch.randn(batch_size, 77, dim, device=device, dtype=dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(latents, torch.tensor(500, device=device), encoder_hidden_states=embeds)
    return float(counter.get_total_flops())


def _measure_in_child(model, unet_config, batch_size, num_steps, k, use_checkpoint, repeats, dtype, resolution):
    import subprocess
    import sys

    args = dict(model=model, unet_config=unet_config, batch_size=batch_size, num_steps=num_steps, k=k,
                use_checkpoint=use_checkpoint, repeats=repeats, dtype=dtype, resolution=resolution)
    out = subprocess.run([sys.executable, "-m", "alignprop.bench", json.dumps(args)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(args: dict) -> None:
    torch_dtype = torch.bfloat16 if args["dtype"] == "bf16" else torch.float32
    unet, vae, scheduler, dim = _build(args["model"], args["unet_config"], "cpu", torch_dtype, args["resolution"])
    models.add_lora(unet, rank=4)
    row = measure(unet, vae, scheduler, dim, args["batch_size"], args["num_steps"], args["k"],
                  args["use_checkpoint"], "cpu", torch_dtype, args["repeats"])
    print(json.dumps(row))


def run_benchmarks(model: str = "tiny", steps: str = "10,20,40", batch_size: int = 2, device: str | None = None,
                   repeats: int = 2, unet_config: str | None = None, dtype: str = "auto",
                   resolution: int | None = None) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = torch.bfloat16 if (dtype == "bf16" or (dtype == "auto" and device.startswith("cuda"))) else torch.float32
    grad_steps_list = [int(s) for s in steps.split(",")]
    num_steps = max(grad_steps_list)
    if model == "tiny" and not unet_config:  # build it once, so every child process loads the same files
        model = str(models.make_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    unet, vae, scheduler, dim = _build(model, unet_config, device, torch_dtype, resolution)
    models.add_lora(unet, rank=4)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch_dtype)  # benchmark the LoRA at the compute dtype
    rows = []
    for use_checkpoint in (True, False):
        for k in grad_steps_list:
            if device == "cpu":  # a fresh process per configuration, so ru_maxrss is this configuration's peak
                row = _measure_in_child(model, unet_config, batch_size, num_steps, k, use_checkpoint, repeats, dtype,
                                        resolution)
            else:
                row = measure(unet, vae, scheduler, dim, batch_size, num_steps, k, use_checkpoint, device,
                              torch_dtype, repeats)
            rows.append(row)
            logger.info("K=%d checkpointing=%s: %s", k, use_checkpoint, row)
    sampling_s = sample_time(unet, vae, scheduler, dim, batch_size, num_steps, device, torch_dtype, repeats)
    full = next(r for r in rows if r["checkpointing"] and r["grad_steps"] == num_steps)
    mem_key = "peak_gib"
    ckpt = {r["grad_steps"]: r[mem_key] for r in rows if r["checkpointing"]}
    result = {
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
        "model": unet_config or model, "batch_size": batch_size, "denoising_steps": num_steps,
        "dtype": str(torch_dtype).replace("torch.", ""), "memory_metric": mem_key, "rows": rows,
        "sampling_s": sampling_s, "train_over_sample": full["train_step_s"] / sampling_s,
        "memory_ratio_max_over_min_k": ckpt[max(ckpt)] / ckpt[min(ckpt)] if ckpt[min(ckpt)] else float("nan"),
    }
    if device.startswith("cuda"):
        flops = unet_flops(unet, batch_size * 2, dim, device, torch_dtype) * num_steps * 3  # cfg x2; fwd+recompute+bwd
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in result["device"]), None)
        result["model_tflops_per_step"] = flops / 1e12
        result["mfu"] = flops / full["train_step_s"] / (peak * 1e12) if peak else None
    print_table(result)
    return result


def print_table(result: dict) -> None:
    mem = result["memory_metric"]
    print(f"device: {result['device']}  model: {result['model']}  dtype: {result['dtype']}  "
          f"batch: {result['batch_size']}  DDIM steps: {result['denoising_steps']}")
    print(f"{'K (steps with graph)':>20} {'checkpointing':>14} {'peak (GiB)':>11} {'graph (GiB)':>12} "
          f"{'train step (s)':>15}")
    for r in result["rows"]:
        print(f"{r['grad_steps']:>20} {str(r['checkpointing']):>14} {r[mem]:>11.3f} {r['graph_gib']:>12.4f} "
              f"{r['train_step_s']:>15.3f}")
    print(f"no-grad sampling of the same batch: {result['sampling_s']:.3f} s")
    print(f"train step / sampling (full chain, checkpointed): {result['train_over_sample']:.2f}  (target <= 4)")
    print(f"memory at K={max(r['grad_steps'] for r in result['rows'])} / K={min(r['grad_steps'] for r in result['rows'])}"
          f" with checkpointing: {result['memory_ratio_max_over_min_k']:.3f}  (target <= 1.25)")
    if "mfu" in result:
        print(f"model TFLOP per step: {result['model_tflops_per_step']:.1f}  MFU: {result['mfu']}")
    print(json.dumps(result))


if __name__ == "__main__":
    import sys

    _child(json.loads(sys.argv[1]))
