"""Checkpoint conversion on real DeepSpeed checkpoints and real ``transformers``: numbers asserted.

Two launches (tests/scripts/convert_cases.py) save, convert and train from real checkpoints:
- 2 ranks: save at TP 2 x ZeRO-3, convert it (consolidated, module-only DeepSpeed at TP 1 and TP 2), then start runs
  from it at TP 2 / ZeRO-1, TP 1 / ZeRO-3 (data parallel 2), TP 1 x PP 2, from the written DeepSpeed folders (megannm's
  loader and DeepSpeed's own), resume from a written folder, and train a model imported from a Hugging Face LLM;
- 4 ranks: save at TP 2 x PP 2 (ZeRO-1) and TP 2 x DP 2 (ZeRO-3), and start a TP 2 x PP 2 run from the consolidated.
Everything else runs in this process (one world of one) or, for the remote-code export, in a subprocess in which
megannm cannot be imported. Streaming is checked in fresh processes: which files a conversion opens (an audit hook:
module weights never open the optimizer partitions), how much anonymous memory it adds (one output shard and a
few tensors, not the model), and our own readers of the fp32 master (BF16_Optimizer, ZeRO-2, ZeRO-3) against the
engine's master and DeepSpeed's zero_to_fp32; module files hold the model's own (canonical) names.
"""
import json
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from tests import dist

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

SCRIPT = "tests/scripts/convert_cases.py"
INIT_RUNS = ("c_tp2z1", "c_tp1z3", "c_pp2", "ds_tp1", "native_tp2", "c_tp2pp2")


def load(out, name):
    return json.loads((out / f"{name}.json").read_text())


def assert_same_state(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", autouse=True)
def parallel_state():
    from megannm.parallel import init_parallel
    init_parallel(1, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy_vocab(toy_data):
    from megannm.vocab import Vocab
    return Vocab.load(toy_data["tokenizers"] / "vocab.json")


@pytest.fixture(scope="module")
def llm(toy_data, tmp_path_factory):
    """A tiny Llama made here with transformers (its own BPE tokenizer, 8 embedding rows of padding beyond it),
    imported as a MoT model, and the toy data preprocessed with the imported vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megannm.convert.hf import import_hf
    from megannm.data.preprocess import preprocess
    from megannm.data.text_tokenizer import load_text_tokenizer, train_text_tokenizer
    out = tmp_path_factory.mktemp("llm")
    raw = toy_data["raw"]
    texts = [p["text"] for line in (raw / "train.jsonl").read_text().splitlines()
             for p in json.loads(line)["parts"] if "text" in p]
    folder = out / "llama"
    train_text_tokenizer(texts, folder, vocab_size=300)
    n_text = len(load_text_tokenizer(folder))
    cfg = LlamaConfig(vocab_size=n_text + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=96,
                      rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # norms away from 1, so that copying them is tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    cons = import_hf(folder, out / "consolidated", toy_data["tokenizers"] / "image_tokenizer.npz", mot=True)
    preprocess([raw / "train.jsonl"], out / "shards" / "train", cons / "tokenizers", workers=1, progress=False)
    return {"hf": folder, "consolidated": cons, "shards": out / "shards", "n_text": n_text, "model": model.eval()}


@pytest.fixture(scope="module")
def runs(toy_data, llm, tmp_path_factory):
    out = tmp_path_factory.mktemp("convert")
    (out / "llm_shards").symlink_to(llm["shards"])
    shards = str(toy_data["shards"])
    dist.run([SCRIPT, str(out), shards,
              "save:src:2:1:3:mot",
              "convert:src/checkpoints:c_src:--to:consolidated",
              "convert:c_src:ds_tp1:--to:deepspeed",
              "convert:c_src:ds_tp2:--to:deepspeed:--tp:2",
              "convert:c_src:ds_resume:--to:deepspeed:--tp:2",
              "init:ref:2:1:3:mot:src/checkpoints",  # the source's own layout, from its own DeepSpeed files
              "init:c_tp2z1:2:1:1:mot:c_src",
              "init:c_tp1z3:1:1:3:mot:c_src",
              "init:c_pp2:1:2:1:mot:c_src",
              "init:ds_tp1:1:1:1:mot:ds_tp1",
              "native:native_tp2:2:1:1:mot:ds_tp2",
              "resume:resumed:2:1:0:mot:ds_resume",
              f"init:llm:2:1:1:llama:{llm['consolidated']}"], nproc=2)
    dist.run([SCRIPT, str(out), shards, "save:tp2pp2z1:2:2:1:mot", "save:tp2dp2z3:2:1:3:mot",
              "init:c_tp2pp2:2:2:1:mot:c_src"], nproc=4)
    return out


def random_consolidated(vocab, seed=0, **model):
    """An untrained model in canonical form, norms perturbed away from 1."""
    from megannm.config import ModelConfig
    from megannm.checkpoint.consolidated import Consolidated, normalise_args
    from megannm import parallel
    from megannm.model.args import ModelArgs
    from megannm.model.transformer import NMMModel
    cfg = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64, max_seq_len=64)
    args = ModelArgs.from_config(ModelConfig(**{**cfg, **model}), vocab, tp=1)
    torch.manual_seed(seed)
    module = NMMModel(args, parallel.init_parallel(1, 1)).state_dict()
    state = {k: v.detach().clone() for k, v in module.items()}
    for k in state:
        if "norm" in k:
            state[k] += 0.1 * torch.randn_like(state[k])
        if k in ("embedding.embed_tokens.weight", "head.output.weight"):
            state[k] = state[k][:vocab.size].clone()
    return Consolidated(state, normalise_args(args, vocab), vocab, {"kind": "test"})


def interleaved(vocab, rows=2, seed=0):
    """<bos> caption <boi> image codes <eoi> caption: both modalities in every row."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        out.append(torch.cat([torch.tensor([vocab.bos_id]), torch.randint(0, vocab.text_size, (5,), generator=g),
                              torch.tensor([vocab.boi_id]),
                              torch.randint(vocab.image_start, vocab.image_end, (9,), generator=g),
                              torch.tensor([vocab.eoi_id]), torch.randint(0, vocab.text_size, (3,), generator=g)]))
    return torch.stack(out)


def megannm_logits(folder, ids):
    from megannm import parallel
    from megannm.checkpoint.opened import load_model
    model, _ = load_model(folder, parallel.init_parallel(1, 1))
    with torch.no_grad():
        return model(ids), model


def greedy(model, ids, n):
    """Greedy continuation with full forwards (no cache): the reference for ``generate``."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def assert_generated(out, model, prompt, n, vocab):
    """``generate``'s greedy tokens are megannm's: the same up to <eos> (which the untrained models may emit), after
    which ``generate`` pads the finished row."""
    ref = greedy(model, prompt, n)
    p = prompt.shape[1]
    assert torch.equal(out[:, :p], prompt)
    for got, want in zip(out[:, p:].tolist(), ref[:, p:].tolist()):
        if vocab.eos_id in want[:len(got)]:
            k = want.index(vocab.eos_id) + 1
            assert got[:k] == want[:k] and all(t == vocab.pad_id for t in got[k:]), (got, want)
        else:
            assert got == want


# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed <-> consolidated


@pytest.mark.parametrize("name, how", [("src", "fp32 master from the optimizer partitions"),
                                       ("tp2dp2z3", "fp32 master from the optimizer partitions"),
                                       ("tp2pp2z1", "pipeline layer files")])
def test_deepspeed_to_consolidated_equals_the_live_weights(runs, name, how):
    from megannm.checkpoint.deepspeed import open_deepspeed, read_deepspeed
    c = read_deepspeed(runs / name / "checkpoints")
    assert how in c.source["weights"]
    _, meta, _, args = open_deepspeed(runs / name / "checkpoints")
    assert_same_state(c.state, torch.load(runs / f"{name}.live.pt"))


@pytest.mark.parametrize("name", ["tp2pp2z1", "tp2dp2z3"])
def test_round_trip_through_tp1_pp1_is_identical(runs, tmp_path, name):
    from megannm import parallel
    from megannm.checkpoint import consolidated
    from megannm.checkpoint.deepspeed import read_deepspeed
    from megannm.checkpoint.opened import load_model
    from megannm.convert.deepspeed import write_deepspeed
    c = read_deepspeed(runs / name / "checkpoints")
    consolidated.write(c, tmp_path / "c")
    c = consolidated.read(tmp_path / "c")
    write_deepspeed(c, tmp_path / "tp1", tp=1, pp=1)
    assert_same_state(read_deepspeed(tmp_path / "tp1").state, c.state)
    write_deepspeed(c, tmp_path / "tp2pp2", tp=2, pp=2)
    assert_same_state(read_deepspeed(tmp_path / "tp2pp2").state, c.state)
    # and the TP=1 model built from the written folder holds exactly those tensors (plus zero padding rows)
    model, meta = load_model(tmp_path / "tp1", parallel.init_parallel(1, 1))
    assert meta["module_only"] and meta["layout"]["tp"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v[:c.state[k].shape[0]], c.state[k]) and not v[c.state[k].shape[0]:].any(), k


def test_consolidated_folder_layout_and_shards(runs, tmp_path):
    from megannm.checkpoint import consolidated
    from megannm.checkpoint.tensors import INDEX
    c = consolidated.read(runs / "c_src")
    meta = consolidated.read_meta(runs / "c_src")
    assert meta["source"]["layout"]["tp"] == 2 and meta["source"]["zero_stage"] == 3
    assert meta["vocab"]["fingerprint"] == c.vocab.fingerprint
    assert meta["model_args"]["padded_vocab_size"] == c.vocab.padded_size(1)  # the canonical form records TP = 1's
    assert c.state["embedding.embed_tokens.weight"].shape[0] == c.vocab.size  # no padding rows
    consolidated.write(c, tmp_path / "sharded", max_shard_size=40_000)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 3 and (tmp_path / "sharded" / INDEX).exists()
    assert_same_state(consolidated.read(tmp_path / "sharded").state, c.state)


# ---------------------------------------------------------------------------------------------------------------------
# consolidated -> training at another layout


def test_init_from_any_layout_starts_from_the_source_loss(runs):
    ref = load(runs, "ref")["losses"]  # the source's layout (TP 2, ZeRO-3) from its own DeepSpeed files
    assert len(ref) == 2
    for name in INIT_RUNS:
        r = load(runs, name)
        assert r["losses"][0] == pytest.approx(ref[0], rel=0, abs=1e-6), name
        assert r["losses"] == pytest.approx(ref, rel=0, abs=1e-5), name
        if name != "native_tp2":
            assert any(e["event"] == "initialised" for e in r["events"]), name


def test_resume_from_a_converted_deepspeed_folder(runs):
    r = load(runs, "resumed")
    resumed = [e for e in r["events"] if e["event"] == "resumed"]
    assert resumed and resumed[0]["step"] == 2
    assert len(r["losses"]) == 2 and all(x < 10 for x in r["losses"])  # steps 3 and 4, fresh optimizer
    # the learning-rate schedule continues from step 2 (warm-up 1, cosine to step 4): lr after steps 3 and 4
    from megannm.config import recipe_from_dict
    from megannm.train.engine import lr_multiplier
    f = lr_multiplier(recipe_from_dict({"optimizer": {"lr": 3e-3, "min_lr": 3e-4},
                                        "schedule": {"train_steps": 4, "warmup_steps": 1}}))
    assert r["lr"] == pytest.approx([3e-3 * f(3), 3e-3 * f(4)], rel=1e-9)


def test_model_imported_from_an_llm_trains_at_tp2(runs):
    r = load(runs, "llm")
    assert len(r["losses"]) == 2 and all(x == x and x < 20 for x in r["losses"])
    assert any(e["event"] == "initialised" for e in r["events"])


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face


@pytest.mark.parametrize("arch, model", [("LlamaForCausalLM", dict(mot=False, qk_norm=False)),
                                         ("Qwen3ForCausalLM", dict(mot=False, qk_norm=True))])
def test_dense_export_loads_with_stock_transformers(toy_data, toy_vocab, tmp_path, monkeypatch, arch, model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megannm.checkpoint import consolidated
    from megannm.convert.hf import export_hf
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c = random_consolidated(toy_vocab, **model)
    consolidated.write(c, tmp_path / "c")
    export_hf(c, tmp_path / "hf", tokenizers=toy_data["tokenizers"], max_shard_size=60_000)  # sharded + index
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == arch
    ids = interleaved(toy_vocab)
    ours, model = megannm_logits(tmp_path / "c", ids)
    with torch.no_grad():
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-5)
    out = hf.generate(ids[:1, :7], max_new_tokens=6, do_sample=False)
    assert_generated(out, model, ids[:1, :7], 6, toy_vocab)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert len(tok) == toy_vocab.size
    assert tok.convert_tokens_to_ids(["<img_0>", "<boi>", "<eos>"]) == [toy_vocab.image_start, toy_vocab.boi_id,
                                                                      toy_vocab.eos_id]
    assert (tok.bos_token_id, tok.pad_token_id) == (toy_vocab.bos_id, toy_vocab.pad_id)


REMOTE = r"""
import sys
sys.modules["megannm"] = None  # the export must not need megannm
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {}
for folder in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    ids = torch.load(sys.argv[1])
    with torch.no_grad():
        logits = model(ids).logits
    gen = model.generate(ids[:, :7], attention_mask=torch.ones_like(ids[:, :7]), max_new_tokens=6, do_sample=False)
    out[folder] = {"class": type(model).__name__, "logits": logits, "generated": gen,
                   "ids": tok.convert_tokens_to_ids(["<img_0>", "<boi>", "<eos>"])}
torch.save(out, sys.argv[1] + ".out")
"""


def test_mot_export_loads_as_remote_code_without_megannm(runs, toy_data, toy_vocab, tmp_path):
    from megannm.checkpoint import consolidated
    from megannm.cli.convert import convert as convert_main
    # the trained MoT model, and the dense twin with Chameleon's norm placement (no stock class has it)
    reorder = random_consolidated(toy_vocab, mot=False, norm_reorder=True)
    consolidated.write(reorder, tmp_path / "reorder")
    folders = {"mot": (runs / "c_src", tmp_path / "hf_mot"), "reorder": (tmp_path / "reorder", tmp_path / "hf_ro")}
    for src, dst in folders.values():
        assert convert_main([str(src), str(dst), "--to", "hf", "--tokenizers", str(toy_data["tokenizers"])]) == 0
    assert {"configuration_megannm_mot.py", "modeling_megannm_mot.py"} <= {p.name for p in dst.iterdir()}
    assert json.loads((dst / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    ids = interleaved(toy_vocab, rows=2, seed=1)
    torch.save(ids, tmp_path / "ids.pt")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = dist.base_env(HF_HUB_OFFLINE="1", PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", REMOTE, str(tmp_path / "ids.pt"),
                           *(str(d) for _, d in folders.values())], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "ids.pt.out")
    for src, dst in folders.values():
        r = got[str(dst)]
        assert r["class"] == "MegannmMoTForCausalLM"
        assert r["ids"] == [toy_vocab.image_start, toy_vocab.boi_id, toy_vocab.eos_id]
        ours, model = megannm_logits(src, ids)
        torch.testing.assert_close(r["logits"], ours, rtol=0, atol=2e-5)
        assert_generated(r["generated"], model, ids[:, :7], 6, toy_vocab)


def test_llm_import_keeps_the_text_logits(llm):
    from megannm.checkpoint import consolidated
    from megannm.data.tokenize import Tokenizers
    c = consolidated.read(llm["consolidated"])
    n = llm["n_text"]
    assert c.vocab.text_size == n and c.args.mot and not c.args.qk_norm
    assert Tokenizers.load(llm["consolidated"] / "tokenizers").vocab.fingerprint == c.vocab.fingerprint
    emb = llm["model"].model.embed_tokens.weight.detach()
    assert torch.equal(c.state["embedding.embed_tokens.weight"][:n], emb[:n])  # existing rows kept
    new = c.state["embedding.embed_tokens.weight"][n:]
    assert new.shape[0] == c.vocab.size - n
    assert torch.allclose(new.mean(0), emb[:n].mean(0), atol=0.02)  # near the mean of the existing rows
    for m in (0, 1):  # each modality starts from the LLM's weights
        assert torch.equal(c.state[f"layers.1.ffn.up_proj.{m}.weight"], llm["model"].model.layers[1].mlp.up_proj.weight)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, n, (2, 12), generator=g)
    ours, _ = megannm_logits(llm["consolidated"], ids)
    with torch.no_grad():
        theirs = llm["model"](ids).logits
    torch.testing.assert_close(ours[..., :n], theirs[..., :n], rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------------------------------------------------
# errors: one line naming the file and the parameter


def _convert(capsys, *argv):
    from megannm.cli import main
    code = main(["convert", *map(str, argv)])
    err = capsys.readouterr().err.strip().splitlines()
    return code, (err[-1] if err else "")


def _rewrite(folder, change):
    from safetensors.torch import load_file, save_file
    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors")


def test_errors_name_the_file_and_the_parameter(runs, llm, toy_data, tmp_path, capsys):
    src = runs / "c_src"
    code, msg = _convert(capsys, src, tmp_path / "x", "--to", "deepspeed", "--tp", "3")
    assert code == 2 and "--tp 3" in msg and "heads=4" in msg, msg
    code, msg = _convert(capsys, src, tmp_path / "x", "--to", "deepspeed", "--pp", "4")
    assert code == 2 and "layers=2" in msg, msg
    code, msg = _convert(capsys, src, runs / "ds_tp1", "--to", "deepspeed")
    assert code == 2 and "already exists" in msg and "--overwrite" in msg, msg
    code, msg = _convert(capsys, src, tmp_path / "x", "--to", "hf", "--tokenizers",
                         llm["consolidated"] / "tokenizers")
    assert code == 2 and "vocabulary mismatch" in msg and "vocab.json" in msg, msg
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))  # nothing half-written is left

    broken = {}
    for kind, change in {
        "missing": lambda s: s.pop("layers.1.ffn.down_proj.0.weight"),
        "unexpected": lambda s: s.__setitem__("layers.7.attn.norm.0.weight", torch.ones(32)),
        "shape": lambda s: s.__setitem__("layers.0.attn.k_proj.1.weight", torch.zeros(8, 32)),
    }.items():
        broken[kind] = tmp_path / kind
        shutil.copytree(src, broken[kind])
        _rewrite(broken[kind], change)
    code, msg = _convert(capsys, broken["missing"], tmp_path / "y", "--to", "hf")
    assert code == 2 and "missing parameter layers.1.ffn.down_proj.0.weight" in msg and "missing" in msg, msg
    code, msg = _convert(capsys, broken["unexpected"], tmp_path / "y", "--to", "hf")
    assert code == 2 and "unexpected parameter layers.7.attn.norm.0.weight" in msg, msg
    code, msg = _convert(capsys, broken["shape"], tmp_path / "y", "--to", "deepspeed")
    assert code == 2 and "model.safetensors" in msg and "layers.0.attn.k_proj.1.weight" in msg and "[8, 32]" in msg

    ds = tmp_path / "ds"
    shutil.copytree(runs / "ds_tp2", ds)
    (ds / "step00000002" / "mp_rank_01_model_states.pt").unlink()
    code, msg = _convert(capsys, ds, tmp_path / "z", "--to", "consolidated")
    assert code == 2 and "mp_rank_01_model_states.pt" in msg, msg
    code, msg = _convert(capsys, tmp_path, tmp_path / "z", "--to", "consolidated")
    assert code == 2 and "not a checkpoint" in msg, msg


def test_tool_script_replaces_an_output_only_with_overwrite(runs, tmp_path, capsys):
    dst = tmp_path / "hf"
    dst.mkdir()
    (dst / "old").write_text("x")
    code, msg = _convert(capsys, runs / "c_src", dst, "--to", "hf")
    assert code == 2 and msg.endswith("already exists (pass --overwrite to replace it)"), msg
    cmd = [sys.executable, "tools/convert_checkpoint.py", str(runs / "c_src"), str(dst), "--to", "hf", "--overwrite"]
    out = subprocess.run(cmd, cwd=dist.REPO, env=dist.base_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "megannm_mot" in out.stdout
    assert (dst / "model.safetensors").exists() and not (dst / "old").exists()


# ---------------------------------------------------------------------------------------------------------------------
# streaming: which files are opened, how much memory, which dtype


def trained(toy_data, out, precision, zero):
    """A real run in this process (2 steps, TP 1, world of one, ZeRO ``zero``), saved; with the engine's own fp32
    master (DeepSpeed's accessor) and module weights under canonical names, as the ground truth."""
    from deepspeed.utils import safe_get_full_fp32_param

    from megannm import parallel
    from megannm.config import recipe_from_dict
    from megannm.stage import build_trainer
    from megannm.toy.selfcheck import phase_recipe
    data = {"shards": toy_data["shards"], "tokenizers": toy_data["tokenizers"]}
    r = recipe_from_dict(phase_recipe("pretrain", data, out, name="run", precision=precision, steps=2, world=1,
                                      zero=zero, model__mot=True), source=str(out), world_size=1)
    trainer = build_trainer(r, parallel.init_parallel(1, 1), source=str(out))
    trainer.run()
    named = list(trainer.engine.module.named_parameters())
    master = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in named}
    module = {n: p.detach().clone() for n, p in named}
    vocab = trainer.args.vocab_size

    def canonical(state):
        return {k: (v[:vocab] if k in ("embedding.embed_tokens.weight", "head.output.weight") else v)
                for k, v in state.items()}
    return {"ckpt": out / "run" / "checkpoints", "master": canonical(master), "module": canonical(module)}


@pytest.fixture(scope="module")
def bf16_run(toy_data, tmp_path_factory):
    """bf16 at ZeRO-1 (DeepSpeed's BF16_Optimizer: bf16 module weights, fp32 master in the optimizer partitions)."""
    return trained(toy_data, tmp_path_factory.mktemp("bf16run"), "bf16", 1)


def test_zero2_master_reader_gives_the_engines_master(toy_data, tmp_path):
    """fp32 at ZeRO-2 (DeepSpeed's ZeRO optimizer: fp32 partitions + param_slice_mappings): --weights master reads
    exactly the engine's master, which ZeRO-2 also copies into the module files (what auto reads)."""
    from megannm.checkpoint.deepspeed import read_deepspeed
    run = trained(toy_data, tmp_path, "fp32", 2)
    master = read_deepspeed(run["ckpt"], weights="master")
    assert "fp32 master" in master.source["weights"]
    assert_same_state(dict(master.state), run["master"])
    module = read_deepspeed(run["ckpt"])
    assert "optimizer partitions not opened" in module.source["weights"]
    assert_same_state(dict(module.state), run["module"])
    assert_same_state(run["module"], run["master"])


OPENS = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" and args and
                 isinstance(args[0], str) else None)
from megannm.cli.convert import convert as main
report = []
for argv in json.loads(sys.argv[1]):
    del opened[:]
    code = main(argv)
    report.append({"code": code, "opened": sorted(set(p for p in opened if p.endswith(".pt")))})
print(json.dumps(report))
"""


def test_module_weights_never_open_the_optimizer_partitions(bf16_run, tmp_path):
    """--to hf of a bf16 run defaults to bf16 from the module files (exact: the module's bf16 copy is the fp32
    master rounded); --to consolidated defaults to fp32, the master, from the optimizer partitions. Every file
    Python opens is recorded by an audit hook in a fresh process."""
    from safetensors.torch import load_file
    ckpt = bf16_run["ckpt"]
    runs_ = [[str(ckpt), str(tmp_path / "hf"), "--to", "hf"],
             [str(ckpt), str(tmp_path / "c32"), "--to", "consolidated"],
             [str(ckpt), str(tmp_path / "up"), "--to", "consolidated", "--weights", "module"]]
    proc = subprocess.run([sys.executable, "-c", OPENS, json.dumps(runs_)], cwd=dist.REPO, env=dist.base_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf, c32, up = json.loads(proc.stdout.strip().splitlines()[-1])
    assert hf["code"] == c32["code"] == up["code"] == 0
    optim = [p for p in hf["opened"] + up["opened"] if p.endswith("_optim_states.pt")]
    assert not optim and any(p.endswith("mp_rank_00_model_states.pt") for p in hf["opened"]), hf
    assert any(p.endswith("_optim_states.pt") for p in c32["opened"]), c32
    log = [line for line in proc.stdout.splitlines() if line.startswith("megannm convert: weights:")]
    assert len(log) == 3 and "optimizer partitions not opened" in log[0] and "fp32 master" in log[1], log

    master, module = bf16_run["master"], bf16_run["module"]
    assert any(not torch.equal(m, m.bfloat16().float()) for m in master.values())  # the master has more bits
    from megannm.convert.hf import hf_name
    got = load_file(tmp_path / "hf" / "model.safetensors")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    for name in master:
        t = got[hf_name(name, per_set=True)]
        assert t.dtype == torch.bfloat16 and torch.equal(t, module[name]) and torch.equal(t, master[name].bfloat16())
    c32 = {k: v for f in (tmp_path / "c32").glob("*.safetensors") for k, v in load_file(f).items()}
    up = {k: v for f in (tmp_path / "up").glob("*.safetensors") for k, v in load_file(f).items()}
    for name in master:
        assert c32[name].dtype == torch.float32 and torch.equal(c32[name], master[name]), name
        assert torch.equal(up[name], module[name].float()), name


MEMORY = r"""
import json, sys, threading, time, warnings
warnings.filterwarnings("ignore")
from pathlib import Path
import torch
from megannm import parallel
from megannm.checkpoint import canonical, consolidated
from megannm.checkpoint.consolidated import Consolidated, normalise_args
from megannm.checkpoint.deepspeed import read_deepspeed
from megannm.convert.deepspeed import write_deepspeed
from megannm.convert.hf import export_hf
from megannm.model.args import ModelArgs
from megannm.vocab import DEFAULT_SPECIALS, Vocab

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

class Peak:
    def __enter__(self):
        self.base, self.peak, self.run = anon(), anon(), True
        self.t = threading.Thread(target=self.sample, daemon=True)
        self.t.start()
        return self
    def sample(self):
        while self.run:
            self.peak = max(self.peak, anon())
            time.sleep(0.001)
    def __exit__(self, *exc):
        self.run = False
        self.t.join()
        self.growth = max(self.peak, anon()) - self.base

out, shard = Path(sys.argv[1]), int(sys.argv[2])
parallel.init_parallel(1, 1)
vocab = Vocab(text_size=400, image_codes=256 - len(DEFAULT_SPECIALS), image_grid=16)
args = ModelArgs(hidden=128, layers=40, heads=4, kv_heads=4, ffn=256, vocab_size=vocab.size,
                 padded_vocab_size=vocab.padded_size(1), image_start=vocab.image_start, image_end=vocab.image_end,
                 mot=True, qk_norm=True, max_seq_len=64)
g = torch.Generator().manual_seed(0)
state = {k: torch.randn(s, generator=g) for k, s in canonical.canonical_shapes(args).items()}
c = Consolidated(state, normalise_args(args, vocab), vocab, {"kind": "test"})
write_deepspeed(c, out / "tp2", tp=2)
consolidated.write(c, out / "c", max_shard_size=shard)
largest = max(t.numel() * t.element_size() for t in state.values())
model = sum(t.numel() * t.element_size() for t in state.values())
del state, c
report = {"largest": largest, "model": model, "shards": len(list((out / "c").glob("*.safetensors")))}
with Peak() as p:
    consolidated.write(read_deepspeed(out / "tp2"), out / "merged", max_shard_size=shard)
report["deepspeed tp2 -> consolidated"] = p.growth
with Peak() as p:
    export_hf(consolidated.read(out / "c"), out / "hf", dtype=torch.bfloat16, max_shard_size=shard)
report["consolidated -> hf bf16"] = p.growth
with Peak() as p:
    consolidated.write(consolidated.read(out / "c"), out / "again", max_shard_size=shard)
report["consolidated -> consolidated"] = p.growth
with Peak() as p:  # a pipeline's rank files are its layer files: one layer each
    write_deepspeed(consolidated.read(out / "c"), out / "tp2pp2", tp=2, pp=2)
report["consolidated -> deepspeed tp2 pp2"] = p.growth
print(json.dumps(report))
"""


def test_peak_memory_of_a_conversion_is_one_output_shard(tmp_path):
    """A model of ~50 MB whose largest tensor is ~0.3 MB, converted with --max-shard-size 2 MB: the anonymous memory a
    conversion adds (RssAnon sampled every millisecond in a fresh process) stays one output shard plus a few tensors
    (8 largest tensors, plus 8 MB of interpreter noise), far from the model (a whole-model conversion adds at least
    its size). A DeepSpeed output's shards are its rank files: under a pipeline, one layer's."""
    shard = 2 * 10 ** 6
    proc = subprocess.run([sys.executable, "-c", MEMORY, str(tmp_path), str(shard)], cwd=dist.REPO,
                          env=dist.base_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    largest, model, shards = r.pop("largest"), r.pop("model"), r.pop("shards")
    assert model > 100 * largest and shards >= 20
    for name, growth in r.items():
        assert growth < shard + 8 * largest + 8 * 2 ** 20 < model / 3, (name, growth, largest, model)


def test_module_files_hold_the_models_own_names_and_load_into_it(toy_vocab, tmp_path):
    """``write_deepspeed``'s module files (TP 2) and pipeline layer files (TP 2 x PP 2) hold the model's own
    parameter names, which are the canonical ones: they read back to the consolidated weights and load into the
    model unchanged."""
    from megannm import parallel
    from megannm.checkpoint.deepspeed import read_deepspeed
    from megannm.checkpoint.opened import load_model
    from megannm.convert.deepspeed import write_deepspeed
    c = random_consolidated(toy_vocab, mot=True, qk_norm=True)
    write_deepspeed(c, tmp_path / "tp2", tp=2)
    written = torch.load(tmp_path / "tp2" / "step00000000" / "mp_rank_01_model_states.pt", weights_only=True)
    assert set(written["module"]) == set(c.state)
    assert_same_state(read_deepspeed(tmp_path / "tp2").state, c.state)
    model, _ = load_model(tmp_path / "tp2", parallel.init_parallel(1, 1))
    got = model.state_dict()
    assert set(got) == set(c.state)
    for k, v in c.state.items():
        assert torch.equal(got[k][:v.shape[0]], v), k
    write_deepspeed(c, tmp_path / "pp2", tp=2, pp=2)
    layer = torch.load(tmp_path / "pp2" / "step00000000" / "layer_01-model_00-model_states.pt", weights_only=True)
    assert {"attn.q_proj.0.weight", "attn.k_proj.1.weight", "ffn.gate_proj.0.weight"} <= set(layer)
    assert_same_state(read_deepspeed(tmp_path / "pp2").state, c.state)


def test_dtype_bf16_round_trip(toy_vocab, tmp_path, capsys):
    """--dtype bf16 through every writer: the consolidated folder, a DeepSpeed TP 2 checkpoint and a Hugging Face
    export (stock transformers loads it in bf16) all hold exactly the fp32 weights rounded to bf16."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from megannm.checkpoint import consolidated
    from megannm.checkpoint.deepspeed import read_deepspeed
    from megannm.convert.hf import hf_name
    c = random_consolidated(toy_vocab, mot=False, qk_norm=False)
    consolidated.write(c, tmp_path / "c32")
    want = {k: v.bfloat16() for k, v in c.state.items()}
    assert _convert(capsys, tmp_path / "c32", tmp_path / "c16", "--to", "consolidated", "--dtype", "bf16")[0] == 0
    assert consolidated.read_meta(tmp_path / "c16")["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "c16" / "model.safetensors"), "pt") as f:
        assert_same_state({k: f.get_tensor(k) for k in f.keys()}, want)
    assert _convert(capsys, tmp_path / "c16", tmp_path / "ds", "--to", "deepspeed", "--tp", "2", "--dtype",
                    "bf16")[0] == 0
    assert_same_state(read_deepspeed(tmp_path / "ds", dtype=torch.bfloat16).state, want)
    assert _convert(capsys, tmp_path / "ds", tmp_path / "hf", "--to", "hf", "--dtype", "bf16")[0] == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.dtype == torch.bfloat16
    params = dict(hf.named_parameters())
    for k, v in want.items():
        assert torch.equal(params[hf_name(k, per_set=False)].detach(), v), k
    # and back up: fp32 again from the bf16 folder is the bf16 values, exactly
    assert _convert(capsys, tmp_path / "c16", tmp_path / "up", "--to", "consolidated", "--dtype", "fp32")[0] == 0
    assert_same_state(dict(consolidated.read(tmp_path / "up").state), {k: v.float() for k, v in want.items()})


def test_zero3_master_reader_agrees_with_deepspeeds_zero_to_fp32(runs, tmp_path):
    """Our lazy ZeRO-3 reader against DeepSpeed's own ``zero_to_fp32`` on one tensor rank of a TP 2 x DP 2 run
    (a folder of links to that rank's files: zero_to_fp32 expects one TP rank)."""
    import os

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from megannm import checkpoint
    from megannm.checkpoint.deepspeed import open_deepspeed, rank_state
    ckpt, meta, _, args = open_deepspeed(runs / "tp2dp2z3" / "checkpoints")
    for r in range(2):
        tag = tmp_path / f"r{r}" / ckpt.name
        tag.mkdir(parents=True)
        for p in checkpoint.zero_files(ckpt, r):
            os.symlink(p.resolve(), tag / p.name)
        theirs = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=ckpt.name)
        ours, source, how = rank_state(ckpt, meta, r)
        assert "fp32 master" in how and "optim_states" in source
        assert_same_state(dict(ours), {k: v for k, v in theirs.items() if not k.endswith("_extra_state")})


def test_a_flipped_byte_is_named_only_in_the_files_a_conversion_reads(bf16_run, tmp_path, capsys):
    """The crc32 records of megannm.json are checked for the files a conversion reads (while it reads them: the
    output is renamed into place only once they agree): a flipped byte in the module file stops --to hf with one
    line naming it and no output; the same byte flipped in an optimizer partition, which --to hf never opens,
    changes nothing."""
    from safetensors.torch import load_file
    from megannm import checkpoint
    tag = checkpoint.resolve(bf16_run["ckpt"])
    for victim, fails in (("mp_rank_00_model_states.pt", True), ("bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                                  False)):
        src = tmp_path / victim / "checkpoints"
        shutil.copytree(bf16_run["ckpt"], src)
        path = src / tag.name / victim
        data = bytearray(path.read_bytes())
        data[len(data) * 2 // 3] ^= 0x10
        path.write_bytes(bytes(data))
        code, msg = _convert(capsys, src, tmp_path / victim / "hf", "--to", "hf")
        if fails:
            assert code == 2 and victim in msg and "corrupt (crc32" in msg, msg
            assert not (tmp_path / victim / "hf").exists() and not list((tmp_path / victim).glob(".hf.tmp-*"))
        else:
            assert code == 0, msg
            got = load_file(tmp_path / victim / "hf" / "model.safetensors")
            assert torch.equal(got["lm_head.weight"], bf16_run["module"]["head.output.weight"])
