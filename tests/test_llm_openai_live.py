"""The Llama as LLM clients expect it (issue 19), live: serve_config.yaml's router and the small Llama
on its continuous scheduler, called with the stock `openai` SDK (completions, chat, streaming) and
raw HTTP; greedy output identical to static `generate()`; a short request finishing before a long
batch-mate; OpenAI-shaped 4xx for malformed requests; 503 + Retry-After past the KV cache; a cancelled
stream freeing its sequence; the simple route and OIP text_output on the same scheduler. One cluster."""
from __future__ import annotations

import copy
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from serve_helpers import ServeCluster

openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parent.parent
MODEL = "llama_int4"
OPTIONS = {"max_prompt_tokens": 48, "max_new_tokens": 128, "default_new_tokens": 4, "kv_queue_factor": 0.5}
PROMPTS = ["Once upon a time", "The quick brown fox", "Hello, my name is", "1, 2, 3,"]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    apps = {a["name"]: a for a in copy.deepcopy(yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"])}
    router, llama = apps["oip"], apps[MODEL]
    router["args"].update(models=[MODEL])
    llama["args"].update(cache_path=str(tmp_path_factory.mktemp("llm-cache") / "tuning.json"), max_batch=4, repeats=1,
                         device="cpu", options=dict(OPTIONS))
    c = ServeCluster(num_cpus=2)
    try:  # a failed start shuts its Ray down too: the next module's ray.init must not find it
        c.deploy([router, llama])
        c.wait_running(["oip", MODEL], timeout=420)
        c.openai = openai.OpenAI(base_url=f"{c.base}/v1", api_key="unused", max_retries=0, timeout=120)
        yield c
        c.openai.close()
    finally:
        c.shutdown()


@pytest.fixture(scope="module")
def static_spec(tmp_path_factory):
    """The same synthetic Llama in this process, answering with static generate() (the parity reference)."""
    from deployments.llama_int4 import LlamaInt4Spec

    spec = LlamaInt4Spec(model_cache_dir=str(tmp_path_factory.mktemp("llm-models")), scheduler="static",
                         **{k: v for k, v in OPTIONS.items() if k != "kv_queue_factor"})
    spec.load("cpu", "float32")
    return spec


def scheduler(live) -> dict:
    return live.tuning(f"/{MODEL}")["scheduler"]


def test_models_lists_the_llama_and_its_limits(live):
    models = {m.id: m for m in live.openai.models.list().data}
    assert MODEL in models
    card = live.http.get("/v1/models").json()["data"][0]
    assert card["max_tokens"] == OPTIONS["max_new_tokens"] and card["scheduler"] == "continuous"
    plan = scheduler(live)
    assert plan["kind"] == "continuous" and plan["num_blocks"] >= plan["max_sequences"] >= 1
    assert plan["max_batch_tokens"] >= plan["max_sequences"] and plan["reasons"]


def test_greedy_completions_match_static_generate(live, static_spec):
    from deployments.llama_int4 import Prompt

    tokenizer = static_spec.get_tokenizer()
    want = static_spec.predict([Prompt(list(tokenizer(p)["input_ids"]), 12) for p in PROMPTS])
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # at once: they share the scheduler's steps
        got = list(pool.map(lambda p: live.openai.completions.create(model=MODEL, prompt=p, max_tokens=12,
                                                                        temperature=0), PROMPTS))
    for prompt, expected, answer in zip(PROMPTS, want, got):
        choice = answer.choices[0]
        assert choice.text == expected["text"], prompt
        assert answer.usage.completion_tokens == expected["completion_tokens"]
        assert answer.usage.prompt_tokens == expected["prompt_tokens"]
        assert answer.usage.total_tokens == expected["prompt_tokens"] + expected["completion_tokens"]
        assert choice.finish_reason == expected["finish_reason"]


def test_chat_streams_the_same_answer_as_a_whole_one(live):
    messages = [{"role": "system", "content": "Brief."}, {"role": "user", "content": "Hi"}]  # 48 tokens at most
    whole = live.openai.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.object == "chat.completion"
    chunks = list(live.openai.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                      stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    streamed = list(live.openai.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, stream=True))
    plain = live.openai.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_stop_seed_and_sampling(live):
    greedy = live.openai.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0)
    text = greedy.choices[0].text
    if len(text.strip()) >= 2:
        stop = text.strip()[1]
        stopped = live.openai.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=[stop])
        assert stopped.choices[0].text == text[:text.find(stop)]
        assert stopped.choices[0].finish_reason == "stop"
    a, b = (live.openai.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=10, temperature=1.0, top_p=0.9,
                                           seed=1234) for _ in range(2))
    assert a.choices[0].text == b.choices[0].text  # the same seed, the same tokens, whatever else ran meanwhile


def test_a_short_request_finishes_before_a_long_batch_mate(live):
    done: list[str] = []

    def run(name: str, tokens: int):
        live.openai.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=tokens, temperature=0)
        done.append(name)

    long = threading.Thread(target=run, args=("long", OPTIONS["max_new_tokens"]))
    long.start()
    time.sleep(0.3)  # the long one is generating when the short one arrives
    run("short", 1)
    long.join()
    assert done == ["short", "long"]


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10_000}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 5}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": [1]}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": 7}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 200}, 413, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0]"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True,
                              "max_tokens": -1}, 400, "max_tokens"),
])
def test_malformed_requests_get_openai_shaped_errors(live, path, body, status, param):
    r = live.http.post(path, json=body)
    assert r.status_code == status, r.text
    error = error_of(r)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_bad_json_and_wrong_paths(live):
    assert live.http.post("/v1/completions", content=b"{not json").status_code == 400
    error_of(live.http.post("/v1/completions", content=b"{not json"))
    assert live.http.get("/v1/completions").status_code == 405
    assert error_of(live.http.get("/v1/nothing"))["code"] == "unknown_url"
    with pytest.raises(openai.BadRequestError):  # the SDK reads the shape as its own error
        live.openai.completions.create(model=MODEL, prompt="hi", temperature=-1)


def test_a_cancelled_stream_frees_its_sequence(live):
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": OPTIONS["max_new_tokens"], "temperature": 0, "stream": True}
    before = scheduler(live)["now"]["cancelled"]
    with httpx.Client(base_url=live.base, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            first = next(r.iter_lines())
            assert first.startswith("data: ") and json.loads(first[6:])["object"] == "text_completion"
    deadline = time.time() + 30  # the router's cancel reaches the replica, which cancels the sequence
    while time.time() < deadline and (scheduler(live)["now"]["in_flight"] or scheduler(live)["now"]["cancelled"] == before):
        time.sleep(0.2)
    now = scheduler(live)["now"]
    assert now["cancelled"] == before + 1, now  # it left before its 128 tokens were done
    assert now["in_flight"] == 0 and now["kv_blocks_reserved"] == 0, now
    assert live.openai.completions.create(model=MODEL, prompt="still", max_tokens=2, temperature=0).choices  # serving


def test_past_the_kv_cache_503_with_retry_after(live):
    plan = scheduler(live)
    allowed = int(plan["num_blocks"] * (1 + OPTIONS["kv_queue_factor"]))
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": OPTIONS["max_new_tokens"], "temperature": 0}

    def one(_):
        with httpx.Client(base_url=live.base, timeout=120) as client:
            return client.post("/v1/completions", json=body)

    with ThreadPoolExecutor(allowed + 4) as pool:
        answers = list(pool.map(one, range(allowed + 4)))
    refused = [r for r in answers if r.status_code == 503]
    assert refused and all(r.status_code in (200, 503) for r in answers)
    assert int(refused[0].headers["retry-after"]) >= 1
    assert error_of(refused[0])["code"] == "kv_cache_full"
    assert scheduler(live)["refused_kv_cache"] >= len(refused)


def test_the_simple_route_and_oip_run_on_the_same_scheduler(live, static_spec):
    from deployments.llama_int4 import Prompt

    tokenizer = static_spec.get_tokenizer()
    want = static_spec.predict([Prompt(list(tokenizer(PROMPTS[0])["input_ids"]), 5)])[0]
    r = live.post(f"/{MODEL}", json.dumps({"prompt": PROMPTS[0], "max_new_tokens": 5}).encode(), "application/json")
    assert r.status_code == 200, r.text
    assert r.json()["text"] == want["text"] and r.json()["completion_tokens"] == want["completion_tokens"]
    oip = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [PROMPTS[0]]},
                      {"name": "max_tokens", "datatype": "INT32", "shape": [1], "data": [5]}]}
    r = live.http.post(f"/v2/models/{MODEL}/infer", json=oip)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [want["text"]]


def test_llm_metrics_are_exported(live):
    names = ("ray_autobatch_llm_time_to_first_token_seconds_bucket", "ray_autobatch_llm_time_per_output_token_seconds_bucket",
             "ray_autobatch_llm_generated_tokens_total", "ray_autobatch_llm_kv_blocks_total")
    deadline, text = time.time() + 30, ""
    while time.time() < deadline:
        text = live.metrics_text()
        if all(n in text for n in names):
            break
        time.sleep(1)
    assert all(n in text for n in names), [n for n in names if n not in text]
