"""Answer metrics on hand-worked examples, the format gate, the invalid penalty, and the Scorer
(with a stub judge; the real HTTP judge is tested in test_judge.py)."""

import asyncio

import pytest

from asearcher_jax.reward import (
    JudgeVerdict,
    RewardSection,
    Scorer,
    cover_exact_match,
    exact_match,
    f1,
    format_ok,
    format_violations,
    invalid_answer,
    normalize_answer,
    paraphrase_blend,
    tokens,
)


def test_normalize_answer_squad():
  assert normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
  assert normalize_answer("A cat and an owl") == "cat and owl"
  assert normalize_answer("theory") == "theory"  # articles only as whole words
  assert normalize_answer("北京，中国。") == "北京，中国。"  # SQuAD strips ASCII punctuation only
  assert normalize_answer("Trenton–Mercer") == "trenton–mercer"
  assert normalize_answer("北京，中国。", "lenient") == "北京中国"
  assert normalize_answer("") == ""
  with pytest.raises(ValueError, match="normalisation"):
    normalize_answer("x", "unicode")


def test_tokens_lenient_cjk_per_character_and_bool_mapping():
  assert tokens("2008年北京", "lenient") == ["2008", "年", "北", "京"]
  assert tokens("Tokyo 東京タワー", "lenient") == ["tokyo", "東", "京", "タ", "ワ", "ー"]
  assert tokens("True", "lenient") == ["yes"] and tokens("false.", "lenient") == ["no"]
  assert tokens("True story", "lenient") == ["true", "story"]  # only a whole True/False maps
  assert tokens("2008年北京") == ["2008年北京"] and tokens("True") == ["true"]  # SQuAD


def test_exact_match():
  assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
  assert exact_match("Eiffel Tower in Paris", "Eiffel Tower") == 0.0
  assert exact_match("Lyon", ["Paris", "lyon", "Nice"]) == 1.0  # max over golds
  assert exact_match("Trenton-Mercer Airport", "Trenton–Mercer Airport") == 0.0  # en dash
  assert exact_match("True", ["yes"]) == 0.0 and exact_match("the", "a") == 1.0  # as SQuAD
  assert exact_match("True", ["yes"], "lenient") == 1.0
  assert exact_match("no", "False", "lenient") == 1.0
  assert exact_match("北 京", "北京", "lenient") == 1.0  # CJK compared per character
  assert exact_match("Trenton-Mercer Airport", "Trenton–Mercer Airport", "lenient") == 1.0
  assert exact_match("the", "a", "lenient") == 0.0


def test_f1_hand_worked():
  # pred tokens (after dropping "the"): eiffel tower in paris (4); gold: eiffel tower (2).
  # common 2: P = 2/4, R = 2/2, F1 = 2*(0.5*1)/(0.5+1) = 1/1.5 = 0.6667 (bag and set agree).
  for variant in ("set", "bag"):
    assert f1("the Eiffel tower in Paris", "Eiffel Tower", variant) == pytest.approx(2 / 3)
  # pred: barack obama (2); gold: obama (1): P = 1/2, R = 1, F1 = 1/1.5 = 0.6667.
  # gold "president barack obama" (3): P = 2/2, R = 2/3, F1 = 2*(2/3)/(5/3) = 0.8. Max: 0.8.
  assert f1("Barack Obama", ["Obama", "President Barack Obama"], "set") == pytest.approx(0.8)
  assert f1("Paris", "Paris, France", "bag") == pytest.approx(2 / 3)  # P 1, R 1/2
  assert f1("Berlin", ["Paris", "Rome"]) == 0.0


def test_f1_bag_vs_set_on_repeated_tokens():
  # pred: paris paris france; gold: paris.
  # bag: common = min(2,1) = 1, P = 1/3, R = 1/1, F1 = 2*(1/3)/(4/3) = 0.5.
  # set: pred {paris, france}, common 1, P = 1/2, R = 1, F1 = 1/1.5 = 0.6667.
  assert f1("Paris Paris France", "Paris", "bag") == pytest.approx(0.5)
  assert f1("Paris Paris France", "Paris", "set") == pytest.approx(2 / 3)
  # gold with a repeated token: "new york new york" vs pred "new york".
  # bag: common 2, P = 2/2, R = 2/4, F1 = 0.6667; set: both {new, york}, F1 = 1.
  assert f1("New York", "New York, New York", "bag") == pytest.approx(2 / 3)
  assert f1("New York", "New York, New York", "set") == 1.0
  with pytest.raises(ValueError):
    f1("a", "a", "multiset")


def test_f1_cjk_lenient():
  # pred 北京市 -> 北 京 市 (3); gold 北京 -> 北 京 (2): P 2/3, R 1, F1 = (4/3)/(5/3) = 0.8.
  assert f1("北京市", "北京", "set", "lenient") == pytest.approx(0.8)
  # digit runs stay whole: pred 2008 年 (2) vs gold 2008 (1): P 1/2, R 1, F1 = 0.6667.
  assert f1("2008年", "2008", "set", "lenient") == pytest.approx(2 / 3)
  assert f1("北京市", "北京", "set") == 0.0  # SQuAD: one whitespace token each, different
  # "Trenton–Mercer Airport" vs "Trenton-Mercer Airport": SQuAD tokens trenton–mercer airport
  # and trentonmercer airport share one of two: P = R = 1/2, F1 = 0.5.
  assert f1("Trenton-Mercer Airport", "Trenton–Mercer Airport") == pytest.approx(0.5)


def test_cover_exact_match_contiguous():
  assert cover_exact_match("It is the Eiffel Tower in Paris", "Eiffel Tower") == 1.0
  assert cover_exact_match("Tower of Eiffel", "Eiffel Tower") == 0.0  # not contiguous
  assert cover_exact_match("a bus", "US") == 0.0  # whole tokens, not substrings
  assert cover_exact_match("Lyon then Paris", ["Rome", "paris"]) == 1.0
  assert cover_exact_match("位于北京市", "北京", "lenient") == 1.0


@pytest.mark.parametrize("normalization", ["squad", "lenient"])
@pytest.mark.parametrize("metric", [exact_match, cover_exact_match,
                                    lambda p, g, n: f1(p, g, "set", n),
                                    lambda p, g, n: f1(p, g, "bag", n)])
def test_empty_and_none_inputs_score_zero(metric, normalization):
  m = lambda p, g: metric(p, g, normalization)
  assert m(None, ["Paris"]) == 0.0
  assert m("", ["Paris"]) == 0.0
  assert m("...", ["Paris"]) == 0.0  # normalises to nothing
  assert m("Paris", []) == 0.0
  assert m("Paris", "") == 0.0
  assert m("Paris", None) == 0.0
  assert m(None, "") == 0.0  # no answer is never right
  assert m("Paris", ["", None, "Paris"]) == 1.0  # empty golds are skipped
  # Both normalise to empty: SQuAD's EM calls that a match (its script compares the strings);
  # F1 finds no common token; the lenient normalisation never matches empties.
  both_empty = 1.0 if metric is exact_match and normalization == "squad" else 0.0
  assert m("the", "a") == both_empty


def test_paraphrase_blend():
  def set_f1(p, g):
    return f1(p, g, "set")

  # no aug answers: the plain metric.
  assert paraphrase_blend("Eiffel Tower", ["Eiffel Tower"], [], set_f1) == 1.0
  # pred "la tour eiffel": vs gold "eiffel tower" common {eiffel}: P 1/3, R 1/2, F1 = 0.4;
  # vs aug "la tour eiffel" F1 = 1. Blend: 0.7*0.4 + 0.3*max(1, 0.4) = 0.28 + 0.3 = 0.58.
  got = paraphrase_blend("La Tour Eiffel", ["Eiffel Tower"], ["La Tour Eiffel"], set_f1)
  assert got == pytest.approx(0.58)
  # aug worse than the gold never lowers the score: 0.7*1 + 0.3*max(0, 1) = 1.
  assert paraphrase_blend("Eiffel Tower", ["Eiffel Tower"], ["Tour Eiffel x"], exact_match) == 1.0
  # custom weight: EM 0 on gold, 1 on aug: 0.5*0 + 0.5*1 = 0.5.
  assert paraphrase_blend("NYC", ["New York City"], ["nyc"], exact_match, aug_weight=0.5) == 0.5


@pytest.mark.parametrize("generation, ok", [
    ("<think>\nI should search.\n</think>\n<search> eiffel tower height </search>", True),
    ("Let me think. </think> <answer> 330 m </answer>", True),
    ("<think>no tool this turn</think>", True),
    ("", True),
    ("<search> eiffel tower height", False),  # unbalanced
    ("</answer>", False),  # closing tag alone
    ("<search> a </search> <search> b </search>", False),  # two tool tags
    ("<search> a </search> <answer> b </answer>", False),  # answer counts as a tool tag
    ("<access> http://x </access><search>q</search>", False),
    ("</think> <answer> x </answer>\n\nUser: thanks\nAssistant: you're welcome", False),
    ("I am the assistant. <answer> x </answer>", False),  # lowercase too
    ("</think> ... </think> <answer> x </answer>", False),  # two </think>
])
def test_format_gate_table(generation, ok):
  assert format_ok([generation]) is ok
  assert (format_violations(generation) == []) is ok


def test_format_gate_is_over_all_generations():
  good = "<think>x</think><search>q</search>"
  assert format_ok([good, good, "<answer>a</answer>"])
  assert not format_ok([good, "<search>q</search><search>r</search>", "<answer>a</answer>"])
  assert format_ok([])  # nothing generated (scoring a bare answer): passes, as upstream
  assert format_violations("<search>a</search><search>b") == [
      "unbalanced <search>", "more than one tool tag"]


@pytest.mark.parametrize("pred, invalid", [
    ("the question is invalid.", True),
    ("Invalid question", True),
    ("This question is inappropriate", True),
    ("not a valid date", True),
    ("questions remain", True),
    ("Paris", False),
    ("an unquestioned leader", False),
    ("misappropriation of funds", False),
    ("", False),
    (None, False),
])
def test_invalid_answer(pred, invalid):
  assert invalid_answer(pred) is invalid


class StubJudge:
  """Stands in for Judge: scripted verdicts, records the calls."""

  def __init__(self, *verdicts: JudgeVerdict):
    self.verdicts = list(verdicts)
    self.calls: list[tuple] = []

  async def judge(self, question, prediction, golds):
    self.calls.append((question, prediction, list(golds)))
    return self.verdicts.pop(0)

  async def close(self):
    pass


def score(scorer, **kw):
  kw.setdefault("question", "Where is the Eiffel Tower?")
  return asyncio.run(scorer.score(**kw))


GOOD = ["<think>x</think><search>eiffel</search>", "<think>y</think><answer>Paris</answer>"]
BAD = ["<think>x</think><search>a</search><search>b</search>", "<answer>Paris</answer>"]


def test_scorer_f1_default_reward_and_metrics():
  s = Scorer(RewardSection())
  # pred "Paris France" vs gold "Paris": set-F1 P 1/2, R 1 -> 0.6667; EM 0; CEM 1.
  r = score(s, prediction="Paris, France", answers=["Paris"], generations=GOOD)
  assert r.reward == pytest.approx(2 / 3) and r.format_ok and not r.invalid
  assert r.metrics == pytest.approx({"em": 0.0, "cem": 1.0, "f1": 2 / 3})
  assert r.verdict is None
  # the reward blends aug answers; the metrics do not: 0.7*(2/3) + 0.3*1 = 0.7667.
  r = score(s, prediction="Paris, France", answers=["Paris"], aug_answers=["Paris France"],
            generations=GOOD)
  assert r.reward == pytest.approx(0.7 * 2 / 3 + 0.3)
  assert r.metrics["f1"] == pytest.approx(2 / 3)


def test_scorer_metric_choice_and_bag_variant():
  r = score(Scorer(RewardSection(metric="em")), prediction="Paris", answers=["Lyon", "paris"])
  assert r.reward == 1.0
  r = score(Scorer(RewardSection(metric="cem")), prediction="in Paris", answers=["Paris"])
  assert r.reward == 1.0 and r.metrics["em"] == 0.0
  r = score(Scorer(RewardSection(f1_variant="bag")), prediction="Paris Paris France",
            answers=["Paris"])
  assert r.reward == pytest.approx(0.5) and r.metrics["f1"] == pytest.approx(0.5)


def test_scorer_no_prediction_is_zero():
  r = score(Scorer(RewardSection()), prediction=None, answers=["Paris"], generations=GOOD)
  assert r.reward == 0.0 and r.metrics == {"em": 0.0, "cem": 0.0, "f1": 0.0}
  r = score(Scorer(RewardSection(metric="judge"), judge=StubJudge()), prediction=None,
            answers=["Paris"])
  assert r.reward == 0.0 and r.metrics["judge"] == 0.0 and r.verdict.attempts == 0


def test_scorer_format_gate():
  r = score(Scorer(RewardSection()), prediction="Paris", answers=["Paris"], generations=BAD)
  assert r.reward == 0.0 and not r.format_ok and r.metrics["f1"] == 1.0
  r = score(Scorer(RewardSection(format_gate=False)), prediction="Paris", answers=["Paris"],
            generations=BAD)
  assert r.reward == 1.0 and not r.format_ok


def test_scorer_invalid_penalty():
  s = Scorer(RewardSection())
  kw = {"prediction": "the question is invalid", "answers": ["Paris"], "generations": GOOD}
  assert score(s, **kw).reward == 0.0  # invalid instruction: no penalty, just F1 0
  r = score(s, valid_instruction=True, **kw)
  assert r.reward == -0.5 and r.invalid
  # applied after the gate, as upstream: a malformed invalid answer is penalised too.
  assert score(s, valid_instruction=True, **{**kw, "generations": BAD}).reward == -0.5
  assert score(Scorer(RewardSection(invalid_penalty=None)), valid_instruction=True,
               **kw).reward == 0.0
  assert score(Scorer(RewardSection(invalid_penalty=-1.0)), valid_instruction=True,
               **kw).reward == -1.0
  r = score(s, prediction="Paris", answers=["Paris"], valid_instruction=True)
  assert r.reward == 1.0 and not r.invalid


def test_scorer_judge_metric():
  judge = StubJudge(JudgeVerdict(True, "same city", None, 1),
                    JudgeVerdict(False, "different", None, 1))
  s = Scorer(RewardSection(metric="judge"), judge=judge)
  r = score(s, prediction="City of Light", answers=["Paris"], aug_answers=["Paris, France"],
            generations=GOOD)
  assert r.reward == 1.0 and r.metrics["judge"] == 1.0 and r.metrics["f1"] == 0.0
  assert judge.calls == [("Where is the Eiffel Tower?", "City of Light", ["Paris"])]
  r = score(s, prediction="Paris", answers=["Paris"], generations=GOOD)
  assert r.reward == 0.0 and r.metrics["judge"] == 0.0 and r.metrics["f1"] == 1.0
  with pytest.raises(ValueError):
    score(s, prediction="Paris", answers=["Paris"], with_judge=False)


def test_scorer_judge_failure():
  judge = StubJudge(JudgeVerdict(None, "", "HTTP 500 (after 4 attempts)", 4),
                    JudgeVerdict(None, "", "HTTP 500 (after 4 attempts)", 4))
  r = score(Scorer(RewardSection(metric="judge"), judge=judge), prediction="Paris",
            answers=["Paris"])
  assert r.reward == 0.0 and "judge" not in r.metrics and "HTTP 500" in r.verdict.error
  # with a text metric the reward does not depend on the judge
  r = score(Scorer(RewardSection(), judge=judge), prediction="Paris", answers=["Paris"],
            with_judge=True)
  assert r.reward == 1.0 and "judge" not in r.metrics and r.verdict.correct is None


def test_an_episode_whose_judged_reward_failed_is_the_environments():
  """A judge that is down leaves a reward of 0 that the policy did not earn: the episode is
  `env_error`, which rollouts drop and evaluations rerun. Where the judge only reports, the
  reward stands and the episode keeps its status."""
  from asearcher_jax.agent import Trajectory
  from asearcher_jax.agent.episode import score as score_episode
  down = JudgeVerdict(None, "", "HTTP 500 (after 4 attempts)", 4)
  for metric, status in (("judge", "env_error"), ("em", "answered")):
    t = Trajectory(qid="q", question="Where?", answers=["Paris"], status="answered",
                   prediction="Paris")
    asyncio.run(score_episode(t, Scorer(RewardSection(metric=metric), judge=StubJudge(down)),
                              with_judge=True))
    assert t.status == status and t.error == "judge: HTTP 500 (after 4 attempts)"
    assert t.reward == (0.0 if metric == "judge" else 1.0)


def test_scorer_with_judge_for_reporting():
  judge = StubJudge(JudgeVerdict(True, "ok", None, 1))
  s = Scorer(RewardSection(metric="em"), judge=judge)
  r = score(s, prediction="Paris, France", answers=["Paris"], with_judge=True)
  assert r.reward == 0.0 and r.metrics["judge"] == 1.0 and r.verdict.rationale == "ok"
  r = score(s, prediction="Paris", answers=["Paris"])  # judge not asked by default
  assert "judge" not in r.metrics and len(judge.calls) == 1
