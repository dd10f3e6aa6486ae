"""Speed benchmarks against diffusers + PEFT (PyTorch), side by side in one run on the same machine.

    python -m benchmarks.speed --out runs/speed.json [--threads 2] [--batch 8] [--size 32] [--repeats 5]
                               [--dtype float32|bfloat16]
                               [--sections attention,groupnorm,conv,lora_step,sampling,efficiency] [--sample-steps 25]

Sections (each prints a Markdown table; all numbers go to the JSON):

* ``attention``: one self-attention call (B, L tokens, H heads of D dims), forward and forward+backward, for our
  backends and torch's fused ``scaled_dot_product_attention``.
* ``groupnorm``: one GroupNorm over a (2·batch, size, size, 32) NHWC activation (the sampler's CFG batch at the
  small UNet's first level), forward and gradient: flax's ``nnx.GroupNorm``, the UNet's ``ChannelsLastGroupNorm``
  (same math, reductions reordered for XLA:CPU) and torch's ``GroupNorm`` (forward only: no_grad).
* ``conv``: a 3×3 convolution (batch, size, size, 64 → 64), forward and forward + both gradients, compiled by plain
  ``jax.jit`` (XLA:CPU's defaults: convolutions go to YNNPACK) and by ``metalora.compiler.jit`` (the library's
  options), and torch's ``conv2d``: the before/after of the compiler options.
* ``lora_step``: a LoRA adaptation training step (forward, backward w.r.t. the LoRA factors only, AdamW) of the
  same UNet config, batch, targets and rank in metalora (one jitted step) and in diffusers + PEFT (eager, and
  ``torch.compile`` with ``--compile``).
* ``sampling``: DDIM (``--sample-steps``, default 25) with classifier-free guidance (scale 3), images/s, of the
  same UNet config and the same weights in our jitted sampler and in the diffusers pipeline loop (``DDIMScheduler``,
  cond + uncond batched); the max abs difference of the two images from the same noise is reported as a check.
* ``efficiency``: our LoRA training step's FLOPs (XLA cost analysis) per measured second, as a fraction of this
  machine's measured f32 matmul FLOP/s; the same for the diffusers + PEFT step (torch's ``FlopCounterMode``), and
  the fraction of peak that the ≥ 2× goal needs (our FLOPs in half torch's time). ``ms_at_peak`` is each step's
  time if every FLOP ran at the matmul peak: a floor no step reaches.

``--dtype bfloat16`` runs ``lora_step``, ``sampling`` and ``efficiency`` in mixed precision on both sides, as
diffusers' LoRA training scripts do: the frozen UNet's weights and its activations in bfloat16, the trained LoRA
factors (and so their AdamW state) kept in float32; ours through the UNet's ``dtype`` / ``param_dtype``, torch's
through ``unet.to(torch.bfloat16)``, float32 LoRA parameters and ``torch.autocast("cpu", torch.bfloat16)``. The
efficiency section's peak is then the bfloat16 matmul peak (float32 accumulation). The loss is float32 on both sides.

Timings exclude compilation (one warm-up call) and report the median of ``--repeats`` runs. torch gets
``--threads`` intra-op threads (default: all cores, as XLA's CPU client uses). The machine and its load average
are recorded with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

from metalora import host
from metalora.compiler import jit

SMALL_UNET = dict(block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=64, attention_head_dim=4,
                  norm_num_groups=8, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (compilation, allocator)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_attention(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from metalora.models.attention import dot_product_attention

    b, length, heads, dim = args.batch, args.tokens, 8, 8
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, length, heads, dim), dtype=np.float32) for _ in range(3))
    jq, jk, jv = map(jnp.asarray, (q, k, v))
    rows = []
    for backend in ("blocked", "einsum", "xla"):
        fwd = jit(lambda q, k, v, backend=backend: dot_product_attention(q, k, v, backend=backend))
        grad = jit(jax.grad(lambda q, k, v, backend=backend: jnp.sum(
            dot_product_attention(q, k, v, backend=backend) ** 2), argnums=(0, 1, 2)))
        rows.append({"impl": f"metalora/{backend}",
                     "fwd_ms": 1e3 * _median_time(lambda f=fwd: f(jq, jk, jv).block_until_ready(), args.repeats),
                     "fwd_bwd_ms": 1e3 * _median_time(lambda g=grad: jax.block_until_ready(g(jq, jk, jv)),
                                                      args.repeats)})
    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))

    def torch_fwd():
        with torch.no_grad():
            torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)

    def torch_fwd_bwd():
        a, bb, c = (t.clone().requires_grad_(True) for t in (tq, tk, tv))
        (torch.nn.functional.scaled_dot_product_attention(a, bb, c) ** 2).sum().backward()

    rows.append({"impl": "torch/sdpa", "fwd_ms": 1e3 * _median_time(torch_fwd, args.repeats),
                 "fwd_bwd_ms": 1e3 * _median_time(torch_fwd_bwd, args.repeats)})
    return rows


DTYPES = ("float32", "bfloat16")


def _jax_dtype(name: str):
    from metalora.models.base_model import COMPUTE_DTYPES  # the library's own name → dtype table

    return COMPUTE_DTYPES[name]


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


CONTEXT_TOKENS = 8  # text tokens the UNet cross-attends to (kept small: the UNet is small too)


def _lora_inputs(args):
    """NCHW images, timesteps and text context for one LoRA step, as numpy (each side converts its own)."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, SMALL_UNET["in_channels"], args.size, args.size), dtype=np.float32)
    t = rng.integers(0, 1000, args.batch).astype(np.float32)
    ctx = rng.standard_normal((args.batch, CONTEXT_TOKENS, SMALL_UNET["cross_attention_dim"]), dtype=np.float32)
    return x, t, ctx


def _metalora_lora_step(args, x, t, ctx, attention_backend: str = "auto"):
    """Our LoRA training step on the (subject) factors only: (jitted step, initial (factors, opt_state), base
    param count). ``step(h, opt_state) -> (h, opt_state, loss)``; ``lora_step`` and ``efficiency`` both time it, so
    they measure the same program."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from metalora.lora import LoRAConfig, inject, merge_roles, split_roles, take_heads
    from metalora.models.unet import UNet2DConditionModel, UNetConfig, count_params

    compute = _jax_dtype(args.dtype)
    model = UNet2DConditionModel(UNetConfig(**SMALL_UNET), rngs=nnx.Rngs(0), attention_backend=attention_backend,
                                 dtype=compute, param_dtype=compute)
    base_params = count_params(model)
    inject(model, LoRAConfig(targets="attn", rank=args.rank, down_role="subject"), key=jax.random.key(0))
    graphdef, base, meta, subject = split_roles(model)
    # The trained factors stay float32 whatever the compute dtype (the adapter casts them to it for its matmuls).
    heads = jax.tree.map(lambda a: a.astype(jnp.float32), take_heads(subject, 0))
    tx = optax.adamw(1e-4)
    jx, jt, jctx = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx)

    def loss_fn(h):
        pred = merge_roles(graphdef, base, meta, h)(jx, jt, jctx)
        return jnp.mean((pred.astype(jnp.float32) - jx) ** 2)

    @jit
    def step(h, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(h)
        updates, opt_state = tx.update(grads, opt_state, h)
        return optax.apply_updates(h, updates), opt_state, loss

    return step, (heads, tx.init(heads)), base_params


def _stepper(step, init):
    """A no-argument callable that runs ``step(*state) -> (*state, loss)`` once, threading the state through."""
    state = list(init)

    def run():
        out = step(*state)
        state[:] = out[:-1]
        out[-1].block_until_ready()

    return run


def _torch_lora_step(args, x, t, ctx):
    """diffusers + PEFT on the same config, targets and rank: (unet, ``torch_step(forward) -> run()``), where
    ``run`` does one AdamW step of the LoRA factors through ``forward`` (the unet itself or a compiled one)."""
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = TorchUNet(**SMALL_UNET, sample_size=args.size)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    compute = _torch_dtype(args.dtype)
    if compute != torch.float32:  # diffusers' scripts: frozen weights in the compute dtype, trained ones float32
        unet.to(compute)
        for p in trainable:
            p.data = p.data.float()
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    tx_, tt, tctx = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)

    def torch_step(forward):
        def run():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=compute, enabled=compute != torch.float32):
                pred = forward(tx_, tt, tctx).sample
            loss = ((pred.float() - tx_) ** 2).mean()
            loss.backward()
            optimizer.step()
        return run

    return unet, torch_step


def bench_lora_step(args) -> list[dict]:
    import torch

    x, t, ctx = _lora_inputs(args)
    rows = []

    # --- metalora: jit-compiled step on the LoRA (subject) factors only --------------------------------------
    step, init, base_params = _metalora_lora_step(args, x, t, ctx)
    rows.append({"impl": "metalora (jit)", "ms_per_step": 1e3 * _median_time(_stepper(step, init), args.repeats),
                 "base_params": base_params})

    # --- diffusers + PEFT ------------------------------------------------------------------------------------
    unet, torch_step = _torch_lora_step(args, x, t, ctx)
    rows.append({"impl": "diffusers+PEFT (eager)", "ms_per_step": 1e3 * _median_time(torch_step(unet), args.repeats)})
    if args.compile:
        compiled = torch.compile(unet)
        rows.append({"impl": "diffusers+PEFT (torch.compile)",
                     "ms_per_step": 1e3 * _median_time(torch_step(compiled), args.repeats)})
    reference = rows[1]["ms_per_step"]
    for row in rows:
        row["speedup_vs_torch_eager"] = reference / row["ms_per_step"]
    return rows


# SD-1.x's DDIM config (as tests/test_pipeline.py), for both samplers: ``steps_offset=1`` and
# ``set_alpha_to_one=False`` make the timesteps and the last step's ᾱ those of a real SD pipeline, and without
# ``clip_sample`` (diffusers' DDIM default is True) x0̂ is not clipped, as SD does.
SD_DDIM = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
               set_alpha_to_one=False, steps_offset=1)
GUIDANCE_SCALE = 3.0


def _sampling_inputs(args):
    """NCHW initial noise and (cond, uncond) text contexts, as numpy."""
    import numpy as np

    rng = np.random.default_rng(1)
    noise = rng.standard_normal((args.batch, SMALL_UNET["in_channels"], args.size, args.size), dtype=np.float32)
    cond, uncond = (rng.standard_normal((args.batch, CONTEXT_TOKENS, SMALL_UNET["cross_attention_dim"]),
                                        dtype=np.float32) for _ in range(2))
    return noise, cond, uncond


def _sampling_model(args):
    """The sampling section's UNet: float32 weights (``nnx.Rngs(0)``), computing in ``args.dtype``."""
    from flax import nnx

    from metalora.models.unet import UNet2DConditionModel, UNetConfig

    return UNet2DConditionModel(UNetConfig(**SMALL_UNET), rngs=nnx.Rngs(0), dtype=_jax_dtype(args.dtype))


def _metalora_sampler(model, steps: int, dtype: str = "float32"):
    """``(sample, params)``: ``sample(params, noise_nhwc, cond, uncond) -> x0`` is DDIM + CFG for ``model``, the
    whole loop one jitted program (``benchmarks/profile_step.py`` profiles the same function); ``params`` are the
    model's weights stored in ``dtype``."""
    import functools

    import jax
    from flax import nnx

    from metalora.diffusion import NoiseSchedule, ddim_sample
    from metalora.models.base_model import apply_unet

    graphdef, params = nnx.split(model)
    params = jax.tree.map(lambda a: a.astype(_jax_dtype(dtype)), params)
    # The sampler's model_fn is a static jit argument keyed by identity: bind the graphdef once (as BaseModel does).
    model_fn = functools.partial(apply_unet, graphdef)
    schedule = NoiseSchedule.create(**SD_DDIM)

    @jit
    def sample(params, noise, cond, uncond):
        return ddim_sample(model_fn, params, schedule, noise, cond, uncond, num_inference_steps=steps,
                           guidance_scale=GUIDANCE_SCALE)

    return sample, params


def _torch_sampler(unet, steps: int):
    """The diffusers pipeline's denoising loop (``StableDiffusionPipeline.__call__``, latents in, latents out)."""
    import torch
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**SD_DDIM)

    def sample(noise, cond, uncond):
        scheduler.set_timesteps(steps)
        context = torch.cat([uncond, cond])  # one UNet call for both halves of CFG, uncond first (as diffusers)
        latents = noise * scheduler.init_noise_sigma
        with torch.inference_mode():
            for t in scheduler.timesteps:
                model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                pred_uncond, pred_cond = unet(model_input, t, encoder_hidden_states=context).sample.chunk(2)
                pred = pred_uncond + GUIDANCE_SCALE * (pred_cond - pred_uncond)
                latents = scheduler.step(pred, t, latents).prev_sample
        return latents

    return sample


def bench_sampling(args) -> list[dict]:
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    from metalora.models.convert import export_torch_state

    model = _sampling_model(args)
    # Same weights on both sides: diffusers' UNet gets ours (strict load, so a missed tensor fails loudly).
    # torch.tensor copies: the exported arrays are read-only views of jax buffers, which from_numpy warns about.
    unet = TorchUNet(**SMALL_UNET, sample_size=args.size).eval()
    unet.load_state_dict({k: torch.tensor(v) for k, v in export_torch_state(model).items()})
    unet.to(_torch_dtype(args.dtype))
    noise, cond, uncond = _sampling_inputs(args)
    sample, params = _metalora_sampler(model, args.sample_steps, args.dtype)

    def ours(noise, cond, uncond):
        return sample(params, noise, cond, uncond)

    theirs = _torch_sampler(unet, args.sample_steps)
    j_in = (jnp.asarray(noise.transpose(0, 2, 3, 1)), jnp.asarray(cond), jnp.asarray(uncond))
    # The diffusers pipeline keeps its latents in the UNet's dtype.
    t_in = tuple(torch.from_numpy(a).to(_torch_dtype(args.dtype)) for a in (noise, cond, uncond))

    # Informative parity check (not asserted): same noise in, the two x0 agree up to the compute dtype's round-off.
    diff = float(np.max(np.abs(np.asarray(ours(*j_in), np.float32).transpose(0, 3, 1, 2)
                               - theirs(*t_in).float().numpy())))
    ours_s = _median_time(lambda: ours(*j_in).block_until_ready(), args.repeats)
    theirs_s = _median_time(lambda: theirs(*t_in), args.repeats)
    return [{"impl": impl, "images_per_s": args.batch / sec, "ms_per_image": 1e3 * sec / args.batch,
             "speedup_vs_torch": theirs_s / sec, "max_abs_diff_vs_torch": d}
            for impl, sec, d in (("metalora (jit, lax.scan)", ours_s, diff), ("diffusers loop (eager)", theirs_s, 0.0))]


def bench_groupnorm(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from metalora.models.unet_blocks import ChannelsLastGroupNorm

    channels, groups = 32, 8
    x_np = np.random.default_rng(0).standard_normal((2 * args.batch, args.size, args.size, channels), np.float32)
    x = jnp.asarray(x_np)

    def timed(name, cls):
        graphdef, state = nnx.split(cls(channels, num_groups=groups, epsilon=1e-5, use_fast_variance=False,
                                        rngs=nnx.Rngs(0)))
        forward = jit(lambda s, x: nnx.merge(graphdef, s)(x))
        grad = jit(jax.grad(lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x) ** 2), argnums=(0, 1)))
        return {"impl": name,
                "forward_ms": 1e3 * _median_time(lambda: forward(state, x).block_until_ready(), args.repeats),
                "grad_ms": 1e3 * _median_time(lambda: jax.block_until_ready(grad(state, x)), args.repeats)}

    rows = [timed("flax nnx.GroupNorm", nnx.GroupNorm), timed("metalora ChannelsLastGroupNorm", ChannelsLastGroupNorm)]
    norm = torch.nn.GroupNorm(groups, channels, eps=1e-5)
    x_t = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        rows.append({"impl": "torch GroupNorm", "forward_ms": 1e3 * _median_time(lambda: norm(x_t), args.repeats)})
    return rows


def bench_conv(args) -> list[dict]:
    """A 3×3 same-padded convolution at the UNet's first level (batch, size, size, 64 → 64), forward and forward +
    both gradients: plain ``jax.jit`` (XLA:CPU's defaults), ``metalora.compiler.jit`` (the library's options) and
    torch (``conv2d``, fwd under no_grad; fwd+bwd with input and weight gradients)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    channels = 64
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((args.batch, args.size, args.size, channels), np.float32)
    w_np = (rng.standard_normal((3, 3, channels, channels), np.float32) / np.sqrt(9 * channels)).astype(np.float32)
    x, w = jnp.asarray(x_np), jnp.asarray(w_np)
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    grads = jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))
    rows = []
    for name, make in (("jax.jit (XLA defaults)", jax.jit), ("metalora.compiler.jit", jit)):
        forward, backward = make(conv), make(grads)
        rows.append({"impl": name,
                     "fwd_ms": 1e3 * _median_time(lambda f=forward: f(x, w).block_until_ready(), args.repeats),
                     "fwd_bwd_ms": 1e3 * _median_time(lambda g=backward: jax.block_until_ready(g(x, w)),
                                                      args.repeats)})
    x_t = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())
    w_t = torch.from_numpy(w_np.transpose(3, 2, 0, 1).copy())

    def torch_fwd():
        with torch.no_grad():
            torch.nn.functional.conv2d(x_t, w_t, padding=1)

    def torch_fwd_bwd():
        a, b = x_t.clone().requires_grad_(True), w_t.clone().requires_grad_(True)
        (torch.nn.functional.conv2d(a, b, padding=1) ** 2).sum().backward()

    rows.append({"impl": "torch conv2d", "fwd_ms": 1e3 * _median_time(torch_fwd, args.repeats),
                 "fwd_bwd_ms": 1e3 * _median_time(torch_fwd_bwd, args.repeats)})
    return rows


PEAK_MATMUL_N = 1024


def _flops(compiled) -> float:
    """FLOPs of a compiled XLA program (``cost_analysis`` is a dict in recent jax, a one-element list in older)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost["flops"])


def peak_matmul_flops(repeats: int, dtype: str = "float32") -> float:
    """This machine's matmul FLOP/s in ``dtype`` with float32 accumulation (a square jitted ``a @ b``: 2n³ flops),
    our practical peak."""
    import functools

    import jax
    import jax.numpy as jnp

    n = PEAK_MATMUL_N
    a, b = (jax.random.normal(jax.random.key(i), (n, n), _jax_dtype(dtype)) for i in range(2))
    matmul = jit(functools.partial(jnp.matmul, preferred_element_type=jnp.float32))
    return 2 * n**3 / _median_time(lambda: matmul(a, b).block_until_ready(), repeats)


def bench_efficiency(args) -> list[dict]:
    inputs = _lora_inputs(args)
    step, init, _ = _metalora_lora_step(args, *inputs)
    # XLA's cost analysis counts a while loop's body once, whatever its trip count, and our CPU attention
    # ("blocked", as lora_step runs) loops over key blocks. So count the FLOPs of the same step with loop-free "xla"
    # attention (the same math: model FLOPs, as MFU counts them) and time the step as it really runs.
    counted, counted_init, _ = _metalora_lora_step(args, *inputs, attention_backend="xla")
    compiled = counted.lower(*counted_init).compile()
    if " while(" in compiled.as_text():
        raise RuntimeError("efficiency: the FLOP-counted step has a while loop, whose FLOPs XLA counts once")
    flops = _flops(compiled)
    seconds = _median_time(_stepper(step, init), args.repeats)
    peak = peak_matmul_flops(args.repeats, args.dtype)

    # The same step in diffusers + PEFT: its FLOPs by torch's own counter (matmuls and convolutions only, forward
    # and backward), its time measured here.
    from torch.utils.flop_counter import FlopCounterMode

    unet, torch_step = _torch_lora_step(args, *inputs)
    run = torch_step(unet)
    with FlopCounterMode(display=False) as counter:
        run()
    torch_flops = float(counter.get_total_flops())
    torch_seconds = _median_time(run, args.repeats)

    def row(what, flops, seconds):
        return {"what": what, "gflop_per_step": flops / 1e9, "ms_per_step": 1e3 * seconds,
                "achieved_gflops": flops / seconds / 1e9, "peak_matmul_gflops": peak / 1e9,
                "fraction_of_peak": flops / seconds / peak, "ms_at_peak": 1e3 * flops / peak}

    # The speed goal (2× diffusers + PEFT eager) as a roofline: our FLOPs in half torch's time, as a fraction of
    # this machine's matmul peak, next to the fractions both measured steps reach.
    return [row("metalora LoRA step (jit)", flops, seconds),
            row("diffusers+PEFT eager (torch FlopCounter)", torch_flops, torch_seconds),
            row("goal: metalora at 2x torch eager", flops, torch_seconds / 2)]


def _table(rows: list[dict]) -> str:
    keys = list(rows[0])
    # Small floats (e.g. a 1e-5 parity difference) in exponent notation, so they do not print as 0.00.
    fmt = lambda v: (f"{v:.2f}" if v == 0 or abs(v) >= 0.01 else f"{v:.1e}") if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


SECTIONS = {"attention": bench_attention, "groupnorm": bench_groupnorm, "conv": bench_conv,
            "lora_step": bench_lora_step, "sampling": bench_sampling, "efficiency": bench_efficiency}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/speed.json")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of the sampling section")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, from: " + ",".join(SECTIONS))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="compute dtype of lora_step, sampling and efficiency (bfloat16: mixed precision)")
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {list(SECTIONS)}")

    import torch

    torch.set_num_threads(args.threads)
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                           "loadavg_before": os.getloadavg()},
               "args": vars(args)}
    for name in args.sections.split(","):
        rows = SECTIONS[name](args)
        results[name] = rows
        print(f"\n## {name}\n\n{_table(rows)}")
    results["machine"]["loadavg_after"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    host.reexec_with_malloc_tunables()  # before any work: see metalora/host.py
    main()
