"""Decode servers over the wire: RL gRPC service, JetStream's own client, the openai client."""

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request

import grpc
import jax
import numpy as np
import openai
import pytest
from conftest import fail_prefills_of, single_device_mesh, tiny_config
from flax import nnx

from asearcher_jax.errors import ConfigError
from asearcher_jax.inference import Driver, Engine, SamplingParams
from asearcher_jax.inference.client import DecodeClient
from asearcher_jax.inference.prometheus import DecodeMetrics
from asearcher_jax.inference.protos import (
  decode_pb2,
  decode_pb2_grpc,
  jetstream_pb2,
  jetstream_pb2_grpc,
)
from asearcher_jax.inference.server import DecodeServer, require_token
from asearcher_jax.models import build_tokenizer, create_model
from asearcher_jax.models.params import flat_state
from asearcher_jax.models.pretrained import save_policy

MESH = single_device_mesh()
CFG = tiny_config("qwen3", vocab_size=300, eos_token_id=258)
TOKEN = "s3cret"


def run(coro):
  return asyncio.run(coro)


@pytest.fixture(scope="module")
def tokenizer():
  return build_tokenizer()


@pytest.fixture(scope="module")
def server(tokenizer):
  model = create_model(CFG, MESH, seed=0, dtype="float32")
  driver = Driver(Engine(model, slots=4, max_len=96, mesh=MESH), version=1, tokenizer=tokenizer,
                  metrics=DecodeMetrics())
  srv = DecodeServer(driver, tokenizer, grpc_port=0, http_port=0, token=TOKEN,
                     model_name="tiny", default_stop_ids=(tokenizer.eos_id,)).start_in_thread()
  yield srv
  srv.stop_thread()


def client(server, token=TOKEN):
  return DecodeClient(server.grpc_address, token=token, timeout=60)


def prompt(n, seed=0):
  return np.random.RandomState(seed).randint(0, 256, n).tolist()


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6)


def test_generate_and_stream_agree(server):
  async def go():
    async with client(server) as c:
      full = await c.generate(prompt(8), GREEDY)
      parts = [r async for r in c.stream(prompt(8), GREEDY)]
      return full, parts
  full, parts = run(go())
  assert len(full.output_ids) == 6 and full.finish_reason == "length" and full.versions == [1] * 6
  assert sum((p.output_ids for p in parts[:-1]), []) == full.output_ids
  np.testing.assert_allclose(sum((p.logprobs for p in parts[:-1]), []), full.logprobs, atol=1e-5)
  assert parts[-1].finish_reason == "length" and not parts[-1].output_ids


def test_sessions_over_grpc_reuse_the_cache(server):
  async def go():
    async with client(server) as c:
      first = await c.generate(prompt(10), GREEDY, session_id="ep-7")
      nxt = prompt(10) + first.output_ids + prompt(4, seed=1)
      second = await c.generate(nxt, GREEDY, session_id="ep-7")
      fresh = await c.generate(nxt, GREEDY)
      existed = await c.end_session("ep-7")
      return first, second, fresh, existed
  first, second, fresh, existed = run(go())
  assert second.cached_tokens == 10 + 6 - 1 and second.output_ids == fresh.output_ids
  assert existed


def test_concurrent_clients_each_get_their_own_greedy_answer(server):
  async def go():
    async with client(server) as c:
      return await asyncio.gather(*(c.generate(prompt(5 + i, seed=i), GREEDY) for i in range(9)))
  together = run(go())

  async def one(i):
    async with client(server) as c:
      return await c.generate(prompt(5 + i, seed=i), GREEDY)
  for i in (0, 4, 8):
    assert run(one(i)).output_ids == together[i].output_ids


@pytest.mark.parametrize("prompt_ids,sampling,message", [
    ([], GREEDY, "the prompt is empty"),
    ([1] * 200, GREEDY, "the prompt has 200 tokens; the maximum is 95"),
    ([1, 300], GREEDY, r"token ids out of the vocabulary \[0, 300\): \[300\]"),
    ([1], SamplingParams(max_new_tokens=100000), r"max_new_tokens must be in \[1, 96\]"),
])
def test_bad_grpc_requests_are_invalid_argument(server, prompt_ids, sampling, message):
  async def go():
    async with client(server) as c:
      with pytest.raises(ValueError, match=message):
        await c.generate(prompt_ids, sampling)
      return await c.generate([1, 2, 3], GREEDY)  # and the server keeps serving
  assert run(go()).finish_reason == "length"


def test_bad_session_ids_are_refused(server):
  async def go():
    async with client(server) as c:
      with pytest.raises(ValueError, match="session_id"):
        await c.generate([1, 2], GREEDY, session_id="x" * 300)
  run(go())


def test_token_is_required(server):
  async def go():
    async with client(server, token="wrong") as c:
      with pytest.raises(grpc.aio.AioRpcError) as e:
        await c.generate([1, 2], GREEDY)
      return e.value.code()
  assert run(go()) == grpc.StatusCode.UNAUTHENTICATED
  req = urllib.request.Request(server.http_address + "/v1/models")
  with pytest.raises(urllib.error.HTTPError) as e:
    urllib.request.urlopen(req)
  assert e.value.code == 401


def test_a_wrong_token_is_refused_before_the_request_is_read(server):
  """gRPC refuses a wrong token from the call's metadata, before reading the request: a message
  over the server's 64 MiB limit is UNAUTHENTICATED, not RESOURCE_EXHAUSTED as one it read
  first, on unary and streaming methods alike; JetStream's HealthCheck needs no token."""
  big = "x" * (65 << 20)
  wrong = (("authorization", "Bearer wrong"),)

  async def code(call):
    try:
      out = call()
      _ = [r async for r in out] if hasattr(out, "__aiter__") else await out
    except grpc.aio.AioRpcError as e:
      return e.code()

  async def go():
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
      rl, js = decode_pb2_grpc.DecodeStub(channel), jetstream_pb2_grpc.OrchestratorStub(channel)
      codes = [await code(lambda: rl.Generate(decode_pb2.GenerateRequest(request_id=big),
                                              metadata=wrong)),
               await code(lambda: rl.GenerateStream(decode_pb2.GenerateRequest(request_id=big),
                                                    metadata=wrong)),
               await code(lambda: js.Decode(jetstream_pb2.DecodeRequest(
                   text_content=jetstream_pb2.DecodeRequest.TextContent(text=big)),
                   metadata=wrong))]
      return codes, await js.HealthCheck(jetstream_pb2.HealthCheckRequest())
  codes, health = run(go())
  assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 3 and health.is_live


def test_non_loopback_bind_needs_a_token(monkeypatch):
  monkeypatch.delenv("ASEARCHER_TOKEN", raising=False)
  with pytest.raises(ConfigError, match="requires a token"):
    require_token("0.0.0.0", None)
  assert require_token("127.0.0.1", None) is None
  assert require_token("0.0.0.0", "t") == "t"


def _ipv6_loopback() -> bool:
  try:
    with socket.socket(socket.AF_INET6) as sock:
      sock.bind(("::1", 0))
    return True
  except OSError:
    return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_the_ipv6_loopback_is_served_and_its_addresses_reach_it(tokenizer):
  """"::1" is loopback (no token needed): both fronts bind it, and the addresses the server
  hands out ("[::1]:port") are ones gRPC and HTTP clients can dial."""
  model = create_model(CFG, MESH, seed=0, dtype="float32")
  srv = DecodeServer(Driver(Engine(model, slots=2, max_len=64, mesh=MESH), version=1),
                     tokenizer, host="::1", model_name="tiny").start_in_thread()
  try:
    assert srv.grpc_address.startswith("[::1]:")

    async def go():
      async with DecodeClient(srv.grpc_address, timeout=60) as c:
        return await c.generate(prompt(4), GREEDY)
    assert len(run(go()).output_ids) == 6
    with urllib.request.urlopen(srv.http_address + "/health", timeout=60) as r:
      assert r.status == 200
  finally:
    srv.stop_thread()


def test_a_server_of_token_ids_alone_streams_as_it_answers_whole():
  """No tokenizer (a library user's `DecodeServer(driver)`): token-id prompts, empty text, the
  log-probs of every token, streamed or not."""
  model = create_model(CFG, MESH, seed=0, dtype="float32")
  srv = DecodeServer(Driver(Engine(model, slots=2, max_len=64, mesh=MESH), version=1),
                     model_name="tiny").start_in_thread()
  try:
    oa = openai.OpenAI(base_url=srv.http_address + "/v1", api_key="none", max_retries=0)
    args = dict(model="tiny", prompt=[1, 2, 3], max_tokens=4, temperature=0, logprobs=1)
    whole = oa.completions.create(**args).choices[0]
    chunks = [c.choices[0] for c in oa.completions.create(**args, stream=True) if c.choices]
    assert whole.text == "" and len(whole.logprobs.token_logprobs) == 4
    assert "".join(c.text for c in chunks) == ""
    np.testing.assert_allclose([v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs],
                               whole.logprobs.token_logprobs, atol=1e-6)
    assert chunks[-1].finish_reason == whole.finish_reason == "length"
  finally:
    srv.stop_thread()


JETSTREAM_DECODE_STATUS = textwrap.dedent("""
    import json, sys, grpc
    from jetstream.core.proto import jetstream_pb2, jetstream_pb2_grpc
    stub = jetstream_pb2_grpc.OrchestratorStub(grpc.insecure_channel(sys.argv[1]))
    req = jetstream_pb2.DecodeRequest(
        token_content=jetstream_pb2.DecodeRequest.TokenContent(token_ids=json.loads(sys.argv[2])),
        max_tokens=4)
    try:
      print(json.dumps([len(r.stream_content.samples) for r in stub.Decode(req)]))
    except grpc.RpcError as e:
      print(json.dumps(e.code().name))
""")


def test_a_request_the_decode_loop_fails_fails_on_every_front(tokenizer, monkeypatch):
  """A request whose prefill fails (a device fault) before its first token: a 500 on the
  OpenAI front, streamed or not, and INTERNAL from gRPC's Generate and GenerateStream and from
  JetStream's Decode; never a stream that ends as if the request had finished."""
  model = create_model(CFG, MESH, seed=0, dtype="float32")
  engine = Engine(model, slots=2, max_len=64, mesh=MESH)
  fail_prefills_of(engine, monkeypatch)
  srv = DecodeServer(Driver(engine, version=1), tokenizer, model_name="tiny").start_in_thread()
  bad = [127, 1, 2]
  try:
    async def go():
      async with DecodeClient(srv.grpc_address, timeout=60) as c:
        with pytest.raises(grpc.aio.AioRpcError) as unary:
          await c.generate(bad, GREEDY)
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
          _ = [r async for r in c.stream(bad, GREEDY)]
        return unary.value, streamed.value, await c.generate([5, 1, 2], GREEDY)
    unary, streamed, fine = run(go())
    assert unary.code() == streamed.code() == grpc.StatusCode.INTERNAL
    assert "device fault" in unary.details() and "device fault" in streamed.details()
    assert fine.finish_reason == "length"  # the server serves on
    oa = openai.OpenAI(base_url=srv.http_address + "/v1", api_key="none", max_retries=0)
    for stream in (False, True):
      with pytest.raises(openai.InternalServerError, match="device fault"):
        out = oa.completions.create(model="tiny", prompt=bad, max_tokens=4, stream=stream)
        _ = list(out) if stream else out
    proc = subprocess.run([sys.executable, "-c", JETSTREAM_DECODE_STATUS, srv.grpc_address,
                           json.dumps(bad)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=""), cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == "INTERNAL"
  finally:
    srv.stop_thread()


def test_update_weights_from_orbax_and_refusal_of_a_wrong_model(server, tmp_path):
  engine = server.driver.engine
  new_model = create_model(CFG, MESH, seed=1, dtype="float32")
  new_params = flat_state(nnx.state(new_model, nnx.Param))
  save_policy(str(tmp_path / "v2"), 0, new_params, CFG)
  wrong = tiny_config("qwen3", vocab_size=300, hidden_size=32)
  save_policy(str(tmp_path / "wrong"), 0, flat_state(nnx.state(create_model(wrong, MESH),
                                                                 nnx.Param)), wrong)

  async def go():
    async with client(server) as c:
      with pytest.raises(ValueError, match="different architecture.*hidden_size.: .32, 64"):
        await c.update_weights(2, orbax_dir=str(tmp_path / "wrong"))
      assert (await c.stats()).version == 1  # the old version keeps serving
      before = await c.generate(prompt(6), GREEDY)
      resp = await c.update_weights(2, orbax_dir=str(tmp_path / "v2"))
      after = await c.generate(prompt(6), GREEDY)
      return before, resp, after
  before, resp, after = run(go())
  assert resp.version == 2 and before.versions == [1] * 6 and after.versions == [2] * 6
  expected = []
  seq = prompt(6)
  fwd = jax.jit(lambda m, t: m(t)[0])
  for _ in range(6):
    expected.append(int(np.asarray(fwd(new_model, jax.numpy.asarray([seq])))[0, -1].argmax()))
    seq.append(expected[-1])
  assert after.output_ids == expected
  assert server.driver.engine is engine


def test_update_weights_refuses_what_the_wire_or_the_folder_cannot_hold(server, tmp_path):
  """A version past int32 would break every later reply's per-token versions; a damaged orbax
  folder is a clear INVALID_ARGUMENT, not UNKNOWN; the server serves as before either way."""
  save_policy(str(tmp_path / "broken"), 0, flat_state(nnx.state(
      create_model(CFG, MESH, seed=1, dtype="float32"), nnx.Param)), CFG)
  shutil.rmtree(tmp_path / "broken" / "0" / "meta")  # orbax: KeyError 'Item "meta" not found'

  async def go():
    async with client(server) as c:
      version = (await c.stats()).version
      with pytest.raises(ValueError, match="int32"):
        await c.update_weights(2**31, orbax_dir=str(tmp_path / "broken"))
      with pytest.raises(ValueError, match="broken"):
        await c.update_weights(version + 1, orbax_dir=str(tmp_path / "broken"))
      after = await c.generate(prompt(6), GREEDY)
      return version, (await c.stats()).version, after
  version, now, after = run(go())
  assert now == version and after.versions == [version] * 6


def test_pause_and_resume(server):
  async def go():
    async with client(server) as c:
      paused = await c.pause()
      task = asyncio.ensure_future(c.generate(prompt(4), GREEDY))
      await asyncio.sleep(0.3)
      assert not task.done() and (await c.stats()).queue_depth == 1
      resumed = await c.resume()
      return paused, resumed, await task
  paused, resumed, result = run(go())
  assert paused.paused and not resumed.paused and result.finish_reason == "length"


JETSTREAM_CLIENT = textwrap.dedent("""
    import json, sys, grpc
    from jetstream.core.proto import jetstream_pb2, jetstream_pb2_grpc
    address, token, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    channel = grpc.insecure_channel(address)
    stub = jetstream_pb2_grpc.OrchestratorStub(channel)
    md = (("authorization", "Bearer " + token),)
    live = stub.HealthCheck(jetstream_pb2.HealthCheckRequest()).is_live
    req = jetstream_pb2.DecodeRequest(
        token_content=jetstream_pb2.DecodeRequest.TokenContent(token_ids=ids), max_tokens=6)
    samples = [s for r in stub.Decode(req, metadata=md) for s in r.stream_content.samples]
    out = [t for s in samples for t in s.token_ids]
    texts = [s.text for s in samples]
    req = jetstream_pb2.DecodeRequest(
        text_content=jetstream_pb2.DecodeRequest.TextContent(text="hello"), max_tokens=5)
    text = "".join(s.text for r in stub.Decode(req, metadata=md) for s in r.stream_content.samples)
    print(json.dumps({"live": live, "ids": out, "texts": texts, "text": text}))
""")


def test_jetstream_generated_client_streams_from_our_server(server, tokenizer):
  """JetStream's own stubs (google-jetstream 0.2.2), in a process that never imports ours."""
  env = dict(os.environ, PYTHONPATH="")
  proc = subprocess.run([sys.executable, "-c", JETSTREAM_CLIENT, server.grpc_address, TOKEN,
                         json.dumps(prompt(7))], capture_output=True, text=True, timeout=120,
                        env=env, cwd="/")
  assert proc.returncode == 0, proc.stderr
  got = json.loads(proc.stdout)

  async def expected():
    async with client(server) as c:
      ids = (await c.generate(prompt(7), GREEDY)).output_ids
      hello = await c.generate(tokenizer.encode("hello"), SamplingParams(
          temperature=0.0, max_new_tokens=5, stop_token_ids=(tokenizer.eos_id,)))
      return ids, hello.output_ids
  ids, hello_ids = run(expected())
  assert got["live"] and got["ids"] == ids
  assert got["text"] == tokenizer.decode(hello_ids)


def test_jetstream_client_receives_the_stop_id_but_not_its_text(tokenizer):
  """JetStream's orchestrator ends a stream at a stop token, sending its id last but no text
  for it (token_utils.process_result_tokens, since JetStream's PR #108): its benchmark counts
  output tokens as len(token_ids)."""
  model = create_model(CFG, MESH, seed=0, dtype="float32")
  fwd, seq = jax.jit(lambda m, t: m(t)[0]), prompt(7)
  for _ in range(6):  # the greedy answer
    seq.append(int(np.asarray(fwd(model, jax.numpy.asarray([seq])))[0, -1].argmax()))
  ref = seq[7:]
  stop = next(t for t in ref[1:] if t != ref[0])  # a token the greedy answer reaches later
  driver = Driver(Engine(model, slots=2, max_len=64, mesh=MESH), version=1, tokenizer=tokenizer)
  srv = DecodeServer(driver, tokenizer, grpc_port=0, http_port=0, token=TOKEN, model_name="tiny",
                     default_stop_ids=(stop,)).start_in_thread()
  try:
    proc = subprocess.run([sys.executable, "-c", JETSTREAM_CLIENT, srv.grpc_address, TOKEN,
                           json.dumps(prompt(7))], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=""), cwd="/")
  finally:
    srv.stop_thread()
  assert proc.returncode == 0, proc.stderr
  got = json.loads(proc.stdout)
  assert got["ids"] == ref[:ref.index(stop) + 1]
  assert "".join(got["texts"]) == tokenizer.decode(ref[:ref.index(stop)])


def test_a_long_jetstream_text_prompt_leaves_the_other_fronts_serving(server, tokenizer):
  """A JetStream Decode of a text of megabytes is tokenized off the event loop the fronts share:
  /health answers throughout, and the prompt is then refused as too long."""
  text = "hello world " * (350_000)  # 4.2 MB: seconds to tokenize here
  outcome = {}

  def decode():
    stub = jetstream_pb2_grpc.OrchestratorStub(grpc.insecure_channel(server.grpc_address))
    t0 = time.monotonic()
    try:
      list(stub.Decode(jetstream_pb2.DecodeRequest(
          text_content=jetstream_pb2.DecodeRequest.TextContent(text=text), max_tokens=4),
          metadata=(("authorization", f"Bearer {TOKEN}"),)))
    except grpc.RpcError as e:
      outcome["error"] = (e.code(), e.details())
    outcome["s"] = time.monotonic() - t0

  thread = threading.Thread(target=decode)
  answered = [time.monotonic()]  # when each /health answer came, from the decode's start
  thread.start()
  while thread.is_alive():
    with urllib.request.urlopen(server.http_address + "/health", timeout=120) as r:
      assert r.status == 200
    answered.append(time.monotonic())
    time.sleep(0.02)
  thread.join()
  code, details = outcome["error"]
  assert code == grpc.StatusCode.INVALID_ARGUMENT and "the maximum is 95" in details
  gap = max(b - a for a, b in zip(answered, answered[1:]))
  assert gap < outcome["s"] / 4, (gap, outcome["s"])


def _jetstream_decode(server, ids, max_tokens):
  """The token ids of a JetStream Decode, through its generated stubs."""
  stub = jetstream_pb2_grpc.OrchestratorStub(grpc.insecure_channel(server.grpc_address))
  req = jetstream_pb2.DecodeRequest(
      token_content=jetstream_pb2.DecodeRequest.TokenContent(token_ids=ids),
      max_tokens=max_tokens)
  return [t for r in stub.Decode(req, metadata=(("authorization", f"Bearer {TOKEN}"),))
          for s in r.stream_content.samples for t in s.token_ids]


def test_jetstream_max_tokens_0_answers_no_token(server):
  """JetStream's default max_tokens (0, proto3's) ends each sample before its first token
  (token_utils.process_result_tokens: complete |= slot_lengths > slot_max_length)."""
  assert _jetstream_decode(server, prompt(7), 0) == []
  assert len(_jetstream_decode(server, prompt(7), 3)) == 3


def test_openai_client_gets_completions_and_logprobs(server, tokenizer):
  oa = openai.OpenAI(base_url=server.http_address + "/v1", api_key=TOKEN, max_retries=0)
  assert [m.id for m in oa.models.list().data] == ["tiny"]
  c = oa.completions.create(model="tiny", prompt="The capital of", max_tokens=5, temperature=0,
                            logprobs=1)
  choice = c.choices[0]
  assert c.usage.completion_tokens <= 5 and choice.finish_reason in ("length", "stop")

  async def rl():
    async with client(server) as cl:
      return await cl.generate(tokenizer.encode("The capital of"), SamplingParams(
          temperature=0.0, max_new_tokens=5, stop_token_ids=(tokenizer.eos_id,)))
  ref = run(rl())
  n = len(choice.logprobs.token_logprobs)
  np.testing.assert_allclose(choice.logprobs.token_logprobs, ref.logprobs[:n], atol=1e-5)
  assert choice.text == tokenizer.decode([t for t in ref.output_ids if t != tokenizer.eos_id])

  chat = oa.chat.completions.create(
      model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
      logprobs=True, n=2, seed=3)
  assert len(chat.choices) == 2 and chat.choices[0].message.role == "assistant"
  assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy
  assert len(chat.choices[0].logprobs.content) <= 4


def _oa(server):
  return openai.OpenAI(base_url=server.http_address + "/v1", api_key=TOKEN, max_retries=0)


def test_openai_streams_what_it_answers_whole(server):
  """Completions and chat, streamed and not, with n = 2 and the usage chunk: the same text,
  finish reasons and token counts either way (greedy)."""
  oa = _oa(server)
  args = dict(model="tiny", prompt="The capital of", max_tokens=6, temperature=0, n=2)
  whole = oa.completions.create(**args)
  parts, reasons, usage = {0: "", 1: ""}, {}, None
  for chunk in oa.completions.create(**args, stream=True, stream_options={"include_usage": True}):
    if chunk.usage is not None:
      usage = chunk.usage
    for c in chunk.choices:
      parts[c.index] += c.text
      if c.finish_reason:
        reasons[c.index] = c.finish_reason
  assert [parts[i] for i in (0, 1)] == [c.text for c in whole.choices]
  assert [reasons[i] for i in (0, 1)] == [c.finish_reason for c in whole.choices]
  assert usage == whole.usage

  chat = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
              temperature=0)
  whole = oa.chat.completions.create(**chat)
  chunks = list(oa.chat.completions.create(**chat, stream=True))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
      whole.choices[0].message.content
  assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
  assert all(c.usage is None for c in chunks)  # no usage chunk unless asked


def test_openai_n_choices_take_any_seed(server):
  """n choices of the largest seed: choice i samples with (seed + i) mod 2**64, so the request
  is served, choice 0 is the seed's own sample and the choices differ."""
  oa = _oa(server)
  args = dict(model="tiny", prompt=prompt(5), max_tokens=8, temperature=1.0, logprobs=0)
  both = oa.completions.create(**args, n=2, seed=2**64 - 1).choices
  alone = oa.completions.create(**args, seed=2**64 - 1).choices[0]
  lps = [c.logprobs.token_logprobs for c in both]
  assert lps[0] == alone.logprobs.token_logprobs and lps[0] != lps[1]


def test_openai_completions_default_to_16_tokens(server):
  """/v1/completions without max_tokens stops at 16 tokens, as OpenAI's and vLLM's do."""
  oa = _oa(server)
  args = dict(model="tiny", prompt=prompt(6), temperature=0)
  longer = oa.completions.create(**args, max_tokens=17)
  assert longer.usage.completion_tokens == 17  # this prompt does not stop earlier
  default = oa.completions.create(**args)
  assert default.usage.completion_tokens == 16 and default.choices[0].finish_reason == "length"


def test_openai_stop_strings_end_the_text_streamed_or_not(server):
  oa = _oa(server)
  args = dict(model="tiny", prompt="Once upon", max_tokens=12, temperature=0)
  free = oa.completions.create(**args).choices[0].text
  stop = free[4:6]  # a stop string the greedy text reaches part-way through
  assert len(stop) == 2 and free.index(stop) >= 1
  whole = oa.completions.create(**args, stop=[stop, "\u2603\u2603"]).choices[0]
  assert whole.text == free[:free.index(stop)] and whole.finish_reason == "stop"
  chunks = list(oa.completions.create(**args, stop=[stop, "\u2603\u2603"], stream=True))
  assert "".join(c.choices[0].text for c in chunks) == whole.text
  assert chunks[-1].choices[0].finish_reason == "stop"


def test_openai_logprobs_and_top_logprobs(server, tokenizer):
  oa = _oa(server)
  c = oa.completions.create(model="tiny", prompt="The capital of", max_tokens=5, temperature=0,
                            logprobs=3).choices[0]
  lp = c.logprobs
  assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) >= 1
  for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
    assert 1 <= len(top) <= 4 and token in top  # the 3 best, plus the sampled token
    assert max(top.values()) == pytest.approx(logprob, abs=1e-6)  # greedy: the best one
  assert "".join(lp.tokens) == c.text and lp.text_offset[0] == 0

  streamed = [ch.choices[0].logprobs for ch in oa.completions.create(
      model="tiny", prompt="The capital of", max_tokens=5, temperature=0, logprobs=3,
      stream=True) if ch.choices[0].logprobs]
  assert [t for s in streamed for t in s.tokens] == lp.tokens
  np.testing.assert_allclose([v for s in streamed for v in s.token_logprobs],
                             lp.token_logprobs, atol=1e-6)

  chat = oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                    max_tokens=6, temperature=0.8, seed=1, logprobs=True,
                                    top_logprobs=2).choices[0]
  content = chat.logprobs.content
  assert content and all(len(e.top_logprobs) == 2 for e in content)
  assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= -1e9 for e in content)
  # Each token's exact bytes, part of a character included: together, the text.
  assert bytes(b for e in content for b in e.bytes).decode("utf-8", "replace") == \
      chat.message.content


@pytest.mark.parametrize("stop", [None, "mid", "start", "absent"])
def test_openai_streamed_logprobs_are_the_whole_answers(server, stop):
  """Log-probs streamed with the text they belong to: the same tokens and text offsets as the
  whole answer, a stop string's tokens in neither (its text held back, then dropped), and no
  token at all for a text that a stop string empties."""
  oa = _oa(server)
  args = dict(model="tiny", prompt="Once upon", max_tokens=12, temperature=0)
  free = oa.completions.create(**args).choices[0].text
  stops = {None: None, "mid": [free[4:7]], "start": [free[:2]], "absent": ["\u2603\u2603"]}[stop]
  whole = oa.completions.create(**args, stop=stops, logprobs=1).choices[0]
  tokens, offsets, text = [], [], ""
  for chunk in oa.completions.create(**args, stop=stops, logprobs=1, stream=True):
    c = chunk.choices[0]
    text += c.text
    if c.logprobs:
      tokens += c.logprobs.tokens
      offsets += c.logprobs.text_offset
  assert text == whole.text
  assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
  assert offsets == list(np.cumsum([0] + [len(t) for t in tokens[:-1]])) if tokens else True
  if stop == "start":
    assert whole.text == "" and whole.logprobs.tokens == []

  chat = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
              temperature=0)
  content = oa.chat.completions.create(**chat).choices[0].message.content
  chat_stop = {None: None, "mid": [content[2:4]], "start": [content[:1]],
               "absent": ["\u2603\u2603"]}[stop]
  whole = oa.chat.completions.create(**chat, stop=chat_stop, logprobs=True).choices[0]
  streamed = [e.token for chunk in oa.chat.completions.create(
      **chat, stop=chat_stop, logprobs=True, stream=True)
      for c in chunk.choices if c.logprobs for e in c.logprobs.content]
  assert streamed == [e.token for e in whole.logprobs.content or []]
  if stop == "start":
    assert whole.message.content == "" and not whole.logprobs.content


def test_openai_unknown_model_is_404_and_unsupported_fields_are_400(server):
  oa = _oa(server)
  with pytest.raises(openai.NotFoundError, match="does not exist"):
    oa.completions.create(model="gpt-4o", prompt="x", max_tokens=2)
  with pytest.raises(openai.NotFoundError):
    oa.models.retrieve("gpt-4o")
  assert oa.models.retrieve("tiny").id == "tiny"
  # curl's raw paths: a model id with a slash reaches the model route; no such route or method
  # is an OpenAI-shaped error too.
  for method, path, status, code in (("GET", "/v1/models/Qwen/Qwen3-0.6B", 404, "model_not_found"),
                                     ("GET", "/v1/embeddings", 404, 404),
                                     ("GET", "/v1/completions", 405, 405)):
    req = urllib.request.Request(server.http_address + path, method=method,
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as e:
      urllib.request.urlopen(req)
    assert e.value.code == status and json.loads(e.value.read())["error"]["code"] == code
    assert status != 405 or e.value.headers["Allow"] == "POST"
  for extra, needle in ((dict(logit_bias={"5": 10}), "'logit_bias' is not supported"),
                        (dict(presence_penalty=0.5), "'presence_penalty' is not supported"),
                        (dict(echo=True), "'echo' is not supported"),
                        (dict(best_of=3), "'best_of' must be equal to n"),
                        (dict(logprobs=6), "'logprobs' must be an integer in 0..5"),
                        (dict(stream_options={"include_usage": True}), "only allowed with")):
    with pytest.raises(openai.BadRequestError, match=needle):
      oa.completions.create(model="tiny", prompt="x", max_tokens=2, **extra)
  with pytest.raises(openai.BadRequestError, match="needs 'logprobs': true"):
    oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                               top_logprobs=2)
  assert oa.completions.create(model="tiny", prompt="ok", max_tokens=2, presence_penalty=0,
                               logit_bias={}).choices[0].finish_reason  # defaults are fine


@pytest.mark.parametrize("path,body,message", [
    ("/v1/completions", b"{not json", "not valid JSON"),
    ("/v1/completions", b"[1, 2]", "must be a JSON object"),
    ("/v1/completions", json.dumps({"prompt": ""}).encode(), "'prompt' is empty"),
    ("/v1/completions", json.dumps({"prompt": [1, 999]}).encode(), "out of the vocabulary"),
    ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 0}).encode(),
     "'max_tokens' must be a positive integer"),
    ("/v1/completions", json.dumps({"prompt": "x", "temperature": "hot"}).encode(),
     "'temperature' must be a number"),
    ("/v1/completions", json.dumps({"prompt": "x", "stream": "yes"}).encode(),
     "'stream' must be true or false"),
    ("/v1/completions", json.dumps({"prompt": "x", "temperature": 10**400}).encode(),
     "'temperature' is out of range"),
    ("/v1/completions", json.dumps({"prompt": "x", "top_k": 2**40}).encode(),
     "top_k must be at most the vocabulary size"),
    ("/v1/chat/completions", json.dumps({"messages": []}).encode(), "'messages' must be"),
    ("/v1/completions", json.dumps({"prompt": "x", "stop": 5}).encode(), "'stop' must be"),
    ("/v1/completions", json.dumps({"prompt": "x", "stop": True}).encode(), "'stop' must be"),
    ("/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "nested too deeply"),
    ("/v1/completions", json.dumps({"prompt": "\ud800"}).encode(), "cannot be tokenized"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
     "not valid JSON"),
])
def test_bad_http_requests_are_400_and_the_server_keeps_serving(server, path, body, message):
  req = urllib.request.Request(server.http_address + path, data=body, method="POST", headers={
      "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
  with pytest.raises(urllib.error.HTTPError) as e:
    urllib.request.urlopen(req)
  assert e.value.code == 400
  assert message in json.loads(e.value.read())["error"]["message"]
  ok = urllib.request.Request(server.http_address + "/v1/completions", method="POST",
                              data=json.dumps({"prompt": "ok", "max_tokens": 2}).encode(),
                              headers={"Authorization": f"Bearer {TOKEN}"})
  assert json.loads(urllib.request.urlopen(ok).read())["choices"][0]["finish_reason"]


def test_a_body_that_cannot_be_read_is_400(server):
  req = urllib.request.Request(server.http_address + "/v1/completions", data=b"\x1f\x8bnot gzip",
                               method="POST", headers={"Authorization": f"Bearer {TOKEN}",
                                                       "Content-Encoding": "gzip"})
  with pytest.raises(urllib.error.HTTPError) as e:
    urllib.request.urlopen(req)
  assert e.value.code == 400 and "cannot be read" in json.loads(e.value.read())["error"]["message"]


def test_a_body_over_the_limit_is_400_and_read_no_further(server):
  body = b'{"prompt": "' + b"x" * (17 << 20) + b'"}'  # serve.max_body_bytes: 16 MiB
  req = urllib.request.Request(server.http_address + "/v1/completions", data=body,
                               method="POST", headers={"Authorization": f"Bearer {TOKEN}"})
  with pytest.raises(urllib.error.HTTPError) as e:
    urllib.request.urlopen(req)
  assert e.value.code == 400 and "exceeds" in json.loads(e.value.read())["error"]["message"]


def _metrics(server) -> str:
  req = urllib.request.Request(server.http_address + "/metrics",
                               headers={"Authorization": f"Bearer {TOKEN}"})
  return urllib.request.urlopen(req).read().decode()


def _generated(text: str) -> float:
  return next(float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("asearcher_decode_generated_tokens_total"))


def _idle(server) -> None:
  """Waits until no request is running or queued (an earlier test's cancelled one included),
  for half a second on end: a busy driver republishes its stats every 0.25 s, so a request just
  admitted is not missed in stats published before it."""
  deadline, since = time.monotonic() + 60, None
  while since is None or time.monotonic() - since < 0.5:
    s = server.driver.stats()
    busy = s.slots_in_use or s.queue_depth
    since = None if busy else (since or time.monotonic())
    assert time.monotonic() < deadline, "the server never went idle"
    time.sleep(0.05)


def test_prometheus_metrics(server):
  _idle(server)
  text = _metrics(server)
  for name in ("asearcher_decode_slots_in_use", "asearcher_decode_queue_depth",
               "asearcher_decode_tokens_per_second", "asearcher_decode_prefill_seconds_bucket",
               "asearcher_decode_step_seconds_count", "asearcher_decode_generated_tokens_total"):
    assert name in text
  before = _generated(text)

  async def go():  # requests that end at different steps: the step after a request's last
    async with client(server) as c:  # token samples its slot too, and that token is dropped
      return await asyncio.gather(*(
          c.generate(prompt(6, seed=i), SamplingParams(temperature=0.0, max_new_tokens=n))
          for i, n in enumerate((1, 2, 5, 9))))
  results = run(go())
  _idle(server)
  assert _generated(_metrics(server)) - before == sum(len(r.output_ids) for r in results)


def _step_seconds(server) -> tuple[float, float]:
  """asearcher_decode_step_seconds' (sum, count), as /metrics reports them."""
  lines = _metrics(server).splitlines()
  return tuple(next(float(line.split()[-1]) for line in lines
                    if line.startswith(f"asearcher_decode_step_seconds_{k} "))
               for k in ("sum", "count"))


def test_step_time_leaves_out_idle_time(server):
  """A request after an idle second adds its steps' time to the step histogram, not the idle
  second's."""
  async def one():
    async with client(server) as c:
      return await c.generate(prompt(6), SamplingParams(temperature=0.0, max_new_tokens=4))
  run(one())  # compiled
  _idle(server)
  time.sleep(1.0)
  before = _step_seconds(server)
  run(one())
  _idle(server)
  after = _step_seconds(server)
  assert after[1] > before[1] and after[0] - before[0] < 0.5, (before, after)


def test_a_client_that_stops_reading_a_stream_cancels_its_request():
  """Closing DecodeClient.stream after the first chunk cancels the request on the server (its
  slot freed at once); it ran to max_new_tokens (here seconds of decoding) before."""
  model = create_model(CFG, MESH, seed=0, dtype="float32")
  metrics = DecodeMetrics()
  srv = DecodeServer(Driver(Engine(model, slots=2, max_len=512, mesh=MESH), version=1,
                            metrics=metrics), model_name="tiny").start_in_thread()
  def finished(reason: str) -> float:
    return metrics.registry.get_sample_value("asearcher_decode_requests_total",
                                             {"finish_reason": reason}) or 0.0

  def ended():  # however it ends: cancelled, or (as before) at max_new_tokens
    deadline = time.monotonic() + 120
    while not finished("cancelled") + finished("length"):
      assert time.monotonic() < deadline, "the request never finished"
      time.sleep(0.02)

  try:
    async def go():  # the channel stays open throughout: closing it would cancel the call too
      async with DecodeClient(srv.grpc_address, timeout=60) as c:
        stream = c.stream(prompt(4), SamplingParams(temperature=0.0, max_new_tokens=500))
        async for _ in stream:
          break
        await stream.aclose()
        await asyncio.get_running_loop().run_in_executor(None, ended)
    run(go())
    assert (finished("cancelled"), finished("length")) == (1, 0)
    assert srv.driver.stats().generated_tokens < 500
  finally:
    srv.stop_thread()


def test_update_weights_from_an_hf_directory(server, tmp_path):
  from asearcher_jax.models import save_pretrained
  new_model = create_model(CFG, MESH, seed=2, dtype="float32")
  out = save_pretrained(new_model, str(tmp_path / "hf"), progress=False)

  async def go():
    async with client(server) as c:
      version = (await c.stats()).version
      resp = await c.update_weights(version + 1, hf_dir=out, mode="keep_kv")
      return version, resp, await c.generate(prompt(5), GREEDY)
  version, resp, after = run(go())
  assert resp.version == version + 1 and after.versions == [version + 1] * 6
  seq = prompt(5)
  fwd = jax.jit(lambda m, t: m(t)[0])
  for tok in after.output_ids:
    assert tok == int(np.asarray(fwd(new_model, jax.numpy.asarray([seq])))[0, -1].argmax())
    seq.append(tok)


def test_weight_updates_load_only_from_under_the_weight_roots(tmp_path):
  """UpdateWeights must not open any path on the server, nor tell whether one exists: outside
  serve.weight_roots (the run's published weights by default) every path is refused alike,
  a symlink out of a root included."""
  from asearcher_jax.inference.service import DecodeService
  root = tmp_path / "run" / "weights"
  (root / "7").mkdir(parents=True)
  (tmp_path / "secret").mkdir()
  (root / "escape").symlink_to(tmp_path / "secret")
  service = DecodeService(driver=None, weight_roots=(str(root),))
  service._check_root(str(root))
  service._check_root(str(root / "7"))
  service._check_root(str(root / "not-yet-published"))  # inside: the load says what is wrong
  errors = set()
  for path in (tmp_path / "secret", tmp_path / "nothing", root / "escape", root / ".." / "..",
               "/etc", str(root) + "-other", root / "7" / ".." / ".." / "x"):
    with pytest.raises(ValueError, match="may only be loaded from under") as e:
      service._check_root(str(path))
    errors.add(str(e.value))
  assert len(errors) == 1  # one answer for every refused path: nothing leaks
  DecodeService(driver=None)._check_root("/anywhere")  # a library user's own process
