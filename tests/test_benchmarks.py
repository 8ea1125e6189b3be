"""benchmarks/: what the scripts record, without running them."""

import json

import numpy as np

from benchmarks import common, gradient_noise


def test_noise_scale_writes_valid_json_when_the_signal_is_not_positive():
  # two opposite gradients: their product, the signal estimate, is negative
  r = gradient_noise.noise_scale(np.array([[1.0, 0.0], [-1.0, 0.0]]))
  assert r["signal_sq_norm"] < 0 and r["signal_nonpositive"] and r["b_noise"] is None
  assert json.loads(json.dumps(r, allow_nan=False))["b_noise"] is None  # no bare Infinity
  r = gradient_noise.noise_scale(np.array([[1.0, 0.0], [1.0, 2.0]]))
  assert not r["signal_nonpositive"]
  assert abs(r["b_noise"] - (r["mean_sq_norm"] - 1.0) / 1.0) < 1e-12  # signal g_0 . g_1 = 1


def test_run_info_records_the_device_unless_told_not_to():
  info = common.run_info(())
  assert info["backend"] == "cpu" and isinstance(info["device_kind"], str)
  assert "device_kind" not in common.run_info((), device=False)
