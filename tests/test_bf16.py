"""Mixed precision end to end, device-correct code and attention backends.

- Every phase in bf16 (and pretraining in fp16 with DeepSpeed's loss scaler) on real engines over 2 ranks: losses
  finite and within TOL of fp32 step by step, bf16 resume bitwise, a bf16 pipeline run, and a bf16 checkpoint
  converted exactly (its fp32 master weights, bit for bit). One launch: ``tests/scripts/bf16_cases.py``.
- ``megannm selfcheck`` on the CPU: every line ok, the GPU-only lines ``skipped: no GPU``.
- Device correctness: a training step, sampling and the RL losses under ``torch.set_default_device("meta")``, so
  any tensor made without the device of its inputs fails; and no hard-coded CPU device in the hot path's source.
- Attention: flex_attention's block mask on packed rows gives SDPA's outputs (flex runs forward-only on the CPU).
"""
import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import dist

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

SCRIPT = "tests/scripts/bf16_cases.py"
ROOT = Path(__file__).resolve().parents[1]
# bf16 vs fp32, per step of these 6-step runs: relative loss difference (measured: at most 0.1%; bf16 has 8 bits
# of mantissa, 0.4% per rounding, and the fp32 master and fp32 accumulation keep the drift far below that)
TOL = 0.01


def load(out, name):
    return json.loads((out / f"{name}.json").read_text())


def losses(out, name):
    return [x["loss"] for x in load(out, name)["train"]]


def fp16_supported() -> bool:
    """Whether DeepSpeed accepts fp16 here: on the CPU only where oneDNN has fp16 kernels (AVX512-FP16 / AMX)."""
    from deepspeed.accelerator import get_accelerator
    return bool(get_accelerator().is_fp16_supported())


@pytest.fixture(scope="module")
def runs(toy_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16")
    toy = Path(toy_data["shards"]).parents[1]  # build_data's folder
    cases = [f"{k}:{p}" for k in ("pretrain", "sft", "grpo", "dpo") for p in ("fp32", "bf16")]
    cases += ["pretrain:fp16"]  # trains where the processor has fp16; elsewhere refused in one line (its test)
    dist.run([SCRIPT, str(out), str(toy), *cases, "resume", "init", "pp2"], nproc=2, launcher="torchrun",
             timeout=600)
    return out


@pytest.mark.parametrize("phase", ["pretrain", "sft", "grpo", "dpo"])
def test_every_phase_trains_in_bf16_close_to_fp32(runs, phase):
    low, ref = load(runs, f"{phase}_bf16"), load(runs, f"{phase}_fp32")
    assert low["dtype"] == "torch.bfloat16" and ref["dtype"] == "torch.float32"
    assert low["optimizer"] == "BF16_Optimizer"  # ZeRO 1 + fp32 gradient accumulation: fp32 master and grads
    a, b = losses(runs, f"{phase}_bf16"), losses(runs, f"{phase}_fp32")
    assert len(a) == len(b) == 6 and all(math.isfinite(x) for x in a)
    for x, y in zip(a, b):
        assert abs(x - y) <= TOL * max(abs(y), 1e-3), (phase, a, b)
    if phase != "grpo":
        assert a[-1] < a[0] - 0.1  # it learns
    for e, f in zip(load(runs, f"{phase}_bf16")["eval"], load(runs, f"{phase}_fp32")["eval"]):
        assert abs(e["loss"] - f["loss"]) <= TOL * abs(f["loss"])  # evaluation in bf16 too


def test_grpo_bf16_reference_equals_the_policy_at_the_start(runs):
    first = load(runs, "grpo_bf16")["train"][0]
    assert first["kl"] == 0.0 and first["ratio"] == 1.0  # the frozen bf16 reference: the policy's own weights
    assert load(runs, "grpo_bf16")["train"][-1]["kl"] > 0  # and the policy moved away from it


def test_dpo_bf16_starts_at_log_2(runs):
    assert losses(runs, "dpo_bf16")[0] == pytest.approx(math.log(2), abs=1e-4)


def test_fp16_trains_under_the_dynamic_loss_scale(runs):
    """fp16 with DeepSpeed's loss scaler where the processor has half-precision arithmetic; elsewhere the recipe is
    refused with one line naming the key, before DeepSpeed's own traceback."""
    r = load(runs, "pretrain_fp16")
    if not fp16_supported():
        assert r["refused"].startswith("precision: fp16 is not supported on this device") and "\n" not in r["refused"]
        return
    assert r["dtype"] == "torch.float16"
    got = losses(runs, "pretrain_fp16")
    assert all(math.isfinite(x) for x in got)
    # 2^16 overflows at first: DeepSpeed skips those steps (loss unchanged) and halves the scale, then trains
    assert got[1] == pytest.approx(got[0], abs=0.01) and got[-1] < got[0] - 0.5


def test_bf16_resume_is_bitwise(runs):
    straight, resumed = losses(runs, "straight"), losses(runs, "resumed")
    assert len(straight) == len(resumed) == 6 and straight == resumed
    assert "resumed" in load(runs, "resumed")["events"]


def test_bf16_pipeline_matches_data_parallel(runs):
    pp, dp = losses(runs, "pp2"), losses(runs, "pretrain_bf16")
    assert load(runs, "pp2")["optimizer"] == "BF16_Optimizer"
    assert pp == pytest.approx(dp, rel=2e-3)  # the same batches; other summation orders in bf16


def test_bf16_checkpoint_converts_exactly(runs, tmp_path):
    """The consolidated weights are the engine's fp32 master (BF16_Optimizer's partitions over 2 ranks joined)."""
    from safetensors.torch import load_file
    from megannm.cli.convert import convert
    out = tmp_path / "consolidated"
    assert convert([str(runs / "pretrain_bf16" / "checkpoints"), str(out), "--to", "consolidated"]) in (0, None)
    state = {}
    for f in out.glob("*.safetensors"):
        state.update(load_file(f))
    master = torch.load(runs / "master.pt")
    assert set(state) == set(master)
    for name, t in state.items():
        assert t.dtype == torch.float32
        assert torch.equal(t, master[name][:t.shape[0]]), name  # vocabulary padding rows are not exported
    assert "fp32 master from the optimizer partitions" in json.loads(
        (out / "consolidated.json").read_text())["source"]["weights"]


def test_a_stage_starts_from_a_bf16_checkpoint(runs):
    """init_from a bf16 ZeRO-1 checkpoint (BF16_Optimizer's files, which DeepSpeed's zero_to_fp32 cannot read)."""
    init = load(runs, "init")
    assert "initialised" in init["events"]
    # the fp32 master starts from the checkpoint's fp32 master, not from its bf16 rounding
    before, source = torch.load(runs / "init_master.pt"), torch.load(runs / "master.pt")
    assert before.keys() == source.keys() and all(torch.equal(before[n], source[n]) for n in source)
    assert any(not torch.equal(source[n], source[n].bfloat16().float()) for n in source)  # it would have rounded
    assert losses(runs, "init")[0] < losses(runs, "sft_bf16")[0] - 0.5  # trained weights, not a fresh model


@pytest.mark.system
def test_selfcheck_runs_on_the_cpu(toy_data, tmp_path):
    out = subprocess.run([sys.executable, "-m", "megannm", "selfcheck", "--out", str(tmp_path)], cwd=ROOT,
                         env=dist.base_env(), capture_output=True, text=True, timeout=300)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    items = {line.split("  ")[0].strip(): line for line in lines[1:-1]}
    for name in ("bf16 pretrain step", "bf16 sft step", "bf16 grpo step", "bf16 dpo step",
                 "generate image -> text (bf16)", "generate text -> image (bf16)", "bf16 checkpoint -> Hugging Face",
                 "attention backends used"):
        assert " ok: " in items[name], items[name]
    assert "sdpa-cpu" in items["attention backends used"]
    for name in ("dense step: tokens/s, MFU, memory", "MoT step: tokens/s, MFU, memory"):
        assert "skipped: no GPU" in items[name]
    assert lines[-1] == "selfcheck: all ok"


# ---------------------------------------------------------------------------------------------------------------------
# in this process: precision, device correctness, attention


@pytest.fixture(scope="module")
def layout():
    from megannm.parallel import init_parallel
    return init_parallel(1, 1)  # no shutdown: other modules of the session may still use the world of one


def tiny(layout, **cfg):
    from megannm.config import ModelConfig
    from megannm.model import ModelArgs, NMMModel
    from megannm.vocab import Vocab
    vocab = Vocab(text_size=200, image_codes=64, image_grid=4)
    base = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64, max_seq_len=64,
                z_loss=1e-4)
    precision = cfg.pop("precision", "fp32")
    args = ModelArgs.from_config(ModelConfig(**{**base, **cfg}), vocab, tp=1, params_dtype=precision)
    torch.manual_seed(0)
    return NMMModel(args, layout), vocab


def packed(vocab, gen, b=2, s=24):
    ids = torch.randint(0, vocab.size, (b, s + 1), generator=gen)
    docs = torch.tensor([[0] * 10 + [1] * (s - 10), [0] * 3 + [1] * 8 + [2] * (s - 11)][:b])
    pos = torch.stack([torch.cat([torch.arange(n) for n in torch.unique_consecutive(d, return_counts=True)[1]])
                       for d in docs])
    return ids, pos, docs


def test_the_model_is_built_in_the_recipe_precision(layout, toy_data):
    from megannm.config import recipe_from_dict
    from megannm.model.build import build_model
    from megannm.train.engine import deepspeed_config
    from megannm.train.loop import load_vocab
    d = {"precision": "bf16", "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "ffn_hidden_size": 64},
         "data": {"train": [{"path": str(toy_data["shards"] / "train")}]}}
    r = recipe_from_dict(d)
    args, module = build_model(r, load_vocab(r), layout)
    assert args.params_dtype == "bfloat16" and {p.dtype for p in module.parameters()} == {torch.bfloat16}
    config = deepspeed_config(r, layout)
    assert config["bf16"]["enabled"] and config["data_types"] == {"grad_accum_dtype": "fp32"}
    r.parallel.grad_accum_dtype = "bf16"
    assert deepspeed_config(r, layout)["data_types"] == {"grad_accum_dtype": "bf16"}


@pytest.mark.parametrize("change, key", [({"parallel": {"zero_stage": 0}}, "parallel.zero_stage"),
                                         ({"parallel": {"grad_accum_dtype": "fp16"}}, "parallel.grad_accum_dtype")])
def test_precision_combinations_deepspeed_refuses_are_one_line(change, key):
    from megannm.config import RecipeError, recipe_from_dict
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"precision": "bf16", **change}, source="r.yaml")
    assert str(e.value).startswith(f"r.yaml: {key}: ") and "\n" not in str(e.value)
    recipe_from_dict({"precision": "bf16", "parallel": {"zero_stage": 0, "grad_accum_dtype": "bf16"}})  # stated


def test_rope_tables_are_fp32_then_cast_and_never_promote_q_k(layout):
    from megannm.model.attention import rotary
    from megannm.model.block import apply_rope
    pos = torch.arange(4000, 4032)[None]
    cos, sin = rotary(pos, 64, 10000.0, torch.bfloat16)
    ref_cos, _ = rotary(pos, 64, 10000.0, torch.float32)
    assert cos.dtype == torch.bfloat16 and torch.equal(cos, ref_cos.bfloat16())  # computed in fp32, then cast
    naive = (pos[..., None].bfloat16() * (1.0 / 10000 ** (torch.arange(0, 64, 2) / 64)).bfloat16()).cos()
    assert (naive.float() - ref_cos[..., :32]).abs().max() > 0.1  # what bf16 positions would have given
    # the model makes its tables in the dtype of the activations it runs on (a module cast to bf16 after it was
    # built gets bf16 tables), so q and k are never promoted to fp32 beside bf16 values
    model, _ = tiny(layout)
    from megannm.model.transformer import context
    hidden = torch.zeros(1, 32, model.args.hidden, dtype=torch.bfloat16)
    ids = torch.zeros(1, 32, dtype=torch.long)
    ctx = context(model.args, hidden, ids, pos - 4000, ids)
    assert ctx.cos.dtype == ctx.sin.dtype == torch.bfloat16
    q = torch.randn(1, 2, 32, model.args.head_dim, dtype=torch.bfloat16)
    assert apply_rope(q, ctx.cos, ctx.sin).dtype == torch.bfloat16


def test_a_bf16_model_trains_and_decodes(layout):
    model, vocab = tiny(layout, precision="bf16")
    ids, pos, docs = packed(vocab, torch.Generator().manual_seed(1))
    loss, stats = model(ids[:, :-1], position_ids=pos, document_ids=docs, labels=ids[:, 1:])
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(float(loss))  # the loss in fp32
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())
    from megannm.generate import SamplingConfig, generate
    rows = generate(model, vocab, [[vocab.bos_id, 5, 6, vocab.boi_id]], "image", sampling=SamplingConfig(seed=2))
    assert len(rows[0]) == vocab.image_grid


def test_the_hot_path_makes_every_tensor_on_its_inputs_device(layout):
    """Under a "meta" default device any tensor made without an explicit device is a meta tensor, and mixing it
    with the CPU tensors of the step raises: a CPU-only run thus catches what fails on a GPU."""
    from megannm.generate import SamplingConfig, generate
    from megannm.phases.dpo import dpo_loss, sequence_logprobs
    from megannm.phases.rl.objective import group_advantages, token_loss
    from megannm.phases.rl.logprobs import collate, token_logprobs
    model, vocab = tiny(layout)
    ids, pos, docs = packed(vocab, torch.Generator().manual_seed(3))
    batch = collate([[vocab.bos_id, 7, 8], [vocab.bos_id, 9]], [[10, 11], [12, 13, 14]], vocab.pad_id)
    rewards = torch.tensor([[1.0, 0.0], [0.5, 0.25]])
    torch.set_default_device("meta")
    try:
        loss, _ = model(ids[:, :-1], position_ids=pos, document_ids=docs, labels=ids[:, 1:],
                        loss_mask=torch.ones(2, 24, device=ids.device))
        loss.backward()
        lp, ent = token_logprobs(model, batch, temperature=0.7)
        t = token_loss(lp, lp.detach(), lp.detach() - 0.1, group_advantages(rewards).reshape(-1)[:2, None]
                       .expand_as(lp), 0.2, 0.2, 0.04)
        seq = sequence_logprobs(model, batch)
        dpo_loss(seq[:1], seq[1:], seq[:1].detach(), seq[1:].detach(), 0.1)[0].backward()
        sampling = SamplingConfig.from_options(temperature=1.0, top_k=5, top_p=0.9, seed=4)
        text = generate(model, vocab, [[vocab.bos_id, 3], [vocab.bos_id, 4, 5]], "text", max_new_tokens=3,
                        sampling=sampling, pad=True)
        image = generate(model, vocab, [[vocab.bos_id, 3, vocab.boi_id]], "image", sampling=sampling, cfg_scale=2.0)
    finally:
        torch.set_default_device(None)
    assert math.isfinite(float(loss)) and torch.isfinite(t["loss"]).all() and len(image[0]) == vocab.image_grid
    assert all(len(r) <= 3 for r in text)
    # the check can fail: a tensor made without a device, mixed with the step's tensors
    torch.set_default_device("meta")
    try:
        with pytest.raises(RuntimeError, match="meta"):
            ids[:, :3] + torch.arange(3)
    finally:
        torch.set_default_device(None)


HOT_PATH = ["model", "train", "phases", "rewards", "generate.py", "evaluate.py"]


def cpu_literals(source: str) -> list[int]:
    """Lines that make a tensor on a hard-coded CPU: ``device="cpu"``, ``torch.device("cpu")``, ``.to("cpu")``,
    and ``torch.Generator()`` without a device (a CPU generator, which torch.multinomial refuses for GPU tensors)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        cpu = lambda x: isinstance(x, ast.Constant) and x.value == "cpu"  # noqa: E731
        if any(k.arg == "device" and cpu(k.value) for k in node.keywords) or \
                (name in ("device", "to") and node.args and cpu(node.args[0])) or \
                (name == "Generator" and not node.args and not any(k.arg == "device" for k in node.keywords)):
            found.append(node.lineno)
    return found


def test_no_hard_coded_cpu_device_in_the_hot_path():
    bad = []
    for part in HOT_PATH:
        where = ROOT / "megannm" / part
        for f in [where] if part.endswith(".py") else sorted(where.rglob("*.py")):
            bad += [f"{f.relative_to(ROOT)}:{n}" for n in cpu_literals(f.read_text())]
    assert not bad, "make these where their inputs live (x.device), or pass the device in:\n" + "\n".join(bad)
    assert cpu_literals("g = torch.Generator(device='cpu')\nt = torch.zeros(3, device='cpu')\n"
                        "u = x.to('cpu')\nr = torch.Generator().manual_seed(0)\n") == [1, 2, 3, 4]
    assert cpu_literals("g = torch.Generator(device=x.device)\nt = x.to(y.device)\n") == []


def test_flex_block_mask_gives_sdpa_outputs_on_packed_rows(layout):
    """The GPU's packed-row path (flex_attention + document_block_mask) against the CPU reference (SDPA + the
    boolean mask), forward on the CPU, with grouped-query heads; and the model's CPU path keeps the boolean mask."""
    import torch.nn.functional as F

    from megannm.model.attention import Attender, attend, attention_mask, document_block_mask
    gen = torch.Generator().manual_seed(5)
    docs = torch.tensor([[0] * 40 + [1] * 100 + [2] * 60, [0] * 7 + [1] * 193])  # blocks of 128 cut documents
    b, s = docs.shape
    q = torch.randn(b, 4, s, 16, generator=gen)
    k, v = torch.randn(b, 2, s, 16, generator=gen), torch.randn(b, 2, s, 16, generator=gen)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(docs, docs, 0), enable_gqa=True)
    out = attend(q, k, v, document_block_mask(docs))  # a BlockMask: the flex path
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(b, s, -1), rtol=1e-5, atol=1e-5)
    assert (ref[0, :, 40] - F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)[0, :, 40]
            ).abs().max() > 1e-3  # the mask matters: a token at a document start sees only itself
    assert Attender(docs).mask.dtype == torch.bool  # the CPU keeps SDPA with a boolean mask
