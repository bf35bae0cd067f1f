"""Tests for moescale.analysis.implicit_bias: the quick run's files, keys and invariants (keeping every
expert is the full model), the digits tokenization on hand-made images, the data split, the report's
readings of hand-made numbers and settings validation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from moescale.analysis import implicit_bias as ib
from moescale.train import supervised as sup

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("implicit_bias")
    result = ib.run_implicit_bias(out, quick=True, seed=0, progress=False)
    return out, result


# ------------------------------------------------------------------------------------------ quick run


class TestQuickRun:
    def test_files_and_keys(self, quick):
        out, result = quick
        assert json.loads((out / ib.JSON_NAME).read_text()) == result
        assert set(result) == {"paper", "seed", "quick", "settings", "digits", "regression", "figures",
                               "versions", "device", "wall_time_s"}
        assert result["seed"] == 0 and result["quick"] is True
        assert result["settings"]["digits"]["experts"] == list(ib.QUICK_DIGITS.experts)
        for name in result["figures"].values():
            assert (out / name).read_bytes()[:8] == PNG_MAGIC
        md = (out / ib.MD_NAME).read_text()
        assert md.startswith("## Implicit bias of Soft MoE")
        for needle in ("Seed 0", "quick run", f"]({ib.DIGITS_FIGURE})", f"]({ib.REGRESSION_FIGURE})",
                       "| n | k | k/n | best-k acc | random-k acc |", '"epochs": 10'):
            assert needle in md, needle

    def test_digits_accuracies(self, quick):
        _, result = quick
        digits = result["digits"]
        assert digits["train_size"] + digits["test_size"] == 1797
        assert [r["n"] for r in digits["runs"]] == list(ib.QUICK_DIGITS.experts)
        for r in digits["runs"]:
            assert r["expert_hidden"] * r["n"] == ib.QUICK_DIGITS.total_hidden
            assert 0.0 <= r["train_accuracy"] <= 1.0
            # 10 epochs already put the quick model far above chance (0.1)
            assert 0.5 < r["test_accuracy"] <= 1.0
            correct = r["test_accuracy"] * digits["test_size"]  # a whole number of test images
            assert correct == pytest.approx(round(correct), abs=1e-9)

    def test_keeping_all_experts_is_the_full_model(self, quick):
        _, result = quick
        runs = [r for r in result["digits"]["runs"] if r["n"] > 1]
        assert runs and all(r["subset"] is not None for r in runs)
        assert result["digits"]["runs"][0]["subset"] is None  # n = 1: nothing to drop
        for r in runs:
            sub, n = r["subset"], r["n"]
            assert sub["k"] == list(range(1, n + 1))
            assert sub["fraction_kept"] == [k / n for k in range(1, n + 1)]
            for key in ("best", "random_mean", "random_std"):
                assert len(sub[key]) == n
            assert all(0.0 <= a <= 1.0 for a in sub["best"] + sub["random_mean"])
            # k = n: best and every random draw keep all experts, which is the full model, exactly
            assert sub["best"][-1] == r["test_accuracy"]
            assert sub["random_mean"][-1] == r["test_accuracy"] and sub["random_std"][-1] == 0.0
            # dropping experts without renormalizing costs accuracy
            assert sub["best"][0] < r["test_accuracy"]

    def test_regression(self, quick):
        _, result = quick
        reg = result["regression"]
        assert [r["n"] for r in reg["runs"]] == list(ib.QUICK_REGRESSION.experts)
        assert reg["controls"] == []  # quick mode skips them
        # target variance: sum of 32 squared N(0, 1) is chi^2_32, variance 64; 512 test samples
        assert 40.0 < reg["target_test_variance"] < 90.0
        for r in reg["runs"]:
            assert np.isfinite(r["test_rel_mse"]) and 0.0 < r["test_rel_mse"] < 1.5
            assert 0.0 < r["train_rel_mse"] < 1.5


# ------------------------------------------------------------------------------------------- data


class TestDigitsData:
    def test_tokens_of_a_hand_made_image(self):
        # pixel (r, c) holds 10 r + c; 4x4 patches in row-major order, pixels row-major inside a patch
        img = (10 * np.arange(8)[:, None] + np.arange(8)[None, :]).astype(np.float32)
        tokens = sup.digits_tokens(np.stack([img, -img]))
        assert tokens.shape == (2, 4, 16)
        np.testing.assert_array_equal(tokens[0, 0], [0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23, 30, 31, 32, 33])
        np.testing.assert_array_equal(tokens[0, 1], [4, 5, 6, 7, 14, 15, 16, 17, 24, 25, 26, 27, 34, 35, 36, 37])
        np.testing.assert_array_equal(tokens[0, 2], [40, 41, 42, 43, 50, 51, 52, 53, 60, 61, 62, 63, 70, 71, 72,
                                                     73])
        np.testing.assert_array_equal(tokens[0, 3], [44, 45, 46, 47, 54, 55, 56, 57, 64, 65, 66, 67, 74, 75, 76,
                                                     77])
        np.testing.assert_array_equal(tokens[1], -tokens[0])  # each image keeps its own pixels
        # 2x2 patches: 16 tokens of 4; token 5 is patch row 1, patch col 1 -> pixels (2..3, 2..3)
        small = sup.digits_tokens(img[None], patch=2)
        assert small.shape == (1, 16, 4)
        np.testing.assert_array_equal(small[0, 5], [22, 23, 32, 33])
        np.testing.assert_array_equal(small[0, 15], [66, 67, 76, 77])
        with pytest.raises(ValueError, match=r"^patch="):
            sup.digits_tokens(img[None], patch=3)

    def test_split(self):
        x_train, y_train, x_test, y_test = sup.digits_split(0)
        assert x_train.shape == (1438, 4, 16) and x_test.shape == (359, 4, 16)
        assert x_train.dtype == np.float32 and x_train.min() >= 0.0 and x_train.max() == 1.0
        assert set(np.unique(y_train)) == set(range(10))
        again = sup.digits_split(0)
        np.testing.assert_array_equal(again[2], x_test)  # the seed fixes the split
        other = sup.digits_split(1)
        assert not np.array_equal(other[3], y_test)

    def test_squared_norm_data(self):
        x, y = sup.squared_norm_data(3, 5, 4, 8)
        assert x.shape == (5, 4, 8) and y.shape == (5,)
        np.testing.assert_allclose(y, [np.sum(x[i].astype(np.float64) ** 2) for i in range(5)], rtol=1e-6)
        np.testing.assert_array_equal(sup.squared_norm_data(3, 5, 4, 8)[0], x)

    def test_batch_order(self):
        order = sup.batch_order((0, 1), 10, epochs=3, batch_size=4)
        assert order.shape == (3, 2, 4) and order.dtype == np.int32
        for epoch in order:  # 8 distinct examples per epoch, the remainder 2 skipped
            assert len(set(epoch.ravel().tolist())) == 8 and epoch.max() < 10
        np.testing.assert_array_equal(sup.batch_order((0, 1), 10, 3, 4), order)


# ---------------------------------------------------------------------------------- report readings


def regression_result(mse: dict[int, float], controls: list[dict] | None = None) -> dict:
    runs = [{"n": n, "test_rel_mse": v} for n, v in mse.items()]
    return {"runs": runs, "controls": controls or []}


class TestReadings:
    def test_single_expert_fails(self):
        # 0.7 > FAIL_MSE = 0.1 and 0.7 / 0.002 = 350 >= GAP = 2
        lines = ib._regression_summary(regression_result({1: 0.7, 4: 0.3, 16: 0.002}))
        assert "n=16" in lines[0] and "350.0x lower" in lines[0] and "consistent with the paper's claim" in lines[0]

    @pytest.mark.parametrize("mse", [{1: 0.05, 16: 0.001}, {1: 0.5, 16: 0.3}])
    def test_no_gap(self, mse):
        # 0.05 <= FAIL_MSE: the single expert fits; 0.5 / 0.3 < GAP: no clear gap
        lines = ib._regression_summary(regression_result(mse))
        assert "not the gap the paper's claim predicts" in lines[0]

    def test_slot_controls(self):
        controls = [{"name": "1 expert, 4 slots", "slots_per_expert": 4, "test_rel_mse": 0.35},
                    {"name": "1 expert, 16 slots", "slots_per_expert": 16, "test_rel_mse": 0.1},
                    {"name": "flat MLP", "test_rel_mse": 0.03}]
        lines = ib._regression_summary(regression_result({1: 0.7, 4: 0.3, 16: 0.002}, controls))
        assert "the limit is the number of slots" in lines[1]  # 0.35 <= 2 x 0.3
        assert "the number of experts matters beyond" in lines[2]  # 0.1 * 2 <= 0.7, 0.1 > 2 x 0.002
        assert "flat MLP" in lines[3]

    def test_digits_readings(self):
        digits = {"runs": [{"n": 1, "test_accuracy": 0.9, "subset": None},
                           {"n": 4, "test_accuracy": 0.8, "subset": {
                               "k": [1, 2, 3, 4], "best": [0.4, 0.6, 0.7, 0.8],
                               "random_mean": [0.3, 0.65, 0.6, 0.8]}}]}
        lines = ib._digits_summary(digits)
        # n/8 = 0.5 -> k = 1, n/2 -> k = 2; best-k 0.4 / 0.8 = 50%
        assert lines[0].startswith("- n=4, k=1 of 4: best-k keeps 50.0%")
        assert lines[1].startswith("- n=4, k=2 of 4")
        assert lines[2] == "- Best-k is below the random-k mean at 1 of 3 (n, k < n) pairs: n=4 k=2."


class TestSettings:
    @pytest.mark.parametrize("make, field", [
        (lambda: ib.DigitsSettings(experts=(3,)), "digits.experts"),  # 3 does not divide 256
        (lambda: ib.DigitsSettings(experts=()), "digits.experts"),
        (lambda: ib.DigitsSettings(patch=3), "digits.patch"),
        (lambda: ib.DigitsSettings(test_fraction=1.0), "digits.test_fraction"),
        (lambda: ib.DigitsSettings(random_draws=0), "digits.random_draws"),
        (lambda: ib.RegressionSettings(dim=0), "regression.dim"),
        (lambda: ib.RegressionSettings(train_size=64, batch_size=128), "regression.batch_size"),
        (lambda: ib.RegressionSettings(learning_rate=-1.0), "regression.learning_rate"),
    ])
    def test_bad_settings(self, make, field):
        with pytest.raises(ValueError, match="^" + field.replace(".", r"\.") + "="):
            make()

    def test_bad_seed(self, tmp_path):
        with pytest.raises(ValueError, match=r"^seed="):
            ib.run_implicit_bias(tmp_path, quick=True, seed=-1, progress=False)
