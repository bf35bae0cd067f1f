"""A small supervised reproduction of the implicit bias of Soft MoE (Chung et al., TMLR 2025, arXiv 2409.00879).

Two experiments, each with a fixed total expert width while the number of experts n varies:

1. Digits classification (scikit-learn's bundled 8x8 digits, nothing downloaded): each image is cut into
   four 4x4 patches, giving 4 tokens of 16 pixels (the paper's small setting cuts MNIST into four 14x14
   patches); a Soft MoE with one slot per expert and bias-free 2-layer ReLU experts, then a linear
   classifier on the flattened tokens. Test accuracy per n, and with only the best-k experts per input
   (expert-subset inference, moescale.analysis.expert_subset) against k experts drawn at random.
2. Regression of the sum of squared entries of Gaussian tokens: with one expert and one slot every token
   receives the same slot output (its combine weight is 1), so the prediction is a function of one convex
   mix of the tokens, which does not determine the target (the paper's single-expert limit).

The data, models and training loop are moescale.train.supervised's; this module runs the experiments,
measures them and writes the results (implicit_bias.json, .md and figures).

Axes: N examples, T tokens, D token dim, E experts (n), S slots per expert, K experts kept, R random draws.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moescale import checks
from moescale.analysis.expert_subset import soft_moe_subset_apply
from moescale.train.supervised import (
    FlatMLP,
    TokenClassifier,
    TokenRegressor,
    batch_order,
    count_params,
    digits_split,
    jit_small,
    squared_norm_data,
    train,
)

PAPER = "Chung et al., TMLR 2025, arXiv 2409.00879"
JSON_NAME, MD_NAME = "implicit_bias.json", "implicit_bias.md"
DIGITS_FIGURE, REGRESSION_FIGURE = "implicit_bias_digits.png", "implicit_bias_regression.png"
# A single expert "fails" in the report's wording when its relative test MSE is above FAIL_MSE and at least
# GAP times that of the best multi-expert layer; both thresholds are printed in the report.
FAIL_MSE, GAP = 0.1, 2.0
# numpy streams are seeded with (seed, stream, ...); the stream tags are nonzero because numpy's SeedSequence
# ignores trailing zeros ((0, 0) seeds the same generator as 0). SPLIT_STREAM (1) is the digits split's.
DIGITS_BATCH_STREAM, TRAIN_STREAM, TEST_STREAM, REGRESSION_BATCH_STREAM = 2, 3, 4, 5


def _check_experts(field: str, experts: tuple[int, ...], total_hidden: int) -> None:
    checks.positive_ints(field, experts)
    checks.positive_int(field.split(".")[0] + ".total_hidden", total_hidden)
    if any(total_hidden % n for n in experts):
        checks.fail(field, experts, f"each count must divide total_hidden={total_hidden}")


@dataclasses.dataclass(frozen=True)
class DigitsSettings:
    """Digits classification: Soft MoE (one slot per expert, bias-free experts) + linear head."""

    experts: tuple[int, ...] = (1, 2, 4, 8, 16)
    total_hidden: int = 256  # summed over experts: each expert has total_hidden / n hidden units
    patch: int = 4  # 8x8 images -> (8 / patch)^2 tokens of patch^2 pixels
    test_fraction: float = 0.2
    batch_size: int = 64
    epochs: int = 150
    learning_rate: float = 3e-3  # Adam, cosine-decayed to 0 over training
    random_draws: int = 5  # random-subset draws averaged per k

    def __post_init__(self) -> None:
        _check_experts("digits.experts", self.experts, self.total_hidden)
        if not checks.is_int(self.patch) or self.patch < 1 or 8 % self.patch:
            checks.fail("digits.patch", self.patch, "must divide 8 (the digits are 8x8)")
        if not isinstance(self.test_fraction, float) or not 0.0 < self.test_fraction < 1.0:
            checks.fail("digits.test_fraction", self.test_fraction, "must be a float in (0, 1)")
        checks.positive_int("digits.batch_size", self.batch_size)
        checks.positive_int("digits.epochs", self.epochs)
        checks.positive_number("digits.learning_rate", self.learning_rate)
        checks.positive_int("digits.random_draws", self.random_draws)


@dataclasses.dataclass(frozen=True)
class RegressionSettings:
    """Regression of sum(X**2) over Gaussian tokens: Soft MoE (one slot per expert) + linear token readout."""

    experts: tuple[int, ...] = (1, 2, 4, 8, 16)
    tokens: int = 4
    dim: int = 8
    total_hidden: int = 256
    expert_bias: bool = True  # an expert as strong as it can be: the limit tested is the slot, not the MLP
    train_size: int = 32768
    test_size: int = 4096
    batch_size: int = 128
    epochs: int = 40
    learning_rate: float = 3e-3
    controls: bool = True  # also fit one expert with more slots, and a flat MLP (see run_regression)

    def __post_init__(self) -> None:
        _check_experts("regression.experts", self.experts, self.total_hidden)
        for name in ("tokens", "dim", "train_size", "test_size", "batch_size", "epochs"):
            checks.positive_int(f"regression.{name}", getattr(self, name))
        checks.positive_number("regression.learning_rate", self.learning_rate)
        if self.batch_size > self.train_size:
            checks.fail("regression.batch_size", self.batch_size, f"must be <= train_size={self.train_size}")


# Quick mode (tests): seconds, most of them XLA compiles, one per model.
QUICK_DIGITS = DigitsSettings(experts=(1, 2), epochs=10, random_draws=2)
QUICK_REGRESSION = RegressionSettings(experts=(1, 2), train_size=1024, test_size=512, epochs=5, controls=False)


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[implicit-bias] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ digits


def subset_correct(model: TokenClassifier, params: Any, x: jax.Array, labels: jax.Array, keys: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    """Correct test predictions with only the best-k experts per input, (n,), and k random ones, (R, n).

    k = 1..n (Chung et al. 2025's expert-subset inference against their random baseline); keys (R,) draw
    the random subsets, independently per input.
    """
    def correct(k: int, mode: str, key: jax.Array | None) -> jax.Array:
        out = soft_moe_subset_apply(params["moe"], x, k, mode=mode, key=key)
        logits = model.apply({"params": params}, out, method=TokenClassifier.classify)
        return jnp.sum(jnp.argmax(logits, axis=-1) == labels)

    ks = range(1, model.num_experts + 1)
    best = jnp.stack([correct(k, "best", None) for k in ks])
    random = jnp.stack([jax.vmap(lambda key, k=k: correct(k, "random", key))(keys) for k in ks], axis=1)
    return best, random


def _digits_job(model: TokenClassifier, settings: DigitsSettings, data: tuple[jax.Array, ...],
                batches: jax.Array, key: jax.Array) -> tuple[Any, dict]:
    """Init, train and evaluate one classifier (one program to compile: XLA:CPU compiles are the cost)."""
    x_train, y_train, x_test, y_test = data
    init_key, draw_key = jax.random.split(key)
    params = model.init(init_key, x_train[:1])["params"]

    def loss_fn(p, xb, yb):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, xb), yb))

    params, losses = train(loss_fn, params, x_train, y_train, batches, settings.learning_rate)

    def n_correct(xs, ys):
        return jnp.sum(jnp.argmax(model.apply({"params": params}, xs), axis=-1) == ys)

    out = {"losses": losses, "train_correct": n_correct(x_train, y_train), "test_correct": n_correct(x_test, y_test)}
    if model.num_experts > 1:
        keys = jax.random.split(draw_key, settings.random_draws)
        out["best_correct"], out["random_correct"] = subset_correct(model, params, x_test, y_test, keys)
    return params, out


def run_digits(settings: DigitsSettings, seed: int, progress: bool = False) -> dict:
    """Train one classifier per expert count and measure expert-subset accuracies (see module docstring)."""
    x_train, y_train, x_test, y_test = digits_split(seed, settings.test_fraction, settings.patch)
    data = tuple(jnp.asarray(a) for a in (x_train, y_train, x_test, y_test))
    n_train, n_test = len(y_train), len(y_test)
    root = jax.random.key(seed)
    runs = []
    for n in settings.experts:
        start = time.perf_counter()
        model = TokenClassifier(n, settings.total_hidden // n)
        job = jit_small(lambda d, b, k, model=model: _digits_job(model, settings, d, b, k))
        batches = batch_order((seed, DIGITS_BATCH_STREAM, n), n_train, settings.epochs, settings.batch_size)
        params, out = jax.device_get(job(data, batches, jax.random.fold_in(root, n)))
        # Accuracies are integer counts divided on the host, so equal counts give equal floats.
        run = {"n": n, "expert_hidden": settings.total_hidden // n, "params": count_params(params),
               "expert_params": count_params(params["moe"]["experts"]), "final_train_loss": float(out["losses"][-1]),
               "train_accuracy": int(out["train_correct"]) / n_train,
               "test_accuracy": int(out["test_correct"]) / n_test, "subset": None}
        if n > 1:
            random = np.asarray(out["random_correct"], np.float64) / n_test  # (R, n)
            run["subset"] = {
                "k": list(range(1, n + 1)),
                "fraction_kept": [k / n for k in range(1, n + 1)],
                "best": [int(c) / n_test for c in out["best_correct"]],
                "random_mean": [float(a) for a in random.mean(axis=0)],
                "random_std": [float(a) for a in random.std(axis=0)],
                "random_draws": settings.random_draws,
            }
        runs.append(run)
        _log(progress, f"digits n={n}: test accuracy {run['test_accuracy']:.4f} "
                       f"({time.perf_counter() - start:.1f} s)")
    return {"train_size": n_train, "test_size": n_test, "num_tokens": int(x_train.shape[1]),
            "token_dim": int(x_train.shape[2]), "runs": runs}


# -------------------------------------------------------------------------------------- regression


def _regression_job(model: nn.Module, settings: RegressionSettings, data: tuple[jax.Array, ...],
                    batches: jax.Array, key: jax.Array) -> tuple[Any, dict]:
    """Init and train one regressor (on standardized targets); its train and test predictions, unstandardized."""
    x_train, y_train, x_test, y_test = data
    mean, std = jnp.mean(y_train), jnp.std(y_train)
    params = model.init(key, x_train[:1])["params"]

    def loss_fn(p, xb, yb):
        return jnp.mean((model.apply({"params": p}, xb) - yb) ** 2)

    params, losses = train(loss_fn, params, x_train, (y_train - mean) / std, batches, settings.learning_rate)

    def predict(xs):
        return model.apply({"params": params}, xs) * std + mean

    return params, {"losses": losses, "train_pred": predict(x_train), "test_pred": predict(x_test)}


def _rel_mse(pred: np.ndarray, y: np.ndarray) -> float:
    y = np.asarray(y, np.float64)
    return float(np.mean((np.asarray(pred, np.float64) - y) ** 2) / np.var(y))


def run_regression(settings: RegressionSettings, seed: int, progress: bool = False) -> dict:
    """Fit sum(X**2) with Soft MoE regressors per expert count, plus two controls (see module docstring)."""
    s = settings
    x_train, y_train = squared_norm_data((seed, TRAIN_STREAM), s.train_size, s.tokens, s.dim)
    x_test, y_test = squared_norm_data((seed, TEST_STREAM), s.test_size, s.tokens, s.dim)
    data = tuple(jnp.asarray(a) for a in (x_train, y_train, x_test, y_test))
    root = jax.random.fold_in(jax.random.key(seed), 1)
    # Controls: one expert with T slots and with as many slots as the largest n (is the limit the single
    # expert or its single slot?), and a plain MLP of the same width on the whole input (can this width and
    # data fit the target at all?).
    models = [(f"n={n}", {"n": n, "slots_per_expert": 1, "expert_hidden": s.total_hidden // n},
               TokenRegressor(n, s.total_hidden // n, 1, s.expert_bias), n) for n in s.experts]
    if s.controls:
        for slots in sorted({s.tokens, max(s.experts)} - {1}):
            name = f"1 expert, {slots} slots"
            models.append((name, {"name": name, "slots_per_expert": slots},
                           TokenRegressor(1, s.total_hidden, slots, s.expert_bias), 1000 + slots))
        models.append(("flat MLP", {"name": "flat MLP"}, FlatMLP(s.total_hidden), 1000))
    runs, controls = [], []
    for label, row, model, salt in models:
        start = time.perf_counter()
        job = jit_small(lambda d, b, k, model=model: _regression_job(model, s, d, b, k))
        batches = batch_order((seed, REGRESSION_BATCH_STREAM, salt), s.train_size, s.epochs, s.batch_size)
        params, out = jax.device_get(job(data, batches, jax.random.fold_in(root, salt)))
        row = {**row, "params": count_params(params), "final_train_loss": float(out["losses"][-1]),
               "train_rel_mse": _rel_mse(out["train_pred"], y_train),
               "test_rel_mse": _rel_mse(out["test_pred"], y_test)}
        (runs if "n" in row else controls).append(row)
        _log(progress, f"regression {label}: test MSE / variance {row['test_rel_mse']:.4f} "
                       f"({time.perf_counter() - start:.1f} s)")
    return {"target": "sum of squared entries of X (T x D Gaussian tokens)",
            "target_test_variance": float(np.var(y_test.astype(np.float64))),
            "runs": runs, "controls": controls}


# ------------------------------------------------------------------------------------------ report


def _figure(*size: float) -> Any:
    # matplotlib's object API renders PNGs with Agg and leaves pyplot's global backend and state alone.
    from matplotlib.figure import Figure

    return Figure(figsize=size)


def _digits_figure(digits: dict, path: Path) -> None:
    import matplotlib

    fig = _figure(10, 4)
    ax0, ax1 = fig.subplots(1, 2)
    runs = digits["runs"]
    ax0.plot([r["n"] for r in runs], [r["test_accuracy"] for r in runs], "o-", color="k")
    ax0.set_xscale("log", base=2)
    ax0.set_xlabel("experts n (total expert width fixed)")
    ax0.set_ylabel("test accuracy")
    ax0.set_title("Digits: full Soft MoE")
    colors = matplotlib.colormaps["viridis"]
    multi = [r for r in runs if r["subset"] is not None]
    for i, r in enumerate(multi):
        c = colors(i / max(1, len(multi) - 1))
        sub = r["subset"]
        ax1.plot(sub["fraction_kept"], sub["best"], "o-", color=c, label=f"n={r['n']} best-k")
        ax1.errorbar(sub["fraction_kept"], sub["random_mean"], yerr=sub["random_std"], fmt="s--", color=c,
                     alpha=0.6, label=f"n={r['n']} random k")
    ax1.set_xlabel("fraction of experts kept k/n")
    ax1.set_ylabel("test accuracy")
    ax1.set_title("Expert-subset inference")
    ax1.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _regression_figure(regression: dict, path: Path) -> None:
    fig = _figure(5.5, 4)
    ax = fig.subplots()
    runs = regression["runs"]
    ax.plot([r["n"] for r in runs], [r["test_rel_mse"] for r in runs], "o-", color="k",
            label="Soft MoE, one slot per expert")
    for c, style in zip(regression["controls"], ("--", ":", "-."), strict=False):
        ax.axhline(c["test_rel_mse"], linestyle=style, color="gray", label=c["name"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("experts n (total expert width fixed)")
    ax.set_ylabel("test MSE / target variance")
    ax.set_title("Regression of sum(X**2)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _closest(values: list[int], target: float) -> int:
    return min(values, key=lambda v: (abs(v - target), v))


def _digits_summary(digits: dict) -> list[str]:
    lines, below = [], []
    pairs = 0
    for r in digits["runs"]:
        if r["subset"] is None:
            continue
        sub, n, full = r["subset"], r["n"], r["test_accuracy"]
        for k in sorted({_closest(sub["k"], frac * n) for frac in (0.125, 0.5)}):
            best, rnd = sub["best"][k - 1], sub["random_mean"][k - 1]
            lines.append(f"- n={n}, k={k} of {n}: best-k keeps {best / full:.1%} of the full accuracy "
                         f"({best:.4f}), random k {rnd / full:.1%} ({rnd:.4f}).")
        for k in sub["k"][:-1]:
            pairs += 1
            if sub["best"][k - 1] < sub["random_mean"][k - 1]:
                below.append(f"n={n} k={k}")
    if pairs:
        lines.append(f"- Best-k is below the random-k mean at {len(below)} of {pairs} (n, k < n) pairs"
                     + (f": {', '.join(below)}." if below else "."))
    return lines


def _regression_summary(regression: dict) -> list[str]:
    mse = {r["n"]: r["test_rel_mse"] for r in regression["runs"]}
    if 1 not in mse or len(mse) < 2:
        return ["- The run needs n=1 and some n>1 to compare the single expert with many."]
    n_best = min((n for n in mse if n > 1), key=lambda n: mse[n])
    ratio = mse[1] / mse[n_best]
    verdict = ("consistent with the paper's claim: the single expert, with the full width, fits the target "
               "far worse than many smaller experts" if mse[1] > FAIL_MSE and ratio >= GAP else
               "not the gap the paper's claim predicts at this scale")
    lines = [f"- One expert: test MSE / variance {mse[1]:.4f}; best multi-expert layer n={n_best}: "
             f"{mse[n_best]:.4f} ({ratio:.1f}x lower). Reading (one expert fails if its relative MSE > "
             f"{FAIL_MSE} and >= {GAP}x the best multi-expert layer's): {verdict}."]
    for c in regression["controls"]:
        slots, got = c.get("slots_per_expert"), c["test_rel_mse"]
        if slots is None:
            lines.append(f"- {c['name']} of the same width on the whole flattened input: {got:.4f} (how well this"
                         " width and data set fit the target without the Soft MoE layer).")
            continue
        if slots in mse and got <= GAP * mse[slots]:
            reading = (f"within {GAP}x of {slots} experts with one slot each ({mse[slots]:.4f}): at this slot "
                       "count the limit is the number of slots, not of experts")
        elif got * GAP <= mse[1]:
            reading = (f"more slots help the single expert (>= {GAP}x lower than one slot)"
                       + (f", but {slots} experts with one slot each do >= {GAP}x better still "
                          f"({mse[slots]:.4f}): the number of experts matters beyond the number of slots"
                          if slots in mse else ""))
        else:
            reading = f"more slots do not rescue the single expert (less than {GAP}x lower than one slot)"
        lines.append(f"- {c['name']}: {got:.4f}; {reading}.")
    return lines


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def write_markdown(result: dict, path: Path) -> None:
    """The report section: what was run, the settings and seed, tables, figure links and readings."""
    d, r = result["settings"]["digits"], result["settings"]["regression"]
    digits, regression = result["digits"], result["regression"]
    out = [
        f"## Implicit bias of Soft MoE: supervised reproduction ({PAPER})",
        "",
        f"Seed {result['seed']}, {'quick' if result['quick'] else 'full'} run, {result['device']}, "
        f"wall time {result['wall_time_s']:.1f} s. Versions: "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
        "",
        "### 1. Digits classification and expert-subset inference",
        "",
        f"scikit-learn's bundled digits ({digits['train_size']} train / {digits['test_size']} test images, "
        f"split by the seed), each 8x8 image cut into {digits['num_tokens']} patches of {d['patch']}x{d['patch']}"
        f" -> {digits['num_tokens']} tokens of {digits['token_dim']} pixels (scaled to [0, 1]). Model: Soft MoE "
        f"with n experts, one slot per expert, bias-free Dense-ReLU-Dense experts of {d['total_hidden']}/n "
        "hidden units each (total expert width fixed), then a linear classifier on the flattened output "
        f"tokens. Adam, learning rate {d['learning_rate']} cosine-decayed to 0, batch {d['batch_size']}, "
        f"{d['epochs']} epochs. Expert-subset inference: per test image, keep the k experts with the largest "
        "total combine weight (sum over tokens and slots), compute only those, leave the combine weights "
        f"as they are; baseline: k experts drawn uniformly at random per image ({d['random_draws']} draws, "
        "mean +- std).",
        "",
        *_table(["n", "hidden per expert", "params", "train acc", "test acc"],
                [[str(x["n"]), str(x["expert_hidden"]), str(x["params"]), f"{x['train_accuracy']:.4f}",
                  f"{x['test_accuracy']:.4f}"] for x in digits["runs"]]),
        "",
        *_table(["n", "k", "k/n", "best-k acc", "random-k acc"],
                [[str(x["n"]), str(k), f"{f:.3f}", f"{b:.4f}", f"{m:.4f} +- {s:.4f}"]
                 for x in digits["runs"] if x["subset"] is not None
                 for k, f, b, m, s in zip(x["subset"]["k"], x["subset"]["fraction_kept"], x["subset"]["best"],
                                          x["subset"]["random_mean"], x["subset"]["random_std"], strict=True)]),
        "",
        f"![Digits: accuracy per n and with k of n experts kept]({DIGITS_FIGURE})",
        "",
        *_digits_summary(digits),
        "",
        "### 2. Regression: the single-expert limit",
        "",
        f"Inputs X: {r['tokens']} tokens of dimension {r['dim']}, i.i.d. N(0, 1) entries ({r['train_size']} train,"
        f" {r['test_size']} test, fixed by the seed); target sum(X**2), a convex function (test variance "
        f"{regression['target_test_variance']:.2f}). Model: Soft MoE with n experts, one slot per expert, "
        f"Dense-ReLU-Dense experts ({'with' if r['expert_bias'] else 'without'} biases) of "
        f"{r['total_hidden']}/n hidden units each; output = sum over tokens of one shared linear readout of "
        "each output token. The readout is linear and nothing bypasses the layer, so with n = 1 every token "
        "receives the same slot output (its combine weight is 1) and the prediction is a function of that "
        "single slot, a convex mix of the tokens that does not determine sum(X**2) (e.g. tokens v, -v, 0, 0 "
        "orthogonal to Phi give the same slot as all-zero tokens). The experts keep their biases here, to make "
        "the single expert as strong as an MLP of its width can be (bias-free ReLU experts are positively "
        "homogeneous, a limit of their own that would blur this test). Controls: one expert of the full width "
        "with several slots (is the limit the single expert or its single slot?) and a plain Dense-ReLU-Dense "
        "MLP of the same hidden width on the flattened input (can this width and data fit the target at "
        "all?). Targets standardized on the training set; "
        f"Adam, learning rate {r['learning_rate']} cosine-decayed, batch {r['batch_size']}, {r['epochs']} "
        "epochs. Reported: MSE divided by the target variance (1.0 = predicting the mean).",
        "",
        *_table(["model", "params", "train MSE / var", "test MSE / var"],
                [[f"Soft MoE n={x['n']} ({x['expert_hidden']} hidden each)", str(x["params"]),
                  f"{x['train_rel_mse']:.4f}", f"{x['test_rel_mse']:.4f}"] for x in regression["runs"]]
                + [[f"control: {c['name']}", str(c["params"]), f"{c['train_rel_mse']:.4f}",
                    f"{c['test_rel_mse']:.4f}"] for c in regression["controls"]]),
        "",
        f"![Regression: test MSE / variance per n]({REGRESSION_FIGURE})",
        "",
        *_regression_summary(regression),
        "",
        "Settings (all of them, as run):",
        "",
        "```",
        *(f"{name}: {json.dumps(value)}" for name, value in result["settings"].items()),
        "```",
        "",
    ]
    path.write_text("\n".join(out))


def _versions() -> dict[str, str]:
    import matplotlib
    import sklearn

    return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "scikit-learn": sklearn.__version__, "matplotlib": matplotlib.__version__}


def run_implicit_bias(out_dir: Path, quick: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """Run both experiments, write implicit_bias.json, implicit_bias.md and the figures; return the json dict.

    quick uses fewer experts, epochs and examples (seconds, for tests); the same seed gives the same
    numbers (only wall_time_s differs between runs).
    """
    checks.int_at_least("seed", seed, 0)
    start = time.perf_counter()
    digits_settings = QUICK_DIGITS if quick else DigitsSettings()
    regression_settings = QUICK_REGRESSION if quick else RegressionSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    digits = run_digits(digits_settings, seed, progress)
    regression = run_regression(regression_settings, seed, progress)
    device = jax.devices()[0]
    kind = str(device.device_kind)
    result = {
        "paper": PAPER,
        "seed": seed,
        "quick": quick,
        "settings": {"digits": dataclasses.asdict(digits_settings),
                     "regression": dataclasses.asdict(regression_settings)},
        "digits": digits,
        "regression": regression,
        "figures": {"digits": DIGITS_FIGURE, "regression": REGRESSION_FIGURE},
        "versions": _versions(),
        "device": device.platform if kind == device.platform else f"{device.platform} ({kind})",
    }
    _digits_figure(digits, out_dir / DIGITS_FIGURE)
    _regression_figure(regression, out_dir / REGRESSION_FIGURE)
    result["wall_time_s"] = round(time.perf_counter() - start, 2)
    result = json.loads(json.dumps(result))  # the dict returned is the file's content (tuples become lists)
    (out_dir / JSON_NAME).write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, out_dir / MD_NAME)
    _log(progress, f"wrote {out_dir / JSON_NAME}, {out_dir / MD_NAME} ({result['wall_time_s']:.1f} s)")
    return result
