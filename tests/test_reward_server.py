"""Rewards over HTTP: real ``megannm reward-server`` processes on localhost and the real client.

Round trip equals the in-process reward (pictures as PNG, structured truths, text answers); one request per batch;
a timeout, a bad request, a reward that raises and a server that dies mid-batch each end in one error line naming
the URL within a bounded time; a GRPO run whose reward server dies mid-run exits with that line and leaves only
its complete checkpoints.
"""
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------------
# rewards the servers below run (imported by the server process as tests.test_reward_server:NAME)


def scripted(prompt, sample, truth) -> float:
    """Does what its truth says: {"sleep": s} sleeps, {"raise": msg} raises, {"die": true} kills the server
    process mid-request; otherwise scores the answer's length."""
    truth = truth or {}
    if truth.get("die"):
        os._exit(3)
    if "raise" in truth:
        raise ValueError(truth["raise"])
    time.sleep(float(truth.get("sleep", 0)))
    return len(sample.ids) / 10


_calls = [0]


def dying_low_text(prompt, sample, truth) -> float:
    """The GRPO tests' low_text, from a server that dies after MEGANNM_TEST_DIE_AFTER samples."""
    from tests.scripts.rl_cases import low_text
    _calls[0] += 1
    if _calls[0] > int(os.environ.get("MEGANNM_TEST_DIE_AFTER", "1000000")):
        os._exit(3)
    return low_text(prompt, sample, truth)


# ---------------------------------------------------------------------------------------------------------------------
# a real server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(tmp_path, reward: str, env: dict | None = None, args: tuple = ()):
    """``megannm reward-server`` in a subprocess on a free localhost port; yields (process, url, log path)."""
    port = free_port()
    log = tmp_path / f"server-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "megannm", "reward-server", "--reward", reward,
                                 "--port", str(port), *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}/score"
    try:
        deadline = time.time() + 60
        while True:  # bounded: the health check answers once the reward is imported
            assert proc.poll() is None, f"the server exited: {log.read_text()}"
            assert time.time() < deadline, f"the server did not start within 60 s: {log.read_text()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
                    assert reward.encode() in r.read()
                    break
            except OSError:
                time.sleep(0.1)
        yield proc, url, log
    finally:
        proc.kill()
        proc.wait(timeout=30)


def batches_scored(log: Path) -> int:
    return sum(line.startswith("scored ") for line in log.read_text().splitlines())


# ---------------------------------------------------------------------------------------------------------------------
# the client against a server


def _geneval_batch():
    """Pictures (right, wrong, malformed) for drawing prompts and text answers (right, wrong) for questions."""
    from megannm.rewards import Prompt, Sample
    from megannm.toy import geneval, scenes
    rng = np.random.default_rng(0)
    prompts, samples, truths = [], [], []
    for spec in geneval.sample_specs(6, rng, "all"):
        for image in (scenes.render(geneval.truth_scene(spec, rng)), np.zeros((64, 64, 3), np.uint8), None):
            prompts.append(Prompt([1, 2, 3], "image", spec.text()))
            samples.append(Sample([7] * 4, "image", image=image, well_formed=image is not None))
            truths.append(spec)
    for _, q in geneval.sample_questions(4, rng, "all"):
        for text in (q.answer, "a purple nothing"):
            prompts.append(Prompt([4, 5], "text", q.question))
            samples.append(Sample([9, 9], "text", text=text))
            truths.append(q)
    return prompts, samples, truths


def test_round_trip_equals_the_in_process_reward(tmp_path):
    from megannm.rewards import Combined, get
    from megannm.rewards.remote import RemoteReward
    from megannm.toy.geneval import toy_geneval
    prompts, samples, truths = _geneval_batch()
    local = [toy_geneval(p, s, t) for p, s, t in zip(prompts, samples, truths)]
    assert 0 < sum(local) < len(local)
    with server(tmp_path, "toy_geneval") as (_, url, log):
        remote = get(url)
        assert isinstance(remote, RemoteReward)
        assert remote.score_batch(prompts, samples, truths) == local
        assert batches_scored(log) == 1  # one request for the whole batch
        assert remote(prompts[0], samples[0], truths[0]) == local[0]
        small = get(url + "#batch=4&timeout=30")
        assert small.score_batch(prompts, samples, truths) == local
        assert batches_scored(log) == 2 + -(-len(prompts) // 4)
        # a recipe's weighted sum: the server once per batch, the local reward per sample
        both = Combined({url: 1.0, "format": 0.5})
        totals, parts = both.score_batch(prompts, samples, truths)
        assert parts[url] == local and totals == [both.score(p, s, t)[0] for p, s, t in zip(prompts, samples, truths)]


def test_timeout_bad_request_and_reward_errors_are_one_line_naming_the_url(tmp_path):
    from megannm.rewards import Prompt, Sample, get
    from megannm.rewards.remote import RemoteRewardError
    p, s = Prompt([1], "text"), Sample([1, 2, 3], "text", text="x")
    with server(tmp_path, "tests.test_reward_server:scripted") as (_, url, log):
        assert get(url).score_batch([p, p], [s, s], [None, {"sleep": 0}]) == [0.3, 0.3]
        with pytest.raises(RemoteRewardError) as e:
            get(url + "#timeout=0.3&retries=1").score_batch([p], [s], [{"sleep": 3}])
        assert batches_scored(log) == 1  # it gave up after two tries of 0.3 s, before the reward's 3 s ended
        msg = str(e.value)
        assert "\n" not in msg and url in msg and "no answer within 0.3 s (2 tries)" in msg, msg
        with pytest.raises(RemoteRewardError, match=r"reward server .*: HTTP 500: reward tests\.test_reward_server:"
                                                    r"scripted: ValueError: no good \(2 tries\)"):
            get(url + "#retries=1").score_batch([p], [s], [{"raise": "no good"}])
        request = urllib.request.Request(url, data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:  # the server's own answer to a malformed batch
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == 400 and b"bad request" in e.value.read()
        with pytest.raises(RemoteRewardError, match=r"cannot send the truths as JSON"):
            get(url).score_batch([p], [s], [object()])
    with pytest.raises(ValueError, match=r"rewards: http://127\.0\.0\.1:1/#tries=3: unknown option 'tries'"):
        get("http://127.0.0.1:1/#tries=3")


def test_a_server_that_dies_mid_batch_fails_the_batch_in_one_line(tmp_path):
    from megannm.rewards import Combined, Prompt, Sample
    from megannm.rewards.remote import RemoteRewardError
    p, s = Prompt([1], "text"), Sample([1], "text", text="x")
    with server(tmp_path, "tests.test_reward_server:scripted") as (proc, url, log):
        combined = Combined({url + "#retries=2": 1.0, "format": 1.0})
        assert combined.score_batch([p], [s], [None])[0] == [1.1]
        with pytest.raises(RemoteRewardError) as e:
            combined.score_batch([p, p], [s, s], [None, {"die": True}])
        assert proc.wait(timeout=10) == 3  # it died answering
        assert batches_scored(log) == 1  # only the first batch; the retries found no server and gave up
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"reward server {url}: ") and "(3 tries)" in msg, msg


def test_grpo_run_whose_reward_server_dies_exits_with_one_line_and_keeps_its_checkpoints(toy_data, tmp_path):
    from megannm import checkpoint
    from megannm.config import dump_recipe
    from tests.scripts import rl_cases
    with server(tmp_path, "tests.test_reward_server:dying_low_text", {"MEGANNM_TEST_DIE_AFTER": "16"}) as (
            proc, url, _log):
        r = rl_cases.recipe(tmp_path, str(toy_data["tokenizers"]), "remote", steps=3, micro=16, prompts_per_step=4,
                            group_size=4, ppo_epochs=1, mini_batches=1, kl_coef=0.0, rewards=[url + "#retries=1"])
        recipe = tmp_path / "remote.yaml"
        data = dump_recipe(r).replace("save_interval: 0", "save_interval: 1")
        recipe.write_text(data)
        out = subprocess.run([sys.executable, "-m", "megannm", "train", str(recipe)], cwd=REPO, capture_output=True,
                             text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.wait(timeout=10) == 3  # the server died in the second step's batch
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and lines[-1].startswith(f"megannm train: error: reward server {url}: ")
    ckpts = tmp_path / "remote" / "checkpoints"
    last = checkpoint.latest(ckpts)
    assert last.name == checkpoint.tag_for(1) and checkpoint.read_meta(last)["step"] == 1  # the step before
    assert [p.name for p in ckpts.iterdir() if p.is_dir()] == [last.name]  # nothing half-written after it


def test_an_api_key_guards_the_batches_and_a_non_local_host_needs_one(tmp_path, monkeypatch):
    """With --api-key a batch without the key (or with another) is a 401 and the client that sends
    MEGANNM_API_KEY is scored; without a key the server refuses to listen beyond this machine, in one line."""
    from megannm.rewards import Prompt, Sample, get
    from megannm.rewards.remote import RemoteRewardError
    p, s = Prompt([1], "text"), Sample([1, 2], "text", text="x")
    with server(tmp_path, "tests.test_reward_server:scripted", args=("--api-key", "k-28")) as (_, url, log):
        monkeypatch.delenv("MEGANNM_API_KEY", raising=False)
        with pytest.raises(RemoteRewardError, match=r"HTTP 401: missing or wrong API key \(set MEGANNM_API_KEY "
                                                    r"where the recipe runs.*\(1 try\)$"):
            get(url).score_batch([p], [s], [None])
        monkeypatch.setenv("MEGANNM_API_KEY", "k-29")
        with pytest.raises(RemoteRewardError, match=r"HTTP 401"):
            get(url).score_batch([p], [s], [None])
        monkeypatch.setenv("MEGANNM_API_KEY", "k-28")
        assert get(url).score_batch([p, p], [s, s], [None, None]) == [0.2, 0.2]
        assert batches_scored(log) == 1
    out = subprocess.run([sys.executable, "-m", "megannm", "reward-server", "--reward", "format", "--port", "0",
                          "--host", "0.0.0.0"], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "MEGANNM_API_KEY"})
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "megannm reward-server: error: --host 0.0.0.0: listening beyond this machine needs --api-key KEY (or "
        "MEGANNM_API_KEY); without one, bind 127.0.0.1 and reach it through an SSH tunnel"]
