"""Speed benchmarks against diffusers + PEFT (PyTorch), side by side in one run on the same machine.

    python -m benchmarks.speed --out runs/speed.json [--threads 2] [--batch 8] [--size 32] [--repeats 5]

Sections (each prints a Markdown table; all numbers go to the JSON):

* ``attention``: one self-attention call (B, L tokens, H heads of D dims), forward and forward+backward, for our
  backends and torch's fused ``scaled_dot_product_attention``.
* ``lora_step``: a LoRA adaptation training step (forward, backward w.r.t. the LoRA factors only, AdamW) of the
  same UNet config, batch, targets and rank in metalora (jit, donated state) and in diffusers + PEFT (eager, and
  ``torch.compile`` with ``--compile``).

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
        fwd = jax.jit(lambda q, k, v, backend=backend: dot_product_attention(q, k, v, backend=backend))
        grad = jax.jit(jax.grad(lambda q, k, v, backend=backend: jnp.sum(
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


def bench_lora_step(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet
    from flax import nnx
    from peft import LoraConfig

    from metalora.lora import LoRAConfig, inject, merge_roles, split_roles, take_heads
    from metalora.models.unet import UNet2DConditionModel, UNetConfig, count_params

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, SMALL_UNET["in_channels"], args.size, args.size), dtype=np.float32)
    t = rng.integers(0, 1000, args.batch).astype(np.float32)
    ctx = rng.standard_normal((args.batch, 8, SMALL_UNET["cross_attention_dim"]), dtype=np.float32)
    rows = []

    # --- metalora: jit-compiled step on the LoRA (subject) factors only, donated state -----------------------
    config = UNetConfig(**SMALL_UNET)
    model = UNet2DConditionModel(config, rngs=nnx.Rngs(0))
    base_params = count_params(model)
    inject(model, LoRAConfig(targets="attn", rank=args.rank, down_role="subject"), key=jax.random.key(0))
    graphdef, base, meta, subject = split_roles(model)
    heads = take_heads(subject, 0)
    tx = optax.adamw(1e-4)
    jx, jt, jctx = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx)

    def loss_fn(h):
        pred = merge_roles(graphdef, base, meta, h)(jx, jt, jctx)
        return jnp.mean((pred - jx) ** 2)

    @jax.jit
    def step(h, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(h)
        updates, opt_state = tx.update(grads, opt_state, h)
        return optax.apply_updates(h, updates), opt_state, loss

    state = {"h": heads, "o": tx.init(heads)}

    def run_jax():
        state["h"], state["o"], loss = step(state["h"], state["o"])
        loss.block_until_ready()

    rows.append({"impl": "metalora (jit)", "ms_per_step": 1e3 * _median_time(run_jax, args.repeats),
                 "base_params": base_params})

    # --- diffusers + PEFT ------------------------------------------------------------------------------------
    torch.manual_seed(0)
    unet = TorchUNet(**SMALL_UNET, sample_size=args.size)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    tx_, tt, tctx = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)

    def torch_step(forward):
        def run():
            optimizer.zero_grad(set_to_none=True)
            loss = ((forward(tx_, tt, tctx).sample - tx_) ** 2).mean()
            loss.backward()
            optimizer.step()
        return run

    rows.append({"impl": "diffusers+PEFT (eager)", "ms_per_step": 1e3 * _median_time(torch_step(unet), args.repeats)})
    if args.compile:
        compiled = torch.compile(unet)
        rows.append({"impl": "diffusers+PEFT (torch.compile)",
                     "ms_per_step": 1e3 * _median_time(torch_step(compiled), args.repeats)})
    reference = rows[1]["ms_per_step"]
    for row in rows:
        row["speedup_vs_torch_eager"] = reference / row["ms_per_step"]
    return rows


def _table(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/speed.json")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sections", default="attention,lora_step")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                           "loadavg_before": os.getloadavg()},
               "args": vars(args)}
    sections = {"attention": bench_attention, "lora_step": bench_lora_step}
    for name in args.sections.split(","):
        rows = sections[name](args)
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
    main()
