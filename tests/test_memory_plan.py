"""`asearcher plan`: per-device memory by hand on a small config, against XLA's own buffer
assignment on a compiled learner step, refusal of a config that does not fit (naming its
biggest item), and the realistic configs fitting the hardware they name."""

import glob
import json
import os

import jax
import numpy as np
import pytest
from conftest import single_device_mesh

from asearcher_jax.cli import main
from asearcher_jax.config import load_config
from asearcher_jax.errors import ShardingError
from asearcher_jax.memory_plan import GiB, PlanError, param_elements, plan, with_remat
from asearcher_jax.models import create_model
from asearcher_jax.rl.batch import TrainBatch
from asearcher_jax.rl.step import make_ppo_step
from asearcher_jax.train.optimizer import make_optimizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SMALL = {"family": "qwen3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
         "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16,
         "tie_embeddings": False}


def small(*overrides):
  return load_config(None, [f"model.arch={json.dumps(SMALL)}", *overrides])


def items(group) -> dict[str, int]:
  return {i.name.split(" (")[0]: i.bytes for i in group.items}


def test_parameters_optimizer_gradients_and_caches_by_hand():
  # Per device under fsdp=2: embed 64x32 and lm_head 32x64 halve (1024 + 1024), final_norm 32
  # does not; per layer (x2): wqkv 32x1x(2+2)x16 /2 = 1024, wo 32x16x2 /2 = 512, w_gate_up
  # 32x2x64 /2 = 2048, w_down 1024, attn_norm and mlp_norm 32, q_norm and k_norm 16.
  per_layer = 1024 + 512 + 2048 + 1024 + 2 * 32 + 2 * 16
  assert param_elements(small().model.arch, {"data": 1, "fsdp": 2, "tensor": 1}) \
      == 1024 + 1024 + 32 + 2 * per_layer == 11488
  cfg = small("model.dtype=bfloat16", "serve.slots=4", "serve.max_len=64",
              "serve.device_sessions=3", "placement.decode_mesh={data: 1, fsdp: 1, tensor: 1}")
  p = plan(cfg, devices=2, decode_devices=1, device_memory_gib=1, platform="cpu")
  learner, decode = (items(g) for g in p.groups)
  n = 11488
  assert learner["parameters"] == 4 * n  # float32 master weights
  assert learner["optimizer state"] == 3 * 4 * n  # mu, nu and the update
  assert learner["gradients"] == (4 + 4) * n  # float32 accumulator + one micro-batch's
  assert learner["layer weights in bfloat16"] == 2 * 2 * per_layer  # cast once a step
  full = small().model.arch.num_params()
  assert decode["parameters"] == decode["parameters of the next version"] == 4 * full
  # keys and values: 2 x 2 layers x 1 kv head x 16 x 2 bytes (bf16) = 128 bytes a token, in
  # (4 slots + 3 device sessions) x 64 / 16 pages of 16 tokens and the sink page
  assert decode["KV pages"] == ((4 + 3) * 4 + 1) * 16 * 128
  fewer = plan(small("model.dtype=bfloat16", "serve.slots=4", "serve.max_len=64",
                     "serve.kv_pages=10", "serve.page_size=8"),
               devices=2, decode_devices=1, device_memory_gib=1, platform="cpu")
  assert items(fewer.groups[1])["KV pages"] == (10 + 1) * 8 * 128
  assert p.groups[0].budget == int(GiB * 0.9 * 0.6)  # colocated: the learner's share


def test_activations_by_hand_for_full_remat_and_xla_attention():
  cfg = small("rl.row_tokens=128", "rl.micro_batch_rows=4", "model.remat=full",
              "model.dtype=float32", "model.attention=xla")
  learner = items(plan(cfg, devices=2, device_memory_gib=1, platform="cpu").groups[0])
  rows, T, E, F, N, K, D, L = 2, 128, 32, 64, 2, 1, 16, 2  # 4 rows over fsdp=2
  live = rows * T * 4 * (4 * E + 3 * (N + K) * D + 4 * F) + rows * N * T * T * (12 + 4)
  assert learner["activations"] == L * rows * T * 4 * E + live + rows * T * T
  # one chunk (here the whole 128-position row: 4 x 128 x 64 fits the chunk budget) of
  # float32 logits, their softmax and their gradient
  assert learner["LM head"] == 3 * rows * T * 64 * 4


@pytest.mark.parametrize("remat", ["none", "attention"])
def test_the_pallas_kernels_are_planned_like_blockwise_attention(remat):
  """None holds a [T, T] mask or scores, only each layer's output and its lse; with nothing
  recomputed the Pallas kernels also keep their own inputs (kv heads repeated to the query
  heads, rows padded to whole tiles: SMALL's 1 kv head for 2 query heads), which blockwise
  attention reads where the layer left them."""
  acts = {impl: items(plan(small("rl.row_tokens=512", f"model.remat={remat}",
                                 f"model.attention={impl}"), devices=1, device_memory_gib=1,
                           platform="gpu").groups[0])["activations"]
          for impl in ("blockwise", "pallas", "splash", "xla")}
  assert acts["pallas"] == acts["splash"] < acts["xla"]
  assert acts["blockwise"] < acts["pallas"]
  if remat == "none":  # per token and layer: q, the output, and k and v repeated to N heads
    # (bfloat16), the float32 lse of each head, and the positions and segment ids (int32)
    rows, T, N, D, L = 4, 512, 2, 16, 2
    assert acts["pallas"] - acts["blockwise"] == L * rows * T * (2 * 2 * (N + N) * D + 4 * N + 8)


def test_auto_attention_takes_each_platforms_kernel_and_tpu_rows_hold_no_scores():
  """`auto`: cuDNN on GPUs (bf16), splash on TPUs, blockwise on CPUs; so the TPU configs'
  learner plans 16k-token rows with no [T, T] scores, a fifth of XLA's activations."""
  from asearcher_jax.models.attention import resolve_impl_for
  assert resolve_impl_for("auto", "gpu", "bfloat16", 128) == "cudnn"
  assert resolve_impl_for("auto", "gpu", "float32", 128) == "xla"
  assert resolve_impl_for("auto", "tpu", "bfloat16", 128) == "splash"
  assert resolve_impl_for("auto", "tpu", "bfloat16", 64) == "splash"
  assert resolve_impl_for("auto", "cpu", "float32", 32) == "blockwise"
  assert resolve_impl_for("xla", "tpu", "bfloat16", 128) == "xla"
  path = os.path.join(ROOT, "configs", "qwen2.5-14b-v5p.yaml")
  acts, prefill = {}, {}
  for impl in ("auto", "xla"):  # the config's placement.platform: tpu, on this CPU too
    learner, server = plan(load_config(path, [f"model.attention={impl}",
                                              "model.remat=full"])).groups
    acts[impl] = next((i.name, i.bytes) for i in learner.items
                      if i.name.startswith("activations"))
    prefill[impl] = next((i.name, i.bytes) for i in server.items if "prefill" in i.name)
  assert "attention splash" in acts["auto"][0] and "attention xla" in acts["xla"][0]
  assert acts["auto"][1] < acts["xla"][1] / 5
  # a prefill attends through its KV cache's mask: XLA either way
  assert prefill["auto"] == prefill["xla"] and "attention xla" in prefill["auto"][0]


def test_plan_takes_the_configs_platform_and_a_run_its_own():
  """`asearcher plan` resolves `auto` for placement.platform wherever it runs; a run resolving
  its remat (resolve_remat) plans for the machine it runs on. Here the device is sized so
  that remat none fits with this CPU's blockwise attention but not with a TPU's splash, which
  keeps its own copies of q, k and v (4 query heads over 1 kv head)."""
  from asearcher_jax.memory_plan import resolve_remat
  arch = dict(SMALL, num_heads=4)
  cfg = load_config(None, [f"model.arch={json.dumps(arch)}", "rl.row_tokens=1024",
                           "placement.platform=tpu", "placement.num_devices=1",
                           "placement.device_memory_gib=0.037"])
  written_for = plan(cfg)
  assert written_for.platform == "tpu" and written_for.remat != "none"
  if jax.default_backend() != "cpu":
    pytest.skip("sized for this CPU's blockwise attention")
  assert plan(cfg, platform="cpu").remat == "none"
  assert resolve_remat(cfg).model.remat == "none"


@pytest.mark.parametrize("remat,attention,dtype", [
    ("none", "xla", "float32"), ("full", "xla", "float32"), ("none", "blockwise", "float32"),
    ("full", "blockwise", "bfloat16"), ("attention", "blockwise", "float32"),
    ("dots", "blockwise", "float32")])
def test_learner_estimate_tracks_xla_buffer_assignment(remat, attention, dtype):
  """The plan against what XLA allocates for the compiled step (arguments + temporaries)."""
  cfg = small("model.arch.num_layers=4", "model.arch.hidden_size=128",
              "model.arch.intermediate_size=256", "model.arch.num_heads=4",
              "model.arch.num_kv_heads=2", "model.arch.vocab_size=512", f"model.remat={remat}",
              f"model.dtype={dtype}", f"model.attention={attention}", "rl.row_tokens=512",
              "rl.micro_batch_rows=2")
  est = plan(cfg, devices=1, device_memory_gib=1, platform="cpu").groups[0].total
  mesh = single_device_mesh()
  model = create_model(cfg.model.arch, mesh, dtype=dtype, attention_impl=attention,
                       remat=remat)
  params, opt_state, step = make_ppo_step(model, make_optimizer(cfg.optimizer), cfg.rl)
  shape = (2, 2, 512)  # two micro-batches of two rows

  def sds(dtype, s=shape):
    return jax.ShapeDtypeStruct(s, dtype)

  # the learner's batch, its LM head on loss positions at the widest (every position: C = T)
  batch = TrainBatch(sds(np.int32), sds(np.int32), sds(np.int32), sds(bool), sds(np.float32),
                     sds(np.float32), sds(np.int32), sds(np.int32, ()), sds(np.int32, ()),
                     select=sds(np.int32))
  memory = step.lower(params, opt_state, batch).compile().memory_analysis()
  xla = memory.temp_size_in_bytes + memory.argument_size_in_bytes
  assert 0.8 * xla < est < 1.4 * xla, (est / 2**20, xla / 2**20)


@pytest.mark.parametrize("max_len,prefill_tokens", [(128, 64), (256, 128), (2048, 256)])
def test_prefill_estimate_tracks_xla_buffer_assignment(max_len, prefill_tokens):
  """The decode server's largest prefill against what XLA allocates for the driver's two
  batched prefills at serve.prefill_tokens: fresh prompts (temporaries and the cache they
  hand to `insert`) and session turns over the whole page table (temporaries)."""
  from asearcher_jax.inference import Engine
  arch = dict(SMALL, num_layers=4, hidden_size=128, intermediate_size=256, num_heads=4,
              num_kv_heads=2, vocab_size=512)
  cfg = load_config(None, [f"model.arch={json.dumps(arch)}", "model.dtype=float32",
                           "serve.slots=4", f"serve.max_len={max_len}", "serve.prefill_chunk=64",
                           f"serve.prefill_tokens={prefill_tokens}", "serve.device_sessions=0",
                           "placement.decode_mesh={data: 1, fsdp: 1, tensor: 1}"])
  est = next(i for i in plan(cfg, devices=2, decode_devices=1, device_memory_gib=1,
                             platform="cpu").groups[1].items if "prefill" in i.name)
  assert est.name.startswith(f"largest prefill ({prefill_tokens} tokens")
  engine = Engine(create_model(cfg.model.arch, single_device_mesh(), dtype="float32"),
                  slots=4, max_len=max_len, mesh=single_device_mesh())
  rows, programs = prefill_tokens // 64, engine._programs
  sds = jax.ShapeDtypeStruct
  tokens, ints = sds((rows, 64), np.int32), sds((rows,), np.int32)
  sampling = (sds((rows,), np.float32), ints, sds((rows,), np.float32), sds((rows, 2), np.uint32))
  fresh = type(programs).prefill_fresh.lower(programs, engine.params, tokens, ints, *sampling) \
      .compile().memory_analysis()
  turns = type(programs).prefill_into.lower(
      programs, engine.params, engine.init_decode_state(), ints, tokens, ints, ints,
      sds((rows, engine.max_pages), np.int32), *sampling).compile().memory_analysis()
  xla = max(fresh.temp_size_in_bytes + fresh.output_size_in_bytes, turns.temp_size_in_bytes)
  assert 0.8 * xla < est.bytes < 1.4 * xla, (est.bytes, xla)


def test_a_config_that_does_not_fit_is_refused_naming_its_biggest_item(capsys):
  cfg = small("rl.row_tokens=4096", "rl.micro_batch_rows=8", "model.attention=xla")
  p = plan(cfg, devices=1, device_memory_gib=1, platform="cpu")
  assert not p.groups[0].fits and p.groups[0].biggest.name.startswith("activations")
  assert p.remat == "full"  # auto: recomputing everything is not enough either
  with pytest.raises(PlanError, match=r"learner: .* GiB per device does not fit its 0\.54 GiB "
                                      r".*the biggest item is activations .*remat full.*: use "
                                      r"fewer rl.micro_batch_rows"):
    p.check()
  argv = ["plan", "--config", os.path.join(ROOT, "configs", "qwen2.5-7b-8xh100.yaml"),
          "rl.row_tokens=65536"]
  assert main(argv) == 2
  out = capsys.readouterr()
  assert "DOES NOT FIT" in out.out
  assert "biggest item is activations (1 row x 65536 tokens" in out.err
  assert main(argv[:3]) == 0  # as shipped, it fits
  # 32k-token rows fit too: the fused LM head holds one 256-position chunk of logits, where
  # full logits were 37 GiB a device (2 x 32768 x 152064 float32)
  assert main(argv[:3] + ["rl.row_tokens=32768"]) == 0
  assert "LM head (1 x 256 of 32768 positions x 152064 vocabulary a chunk" in \
      capsys.readouterr().out


def test_a_mesh_that_does_not_divide_a_tensor_is_refused_before_launch():
  cfg = load_config(os.path.join(ROOT, "configs", "qwen2.5-7b-8xh100.yaml"),
                    ["mesh.fsdp=3", "placement.num_devices=3"])
  with pytest.raises(ShardingError, match="embed.*size 3584.*not divisible by mesh axis 'fsdp'"):
    plan(cfg)


def test_micro_batches_that_do_not_split_over_the_batch_axes_are_flagged():
  p = plan(small("rl.micro_batch_rows=3"), devices=2, device_memory_gib=1, platform="cpu")
  assert any("micro_batch_rows=3 does not divide" in w for w in p.warnings)


def test_qwen25_7b_has_its_published_parameter_count():
  cfg = load_config(os.path.join(ROOT, "configs", "qwen2.5-7b-8xh100.yaml"))
  assert abs(cfg.model.arch.num_params() - 7.6e9) < 0.05e9  # "7.61B" on the model card
  assert cfg.model.arch.num_params(include_embeddings=False) == pytest.approx(6.53e9, rel=0.01)


@pytest.mark.parametrize("path", sorted(
    p for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))
    if load_config(p).placement.num_devices is not None))
def test_realistic_configs_fit_the_hardware_they_name(path):
  """Each names its platform, which the plan resolves `auto` for wherever it runs."""
  cfg = load_config(path)
  assert cfg.placement.platform == ("tpu" if "v5p" in os.path.basename(path) else "gpu")
  p = plan(cfg)
  p.check()
  assert p.device_memory is not None and all(g.budget for g in p.groups)
  assert not p.warnings, p.warnings


def test_decode_servers_hold_compute_dtype_weights_on_accelerators():
  """Served weights: placement.decode_param_dtype when set, else bfloat16 (the compute dtype)
  on an accelerator and the model's param_dtype on CPU; the plan counts what is served."""
  from asearcher_jax.placement import serving_param_dtype
  cfg = load_config(os.path.join(ROOT, "configs", "bench", "qwen2.5-0.5b.yaml"))
  assert cfg.model.param_dtype == "float32" and cfg.model.dtype == "bfloat16"
  assert serving_param_dtype(cfg, "gpu") == serving_param_dtype(cfg, "tpu") == "bfloat16"
  assert serving_param_dtype(cfg, "cpu") == "float32"
  pinned = load_config(os.path.join(ROOT, "configs", "bench", "qwen2.5-0.5b.yaml"),
                       ["placement.decode_param_dtype=float32"])
  assert serving_param_dtype(pinned, "gpu") == "float32"
  assert serving_param_dtype(load_config(os.path.join(ROOT, "configs", "debug.yaml")),
                             "gpu") == "float32"  # computes in float32: nothing to halve
  gpu = {i.name: i.bytes for i in plan(cfg, devices=1, platform="gpu",
                                       device_memory_gib=80).groups[-1].items}
  cpu = {i.name: i.bytes for i in plan(cfg, devices=1, platform="cpu",
                                       device_memory_gib=80).groups[-1].items}
  assert gpu["parameters (bfloat16)"] * 2 == cpu["parameters (float32)"]


def test_remat_auto_recomputes_only_what_memory_requires():
  """`model.remat: auto` (the default) takes the fastest policy whose learner fits: nothing
  recomputed on a device with room, more as the device shrinks, and nothing where memory is
  unknown (CPUs)."""
  from asearcher_jax.memory_plan import resolve_remat
  from asearcher_jax.models.config import REMAT_BY_MEMORY
  cfg = small("rl.row_tokens=2048", "rl.micro_batch_rows=2", "model.attention=xla")
  assert cfg.model.remat == "auto"
  need = {r: plan(small("rl.row_tokens=2048", "rl.micro_batch_rows=2", "model.attention=xla",
                        f"model.remat={r}"), devices=1, platform="cpu").groups[0].total
          for r in REMAT_BY_MEMORY}
  assert need["none"] > need["dots"] > need["full"]  # else the order means nothing
  share = plan(cfg, devices=1, device_memory_gib=1, platform="cpu").groups[0].budget / GiB
  for remat in ("none", "dots", "full"):  # a device just big enough for each in turn
    gib = need[remat] * 1.01 / GiB / share
    p = plan(cfg, devices=1, device_memory_gib=gib, platform="cpu")
    assert p.remat == remat and p.groups[0].fits, (remat, p.remat)
    assert f"model.remat auto: {remat}" in p.report()
    assert resolve_remat(cfg, devices=1, device_memory_gib=gib,
                         platform="cpu").model.remat == remat
  tiny = plan(cfg, devices=1, device_memory_gib=need["full"] * 0.5 / GiB / share, platform="cpu")
  assert tiny.remat == "full" and not tiny.groups[0].fits  # refused by check(), as before
  assert resolve_remat(cfg, devices=1, platform="cpu").model.remat == "none"  # memory unknown
  fixed = small("model.remat=dots")
  assert resolve_remat(fixed, devices=1, device_memory_gib=1e-3, platform="cpu") is fixed
  # with a kernel that keeps its residuals, `attention` comes between dots_no_batch and full
  kernel = small("rl.row_tokens=2048", "rl.micro_batch_rows=2", "model.attention=blockwise")
  need = plan(with_remat(kernel, "attention"), devices=1, platform="cpu").groups[0].total
  gib = need * 1.01 / GiB / share
  assert plan(kernel, devices=1, device_memory_gib=gib, platform="cpu").remat == "attention"


def test_a_policy_loaded_for_training_needs_remat_resolved():
  from asearcher_jax.models.pretrained import load_policy
  with pytest.raises(ValueError, match="model.remat auto: resolve it"):
    load_policy(small().model)


def test_the_learner_is_planned_over_its_own_devices():
  """With no placement.num_devices, the learner was planned over every device of the host,
  though placement.learner_devices gives it four of eight."""
  cfg = load_config(os.path.join(ROOT, "configs", "qwen2.5-7b-8xh100.yaml"),
                    ["placement.num_devices=null", "mesh.fsdp=-1"])
  [learner] = [g for g in plan(cfg).groups if g.role == "learner"]
  assert learner.devices == 4

