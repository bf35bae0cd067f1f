"""Where a Soft MoE layer's time goes: the forward pass and the gradient of the whole layer, of its routing alone
(the logits, the two softmaxes, the slots and the combine, with the experts left out) and of its experts alone, at
the shapes of minatar-dqn's Soft MoE-4 (batch 32, 100 tokens of 16 channels, 4 experts of 25 slots, hidden 512).
Beside them, the routing as the layer computed it until 2026-12-04 (jax.nn.softmax, E and S apart in the einsums),
so the gain of the layer's own routing is measured side by side.

Every part is compiled first; then they take turns for --rounds rounds of --repeats calls each, so a slow spell of
the machine hits all alike, and the table gives the median call. A gradient is that of <output, a fixed random
cotangent> with respect to the part's parameters and its input, as the layer's gradient inside an update.
`--one-core` holds the process to one core before JAX starts (XLA then makes its thread pools for one core), as
each seed of a run spread over one CPU device per core has.

    python benchmarks/softmoe_parts.py --one-core --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def one_core_requested(argv: list[str]) -> bool:
    return "--one-core" in argv


# The process is held to one core before jax is imported, so XLA sizes its thread pools for it.
if __name__ == "__main__" and one_core_requested(sys.argv[1:]) and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from moescale.layers.experts import Experts  # noqa: E402
from moescale.layers.soft_moe import SoftMoE, flat_soft_moe_weights  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_step import section_text, write_section  # noqa: E402

BATCH, TOKENS, DIM, EXPERTS, SLOTS, HIDDEN = 32, 100, 16, 4, 25, 512  # minatar-dqn, Soft MoE-4


def routing(phi: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The layer's routing from tokens x (B, T, D) and Phi (D, E, S): its slots (B, E*S, D) and combine weights
    (B, T, E*S), as SoftMoE computes them."""
    dispatch, combine = flat_soft_moe_weights(x, phi)
    return jnp.einsum("...tn,...td->...nd", dispatch, x), combine


def routing_only(phi: jax.Array, x: jax.Array) -> jax.Array:
    """The routing with the experts left out (each expert the identity): (B, T, D)."""
    slots, combine = routing(phi, x)
    return jnp.einsum("...tn,...nd->...td", combine, slots)


def former_routing_only(phi: jax.Array, x: jax.Array) -> jax.Array:
    """routing_only as the layer computed it until 2026-12-04: logits (B, T, E, S), jax.nn.softmax over T and over
    the E*S slots, and einsums that keep E and S apart. The same numbers to float rounding."""
    logits = jnp.einsum("...td,des->...tes", x, phi)
    dispatch = jax.nn.softmax(logits, axis=-3)
    combine = jax.nn.softmax(logits.reshape(*logits.shape[:-2], -1), axis=-1).reshape(logits.shape)
    slots = jnp.einsum("...tes,...td->...esd", dispatch, x)
    return jnp.einsum("...tes,...esd->...td", combine, slots)


def parts(batch: int = BATCH) -> dict[str, tuple]:
    """name -> (function of (params, input), params, input): the whole layer, its routing, its experts, at the
    layer's own parameters (the experts take the slots the routing makes)."""
    layer = SoftMoE(num_experts=EXPERTS, slots_per_expert=SLOTS, expert_hidden=HIDDEN)
    x = jax.random.normal(jax.random.key(0), (batch, TOKENS, DIM))
    params = layer.init(jax.random.key(1), x)
    phi, expert_params = params["params"]["phi"], {"params": params["params"]["experts"]}
    slots = routing(phi, x)[0].reshape(batch, EXPERTS, SLOTS, DIM)
    experts = Experts(EXPERTS, HIDDEN)
    return {"whole layer": (layer.apply, params, x), "routing (experts left out)": (routing_only, phi, x),
            "experts": (experts.apply, expert_params, slots),
            "routing as until 2026-12-04": (former_routing_only, phi, x)}


def timed_calls(fn, params, x) -> dict[str, tuple]:
    """The jitted forward pass and gradient of fn, each with its arguments, compiled."""
    cotangent = jax.random.normal(jax.random.key(2), jax.eval_shape(fn, params, x).shape)
    grad = jax.grad(lambda p, v: jnp.vdot(fn(p, v), cotangent), argnums=(0, 1))
    calls = {}
    for name, f in (("forward", fn), ("gradient", grad)):
        compiled = jax.jit(f).lower(params, x).compile()
        jax.block_until_ready(compiled(params, x))
        calls[name] = (compiled, params, x)
    return calls


def measure(rounds: int, repeats: int) -> list[dict]:
    """Median ms per call of each part's forward and gradient, the parts taking turns every round."""
    calls = {(part, kind): call for part, (fn, p, x) in parts().items() for kind, call in timed_calls(fn, p, x).items()}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    for _ in range(rounds):
        for key, (f, p, x) in calls.items():
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(f(p, x))
                times[key].append(time.perf_counter() - t0)
    return [{"part": part, "pass": kind, "ms": 1e3 * statistics.median(t)} for (part, kind), t in times.items()]


def table(rows: list[dict]) -> str:
    whole = {r["pass"]: r["ms"] for r in rows if r["part"] == "whole layer"}
    lines = ["| part | pass | ms per call (median) | share of the whole layer's |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['part']} | {r['pass']} | {r['ms']:.3f} | {r['ms'] / whole[r['pass']]:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds in which the parts take turns")
    parser.add_argument("--repeats", type=int, default=20, help="calls of each part per round")
    parser.add_argument("--one-core", action="store_true", help="hold the process to one core (Linux)")
    parser.add_argument("--write", type=Path, default=None, help="markdown file whose section to update")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        parser.error("--rounds and --repeats must be >= 1")
    if args.one_core and not hasattr(os, "sched_setaffinity"):
        parser.error("--one-core needs a system that can hold a process to a core (Linux)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = section_text(f"Soft MoE-4 layer's parts, minatar-dqn shapes (batch {BATCH}, {TOKENS} tokens of {DIM}, "
                        f"{EXPERTS} experts x {SLOTS} slots, hidden {HIDDEN})", "softmoe_parts.py", argv,
                        f"median of {args.rounds} rounds x {args.repeats} calls, the parts taking turns, on "
                        f"{cores} core(s) of the process.", table(measure(args.rounds, args.repeats)))
    print(text)
    if args.write:
        write_section(args.write, text, "softmoe_parts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
