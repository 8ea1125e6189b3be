"""The processes of `asearcher train`, each run as `asearcher learn` / `asearcher rollout` by the
supervisor (rl/supervisor.py) or by hand on another host: the learner (`run_learn`) and the rollout
workers (`run_rollout`), built from one typed `Config`.
"""

from __future__ import annotations

import asyncio
import os
import signal

from asearcher_jax.config import Config
from asearcher_jax.errors import AsearcherError


def check_sampling(cfg: Config) -> None:
  """The learner recomputes the log-probs of the distribution the rollouts sampled from: with
  rl.temperature other than agent.temperature every behaviour weight and PPO ratio is off by
  the temperature's factor, and training goes on without an error."""
  if cfg.rl.temperature != cfg.agent.temperature:
    raise AsearcherError(f"rl.temperature ({cfg.rl.temperature}) must equal agent.temperature "
                         f"({cfg.agent.temperature}), the temperature rollouts sample at: the "
                         "learner's log-probs must be of the distribution the tokens came from")


def rl_items(cfg: Config, worker: int, workers: int):
  """This worker's shard of the training questions (every workers-th, from `worker`)."""
  from asearcher_jax.data.datasets import load_datasets
  paths = list(cfg.rl.data)
  if not paths:
    from asearcher_jax.world import ensure_world
    paths = [os.path.join(ensure_world(cfg.world), "qa_train.jsonl")]
  items, notes, _ = load_datasets(paths, cfg.rl.split)
  return [it for _, it in items][worker::workers], notes


def run_rollout(cfg: Config, *, worker: int, workers: int, replay: str, decode: str,
                max_groups: int | None = None) -> int:
  from asearcher_jax.agent import Agent, DecodePolicy
  from asearcher_jax.inference.client import DecodeClient
  from asearcher_jax.models.tokenizer import policy_tokenizer
  from asearcher_jax.placement import client_token
  from asearcher_jax.replay import ReplayClient
  from asearcher_jax.reward import Scorer
  from asearcher_jax.rl.rollout import PromptStream, RolloutWorker
  from asearcher_jax.rl.training_log import rollout_log_path
  from asearcher_jax.tools.client import make_client
  items, notes = rl_items(cfg, worker, workers)
  for n in notes:
    print(n, flush=True)
  tokenizer = policy_tokenizer(cfg.model)

  async def main():
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
      loop.add_signal_handler(sig, stop.set)
    token = client_token(cfg)  # servers on other hosts require it
    async with DecodeClient(decode, token=token, timeout=cfg.rl.request_timeout_s) as client:
      tools = make_client(cfg.search, cfg.web)
      replay_client = ReplayClient(replay, token=token)
      try:
        agent = Agent(cfg.agent, DecodePolicy(client, tokenizer), tools)
        w = RolloutWorker(worker=worker, workers=workers, rl=cfg.rl, agent=agent,
                          scorer=Scorer(cfg.reward), replay=replay_client,
                          prompts=PromptStream(items, cfg.rl.seed), seed=cfg.rl.seed,
                          log_path=rollout_log_path(cfg.run.output_dir, worker))
        print(f"rollout worker w{worker}: {len(items)} questions, decode {decode}, replay "
              f"{replay}", flush=True)
        await w.run(max_groups=max_groups, stop=stop)
        print(f"rollout worker w{worker} stopped: {w.stats}", flush=True)
      finally:
        await tools.close()
        await replay_client.close()

  asyncio.run(main())
  return 0


def build_learner(cfg: Config, *, replay, decode: list[str], out_dir: str, echo=print):
  """The learner with the publisher the placement needs (decode servers over gRPC). With
  several processes (`jax.distributed`), the mesh spans all of them and the learner is a
  `MultiHostLearner`; `replay` is then process 0's client (None elsewhere)."""
  import jax

  from asearcher_jax import distributed
  from asearcher_jax.memory_plan import resolve_remat
  from asearcher_jax.models.pretrained import load_policy
  from asearcher_jax.models.tokenizer import tokenizer_dir
  from asearcher_jax.placement import client_token
  from asearcher_jax.rl.learner import Learner
  from asearcher_jax.rl.publish import CheckpointPublisher
  from asearcher_jax.sharding import describe, make_mesh
  mesh = make_mesh(cfg.mesh.shape())
  cfg = resolve_remat(cfg, echo=echo)
  model, tokenizer, arch = load_policy(cfg.model, mesh, progress=False)
  if cfg.model.path:
    tok_dir = tokenizer_dir(cfg.model.path)
  else:  # the publisher copies the tokenizer beside the weights it publishes
    tok_dir = os.path.join(out_dir, "tokenizer")
    if distributed.is_primary():
      tokenizer.save(tok_dir)
    distributed.barrier("learner-tokenizer")
  p = cfg.placement
  publisher = CheckpointPublisher(p.weights_dir or os.path.join(out_dir, "weights"), arch, decode,
                                  tokenizer_dir=tok_dir, token=client_token(cfg),
                                  dtype=p.decode_param_dtype, verify=p.verify_weights)
  if jax.process_count() == 1:
    learner = Learner(cfg, model=model, replay=replay, publisher=publisher, out_dir=out_dir,
                      echo=echo)
  else:
    from asearcher_jax.rl.multihost import MultiHostLearner, ReplicatedReplay
    echo(f"learner: process {jax.process_index()} of {jax.process_count()}, mesh "
         f"{describe(mesh)}")
    learner = MultiHostLearner(cfg, model=model, replay=ReplicatedReplay(replay),
                               publisher=publisher, out_dir=out_dir, echo=echo)
  return learner


def run_learn(cfg: Config, *, replay: str | None, decode: list[str] | None, resume: bool) -> int:
  """The learner process: joins the run's other learner processes first (jax.distributed,
  from `distributed:`), takes its devices (`placement:`), then trains."""
  from asearcher_jax import distributed, placement
  from asearcher_jax.replay import SyncReplayClient
  check_sampling(cfg)
  cfg = placement.apply(cfg, "learner")
  replay = placement.replay_address(cfg, replay)
  decode = placement.decode_addresses(cfg, decode)
  distributed.initialize(cfg.distributed)
  primary = distributed.is_primary()
  out_dir = cfg.run.output_dir
  client = SyncReplayClient(replay, token=placement.client_token(cfg)) if primary else None
  echo = (lambda s: print(s, flush=True)) if primary else (lambda s: None)
  learner = build_learner(cfg, replay=client, decode=decode, out_dir=out_dir, echo=echo)
  try:
    if resume:
      learner.restore()
    elif (version := learner.replay.state("").version) > 0:
      raise AsearcherError(f"the replay queue at {replay} is at version {version}: it belongs "
                           "to a previous run; pass --resume to continue it")
    learner.run()
  finally:
    learner.close()
    if client is not None:
      client.close()
  echo("learner finished")
  return 0
