"""Seeded, bounded fuzzing of every server on loopback: the decode server's OpenAI HTTP front and
its gRPC services, and the replay queue. Each request is malformed in some way (or, now and
then, well formed); the server must answer every one with a clear client error or a result
(never 5xx, never gRPC UNKNOWN/INTERNAL for a well-formed protobuf), store nothing it refused,
and still serve afterwards. (The retrieval server's fuzz is in test_tools_retrieval.py.)"""

import asyncio
import json
import math
import random
import urllib.error
import urllib.request

import grpc
import pytest
from conftest import single_device_mesh, tiny_config

from asearcher_jax.inference import Driver, Engine
from asearcher_jax.inference.protos import decode_pb2, decode_pb2_grpc
from asearcher_jax.inference.server import DecodeServer
from asearcher_jax.models import build_tokenizer, create_model
from asearcher_jax.replay import ReplayQueue, ReplayServer
from asearcher_jax.replay.client import SyncReplayClient
from asearcher_jax.replay.protos import replay_pb2, replay_pb2_grpc

pytestmark = pytest.mark.e2e

MESH = single_device_mesh()
CFG = tiny_config("qwen3", vocab_size=300, eos_token_id=258)
TOKEN = "fuzz"
META = (("authorization", f"Bearer {TOKEN}"),)
# Values a confused or hostile client sends: wrong types, edges, huge and non-finite numbers.
VALUES = [None, True, False, 0, 1, -1, 2, 3, 7, 2**31, 2**63, 10**30, -(10**30), 0.5, 1.5, -0.5,
          1e308, float("nan"), float("inf"), "", "x", "\u2603", "\ud800", [], [1, 2], ["a"],
          [""], ["a"] * 9, [10**6], {}, {"a": 1}, {"5": 10}, {"include_usage": True},
          {"include_usage": "yes"}, "tiny", "gpt-4o", [[1, 2]], [{"role": "user"}],
          [{"role": "user", "content": "hi"}], [{"role": 1, "content": []}]]
FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "top_k", "n", "best_of", "stop", "stream", "stream_options", "logprobs",
          "top_logprobs", "seed", "model", "logit_bias", "echo", "presence_penalty", "suffix",
          "user", "tools", "response_format"]


@pytest.fixture(scope="module")
def decode_server():
  tokenizer = build_tokenizer()
  model = create_model(CFG, MESH, seed=0, dtype="float32")
  driver = Driver(Engine(model, slots=4, max_len=64, mesh=MESH), version=1, tokenizer=tokenizer)
  srv = DecodeServer(driver, tokenizer, grpc_port=0, http_port=0, token=TOKEN, model_name="tiny",
                     default_stop_ids=(tokenizer.eos_id,)).start_in_thread()
  yield srv
  srv.stop_thread()


def _post(url: str, raw: bytes, headers: dict | None = None) -> tuple[int, bytes]:
  req = urllib.request.Request(url, data=raw, method="POST", headers={
      "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json", **(headers or {})})
  try:
    with urllib.request.urlopen(req, timeout=60) as r:
      return r.status, r.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read()


def _body(rng: random.Random) -> bytes:
  kind = rng.random()
  if kind < 0.08:
    return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
  if kind < 0.12:
    return rng.choice([b"[" * 5000 + b"]" * 5000, b'{"prompt": "x", "n": ' + b"9" * 5000 + b"}",
                       b"null", b"[]", b'"text"', b"{", b'{"prompt": "\\ud800"}'])
  body = {k: rng.choice(VALUES) for k in rng.sample(FIELDS, rng.randrange(0, 7))}
  if rng.random() < 0.5:  # mostly near a valid request, so deeper checks are reached
    body.setdefault("prompt", "The capital of")
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    body["max_tokens"] = rng.choice([1, 2, 3, body.get("max_tokens")])
  return json.dumps(body, allow_nan=True).encode()


def test_openai_front_answers_1000_malformed_requests_without_a_5xx(decode_server):
  rng = random.Random(0)
  base = decode_server.http_address
  counts = {}
  for i in range(1000):
    path = rng.choice(["/v1/completions", "/v1/chat/completions"])
    status, raw = _post(base + path, _body(rng))
    counts[status] = counts.get(status, 0) + 1
    assert status in (200, 400, 404), (status, raw[:300])
    if status != 200:
      assert json.loads(raw)["error"]["message"]
  assert counts.get(400, 0) > 500 and counts.get(200, 0) > 20  # both paths were exercised
  status, raw = _post(base + "/v1/completions", json.dumps(
      {"prompt": "ok", "max_tokens": 2, "temperature": 0}).encode())
  assert status == 200 and json.loads(raw)["choices"][0]["finish_reason"]


def _sampling(rng: random.Random) -> decode_pb2.SamplingParams:
  p = decode_pb2.SamplingParams()
  for field, values in (("temperature", [0.0, 1.0, -1.0, 1e30, math.nan, math.inf]),
                        ("top_p", [0.0, 0.5, 1.0, 2.0, -1.0, math.nan]),
                        ("top_k", [0, 5, -3, 2**31 - 1]),
                        ("max_new_tokens", [0, 1, 3, 10**6, -5])):
    if rng.random() < 0.6:
      setattr(p, field, rng.choice(values))
  if rng.random() < 0.3:
    p.seed = rng.choice([0, 2**63 - 1, 7])
  if rng.random() < 0.3:
    p.stop_token_ids.extend(rng.choice([[1], [10**6], [-1], []]))
  if rng.random() < 0.3:
    p.stop.extend(rng.choice([["a"], [""], ["\u2603" * 100]]))
  return p


def test_grpc_decode_answers_1000_malformed_requests_with_client_errors(decode_server, tmp_path):
  rng = random.Random(1)
  ok_codes = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.UNAUTHENTICATED}

  async def go():
    async with grpc.aio.insecure_channel(decode_server.grpc_address) as ch:
      stub = decode_pb2_grpc.DecodeStub(ch)
      seen = {}
      for i in range(1000):
        what = rng.random()
        meta = META if rng.random() > 0.02 else ()
        try:
          if what < 0.8:
            ids = rng.choice([[], [1, 2, 3], [10**6], [-1, 5], list(range(100)), [5] * 70])
            req = decode_pb2.GenerateRequest(prompt_ids=ids, sampling=_sampling(rng),
                                             session_id=rng.choice(["", "s1", "\u2603" * 300]))
            await stub.Generate(req, metadata=meta, timeout=60)
          elif what < 0.9:
            req = decode_pb2.UpdateWeightsRequest(
                version=rng.choice([0, 1, 2**31, 2**62, -1]),
                orbax_dir=rng.choice(["", str(tmp_path / "none"), str(tmp_path), "/"]),
                mode=rng.choice(["", "abort", "keep_kv", "bogus"]))
            await stub.UpdateWeights(req, metadata=meta, timeout=60)
          else:
            await stub.EndSession(decode_pb2.EndSessionRequest(
                session_id=rng.choice(["", "s1", "x" * 10_000])), metadata=meta, timeout=60)
          code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as e:
          code = e.code()
          assert code in ok_codes, (code, e.details())
        seen[code] = seen.get(code, 0) + 1
      stats = await stub.Stats(decode_pb2.StatsRequest(), metadata=META, timeout=60)
      return seen, stats
  seen, stats = asyncio.run(go())
  assert seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 300 and seen.get(grpc.StatusCode.OK)
  assert stats.version == 1  # no refused update took effect


def test_replay_queue_answers_1000_malformed_calls_and_stores_only_sound_groups(tmp_path):
  from test_replay import group  # sound groups, as rollout workers send them

  rng = random.Random(2)
  queue = ReplayQueue(str(tmp_path))
  queue.set_version(3)
  srv = ReplayServer(queue, vocab_size=300).start_in_thread()
  accepted = 0
  try:
    with grpc.insecure_channel(srv.address) as ch:
      stub = replay_pb2_grpc.ReplayStub(ch)
      for i in range(1000):
        what = rng.random()
        try:
          if what < 0.5:
            g = group(f"g{i}", v=rng.choice([0, 3, 4, -1]))
            proto = replay_pb2.Group(group_id=g.group_id, qid=g.qid,
                                     submit_version=g.submit_version, worker="w", cursor=i,
                                     trajectories=list(g.trajectories))
            if rng.random() < 0.6:  # damage one trajectory
              proto.trajectories[rng.randrange(len(proto.trajectories))] = rng.choice(
                  [b"", b"{}", b"\xff\xfe", b"[1]", json.dumps({"tokens": [1]}).encode(),
                   bytes(rng.randrange(256) for _ in range(40)),
                   g.trajectories[0][:rng.randrange(len(g.trajectories[0]))],  # truncated
                   b"\x00TRJ" + bytes(rng.randrange(256) for _ in range(40))])
            if rng.random() < 0.1:
              proto.group_id = ""
            resp = stub.Put(replay_pb2.PutRequest(group=proto), timeout=30)
            accepted += resp.status == "accepted"
          elif what < 0.7:
            lease = stub.Lease(replay_pb2.LeaseRequest(
                count=rng.choice([0, 1, 2, -1, 10**6]),
                timeout_s=rng.choice([0.0, 5.0, -1.0, math.inf, math.nan, 1e308]),
                wait_s=0.0), timeout=30)
            if lease.lease_id and rng.random() < 0.5:
              stub.Release(replay_pb2.ReleaseRequest(lease_id=lease.lease_id), timeout=30)
          elif what < 0.8:
            stub.SetVersion(replay_pb2.VersionRequest(
                version=rng.choice([3, 4, -1, -(2**63)])), timeout=30)
          else:
            stub.Renew(replay_pb2.RenewRequest(lease_id=rng.choice(["", "x", "\u2603"]),
                                               timeout_s=rng.choice([1.0, math.nan])),
                       timeout=30)
        except grpc.RpcError as e:
          assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
    state = SyncReplayClient(srv.address).state()
  finally:
    srv.stop_thread()
  assert 20 < accepted == state.accepted_total  # only the sound groups were stored
  assert state.version >= 0
