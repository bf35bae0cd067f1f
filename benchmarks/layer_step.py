"""Step time of one jit-compiled DQN-style update (batch 32) per penultimate layer and expert count.

For each encoder (MinAtar 10x10x4, Impala 84x84x4) and each layer (dense x{1,2,4,8} width, Soft MoE,
top-1 and expert choice with 1, 2, 4, 8 experts) the update computes Q(s), a target max_a Q_target(s'),
an MSE TD loss, its gradient and an Adam step. Every configuration is compiled first; then the repeats
run round-robin over the configurations, so all of them see the same machine noise, and the table reports
medians and ratios to the dense x1 baseline of the same encoder.

    python benchmarks/layer_step.py --repeats 50 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

from moescale.config import NetworkConfig
from moescale.networks import build_network
from moescale.train.run import host_cpu

BATCH = 32
NUM_ACTIONS = 6
GAMMA = 0.99
ENCODERS = {"minatar": (10, 10, 4), "impala": (84, 84, 4)}
LAYERS = ("dense", "softmoe", "topk", "expert_choice")
EXPERTS = (1, 2, 4, 8)


def make_config(encoder: str, layer: str, n: int) -> NetworkConfig:
    """Dense scales its width by n ("scaled baseline"); MoE layers use n experts (paper settings)."""
    if layer == "dense":
        return NetworkConfig(encoder=encoder, moe="dense", width_multiplier=n)
    return NetworkConfig(encoder=encoder, moe=layer, num_experts=n)


def make_step(config: NetworkConfig, obs_shape: tuple[int, ...]):
    """(jitted update, its initial arguments, the built network) for one configuration."""
    net = build_network(config, obs_shape, NUM_ACTIONS)
    opt = optax.adam(6.25e-5, eps=1.5e-4)  # Obando-Ceron et al. 2024 (Dopamine Atari settings)

    def loss_fn(params, target, obs, act, rew, next_obs):
        q = net.apply(params, obs).q_values  # (B, A)
        q_next = net.apply(target, next_obs).q_values  # (B, A)
        y = rew + GAMMA * jnp.max(q_next, axis=-1)
        q_a = jnp.take_along_axis(q, act[:, None], axis=-1)[:, 0]
        return jnp.mean((q_a - jax.lax.stop_gradient(y)) ** 2)

    @jax.jit
    def step(params, target, opt_state, obs, act, rew, next_obs):
        loss, grads = jax.value_and_grad(loss_fn)(params, target, obs, act, rew, next_obs)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    keys = jax.random.split(jax.random.key(0), 5)
    params = net.init(keys[0])
    obs = jax.random.uniform(keys[1], (BATCH, *obs_shape))
    next_obs = jax.random.uniform(keys[2], (BATCH, *obs_shape))
    act = jax.random.randint(keys[3], (BATCH,), 0, NUM_ACTIONS)
    rew = jax.random.normal(keys[4], (BATCH,))
    args = (params, params, opt.init(params), obs, act, rew, next_obs)
    return step, args, net


def run(repeats: int, encoders: list[str]) -> list[dict]:
    """Compile every configuration, then time them round-robin; one row per configuration."""
    rows = []
    for encoder in encoders:
        cases = [(layer, n) for layer in LAYERS for n in EXPERTS]
        compiled = {}
        for layer, n in tqdm(cases, desc=f"compile {encoder}", file=sys.stderr):
            step, args, net = make_step(make_config(encoder, layer, n), ENCODERS[encoder])
            t0 = time.perf_counter()
            jax.block_until_ready(step(*args))
            compiled[(layer, n)] = (step, args, net, time.perf_counter() - t0, [])
        for _ in tqdm(range(repeats), desc=f"time {encoder}", file=sys.stderr):
            for key in cases:
                step, args, _, _, times = compiled[key]
                t0 = time.perf_counter()
                jax.block_until_ready(step(*args))
                times.append(time.perf_counter() - t0)
        base = statistics.median(compiled[("dense", 1)][4])
        for (layer, n), (_, _, net, first, times) in compiled.items():
            med = statistics.median(times)
            rows.append({"encoder": encoder, "layer": layer, "n": n, "ms": 1e3 * med, "ratio": med / base,
                         "params": net.info.params["total"], "flops": net.info.forward_flops,
                         "tokens": net.info.token_shape, "capacity": net.info.capacity, "compile_s": first})
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table of the rows."""
    head = ("| encoder | layer | width x / experts | tokens (T, D) | capacity | params | fwd MFLOPs | "
            "step ms (median) | ratio to dense x1 |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        cap = "-" if r["capacity"] is None else str(r["capacity"])
        lines.append(f"| {r['encoder']} | {r['layer']} | {r['n']} | {r['tokens']} | {cap} | {r['params']:,} | "
                     f"{r['flops'] / 1e6:.1f} | {r['ms']:.2f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def machine() -> str:
    """One line naming the machine and versions."""
    dev = jax.devices()[0]
    return (f"{platform.machine()} {os.cpu_count()} cores ({host_cpu()}), {dev.platform}:{dev.device_kind}, "
            f"jax {jax.__version__}, python {platform.python_version()}")


def section_text(title: str, script: str, argv: list[str] | None, how: str, body: str) -> str:
    """A BENCHMARKS.md section: title, the exact command, the machine, the date with how it was measured, body."""
    args = " ".join(argv if argv is not None else sys.argv[1:])
    return (f"## {title}\n\nCommand: `{f'python benchmarks/{script} {args}'.strip()}`  \nMachine: {machine()}  \n"
            f"Date: {datetime.date.today().isoformat()}, {how}\n\n{body}\n")


def write_section(path: Path, text: str, name: str = "layer_step") -> None:
    """Replace (or append) the named section of a markdown file, keeping the rest."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    begin, end_mark = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text}\n{end_mark}"
    if begin in old and end_mark in old:
        start, end = old.index(begin), old.index(end_mark) + len(end_mark)
        new = old[:start] + block + old[end:]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(new)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50, help="timed steps per configuration")
    parser.add_argument("--encoders", default="minatar,impala", help="comma list of: minatar, impala")
    parser.add_argument("--write", type=Path, default=None, help="markdown file whose section to update")
    args = parser.parse_args(argv)
    encoders = args.encoders.split(",")
    bad = [e for e in encoders if e not in ENCODERS]
    if bad or args.repeats < 1:
        parser.error(f"--encoders={args.encoders!r}: allowed {sorted(ENCODERS)}; --repeats must be >= 1")
    t0 = time.perf_counter()
    rows = run(args.repeats, encoders)
    text = section_text(f"Layer step time (batch {BATCH}, forward + backward + Adam)", "layer_step.py", argv,
                        f"{args.repeats} round-robin repeats, {time.perf_counter() - t0:.0f} s in all.", table(rows))
    print(text)
    if args.write:
        write_section(args.write, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
