"""The LLM judge against a scripted OpenAI-compatible server on 127.0.0.1: verdict parsing,
retries on bad replies / 5xx / timeouts, give-up without raising, and what goes on the wire."""

import asyncio
import contextlib
import json
import socket
import time

import pytest
from aiohttp import web

from asearcher_jax.reward import Judge, JudgeSection, RewardSection, Scorer, load_prompt
from asearcher_jax.reward.judge import parse_verdict

KEY = "judge-test-key"
FENCED = ('Let me compare.\n```json\n{\n  "rationale": "Both name the same city.",\n'
          '  "judgement": "correct"\n}\n```')
PROSE = ('The labeled answer is Paris but the prediction says Lyon. Here is my verdict: '
         '{"rationale": "different cities", "judgement": "incorrect"} I hope this helps.')


class FakeLLM:
  """Scripted /chat/completions: `script` items are reply texts, HTTP statuses (int) or
  "slow"; consumed one per request, and once empty every request gets `default`."""

  def __init__(self, script=(), default=FENCED, delay=0.0):
    self.script, self.default, self.delay = list(script), default, delay
    self.requests: list[dict] = []
    self.active = self.peak = 0

  def app(self) -> web.Application:
    app = web.Application()

    async def models(request):
      self.requests.append({"path": request.path, "headers": dict(request.headers)})
      return web.json_response({"object": "list", "data": [{"id": "served-model"}]})

    async def chat(request):
      body = await request.json()
      self.requests.append({"path": request.path, "headers": dict(request.headers), "body": body})
      what = self.script.pop(0) if self.script else self.default
      if what == "slow":
        await asyncio.sleep(0.6)
        what = self.default
      if isinstance(what, int):
        return web.json_response({"error": {"message": "scripted"}}, status=what)
      self.active += 1
      self.peak = max(self.peak, self.active)
      await asyncio.sleep(self.delay)
      self.active -= 1
      return web.json_response({
          "id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
          "choices": [{"index": 0, "finish_reason": "stop",
                       "message": {"role": "assistant", "content": what}}]})

    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    return app


@contextlib.asynccontextmanager
async def serve(fake: FakeLLM):
  runner = web.AppRunner(fake.app(), access_log=None)
  await runner.setup()
  site = web.TCPSite(runner, "127.0.0.1", 0)
  await site.start()
  port = site._server.sockets[0].getsockname()[1]
  try:
    yield f"http://127.0.0.1:{port}/v1"
  finally:
    await runner.cleanup()


def cfg(base_url: str, **kw) -> JudgeSection:
  base = {"base_url": base_url, "model": "judge-model", "max_retries": 2, "backoff_s": 0.01,
          "max_backoff_s": 0.02, "timeout_s": 1.0}
  base.update(kw)
  return JudgeSection(**base)


def run_judge(fake: FakeLLM, prediction="Paris", golds=("Paris",), **kw):
  async def go():
    async with serve(fake) as url, Judge(cfg(url, **kw), seed=0) as judge:
      return await judge.judge("What is the capital of France?", prediction, list(golds))
  return asyncio.run(go())


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
  monkeypatch.setenv("OPENAI_API_KEY", KEY)


def test_fenced_json_verdict_and_request_shape():
  fake = FakeLLM([FENCED])
  v = run_judge(fake, prediction="Paris" + "x" * 100, golds=["Paris", "Paris, France"],
                max_pred_chars=10)
  assert v.correct is True and v.error is None and v.attempts == 1
  assert v.rationale == "Both name the same city." and v.raw == FENCED
  (req,) = fake.requests
  assert req["headers"]["Authorization"] == f"Bearer {KEY}"
  body = req["body"]
  assert body["model"] == "judge-model"
  assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.6, 0.95, 1024)
  (msg,) = body["messages"]
  assert msg["role"] == "user"
  prompt = msg["content"]
  assert "Predicted Answer: Parisxxxxx\n" in prompt  # cut to max_pred_chars = 10
  assert "Labeled Answer: Paris | Paris, France\n" in prompt
  assert "Question: What is the capital of France?" in prompt


def test_verdict_with_surrounding_prose():
  v = run_judge(FakeLLM([PROSE]), prediction="Lyon")
  assert v.correct is False and v.rationale == "different cities" and v.attempts == 1


def test_garbage_then_valid_verdict_is_retried():
  fake = FakeLLM(["I think so, probably.", FENCED])
  v = run_judge(fake)
  assert v.correct is True and v.attempts == 2 and len(fake.requests) == 2


def test_http_500_then_success():
  fake = FakeLLM([500, FENCED])
  v = run_judge(fake)
  assert v.correct is True and v.attempts == 2 and v.error is None


def test_timeout_then_success():
  fake = FakeLLM(["slow", FENCED])
  v = run_judge(fake, timeout_s=0.3)
  assert v.correct is True and v.attempts == 2


def test_always_500_gives_none_after_retries():
  fake = FakeLLM(default=500)
  v = run_judge(fake, max_retries=2)
  assert v.correct is None and v.attempts == 3 and len(fake.requests) == 3
  assert "HTTP 500" in v.error and "after 3 attempts" in v.error


def test_always_unparseable_gives_none():
  v = run_judge(FakeLLM(default="no idea"), max_retries=1)
  assert v.correct is None and v.attempts == 2 and "unparseable" in v.error
  assert v.raw == "no idea"


def test_client_error_is_not_retried():
  fake = FakeLLM([400])
  v = run_judge(fake)
  assert v.correct is None and v.attempts == 1 and "HTTP 400" in v.error


def test_model_from_models_endpoint_and_no_key(monkeypatch):
  monkeypatch.delenv("OPENAI_API_KEY")
  fake = FakeLLM([FENCED])
  v = run_judge(fake, model=None)
  assert v.correct is True
  assert [r["path"] for r in fake.requests] == ["/v1/models", "/v1/chat/completions"]
  assert fake.requests[1]["body"]["model"] == "served-model"
  assert "Authorization" not in fake.requests[1]["headers"]


def test_unreachable_endpoint_gives_none_quickly():
  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]

  async def go():
    async with Judge(cfg(f"http://127.0.0.1:{port}/v1", max_retries=1)) as judge:
      return await judge.judge("q", "Paris", ["Paris"])
  t0 = time.monotonic()
  v = asyncio.run(go())
  assert time.monotonic() - t0 < 3.0
  assert v.correct is None and v.attempts == 2 and "after 2 attempts" in v.error


def test_empty_prediction_and_no_golds_skip_the_endpoint():
  fake = FakeLLM()
  assert run_judge(fake, prediction="  ").correct is False
  v = run_judge(fake, golds=[])
  assert v.correct is None and "no gold" in v.error
  assert fake.requests == []


def test_concurrency_limit():
  fake = FakeLLM(delay=0.1)

  async def go():
    async with serve(fake) as url, Judge(cfg(url, concurrency=2)) as judge:
      return await asyncio.gather(*[judge.judge("q", f"p{i}", ["g"]) for i in range(6)])
  verdicts = asyncio.run(go())
  assert all(v.correct for v in verdicts) and fake.peak == 2


def test_custom_prompt_file(tmp_path):
  path = tmp_path / "judge.txt"
  path.write_text("Q={question} G={gold} P={prediction} reply as {{\"judgement\": ...}}")
  fake = FakeLLM([FENCED])
  v = run_judge(fake, golds=["a", "b"], prompt_file=str(path))
  assert v.correct is True
  content = fake.requests[0]["body"]["messages"][0]["content"]
  assert content == 'Q=What is the capital of France? G=a | b P=Paris reply as {"judgement": ...}'
  bad = tmp_path / "bad.txt"
  bad.write_text("Q={question} {answer}")
  with pytest.raises(ValueError, match="placeholder"):
    load_prompt(str(bad))
  bad.write_text("Q={question} P={prediction}")
  with pytest.raises(ValueError, match="lacks"):
    load_prompt(str(bad))


def test_scorer_with_real_judge():
  fake = FakeLLM([FENCED, 500, 500, 500])

  async def go():
    async with serve(fake) as url:
      rcfg = RewardSection(metric="judge", judge=cfg(url))
      async with Scorer(rcfg) as scorer:  # makes and closes its own Judge
        ok = await scorer.score(question="q", prediction="City of Light", answers=["Paris"])
        failed = await scorer.score(question="q", prediction="Paris", answers=["Paris"])
        return ok, failed
  ok, failed = asyncio.run(go())
  assert ok.reward == 1.0 and ok.metrics["judge"] == 1.0 and ok.metrics["f1"] == 0.0
  assert failed.reward == 0.0 and "judge" not in failed.metrics
  assert "HTTP 500" in failed.verdict.error


@pytest.mark.parametrize("reply, expected", [
    (FENCED, True),
    (PROSE, False),
    ("```\n{'rationale': 'same', 'judgement': 'Correct'}\n```", True),  # single quotes
    ('{"rationale": "x", "judgement": "Incorrect",}', False),  # trailing comma
    ('```json\n{"rationale": "an "unescaped" quote", "judgement": "correct"}\n```', True),
    ('**Judgement**: Incorrect', False),  # markdown
    ('Format: "judgement": "correct" or "incorrect"', None),  # the template echoed back
    ('"judgement": "correct" or "incorrect"\n"judgement": "incorrect"', False),
    ('"judgement": incorrect', False),
    ("judgement: correct", True),
    ('{"judgment": "correct"}', True),  # American spelling
    ('{"judgement": "maybe"}', None),
    ("", None),
    (None, None),
    ("The answer is correct.", None),  # no judgement field: ask again rather than guess
])
def test_parse_verdict(reply, expected):
  got = parse_verdict(reply)
  assert (None if got is None else got[0]) is expected


def test_packaged_prompt_renders():
  text = load_prompt()
  rendered = text.format(question="Q?", gold="G", prediction="P")
  assert "Question: Q?" in rendered and '"judgement"' in rendered
  assert json.dumps("correct") in rendered
