"""Open-VQA judging against a real HTTP server on 127.0.0.1 that speaks OpenAI chat completions."""

from __future__ import annotations

import json
import time

import pytest
import torch
from eval_fixtures import SECRET, ChatServer

from lynx_zoo.evaluation import (
    JUDGE_PROMPT,
    CategoryAccuracy,
    ExactMatchJudge,
    JudgeError,
    JudgementCache,
    OpenAIChatJudge,
    TransformersJudge,
    judge_all,
    judge_prompt,
    parse_judge_reply,
)
from lynx_zoo.llm import LLMConfig, build_llm, load_tokenizer


@pytest.fixture
def server():
    with ChatServer() as running:
        yield running


@pytest.fixture
def judge_factory(server, monkeypatch):
    monkeypatch.setenv("LYNX_TEST_JUDGE_KEY", SECRET)

    def make(**overrides) -> OpenAIChatJudge:
        settings = dict(api_key_env="LYNX_TEST_JUDGE_KEY", timeout=2.0, max_retries=2, backoff=0.01)
        return OpenAIChatJudge(server.base_url, "judge-model", **{**settings, **overrides})

    return make


def test_the_prompt_is_the_papers():
    assert judge_prompt("what colour?", "it is red", "red") == (
        'Given the question "what colour?", does the answer "it is red" imply the answer "red"? Answer with Yes or No.'
    )
    assert JUDGE_PROMPT.count("{") == 3


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("No", "no"),
        ("NO, it does not", "no"),
        ('"Yes"', "yes"),
        ("**No**", "no"),
        ("", "failed"),
        ("Maybe", "failed"),
        ("The answer is yes", "failed"),
        ("Yesterday", "failed"),
        ("None", "failed"),
    ],
)
def test_only_a_clear_yes_or_no_is_a_verdict(reply, verdict):
    assert parse_judge_reply(reply) == verdict


def test_openai_judge_asks_the_endpoint_with_the_prompt_model_and_key(server, judge_factory):
    judge = judge_factory()
    assert judge.judge("what color is the circle?", "the circle is red", "red").verdict == "yes"
    result = judge.judge("what color is the circle?", "blue", "red")
    assert (result.verdict, result.raw) == ("no", "No")
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == f"Bearer {SECRET}"
    assert request["body"]["model"] == "judge-model" and request["body"]["temperature"] == 0
    assert request["body"]["messages"] == [
        {"role": "user", "content": judge_prompt("what color is the circle?", "the circle is red", "red")}
    ]


def test_a_slow_reply_times_out_and_is_retried(server, judge_factory):
    judge = judge_factory(timeout=0.2)
    server.script.append(("sleep", 0.6))
    start = time.monotonic()
    result = judge.judge("q", "red", "red")
    assert result.verdict == "yes" and len(server.requests) == 2
    assert time.monotonic() - start >= 0.2
    server.script.extend([("sleep", 0.6)] * 3)  # every attempt times out: a failure, never a yes
    result = judge.judge("q", "red", "red")
    assert (result.verdict, result.replied) == ("failed", False)
    assert "no reply after 3 attempts" in result.error and "timed out" in result.error


def test_429_and_5xx_are_retried_with_exponential_backoff(server, judge_factory):
    judge = judge_factory(backoff=0.05, max_retries=3)
    server.script.extend([("status", 429), ("status", 503)])
    result = judge.judge("q", "a red one", "red")
    assert result.verdict == "yes" and len(server.requests) == 3
    gaps = [b["time"] - a["time"] for a, b in zip(server.requests, server.requests[1:])]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1  # 0.05 s, then twice that
    server.script.extend([("status", 500)] * 4)
    assert judge.judge("q", "red", "red").verdict == "failed" and len(server.requests) == 3 + 4


@pytest.mark.parametrize(
    "action, error",
    [
        (("content", "Maybe"), "neither yes nor no"),
        (("content", ""), "neither yes nor no"),
        (("body", "this is not json"), "not a chat-completions reply"),
        (("body", '{"choices": []}'), "not a chat-completions reply"),
        (("body", '{"choices": [{"message": {"content": null}}]}'), "not a string"),
    ],
)
def test_malformed_replies_are_failures_never_yes(server, judge_factory, action, error):
    server.script.append(action)
    result = judge_factory().judge("q", "red", "red")  # the rule would have said Yes
    assert result.verdict == "failed" and result.replied
    assert error in result.error
    assert len(server.requests) == 1  # a reply is a reply: no retry


def test_a_rejected_request_stops_with_the_status(server, judge_factory):
    server.script.append(("status", 401))
    with pytest.raises(JudgeError, match="HTTP 401") as info:
        judge_factory().judge("q", "red", "red")
    assert SECRET not in str(info.value)


def test_rate_limit_spaces_the_requests(server, judge_factory):
    judge = judge_factory(requests_per_second=10)
    start = time.monotonic()
    for _ in range(4):
        judge.judge("q", "red", "red")
    assert time.monotonic() - start >= 3 * 0.1  # the first request goes at once, each next one 0.1 s later
    assert len(server.requests) == 4


def test_missing_key_variable_is_named(monkeypatch):
    monkeypatch.delenv("LYNX_NO_SUCH_KEY", raising=False)
    with pytest.raises(JudgeError, match="environment variable LYNX_NO_SUCH_KEY"):
        OpenAIChatJudge("http://127.0.0.1:9/v1", "m", api_key_env="LYNX_NO_SUCH_KEY")


def test_the_key_is_never_in_reprs_settings_logs_or_the_cache(server, judge_factory, tmp_path, caplog):
    judge = judge_factory()
    server.script.extend([("status", 429), ("content", f"No, and your key is {SECRET}")])
    cache = JudgementCache(tmp_path / "cache.sqlite")
    with caplog.at_level("DEBUG"):
        (judgement,) = judge_all(judge, [("q", "red", "red")], cache)
    cache.close()
    assert judgement.verdict == "no" and "***" in judgement.raw
    assert "retry 1/2" in caplog.text
    for text in (
        repr(judge),
        json.dumps(judge.describe()),
        caplog.text,
        judgement.raw,
        (tmp_path / "cache.sqlite").read_bytes().decode("latin-1"),
    ):
        assert SECRET not in text
    assert judge.describe()["api_key_env"] == "LYNX_TEST_JUDGE_KEY"


def test_the_cache_never_asks_twice_for_the_same_triple(server, judge_factory, tmp_path):
    triples = [("what color?", "red", "red"), ("what shape?", "a square", "circle"), ("what color?", "red", "red")]
    server.script.extend([("content", "Yes"), ("content", "Hmm")])  # the second reply is malformed
    cache = JudgementCache(tmp_path / "cache.sqlite")
    first = judge_all(judge_factory(), triples, cache)
    assert [j.verdict for j in first] == ["yes", "failed", "yes"]
    assert len(server.requests) == 2  # the repeated triple came from the cache
    cache.close()
    reopened = JudgementCache(tmp_path / "cache.sqlite")
    again = judge_all(judge_factory(), triples, reopened)
    assert len(server.requests) == 2 and again == first  # a malformed reply is kept too: never re-asked
    # another judge (model) is another cache key
    other = OpenAIChatJudge(server.base_url, "other-model", api_key_env="LYNX_TEST_JUDGE_KEY", backoff=0.01)
    assert [j.verdict for j in judge_all(other, triples[:1], reopened)] == ["yes"] and len(server.requests) == 3
    assert len(reopened) == 3


def test_no_reply_at_all_is_not_cached(server, judge_factory, tmp_path):
    cache = JudgementCache(tmp_path / "cache.sqlite")
    server.script.extend([("status", 503)] * 3)
    (failed,) = judge_all(judge_factory(), [("q", "red", "red")], cache)
    assert failed.verdict == "failed" and len(cache) == 0
    (judged,) = judge_all(judge_factory(), [("q", "red", "red")], cache)
    assert judged.verdict == "yes" and len(cache) == 1


def test_exact_match_judge_normalises():
    judge = ExactMatchJudge()
    assert judge.judge("q", "Top left.", "top left").verdict == "yes"
    assert judge.judge("q", "top right", "top left").verdict == "no"
    assert ExactMatchJudge(normalize=False).judge("q", "Top left.", "top left").verdict == "no"


def test_transformers_judge_reads_a_local_llm_and_fails_on_a_non_answer():
    config = LLMConfig(
        pretrained=False,
        tokenizer="lynx_zoo/shapes-words",
        config=dict(
            model_type="llama",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
        ),
    )
    torch.manual_seed(0)
    tokenizer = load_tokenizer(config)
    model = build_llm(config, tokenizer)
    judge = TransformersJudge(model, tokenizer, "tiny-random", max_new_tokens=4)
    result = judge.judge("what color is the circle?", "red", "red")
    # the random LLM's own greedy reply to the paper's prompt, decoded independently
    ids = tokenizer(judge_prompt("what color is the circle?", "red", "red"), return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert result.raw == expected and expected  # its words are shapes words: never a yes or a no
    assert result.verdict == "failed" and result.replied
    assert judge.judge_id == "hf:tiny-random"


def test_category_accuracy_counts_failures_as_wrong_and_merges_across_processes():
    verdicts = [("colour", "yes"), ("colour", "failed"), ("colour", "no"), ("counting", "yes"), ("counting", "yes")]
    whole = CategoryAccuracy(["colour", "counting", "position"])
    whole.update([v == "yes" for _, v in verdicts], [c for c, _ in verdicts], [v == "failed" for _, v in verdicts])
    result = whole.compute()
    assert result["colour"].item() == pytest.approx(1 / 3)  # the failure is wrong, not yes
    assert result["counting"].item() == 1.0 and result["overall"].item() == pytest.approx(3 / 5)
    assert torch.isnan(result["position"])  # no questions in that category
    assert whole.failed.tolist() == [1, 0, 0] and whole.total.tolist() == [3, 2, 0]
    first, second = (
        CategoryAccuracy(["colour", "counting", "position"]),
        CategoryAccuracy(["colour", "counting", "position"]),
    )
    for part, metric in ((verdicts[:2], first), (verdicts[2:], second)):
        metric.update([v == "yes" for _, v in part], [c for c, _ in part], [v == "failed" for _, v in part])
    first.merge_state(second)
    assert {k: v.item() for k, v in first.compute().items() if k != "position"} == {
        k: v.item() for k, v in result.items() if k != "position"
    }
    with pytest.raises(KeyError, match=r"unknown categories \['shape'\]"):
        whole.update([True], ["shape"])
    with pytest.raises(ValueError, match="not 'overall'"):
        CategoryAccuracy(["overall"])
