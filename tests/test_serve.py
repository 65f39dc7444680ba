"""Serving: the batched decoder, and a real ``megannm serve`` process answering real clients.

The decoder: rows that join a running batch at different steps decode what they decode alone (greedy, and seeded
sampling), guided image rows beside text rows included. The server (one process for the module, on a checkpoint of a
few training steps of the toy world, with an API key): the official ``openai`` client's chat with a picture in and
text out, text in and a picture out, streaming, the images endpoint; completions' echo + logprobs equal to the
model's own log-probs; every bad request an HTTP error naming its field, the server serving on; a full queue answers
429 and a client that goes away frees its rows; lm-eval evaluates the served model through its OpenAI-compatible
backend on a task file written here. Last, ``megannm generate`` with many prompts writes one results file.
"""
from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import signal
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key-31"
MODEL = "tiny"
CONTEXT = 448

RECIPE = """\
name: tiny
seed: 0
model: {hidden_size: 32, num_layers: 2, num_heads: 4, ffn_hidden_size: 64, max_seq_len: %(context)d}
parallel: {zero_stage: 0}
data: {train: [{path: %(shards)s}], seq_len: 96, micro_batch_size: 4, global_batch_size: 4, pack: true}
optimizer: {lr: 1.0e-2, min_lr: 1.0e-3}
schedule: {train_steps: 6, warmup_steps: 1}
logging: {dir: %(run)s, interval: 1, progress_bar: false, tensorboard: false}
"""


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def checkpoint(toy_data, tmp_path_factory):
    """A few training steps of the toy world (a real `megannm train` process)."""
    out = tmp_path_factory.mktemp("serve_run")
    recipe = out / "tiny.yaml"
    recipe.write_text(RECIPE % {"shards": toy_data["shards"] / "train", "run": out / "run", "context": CONTEXT})
    done = subprocess.run([sys.executable, "-m", "megannm", "train", str(recipe)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out / "run" / "checkpoints"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoint, toy_data, tmp_path_factory):
    """`megannm serve` in a subprocess (2 rows, a queue of 2, an API key from the environment); yields its base URL
    and the folder local image paths may name."""
    media = tmp_path_factory.mktemp("media")
    port = free_port()
    log = media.parent / f"serve-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "megannm", "serve", str(checkpoint), "--tokenizers",
                                 str(toy_data["tokenizers"]), "--port", str(port), "--served-model-name", MODEL,
                                 "--max-rows", "2", "--max-queue", "2", "--max-n", "4", "--max-tokens", "400",
                                 "--max-body", "2000000", "--allowed-local-media-path", str(media)],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**env(), "MEGANNM_API_KEY": KEY})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, f"the server exited: {log.read_text()}"
            assert time.time() < deadline, f"the server did not start in 120 s: {log.read_text()}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    assert json.loads(r.read()) == {"status": "ok"}
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        yield url, media
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=120)


def post(url: str, body, key: str | None = KEY, raw: bytes | None = None, timeout: float = 120):
    """(status, JSON answer) of a POST."""
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def metric(url: str, name: str) -> float:
    req = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read().decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def toy_picture(seed=0) -> np.ndarray:
    from megannm.toy import world
    return world.make_examples(1, seed=seed)[0][1]


# ---------------------------------------------------------------------------------------------------------------------
# the decoder


def tiny_model(tok, layout, seed=2):
    from megannm.config import ModelConfig
    from megannm.model.transformer import ModelArgs, NMMModel
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64, max_seq_len=160)
    return NMMModel(ModelArgs.from_config(cfg, tok.vocab), layout).eval()


def test_rows_joining_a_running_batch_decode_what_they_decode_alone(tok, layout):
    """Three slots, six rows of different lengths and kinds joining at different steps (a guided image row takes
    two slots beside text rows): each row's tokens equal its tokens decoded alone, greedy and seeded sampling."""
    from megannm.decode import Decoder, Row
    from megannm.generate import caption_prompt, image_prompt
    from megannm.toy import world
    model = tiny_model(tok, layout)
    v = tok.vocab
    ex = world.make_examples(3, seed=4)
    def rows():  # noqa: E306
        out = []
        for i, (attrs, image, caption) in enumerate(ex):
            out.append(Row(caption_prompt(tok, image), "text", max_new=5 + 3 * i, temperature=0.0 if i % 2 else 0.9,
                           seed=None if i % 2 else 10 + i, ignore_eos=i == 2))
            out.append(Row(image_prompt(tok, caption), "image", temperature=0.0 if i else 0.8, seed=20 + i,
                           cfg_scale=2.0 if i == 1 else 1.0))
        return out

    alone = []
    for r in rows():
        Decoder(model, v, max_rows=2).run([r])
        alone.append(r.tokens)
    assert len(alone[5 - 1]) == 5 + 3 * 2 and all(len(a) == v.image_grid for a in alone[1::2])
    dec = Decoder(model, v, max_rows=3, sync_every=3)
    together = rows()
    steps_at_join = []
    for r in together:  # one row joins every other step while the others decode
        dec.add(r)
        steps_at_join.append(dec.steps)
        dec.step()
        dec.step()
    while not dec.idle:
        dec.step()
    assert [r.tokens for r in together] == alone
    assert len(set(steps_at_join)) == len(together) and all(r.finish in ("stop", "length") for r in together)
    assert dec.steps < sum(len(a) for a in alone)  # rows decoded side by side, not one after another


# ---------------------------------------------------------------------------------------------------------------------
# the server and the openai client


def test_openai_chat_picture_in_text_out_and_text_in_picture_out(server, client, tok):
    from megannm.generate import chat_prompt
    picture = toy_picture()
    content = [{"type": "text", "text": "What is in the picture?"},
               {"type": "image_url", "image_url": {"url": data_url(png(picture))}}]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=12,
                                       temperature=0)
    want_prompt = chat_prompt(tok, [{"role": "user", "content": [{"type": "text", "text": "What is in the picture?"},
                                                                 {"type": "image", "image": picture}]}])
    assert r.usage.prompt_tokens == len(want_prompt)
    assert isinstance(r.choices[0].message.content, str) and 0 <= r.usage.completion_tokens <= 12
    # the same picture as a local file under --allowed-local-media-path: the same greedy answer
    path = server[1] / "shape.png"
    path.write_bytes(png(picture))
    again = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
        content[0], {"type": "image_url", "image_url": {"url": str(path)}}]}], max_tokens=12, temperature=0)
    assert again.choices[0].message.content == r.choices[0].message.content

    drawn = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a red circle"}],
                                           n=2, seed=5, temperature=1.0,
                                           extra_body={"modalities": ["image"], "guidance_scale": 2.0})
    assert [c.index for c in drawn.choices] == [0, 1] and drawn.usage.completion_tokens == 2 * tok.vocab.image_grid
    urls = []
    for c in drawn.choices:
        part = c.message.content[0]
        assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,")
        urls.append(part["image_url"]["url"])
        im = Image.open(io.BytesIO(base64.b64decode(urls[-1].split(",", 1)[1])))
        assert im.size == tuple(tok.image_size())[::-1] and im.mode == "RGB"
    assert urls[0] != urls[1]  # seeds 5 and 6


def test_streaming_chat_equals_the_whole_answer(client):
    messages = [{"role": "user", "content": "Describe a small blue square."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                           extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices[0].delta.content]) > 1  # token by token, not one block
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_images_endpoint_b64_json_seeded(client, tok):
    def draw(seed):
        out = client.images.generate(model=MODEL, prompt="a large green triangle", n=2, response_format="b64_json",
                                     extra_body={"seed": seed, "temperature": 0.9})
        return [base64.b64decode(d.b64_json) for d in out.data]
    first = draw(7)
    assert len(first) == 2 and first[0] != first[1]
    assert all(Image.open(io.BytesIO(b)).size == tuple(tok.image_size())[::-1] for b in first)
    assert draw(7) == first  # a seeded request draws the same pictures


def test_completions_echo_logprobs_are_the_models(server, checkpoint, tok, layout):
    """lm-eval's log-likelihood request: token ids in, echo + logprobs out: every prompt token's log-prob equals
    the checkpoint's own, and the generated token is the greedy one."""
    from megannm.checkpoint.opened import load_model
    from megannm.serve.prompts import decode_ids, token_string
    ids = [tok.vocab.bos_id, *tok.text_ids("a small red circle at the top")]
    status, out = post(f"{server[0]}/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 1,
                                                        "temperature": 0, "logprobs": 1, "echo": True})
    assert status == 200, out
    lp = out["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    model, _ = load_model(checkpoint, layout, tok.vocab)
    with torch.no_grad():
        x = torch.tensor([ids])
        pos = torch.arange(len(ids))[None]
        logp = torch.log_softmax(model(x, position_ids=pos, document_ids=torch.zeros_like(pos))[0].float(), -1)
    want = [logp[j - 1, ids[j]].item() for j in range(1, len(ids))]
    assert lp["token_logprobs"][1:-1] == pytest.approx(want, abs=1e-4)
    # the generated token is the greedy one among what a text answer may hold (text ids and <eos>)
    allowed = torch.tensor(list(range(tok.vocab.text_size)) + [tok.vocab.eos_id])
    greedy = int(allowed[logp[-1, allowed].argmax()])
    assert lp["tokens"][-1] == token_string(tok, greedy)
    assert lp["token_logprobs"][-1] == pytest.approx(logp[-1, greedy].item(), abs=1e-4)
    assert out["choices"][0]["text"] == decode_ids(tok, ids + [greedy] * (greedy < tok.vocab.text_size))
    for j, top in enumerate(lp["top_logprobs"][1:], 1):
        assert max(top.values()) == pytest.approx(logp[j - 1].max().item(), abs=1e-4)


def test_bad_requests_get_clear_http_errors_and_the_server_serves_on(server, tok):
    url = server[0]
    chat = f"{url}/v1/chat/completions"
    ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    big = np.zeros((4100, 4100, 3), dtype=np.uint8)
    cases = [  # (body or raw bytes, key, status, words the message must hold, param)
        (b"{not json", KEY, 400, "not valid JSON", None),
        ({**ok, "model": "gpt-4"}, KEY, 404, "'gpt-4' does not exist", "model"),
        ({**ok, "messages": "hi"}, KEY, 422, "messages", "messages"),
        ({**ok, "temperature": 7}, KEY, 400, "temperature", "temperature"),
        ({**ok, "n": 9}, KEY, 400, "n=9 is over this server's limit of 4", "n"),
        ({**ok, "max_tokens": 401}, KEY, 400, "max_tokens=401 is over this server's limit of 400", "max_tokens"),
        ({**ok, "messages": [{"role": "user", "content": "word " * 600}]}, KEY, 400,
         f"maximum context length is {CONTEXT} tokens", "messages"),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(b"not a picture").decode()}}]}]}, KEY, 400,
         "cannot be decoded", "messages[0].content[0].image_url"),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": data_url(png(big))}}]}]}, KEY, 413, "4100x4100 px", "messages[0].content[0].image_url"),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "/etc/passwd"}}]}]}, KEY, 400, "outside --allowed-local-media-path",
         "messages[0].content[0].image_url"),
        ({**ok, "pad": "x" * 2_100_000}, KEY, 413, "more than --max-body 2000000", None),
        (ok, None, 401, "missing or wrong API key", None),
        (ok, "wrong", 401, "missing or wrong API key", None),
    ]
    for body, key, status, words, param in cases:
        got, answer = post(chat, None if isinstance(body, bytes) else body, key,
                           raw=body if isinstance(body, bytes) else None)
        err = answer["error"]
        assert (got, err["code"]) == (status, status) and words in err["message"], (words, got, answer)
        assert err["param"] == param, err
    assert post(f"{url}/v1/completions", {"model": MODEL, "prompt": [tok.vocab.size + 5]})[0] == 400
    assert post(f"{url}/v1/images/generations", {"prompt": "a circle", "size": "1024x1024"})[0] == 400
    with urllib.request.urlopen(f"{url}/health", timeout=10) as r:  # no key needed for the health check
        assert r.status == 200
    status, answer = post(chat, ok)
    assert status == 200 and answer["choices"][0]["message"]["role"] == "assistant"
    assert metric(url, 'megannm_requests_total{endpoint="/v1/chat/completions",status="401"}') == 2


def test_full_queue_answers_429_and_a_client_that_leaves_frees_its_rows(server):
    """2 slots and a queue of 2: a request holding both slots, one waiting with 2 rows, and a third is refused
    with 429; then a client that goes away mid-answer has its rows cancelled long before their end."""
    url = server[0]
    long = {"model": MODEL, "prompt": "a", "max_tokens": 400, "n": 2, "temperature": 0, "ignore_eos": True}
    pool = concurrent.futures.ThreadPoolExecutor(4)
    first = pool.submit(post, f"{url}/v1/completions", long)
    while metric(url, "megannm_running_rows") < 2:
        assert not first.done(), first.result()
        time.sleep(0.05)
    second = pool.submit(post, f"{url}/v1/completions", {**long, "max_tokens": 2})
    while metric(url, "megannm_queue_rows") < 2:
        assert not second.done() and not first.done(), (first, second)
        time.sleep(0.02)
    status, answer = post(f"{url}/v1/completions", {**long, "n": 1, "max_tokens": 2})
    assert status == 429 and "rows already wait (--max-queue 2)" in answer["error"]["message"]
    assert first.result()[0] == 200 and second.result()[0] == 200
    assert first.result()[1]["usage"]["completion_tokens"] == 800

    before, generated = metric(url, "megannm_cancelled_rows"), metric(url, "megannm_generated_tokens_total")
    leaving = pool.submit(post, f"{url}/v1/completions", long, timeout=1.0)
    with pytest.raises(Exception):  # noqa: B017 - the client gives up after a second: a read timeout
        leaving.result()
    while metric(url, "megannm_running_rows") > 0:
        time.sleep(0.05)
    assert metric(url, "megannm_cancelled_rows") == before + 2
    assert metric(url, "megannm_generated_tokens_total") - generated < 800  # freed before their 2 x 400 tokens
    assert post(f"{url}/v1/completions", {**long, "n": 1, "max_tokens": 3})[1]["usage"]["completion_tokens"] == 3


def test_a_non_local_host_needs_an_api_key(checkpoint, toy_data):
    done = subprocess.run([sys.executable, "-m", "megannm", "serve", str(checkpoint), "--tokenizers",
                           str(toy_data["tokenizers"]), "--host", "0.0.0.0"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={k: v for k, v in env().items() if k != "MEGANNM_API_KEY"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "megannm serve: error: --host 0.0.0.0: listening beyond this machine needs --api-key KEY (or "
        "MEGANNM_API_KEY); without one, bind 127.0.0.1 and reach it through an SSH tunnel"]


@pytest.mark.distributed
def test_two_tensor_parallel_ranks_serve_what_one_serves(server, checkpoint, toy_data, tmp_path):
    """`torchrun --nproc-per-node 2 megannm serve`: rank 0 serves, rank 1 follows every step; greedy answers and
    log-probs equal the one-rank server's, concurrent requests and a cancelled one included; SIGTERM ends both."""
    log = tmp_path / "tp2.log"

    def launch():
        port, master = free_port(), free_port()
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                     "--master-port", str(master), "-m", "megannm", "serve", str(checkpoint),
                                     "--tokenizers", str(toy_data["tokenizers"]), "--port", str(port),
                                     "--served-model-name", MODEL, "--max-rows", "4"], cwd=REPO, stdout=out,
                                    stderr=subprocess.STDOUT, env={**env(), "MEGANNM_API_KEY": KEY},
                                    start_new_session=True)  # its ranks in its group, killed with it below
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                return proc, url
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None, url

    # free_port() closes its socket before torchrun binds the port: another process may take it in between, and
    # the launch then never comes up; one more launch on fresh ports (a second failure is a failure)
    proc, url = launch()
    if proc is None:
        first_log = log.read_text()
        proc, url = launch()
        assert proc is not None, f"the server came up neither time:\n{first_log}\n---\n{log.read_text()}"
    try:
        assert "tensor parallel 2" in log.read_text()
        bodies = [{"model": MODEL, "prompt": p, "max_tokens": 6, "temperature": 0, "logprobs": 2, "echo": True,
                   "ignore_eos": True} for p in ("a small red", "a large blue square at the", "a")]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            two = list(pool.map(lambda b: post(f"{url}/v1/completions", b), bodies))
            left = pool.submit(post, f"{url}/v1/completions", {**bodies[0], "max_tokens": 400, "n": 2}, KEY,
                               None, 0.5)
            with pytest.raises(Exception):  # noqa: B017 - a client that gives up: its rows are cancelled
                left.result()
        one = [post(f"{server[0]}/v1/completions", b) for b in bodies]
        for (s2, a2), (s1, a1) in zip(two, one):
            assert s2 == s1 == 200
            c2, c1 = a2["choices"][0], a1["choices"][0]
            assert c2["text"] == c1["text"] and c2["logprobs"]["tokens"] == c1["logprobs"]["tokens"]
            assert c2["logprobs"]["token_logprobs"][1:] == pytest.approx(c1["logprobs"]["token_logprobs"][1:],
                                                                         abs=1e-4)
        drawn = post(f"{url}/v1/images/generations", {"prompt": "a red circle", "n": 2, "temperature": 0})
        assert drawn[0] == 200 and len(drawn[1]["data"]) == 2
    finally:
        proc.terminate()  # torchrun passes SIGTERM on: rank 0 drains and stops rank 1 (torchrun itself exits 1)
        proc.wait(90)
    text = log.read_text()
    assert "/megannm/" not in text and "ChildFailedError" not in text, text  # no rank failed


# ---------------------------------------------------------------------------------------------------------------------
# lm-eval through its OpenAI-compatible backend

TASK = """\
task: toy_colours
dataset_path: json
dataset_kwargs:
  data_files:
    test: %(data)s
test_split: test
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_scores_the_served_model(server, tmp_path, checkpoint, tok, layout):
    """lm-eval's local-completions backend with the server's own tokenizer (tokenizer_backend=remote), offline,
    on a multiple-choice task written here: its accuracy equals the one computed from the checkpoint directly."""
    from megannm.checkpoint.opened import load_model
    docs = [{"context": f"a {size}", "choices": [" red circle", " blue square", " green triangle"], "answer": i % 3}
            for i, size in enumerate(["small", "large", "small red", "large blue", "small green", "large"])]
    data = tmp_path / "colours.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy_colours.yaml").write_text(TASK % {"data": data})
    out = tmp_path / "results"
    args = (f"model={MODEL},base_url={server[0]}/v1/completions,tokenizer_backend=remote,num_concurrent=2,"
            f"auth_token={KEY}")
    done = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args",
                           args, "--include_path", str(tasks), "--tasks", "toy_colours", "--output_path", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**env(), "OPENAI_API_KEY": KEY, "HF_DATASETS_OFFLINE": "1"})
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    result = json.loads(next(out.rglob("results_*.json")).read_text())
    acc = result["results"]["toy_colours"]["acc,none"]
    assert result["n-samples"]["toy_colours"]["effective"] == len(docs)

    from megannm.serve.prompts import encode_text
    model, _ = load_model(checkpoint, layout, tok.vocab)
    right = 0
    for d in docs:
        scores = []
        for choice in d["choices"]:
            ctx, cont = encode_text(tok, d["context"]), encode_text(tok, choice)
            ids = torch.tensor([ctx + cont])
            pos = torch.arange(ids.shape[1])[None]
            with torch.no_grad():
                logp = torch.log_softmax(model(ids, position_ids=pos, document_ids=torch.zeros_like(pos))[0], -1)
            scores.append(sum(logp[len(ctx) + j - 1, t].item() for j, t in enumerate(cont)))
        right += int(np.argmax(scores) == d["answer"])
    assert acc == pytest.approx(right / len(docs))


# ---------------------------------------------------------------------------------------------------------------------
# megannm generate, many prompts at once (last: it opens and closes its own world of one)


def test_generate_many_prompts_into_one_results_file(checkpoint, toy_data, tmp_path):
    from megannm.cli import main as megannm
    pictures = []
    for i in range(2):
        pictures.append(tmp_path / f"p{i}.png")
        pictures[-1].write_bytes(png(toy_picture(i)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"caption": "a large blue square"}) + "\n" + json.dumps({"image": "p1.png"}) + "\n")
    out = tmp_path / "gen"
    assert megannm(["generate", str(checkpoint), "--tokenizers", str(toy_data["tokenizers"]), "--caption",
                    "a red circle", "a small green triangle", "--image", str(pictures[0]), "--prompts", str(prompts),
                    "--out", str(out), "--batch-size", "3"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r.get("caption") if "image_" in str(r["image"]) else r["image"] for r in results] == [
        "a red circle", "a small green triangle", "a large blue square", str(pictures[0]), str(tmp_path / "p1.png")]
    assert all(Image.open(r["image"]).size == (32, 32) for r in results[:3])
    assert all(isinstance(r["caption"], str) for r in results[3:])
