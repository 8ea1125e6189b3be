"""`asearcher`: the command line. Each subcommand is a thin shell over a library call.

Config-driven subcommands take `--config FILE` and trailing `dotted.key=value`
overrides, MaxText-style.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: config.py assembles every section, above this module
  from asearcher_jax.config import Config


def _config_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", help="YAML file under configs/ (defaults apply where absent; "
                                  "without one, give model.path or model.arch as overrides)")
  p.add_argument("overrides", nargs="*", metavar="key=value",
                 help="dotted overrides, e.g. model.arch.num_layers=4 mesh.tensor=2")


def _mesh(cfg: Config):
  from asearcher_jax.sharding import describe, make_mesh
  mesh = make_mesh(cfg.mesh.shape())
  print(f"mesh: {describe(mesh)}")
  return mesh


def cmd_config(args) -> int:
  from asearcher_jax.config import dump_config, load_config
  print(dump_config(load_config(args.config, args.overrides)), end="")
  return 0


def cmd_plan(args) -> int:
  """per-device memory of the learner and the decode servers; refuses a config that won't fit"""
  from asearcher_jax.config import load_config
  from asearcher_jax.memory_plan import plan
  cfg = load_config(args.config, args.overrides)
  p = plan(cfg, devices=args.devices, decode_devices=args.decode_devices,
           device_memory_gib=args.device_memory, platform=args.platform)
  print(p.report())
  p.check()  # PlanError: exit 2, naming the biggest item
  return 0


def cmd_init_model(args) -> int:
  """A randomly initialised policy (architecture from the config) saved as an HF directory."""
  from asearcher_jax.config import load_config
  from asearcher_jax.models import build_tokenizer, create_model, save_pretrained
  cfg = load_config(args.config, args.overrides)
  if cfg.model.arch is None:
    raise SystemExit("init-model needs model.arch (an architecture), not model.path")
  arch = cfg.model.arch
  if args.tokenizer_corpus:
    import dataclasses

    from asearcher_jax.agent.tokenizer import train_tokenizer
    tokenizer = train_tokenizer(args.tokenizer_corpus, arch.vocab_size)
    arch = dataclasses.replace(arch, eos_token_id=tokenizer.eos_id)
    print(f"trained a {tokenizer.vocab_size}-token BPE tokenizer on "
          f"{', '.join(args.tokenizer_corpus)}")
  else:
    tokenizer = build_tokenizer()
  if tokenizer.vocab_size > arch.vocab_size:
    raise SystemExit(f"model.arch.vocab_size={arch.vocab_size} is smaller than the "
                     f"tokenizer's {tokenizer.vocab_size} tokens")
  model = create_model(arch, _mesh(cfg), seed=cfg.model.seed, param_dtype=cfg.model.param_dtype,
                       dtype=cfg.model.dtype)
  out = save_pretrained(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
  print(f"wrote {arch.family} model with {arch.num_params() / 1e6:.2f}M parameters to {out}")
  return 0


def cmd_convert(args) -> int:
  """HF directory -> orbax policy checkpoint, or orbax policy checkpoint -> HF directory."""
  from asearcher_jax.models import flat_params, from_pretrained, save_pretrained
  from asearcher_jax.models.pretrained import save_policy
  from asearcher_jax.models.tokenizer import is_hf_dir, tokenizer_dir
  from asearcher_jax.outdir import HF_MARKERS, POLICY_MARKERS, check_out_dir
  to = args.to or ("orbax" if is_hf_dir(args.src) else "hf")
  check_out_dir(args.dst, overwrite=args.overwrite, what=f"{to} checkpoint", flag="dst",
                markers=POLICY_MARKERS if to == "orbax" else HF_MARKERS)
  start = time.time()
  model, _, cfg = from_pretrained(args.src, tokenizer=False, step=args.step,
                                  param_dtype=args.param_dtype)
  tok_dir = tokenizer_dir(args.src)
  if to == "orbax":
    if args.overwrite:
      shutil.rmtree(args.dst, ignore_errors=True)
    save_policy(args.dst, args.step or 0, flat_params(model), cfg, tokenizer_dir=tok_dir)
  else:
    save_pretrained(model, args.dst, tokenizer=tok_dir, dtype=args.dtype,
                    overwrite=args.overwrite)
  print(f"converted {args.src} -> {args.dst} ({to}) in {time.time() - start:.1f}s")
  return 0


def cmd_generate(args) -> int:
  """Greedy continuation through the decode engine (KV cache), without a server."""
  from asearcher_jax.inference import Driver, Engine, SamplingParams
  from asearcher_jax.models import from_pretrained
  model, tok, cfg = from_pretrained(args.model, dtype=args.dtype)
  text = args.prompt
  if args.chat:
    text = tok.apply_chat_template([{"role": "user", "content": text}])
  ids = tok.encode(text)
  stop = tok.eos_ids
  engine = Engine(model, slots=1, max_len=len(ids) + args.max_new_tokens + 1,
                  quantization=args.quantization)
  start = time.time()
  with Driver(engine, tokenizer=tok) as driver:
    out = driver.generate(ids, SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens,
                                              stop_token_ids=stop)).output_ids
  elapsed = time.time() - start
  print(f"prompt ({len(ids)} tokens): {text!r}")
  weights = f"{args.dtype}" + (", int8 matmul weights" if args.quantization == "int8" else "")
  print(f"completion ({len(out)} tokens, {weights}, {len(out) / elapsed:.1f} tok/s incl. compile): "
        f"{tok.decode(out)!r} ids={out}")
  return 0


def cmd_serve(args) -> int:
  """A decode server (gRPC + OpenAI-compatible HTTP) for the config's policy."""
  import asyncio
  import signal

  from asearcher_jax import placement
  from asearcher_jax.config import load_config
  from asearcher_jax.inference.server import build_server
  cfg = placement.apply(load_config(args.config, args.overrides), "decode")
  server = build_server(cfg)

  async def main():
    task = asyncio.ensure_future(server.serve_forever())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
      loop.add_signal_handler(sig, lambda: server._stopped and server._stopped.set())
    while server._stopped is None or not server.driver.live:
      if task.done():
        return await task
      await asyncio.sleep(0.05)
    print(f"serving {server.service.model_name} (version {server.driver.version}): "
          f"gRPC {server.grpc_address}" + (f", OpenAI {server.http_address}/v1"
                                           if server.http_port is not None else ""), flush=True)
    await task

  asyncio.run(main())
  print("decode server stopped")
  return 0


def cmd_eval(args) -> int:
  """run the agent on QA datasets k times per question; Avg@k / Pass@k, traces, report"""
  import asyncio
  import json

  from asearcher_jax.config import load_config
  from asearcher_jax.errors import DataError
  from asearcher_jax.eval import evaluate
  base = None
  if args.baseline:  # read before the evaluation, which may take hours
    try:
      with open(args.baseline) as f:
        base = json.load(f)
    except (OSError, ValueError) as e:
      raise DataError(f"--baseline {args.baseline}: {type(e).__name__}: {e}") from None
  overrides = list(args.overrides)
  if args.data:
    overrides.append("eval.data=" + json_list(args.data))
  for flag, key in (("k", "k"), ("limit", "limit"), ("out", "out_dir"),
                    ("concurrency", "concurrency")):
    if getattr(args, flag) is not None:
      overrides.append(f"eval.{key}={getattr(args, flag)}")
  server = retrieval = None
  if args.serve:  # the policy of model.path and the local search tools, from this process
    from asearcher_jax.inference.server import build_server
    served = load_config(args.config, overrides + ["serve.grpc_port=0", "serve.http_port=null"])
    if served.search.backend == "local":
      from asearcher_jax.tools.retrieval_server import serve_index
      from asearcher_jax.world.io import default_world_index
      retrieval = serve_index(served.retrieval.index or default_world_index(served.world),
                              served.retrieval)
      overrides.append(f"search.url={retrieval.url}")
    server = build_server(served, progress=not args.no_progress).start_in_thread()
    overrides.append(f"eval.decode_address=127.0.0.1:{server.grpc_port}")
  cfg = load_config(args.config, overrides)
  try:
    report = asyncio.run(evaluate(cfg, progress=not args.no_progress))
  finally:
    if server is not None:
      server.stop_thread()
    if retrieval is not None:
      retrieval.stop()
  if base is not None:
    from asearcher_jax.eval.harness import latest_traces
    from asearcher_jax.eval.report import format_comparison, incomparable, paired_intervals
    k = report["k"]
    why = incomparable(base, report)
    if why:
      raise SystemExit(f"{args.baseline} cannot be compared with this run: {why}")
    base_traces = os.path.join(os.path.dirname(args.baseline), "traces.jsonl")
    intervals = None
    if os.path.exists(base_traces):  # the questions of both runs: a paired interval
      intervals = paired_intervals(latest_traces(base_traces, k).values(),
                                   latest_traces(report["traces"], k).values(), k)
    print(f"against {args.baseline}" + (" (change [95% paired bootstrap interval over "
                                        "questions]):" if intervals else ":"))
    print(format_comparison(base["datasets"], report["datasets"], k, intervals=intervals))
  from asearcher_jax.agent.trajectory import INFRA_STATUSES
  failed = sum(d["status"].get(s, 0) for d in report["datasets"].values() for s in INFRA_STATUSES)
  return 1 if failed or not report["datasets"] else 0  # a rerun retries those episodes


def json_list(items) -> str:
  import json
  return json.dumps(list(items))


def cmd_synth(args) -> int:
  """QA synthesis agent: seed QA or pages made hard by injection and fuzzing, verified; resumable"""
  import asyncio
  import json

  from asearcher_jax.config import load_config
  from asearcher_jax.synth import synthesize
  overrides = list(args.overrides)
  if args.seeds:
    overrides.append("synth.seeds=" + json_list(args.seeds))
  # JSON-encoded, so a path reads as the string it is (not `2024` the number, `null` None).
  for flag, key in (("seed_pages", "seed_pages"), ("random_pages", "random_pages"),
                    ("out", "out_dir"), ("limit", "limit"), ("k", "variants_per_seed"),
                    ("concurrency", "concurrency"), ("verifier", "verifier")):
    if getattr(args, flag) is not None:
      overrides.append(f"synth.{key}={json.dumps(getattr(args, flag))}")
  cfg = load_config(args.config, overrides)
  report = asyncio.run(synthesize(cfg, progress=not args.no_progress))
  return 1 if report["seeds"]["aborted"] else 0  # a rerun retries aborted seeds


def cmd_data_build(args) -> int:
  """build a TFDS (array_record) QA dataset from QA files; read back without TensorFlow"""
  from asearcher_jax.data import build_qa_dataset
  sources = {}
  for spec in args.split:
    name, _, files = spec.partition("=")
    if not files:
      raise SystemExit(f"--split wants NAME=FILE[,FILE...], got {spec!r}")
    sources[name] = files.split(",")
  path = build_qa_dataset(sources, args.out, name=args.name, overwrite=args.overwrite)
  print(f"dataset: {path}")
  return 0


def cmd_train(args) -> int:
  """asynchronous RL on one host: retrieval, decode server(s), replay queue, learner, rollouts"""
  from asearcher_jax.config import load_config
  from asearcher_jax.rl.supervisor import train
  cfg = load_config(args.config, args.overrides)
  return train(cfg, config_path=args.config, overrides=args.overrides, resume=args.resume,
               progress=not args.no_progress, echo=lambda s: print(s, flush=True))


def cmd_learn(args) -> int:
  """the learner alone (asearcher train starts it): lease groups, train, publish, checkpoint"""
  from asearcher_jax.config import load_config
  from asearcher_jax.rl.launch import run_learn
  cfg = load_config(args.config, args.overrides)
  return run_learn(cfg, replay=args.replay, decode=args.decode, resume=args.resume)


def cmd_rollout(args) -> int:
  """one rollout worker (asearcher train starts them): episodes in groups onto the queue"""
  from asearcher_jax import placement
  from asearcher_jax.config import load_config
  from asearcher_jax.rl.launch import run_rollout
  cfg = load_config(args.config, args.overrides)
  decode = args.decode or placement.worker_decode_address(cfg, args.worker)
  return run_rollout(cfg, worker=args.worker, workers=args.workers,
                     replay=placement.replay_address(cfg, args.replay), decode=decode,
                     max_groups=args.max_groups)


def cmd_sft(args) -> int:
  """supervised fine-tuning on trajectory files (loss on the agent's tokens); writes HF weights"""
  from asearcher_jax import distributed, placement
  from asearcher_jax.config import load_config
  from asearcher_jax.memory_plan import resolve_remat
  from asearcher_jax.train.sft import sft_command
  cfg = load_config(args.config, args.overrides)
  # SFT runs alone on its devices: a whole device's share (placement.memory_fraction), taken
  # before JAX starts, and the remat plan budgets that share, not a colocated learner's.
  alone = cfg.placement.model_copy(update={"mode": "disaggregated", "learner_devices": None,
                                           "decode_devices": None})
  cfg = placement.apply(cfg.model_copy(update={"placement": alone}), "learner")
  distributed.initialize(cfg.distributed)  # several hosts: one mesh over all their devices
  # a step holds --batch-rows rows of rl.row_tokens, as a learner micro-batch of that many does
  rl = cfg.rl.model_copy(update={"micro_batch_rows": args.batch_rows})
  cfg = resolve_remat(cfg.model_copy(update={"rl": rl}), echo=print)
  sft_command(cfg, args.data, args.out, epochs=args.epochs, batch_rows=args.batch_rows,
              loss_on=args.loss_on, eval_paths=args.eval_data or (),
              eval_every=args.eval_every, progress=not args.no_progress,
              overwrite=args.overwrite)
  return 0


def _positive(text: str) -> int:
  """An argparse type: an integer >= 1 (a clear usage error otherwise, not a traceback)."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
  return value


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="asearcher", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("config", help="print the resolved config")
  _config_args(p)
  p.set_defaults(fn=cmd_config)

  p = sub.add_parser("plan", help=cmd_plan.__doc__)
  _config_args(p)
  p.add_argument("--devices", type=int, help="learner devices, all hosts (placement.num_devices)")
  p.add_argument("--decode-devices", type=int,
                 help="devices of one decode server (placement.decode_num_devices)")
  p.add_argument("--device-memory", type=float, metavar="GIB",
                 help="memory per device in GiB (placement.device_memory_gib; else detected)")
  p.add_argument("--platform", choices=["cpu", "gpu", "tpu"],
                 help="what `auto` attention and remat resolve for (default: "
                      "placement.platform, else this machine's)")
  p.set_defaults(fn=cmd_plan)

  p = sub.add_parser("init-model", help=cmd_init_model.__doc__)
  _config_args(p)
  p.add_argument("--out", required=True, help="output HF directory")
  p.add_argument("--tokenizer-corpus", nargs="+", metavar="SRC",
                 help="train a BPE tokenizer of model.arch.vocab_size ids on these world "
                      "directories or JSONL files (default: the byte-level tokenizer)")
  p.add_argument("--overwrite", action="store_true")
  p.set_defaults(fn=cmd_init_model)

  p = sub.add_parser("convert", help=cmd_convert.__doc__)
  p.add_argument("src", help="HF directory (config.json) or orbax policy checkpoint")
  p.add_argument("dst")
  p.add_argument("--to", choices=["hf", "orbax"], help="default: the other format")
  p.add_argument("--step", type=int, help="orbax step to read/write (default: latest / 0)")
  p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                 help="dtype of exported HF tensors (default: as held)")
  p.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--overwrite", action="store_true")
  p.set_defaults(fn=cmd_convert)

  p = sub.add_parser("serve", help=cmd_serve.__doc__)
  _config_args(p)
  p.set_defaults(fn=cmd_serve)

  p = sub.add_parser("generate", help=cmd_generate.__doc__)
  p.add_argument("model", help="HF directory or orbax policy checkpoint")
  p.add_argument("--prompt", required=True)
  p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
  p.add_argument("--max-new-tokens", type=int, default=32)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--quantization", default="none", choices=["none", "int8"],
                 help="int8: weight-only int8 matmul weights, as serve.quantization")
  p.set_defaults(fn=cmd_generate)

  p = sub.add_parser("eval", help=cmd_eval.__doc__)
  _config_args(p)
  p.add_argument("--data", nargs="+", help="QA files or TFDS directories (eval.data)")
  p.add_argument("--k", type=int, help="samples per question (eval.k)")
  p.add_argument("--limit", type=int, help="questions per dataset (eval.limit)")
  p.add_argument("--out", help="output directory (eval.out_dir); reruns resume")
  p.add_argument("--concurrency", type=int, help="episodes in flight (eval.concurrency)")
  p.add_argument("--serve", action="store_true",
                 help="serve the config's policy (model.path) and, for local search, the "
                      "retrieval server (retrieval.index) from this process for the run")
  p.add_argument("--baseline", metavar="REPORT_JSON",
                 help="also print the change against an earlier run's report.json")
  p.add_argument("--no-progress", action="store_true")
  p.set_defaults(fn=cmd_eval)

  p = sub.add_parser("synth", help=cmd_synth.__doc__)
  _config_args(p)
  p.add_argument("--seeds", nargs="+", help="seed QA files, any loader format (synth.seeds)")
  p.add_argument("--seed-pages", help="JSONL of {url or title, fact?} (synth.seed_pages)")
  p.add_argument("--random-pages", type=int, help="seeds drawn from the pages (synth.random_pages)")
  p.add_argument("--out", help="output directory (synth.out_dir); reruns resume")
  p.add_argument("--limit", type=int, help="seeds at most (synth.limit)")
  p.add_argument("--k", type=int, help="variants kept per seed (synth.variants_per_seed)")
  p.add_argument("--concurrency", type=int, help="seeds in flight (synth.concurrency)")
  p.add_argument("--verifier", choices=["llm", "world"], help="synth.verifier")
  p.add_argument("--no-progress", action="store_true")
  p.set_defaults(fn=cmd_synth)

  p = sub.add_parser("sft", help=cmd_sft.__doc__)
  _config_args(p)
  p.add_argument("--data", nargs="+", required=True, help="trajectory JSONL files")
  p.add_argument("--out", required=True, help="output HF directory (usable as model.path)")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  p.add_argument("--epochs", type=_positive, default=3)
  p.add_argument("--batch-rows", type=_positive, default=4, help="rows of rl.row_tokens per step")
  p.add_argument("--loss-on", choices=["agent", "all"], default="agent",
                 help="the agent's own tokens (default), or every token: language-model data "
                      "for a policy that was never pretrained")
  p.add_argument("--eval-data", nargs="+", metavar="FILE",
                 help="held-out trajectory files: NLL, greedy accuracy and turns reproduced "
                      "on their agent tokens, before training, each epoch and at the end")
  p.add_argument("--eval-every", type=int, default=0, metavar="STEPS",
                 help="evaluate every STEPS steps instead of each epoch")
  p.add_argument("--no-progress", action="store_true")
  p.set_defaults(fn=cmd_sft)

  p = sub.add_parser("train", help=cmd_train.__doc__)
  _config_args(p)
  p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
  p.add_argument("--no-progress", action="store_true")
  p.set_defaults(fn=cmd_train)

  p = sub.add_parser("learn", help=cmd_learn.__doc__)
  _config_args(p)
  p.add_argument("--replay", help="replay queue host:port (default: placement.replay_address)")
  p.add_argument("--decode", nargs="*",
                 help="decode server addresses (default: placement.decode_addresses; none: "
                      "weights are only written to disk)")
  p.add_argument("--resume", action="store_true")
  p.set_defaults(fn=cmd_learn)

  p = sub.add_parser("rollout", help=cmd_rollout.__doc__)
  _config_args(p)
  p.add_argument("--worker", type=int, default=0)
  p.add_argument("--workers", type=int, default=1)
  p.add_argument("--replay", help="default: placement.replay_address")
  p.add_argument("--decode", help="default: placement.decode_addresses[worker %% count]")
  p.add_argument("--max-groups", type=int, help="stop after this many groups (default: never)")
  p.set_defaults(fn=cmd_rollout)

  data = sub.add_parser("data", help="QA datasets").add_subparsers(dest="data_command",
                                                                   required=True)
  p = data.add_parser("build", help=cmd_data_build.__doc__)
  p.add_argument("--split", action="append", required=True, metavar="NAME=FILE[,FILE]",
                 help="a split and its QA files (any loader format); repeat per split")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--name", default="qa")
  p.add_argument("--overwrite", action="store_true")
  p.set_defaults(fn=cmd_data_build)

  from asearcher_jax.commands import search, world
  search.register(sub)  # index build, retrieval serve
  world.register(sub)  # world build, world solve
  return parser


class _QuietReadOnly(logging.Filter):
  """orbax warns on every read-only open of a checkpoint; reading is what we mean to do."""

  def filter(self, record):
    return "read only" not in record.getMessage() and "read_only=True" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
  from asearcher_jax.procs import follow_supervisor
  follow_supervisor()  # a child of `asearcher train` dies with it
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  # argparse fills `overrides` at the first positional slot only: `train --resume a.b=1` would
  # leave a.b=1 over. Dotted overrides are taken wherever they stand; anything else is an error.
  stray = [a for a in extra if a.startswith("-") or "=" not in a]
  if stray or (extra and not hasattr(args, "overrides")):
    parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
  if extra:
    args.overrides = [*args.overrides, *extra]
  logging.getLogger("absl").addFilter(_QuietReadOnly())
  from asearcher_jax.errors import AsearcherError
  try:
    return args.fn(args)
  except AsearcherError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
