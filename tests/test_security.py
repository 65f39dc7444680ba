"""Nothing runs that the user did not ask for (docs/security.md): a pickled callable planted in each kind of file
megannm loads (DeepSpeed's model and optimizer states, the RNG files, a saved image tokenizer's kind) is refused by
every command that reads it, with one line naming the file, what it holds and ``--trust-code``, and the marker the
code would create never appears; with ``--trust-code`` the same files load (and the planted code runs: that is what
the switch opens). One tiny trained ZeRO-1 run is shared by the module; every case damages a copy of it."""
from __future__ import annotations

import inspect
import io
import json
import re
import shutil
import sys
from contextlib import redirect_stderr, redirect_stdout
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from megannm.cli import main
from tests.planted import plant_kind, plant_pickle

ROOT = Path(__file__).resolve().parents[1]
MODEL, OPTIM, RNG = "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng/rank00000.pt"
TAG = "step00000002"


def cli(*argv) -> tuple[int, list[str]]:
    """(exit code, the lines megannm printed as its own) of ``megannm ARGV`` in this process."""
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    assert "Traceback" not in err.getvalue(), err.getvalue()
    return code, [x for x in err.getvalue().splitlines() if x.startswith("megannm")]


def recipe(folder: Path, shards: Path) -> Path:
    path = folder / "r.yaml"
    path.write_text(
        "name: r\nseed: 3\n"
        "model: {hidden_size: 32, num_layers: 2, num_heads: 4, ffn_hidden_size: 64, max_seq_len: 96}\n"
        "parallel: {zero_stage: 1}\n"
        f"data: {{train: [{{path: {shards / 'train'}}}], seq_len: 80, micro_batch_size: 2, global_batch_size: 4}}\n"
        "optimizer: {lr: 0.003, min_lr: 0.0003}\nschedule: {train_steps: 2, warmup_steps: 1}\n"
        "checkpoint: {save_interval: 2, keep_last: 2}\n"
        f"logging: {{dir: {folder / 'run'}, interval: 1, progress_bar: false, tensorboard: false}}\n")
    return path


@pytest.fixture(scope="module")
def trained(toy_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("secure")
    mp = pytest.MonkeyPatch()
    mp.setenv("MEGANNM_QUIET", "1")
    assert cli("train", recipe(root, toy_data["shards"]))[0] == 0
    mp.undo()
    return root


class Case:
    """A copy of the trained run: its recipe, its checkpoint tag, the marker planted code would create."""

    def __init__(self, trained: Path, tmp: Path, toy: dict):
        shutil.copytree(trained / "run", tmp / "run")
        self.tmp, self.toy = tmp, toy
        self.recipe = recipe(tmp, toy["shards"])
        self.tag = tmp / "run" / "checkpoints" / TAG
        self.marker = tmp / "MARKER"

    def plant(self, name: str) -> Path:
        return plant_pickle(self.tag / name, self.marker)

    def refused(self, result: tuple[int, list[str]], culprit: str, what: str) -> str:
        """The run was refused in one line naming ``culprit`` and ``what`` it holds, and nothing ran."""
        code, lines = result
        assert code == 2, lines
        assert len(lines) == 1, lines
        assert culprit in lines[0] and what in lines[0] and "--trust-code" in lines[0], lines[0]
        assert not self.marker.exists(), "the planted code ran"
        return lines[0]


@pytest.fixture
def case(trained, tmp_path, toy_data, monkeypatch):
    monkeypatch.setenv("MEGANNM_QUIET", "1")
    return Case(trained, tmp_path, toy_data)


@pytest.mark.parametrize("name", [MODEL, OPTIM, RNG])
def test_resume_refuses_a_planted_file_and_runs_nothing(case, name):
    case.plant(name)
    line = case.refused(cli("train", case.recipe, "--resume", "schedule.train_steps=3"), f"{TAG}/{name}",
                        "holds a pickled posix.system")
    assert line.startswith("megannm train: error: ") and (case.tag.parent / "latest").read_text().strip() == TAG


def test_every_command_that_reads_a_checkpoint_refuses_it(case):
    case.plant(MODEL)
    tok = case.toy["tokenizers"]
    for argv in (("convert", case.tag, case.tmp / "c", "--to", "consolidated"),
                 ("convert", case.tag, case.tmp / "hf", "--to", "hf", "--tokenizers", tok),
                 ("generate", case.tag, "--tokenizers", tok, "--caption", "a red circle", "--out", case.tmp / "g"),
                 ("evaluate", case.tag, "--tokenizers", tok, "--benchmark", "toy", "--n", "1",
                  "--out", case.tmp / "e"),
                 ("train", case.recipe, f"checkpoint.init_from={case.tag}", f"logging.dir={case.tmp / 'next'}")):
        case.refused(cli(*argv), f"{TAG}/{MODEL}", "posix.system")
    assert not (case.tmp / "c").exists() and not (case.tmp / "hf").exists()


def test_master_weights_read_from_a_planted_optimizer_file_are_refused(case):
    case.plant(OPTIM)
    line = case.refused(cli("convert", case.tag, case.tmp / "c", "--to", "consolidated", "--weights", "master"),
                        f"{TAG}/{OPTIM}", "posix.system")
    assert line.startswith("megannm convert: error:") and not (case.tmp / "c").exists()  # nothing written


def test_trust_code_loads_them(case):
    case.plant(MODEL)
    case.plant(OPTIM)
    assert cli("train", case.recipe, "--resume", "schedule.train_steps=3", "--trust-code") == (0, [])
    assert case.marker.exists()  # the planted code ran: that is what the switch opens
    assert (case.tag.parent / "latest").read_text().strip() == "step00000003"  # resumed from step 2, one more
    case.marker.unlink()
    assert cli("--trust-code", "convert", case.tag, case.tmp / "c", "--to", "consolidated")[0] == 0
    assert case.marker.exists() and (case.tmp / "c" / "model.safetensors").exists()
    from megannm.trust import trusted
    assert not trusted()  # for that command only: the next one in this process is refused again


def test_a_saved_image_tokenizer_imports_only_registered_kinds(case, monkeypatch):
    from megannm.data.image_tokenizer import base
    from megannm.data.tokenize import Tokenizers
    from megannm.trust import trust_code
    tok = case.tmp / "tok"
    shutil.copytree(case.toy["tokenizers"], tok)
    monkeypatch.syspath_prepend(str(case.tmp / "modules"))
    kind = plant_kind(tok, case.tmp / "modules", case.marker)
    module = kind.partition(":")[0]
    line = case.refused(cli("generate", case.tag, "--tokenizers", tok, "--caption", "a red circle", "--out",
                            case.tmp / "g"), "tok/image_tokenizer.npz", f"image tokenizer kind '{kind}'")
    assert f"would import module {module}" in line and module not in sys.modules

    # a folder kind names it in image_tokenizer.json: the same
    folder = case.tmp / "folder_kind"
    folder.mkdir()
    (folder / base.META_FILE).write_text(json.dumps({"format": base.FOLDER_FORMAT, "format_version": 1,
                                                     "kind": kind}))
    with pytest.raises(Exception, match=re.escape(f"{folder / base.META_FILE}: not loaded: image tokenizer kind")):
        base.load_image_tokenizer(folder)
    assert not case.marker.exists() and module not in sys.modules

    # an installed package's entry point registers it: its module is imported, as for any installed kind
    ep = EntryPoint(name="planted", value=kind, group=base.ENTRY_POINT_GROUP)
    with monkeypatch.context() as m:
        m.setattr(base, "entry_points", lambda group: [ep] if group == base.ENTRY_POINT_GROUP else [])
        assert type(Tokenizers.load(tok).image).__name__ == "PlantedVQ" and case.marker.exists()

    # or --trust-code: a new module, loaded as such
    case.marker.unlink()
    kind = plant_kind(tok, case.tmp / "modules", case.marker)
    with trust_code():
        image = Tokenizers.load(tok).image
    assert image.kind == kind and case.marker.exists()
    for name in [n for n in sys.modules if n.startswith("megannm_planted_vq")]:
        monkeypatch.delitem(sys.modules, name)


def test_a_truncated_safetensors_file_is_one_line(case):
    assert cli("convert", case.tag, case.tmp / "c", "--to", "consolidated")[0] == 0
    data = (case.tmp / "c" / "model.safetensors").read_bytes()
    for cut, want in ((len(data) // 2, rf"truncated \({len(data) // 2} bytes, its header describes {len(data)}\)$"),
                      (100, r"truncated \(100 bytes, its header alone needs \d+\)$")):
        (case.tmp / "c" / "model.safetensors").write_bytes(data[:cut])
        code, lines = cli("convert", case.tmp / "c", case.tmp / "hf", "--to", "hf", "--tokenizers",
                          case.toy["tokenizers"])
        assert code == 2 and len(lines) == 1, lines
        assert re.search(rf"c/model.safetensors: {want}", lines[0]), lines[0]


def test_every_torch_load_goes_through_megannm_trust():
    """``torch.load`` appears in megannm/trust.py alone: every other reader calls ``megannm.trust.torch_load`` (or
    ``megannm.checkpoint.tensors.load_torch`` over it), and DeepSpeed's engine loads through ``DataLoads``."""
    calls = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "megannm").rglob("*.py"))
             for i, text in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"\btorch\.load\(", text.split("#")[0]) and "``torch.load" not in text]
    assert len(calls) == 2 and {c.split(":")[0] for c in calls} == {"megannm/trust.py"}, calls
    from megannm.train import engine
    assert "engine.checkpoint_engine = DataLoads(engine.checkpoint_engine)" in inspect.getsource(engine.build_engine)
