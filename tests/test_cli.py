"""The ``tucker-peft`` command line, end to end on tiny synthetic checkpoints."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

import tucker_peft as tp
from tucker_peft.adapter import spec_from_json
from tucker_peft.cli import main
from tucker_peft.cli._checkpoint import CheckpointError, open_checkpoint

safetensors_numpy = pytest.importorskip("safetensors.numpy")

KINDS = ("tucker", "tucker2", "cp", "lora")
SHAPES = {
    "features.0.weight": (8, 3, 3, 3),
    "features.0.bias": (8,),
    "features.3.weight": (16, 8, 3, 3),
    "classifier.weight": (10, 48),
    "embed.weight": (30, 6),
    "narrow.weight": (4, 3),
}
ADAPTABLE = [n for n, s in SHAPES.items() if len(s) >= 2]


def _base(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (0.1 * rng.standard_normal(s)).astype(np.float32) for n, s in SHAPES.items()}


def _save_sharded(folder, tensors: dict[str, np.ndarray], n_shards: int = 3) -> str:
    os.makedirs(folder, exist_ok=True)
    names = list(tensors)
    wmap = {}
    for i in range(n_shards):
        fn = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = names[i::n_shards]
        safetensors_numpy.save_file({k: tensors[k] for k in part}, os.path.join(folder, fn))
        wmap.update({k: fn for k in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": wmap}, f)
    return str(folder)


def _save_raw(path, entries: dict[str, tuple[str, tuple[int, ...], bytes]]) -> None:
    """A safetensors file written by hand (for dtypes NumPy cannot save, e.g. BF16)."""
    header, data = {}, b""
    for name, (dtype, shape, raw) in entries.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + data)


def _exact_specs(kind: str, match=("lora", 2)) -> dict:
    """Per adaptable tensor, the spec that ``--match lora:2`` gives ``kind``."""
    from tucker_peft.cli._ranks import reference_spec

    return {n: tp.ranks.match(reference_spec(match[0], SHAPES[n], match[1]), kind) for n in ADAPTABLE}


def _pair(tmp_path, kind: str, sharded: bool = True, zero=("embed.weight",)):
    """BASE (single file) and TUNED (sharded) with dW of exactly the ranks --match lora:2 asks, zero on ``zero``."""
    base = _base()
    tuned = dict(base)
    deltas = {}
    for i, (n, spec) in enumerate(_exact_specs(kind).items()):
        if n in zero:
            continue
        d = np.asarray(spec.reconstruct(spec.init("random", seed=10 + i)))
        d = d / np.linalg.norm(d) * math.sqrt(d.size)  # entries of order 1, 10x the base's
        tuned[n] = (base[n] + d).astype(np.float32)
        deltas[n] = d
    bpath = str(tmp_path / "base.safetensors")
    safetensors_numpy.save_file(base, bpath)
    if sharded:
        tpath = _save_sharded(tmp_path / "tuned", tuned)
    else:
        tpath = str(tmp_path / "tuned.safetensors")
        safetensors_numpy.save_file(tuned, tpath)
    return bpath, tpath, base, tuned


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# -- the checkpoint reader ---------------------------------------------------------------

def test_checkpoint_reader_single_sharded_and_index(tmp_path):
    tensors = _base()
    safetensors_numpy.save_file(tensors, str(tmp_path / "one.safetensors"))
    _save_sharded(tmp_path / "sharded", tensors)
    os.makedirs(tmp_path / "dir")
    shutil.copy(tmp_path / "one.safetensors", tmp_path / "dir" / "model.safetensors")
    for p in (tmp_path / "one.safetensors", tmp_path / "sharded", tmp_path / "sharded" / "model.safetensors.index.json",
              tmp_path / "dir"):
        ck = open_checkpoint(p)
        assert sorted(ck.keys()) == sorted(tensors)
        for n, a in tensors.items():
            assert ck.shape(n) == a.shape and ck.dtype(n) == "F32"
            np.testing.assert_array_equal(ck.get(n), a)
    assert len(open_checkpoint(tmp_path / "sharded").files) == 3


def test_checkpoint_reader_bf16_without_torch_and_errors(tmp_path):
    vals = np.array([[1.0, -2.5, 3.140625], [0.0, 1e-3, -65280.0]], np.float32)
    bf16 = (vals.view(np.uint32) >> 16).astype("<u2")  # exact for these values' upper halves
    _save_raw(tmp_path / "bf.safetensors", {"w.weight": ("BF16", vals.shape, bf16.tobytes())})
    ck = open_checkpoint(tmp_path / "bf.safetensors")
    got = ck.get("w.weight")
    assert ck.dtype("w.weight") == "BF16" and got.dtype == np.float32
    np.testing.assert_array_equal(got, (bf16.astype(np.uint32) << 16).view(np.float32))

    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    os.makedirs(tmp_path / "two")
    for n in ("a", "b"):
        shutil.copy(tmp_path / "bf.safetensors", tmp_path / "two" / f"{n}.safetensors")
    os.makedirs(tmp_path / "badshard")
    with open(tmp_path / "badshard" / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {"x.weight": "missing.safetensors"}}, f)
    for p in ("junk.safetensors", "two", "badshard", "nothing-here"):
        with pytest.raises(CheckpointError):
            open_checkpoint(tmp_path / p)


# -- ranks -------------------------------------------------------------------------------

def _table_rows(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in out.splitlines() if line.split() and line.split()[0] in SHAPES}


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_ranks_table_matches_the_library(tmp_path, capsys, layout):
    tensors = _base()
    if layout == "single":
        path = str(tmp_path / "m.safetensors")
        safetensors_numpy.save_file(tensors, path)
    else:
        path = _save_sharded(tmp_path / "m", tensors)
    rc, out, err = _run(capsys, "ranks", path, "--budget", 150)
    assert rc == 0, err
    rows = _table_rows(out)
    assert sorted(rows) == sorted(ADAPTABLE)  # the bias is not adaptable
    for name in ADAPTABLE:
        shape = SHAPES[name]
        row = rows[name]
        assert row[1] == "x".join(map(str, shape))
        assert row[2] == f"{math.prod(shape):,}"
        for i, kind in enumerate(KINDS):
            cells = row[3 + 2 * i: 5 + 2 * i]
            try:
                spec = tp.ranks.for_budget(kind, shape, 150)
            except tp.RankError:
                assert cells == ["-", "-"]
                continue
            ranks = getattr(spec, "ranks", None)
            want = ",".join("*" if r is None else str(r) for r in ranks) if ranks else str(spec.rank)
            assert cells == [want, f"{spec.num_params:,}"], (name, kind)


def test_ranks_json_match_clips_the_lora_rank(tmp_path, capsys):
    path = str(tmp_path / "m.safetensors")
    safetensors_numpy.save_file(_base(), path)
    rc, out, err = _run(capsys, "ranks", path, "--match", "lora:8", "--kinds", "tucker,lora", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert sorted(t["name"] for t in doc["tensors"]) == sorted(ADAPTABLE)
    for t in doc["tensors"]:
        shape = tuple(t["shape"])
        lora = tp.LoRA(shape, min(8, shape[0], math.prod(shape[1:])))
        assert spec_from_json(json.dumps(t["specs"]["lora"]["spec"])) == lora
        tucker = tp.ranks.match(lora, "tucker")
        assert spec_from_json(json.dumps(t["specs"]["tucker"]["spec"])) == tucker
        assert t["specs"]["tucker"]["num_params"] == tucker.num_params
    narrow = next(t for t in doc["tensors"] if t["name"] == "narrow.weight")
    assert narrow["specs"]["lora"]["spec"]["rank"] == 3


def test_ranks_budget_too_small_shows_a_dash_and_why(tmp_path, capsys):
    path = str(tmp_path / "m.safetensors")
    safetensors_numpy.save_file(_base(), path)
    rc, out, err = _run(capsys, "ranks", path, "--budget", 40, "--kinds", "lora,tucker")
    assert rc == 0, err
    row = _table_rows(out)["features.3.weight"]
    assert row[3:5] == ["-", "-"]  # LoRA r=1 on 16x72 needs 88
    assert "features.3.weight lora: needs >= 88 params, budget 40" in out


def test_ranks_resolves_model_names_through_the_registry(tmp_path, capsys, monkeypatch):
    path = str(tmp_path / "m.safetensors")
    safetensors_numpy.save_file(_base(), path)
    fake = types.ModuleType("tucker_peft.cli._models")
    fake.resolve_model = lambda name: path if name == "tiny-net" else None
    monkeypatch.setitem(sys.modules, "tucker_peft.cli._models", fake)
    import tucker_peft.cli

    monkeypatch.setattr(tucker_peft.cli, "_models", fake, raising=False)  # if another test imported the real one
    rc, out, err = _run(capsys, "ranks", "tiny-net", "--budget", 100)
    assert rc == 0 and "classifier.weight" in out, err
    rc, out, err = _run(capsys, "ranks", "no-such-net", "--budget", 100)
    assert rc == 2 and err.count("\n") == 1 and "no-such-net" in err


# -- extract -----------------------------------------------------------------------------

def _load_adapter(out_dir):
    from safetensors import safe_open

    with safe_open(os.path.join(out_dir, "tucker_peft_adapter.safetensors"), framework="numpy") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta.pop("config"))
    with open(os.path.join(out_dir, "extract_report.json")) as f:
        report = json.load(f)
    return config, meta, tensors, report


@pytest.mark.parametrize("kind", ["tucker", "tucker2", "lora"])
def test_extract_writes_the_adapter_format_and_is_exact(tmp_path, capsys, kind):
    bpath, tpath, base, tuned = _pair(tmp_path, kind)
    out_dir = tmp_path / "adapter"
    rc, out, err = _run(capsys, "extract", bpath, tpath, "--kind", kind, "--match", "lora:2", "-o", out_dir)
    assert rc == 0, err
    config, meta, tensors, report = _load_adapter(out_dir)
    assert meta == {"format": "tucker_peft.model_adapter/2"}
    assert config["library_version"] == tp.__version__ and config["adapter_name"] == "default"
    assert config["config"] == {"kind": kind, "alpha": 1.0, "target_modules": None, "init": "zero",
                                "forward": "auto", "dropout": 0.0}
    assert config["trainable"] == []
    expected = _exact_specs(kind)
    extracted = [n for n in ADAPTABLE if n != "embed.weight"]
    assert sorted(config["layers"]) == sorted(extracted)
    assert sorted(tensors) == sorted(f"{n}::{p}" for n in extracted for p in expected[n].param_shapes)
    errors = {r["name"]: r for r in report["layers"]}
    for name in extracted:
        layer = config["layers"][name]
        assert {k: layer[k] for k in ("scale", "base_shape", "dtype", "module_type", "has_init")} == \
            {"scale": 1.0, "base_shape": list(SHAPES[name]), "dtype": "float32", "module_type": None, "has_init": False}
        spec = spec_from_json(json.dumps(layer["spec"]))
        assert spec == expected[name]
        params = {p: tensors[f"{name}::{p}"] for p in spec.param_shapes}
        assert all(a.dtype == np.float32 for a in params.values())
        dw = tuned[name].astype(np.float64) - base[name].astype(np.float64)
        recon = spec.reconstruct({k: v.astype(np.float64) for k, v in params.items()})
        rel = np.linalg.norm(recon - dw) / np.linalg.norm(dw)
        assert rel < 1e-6, (name, rel)
        assert errors[name]["rel_error"] == pytest.approx(rel, rel=1e-6, abs=1e-12)
        assert errors[name]["num_params"] == spec.num_params
        assert name in out
    assert errors["embed.weight"]["status"] == "zero"
    assert "skipped: dW is exactly zero" in out
    assert report["summary"]["tensors_extracted"] == len(extracted)
    assert "extracted 4 of 5 tensors" in out


def test_extract_cp_and_als_report_the_error_of_the_saved_params(tmp_path, capsys):
    bpath, tpath, base, tuned = _pair(tmp_path, "tucker", sharded=False, zero=())
    for kind, extra in (("cp", ["--method", "als", "--steps", "3"]), ("tucker", ["--method", "als"])):
        out_dir = tmp_path / f"ad_{kind}"
        rc, out, err = _run(capsys, "extract", bpath, tpath, "--kind", kind, "--budget", 120, "-o", out_dir,
                            "--dtype", "float64", *extra)
        assert rc == 0, err
        config, _, tensors, report = _load_adapter(out_dir)
        for r in report["layers"]:
            name = r["name"]
            if r["status"] != "ok":
                assert r["status"] == "budget_too_small" and name not in config["layers"]
                continue
            spec = spec_from_json(json.dumps(config["layers"][name]["spec"]))
            assert spec == tp.ranks.for_budget(kind, SHAPES[name], 120)
            params = {p: tensors[f"{name}::{p}"] for p in spec.param_shapes}
            dw = tuned[name].astype(np.float64) - base[name].astype(np.float64)
            rel = np.linalg.norm(spec.reconstruct(params) - dw) / np.linalg.norm(dw)
            assert r["rel_error"] == pytest.approx(rel, rel=1e-9)
            assert 0 <= rel < 1


def test_extract_cp_on_a_rank_deficient_delta(tmp_path, capsys):
    # dW of Tucker ranks (2, 2, 2, 2) has CP rank below what the budget buys: tensorly's
    # SVD-started CP-ALS can hit a singular system there; the CLI falls back and says so.
    bpath, tpath, base, tuned = _pair(tmp_path, "tucker")
    rc, out, err = _run(capsys, "extract", bpath, tpath, "--kind", "cp", "--match", "lora:2", "-o", tmp_path / "ad")
    assert rc == 0, err
    config, _, tensors, report = _load_adapter(tmp_path / "ad")
    for r in report["layers"]:
        if r["status"] == "ok":
            spec = spec_from_json(json.dumps(r["spec"]))
            params = {p: tensors[f"{r['name']}::{p}"].astype(np.float64) for p in spec.param_shapes}
            dw = tuned[r["name"]].astype(np.float64) - base[r["name"]].astype(np.float64)
            rel = np.linalg.norm(spec.reconstruct(params) - dw) / np.linalg.norm(dw)
            assert r["rel_error"] == pytest.approx(rel, rel=1e-6) and rel < 0.5
            if "fallback" in r:
                assert "random start" in r["fallback"]


def test_extract_energy_finds_the_true_ranks(tmp_path, capsys):
    bpath, tpath, base, tuned = _pair(tmp_path, "tucker", sharded=False)
    truth = _exact_specs("tucker")
    for kind in ("tucker", "lora"):
        out_dir = tmp_path / f"e_{kind}"
        rc, out, err = _run(capsys, "extract", bpath, tpath, "--kind", kind, "--energy", "0.99999", "-o", out_dir)
        assert rc == 0, err
        config, _, _, report = _load_adapter(out_dir)
        for r in report["layers"]:
            if r["status"] == "ok":
                spec = spec_from_json(json.dumps(r["spec"]))
                if kind == "tucker":
                    assert spec.ranks == truth[r["name"]].ranks
                else:  # rank of the mode-0 unfolding of the Tucker dW
                    assert spec.rank == truth[r["name"]].ranks[0]
                assert r["rel_error"] < 1e-5


def test_extract_reports_missing_and_mismatched_tensors(tmp_path, capsys):
    base = _base()
    tuned = {k: v + 1.0 for k, v in base.items() if k != "narrow.weight"}
    tuned["classifier.weight"] = np.zeros((48, 10), np.float32)
    tuned["extra.weight"] = np.ones((3, 3), np.float32)
    safetensors_numpy.save_file(base, str(tmp_path / "b.safetensors"))
    safetensors_numpy.save_file(tuned, str(tmp_path / "t.safetensors"))
    rc, out, err = _run(capsys, "extract", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "--kind", "lora",
                        "--budget", 1000, "-o", tmp_path / "ad")
    assert rc == 0, err
    report = _load_adapter(tmp_path / "ad")[3]
    status = {p["name"]: p["status"] for p in report["mismatched"]}
    assert status == {"narrow.weight": "missing_in_tuned", "classifier.weight": "shape_mismatch",
                      "extra.weight": "missing_in_base"}
    assert "skipped: shape 10x48 in BASE, 48x10 in TUNED" in out


def test_extract_refuses_a_non_empty_dir_unless_forced(tmp_path, capsys):
    bpath, tpath, _, _ = _pair(tmp_path, "lora", sharded=False)
    out_dir = tmp_path / "ad"
    os.makedirs(out_dir)
    (out_dir / "old.txt").write_text("x")
    rc, out, err = _run(capsys, "extract", bpath, tpath, "--kind", "lora", "--budget", 200, "-o", out_dir)
    assert rc == 2 and err.count("\n") == 1 and "--force" in err and out == ""
    # --force replaces only a tucker-peft adapter: a directory without one is left alone.
    rc, out, err = _run(capsys, "extract", bpath, tpath, "--kind", "lora", "--budget", 200, "-o", out_dir, "--force")
    assert rc == 2 and err.count("\n") == 1 and "holds none" in err and out == ""
    assert sorted(os.listdir(out_dir)) == ["old.txt"]
    rc, out, err = _run(capsys, "extract", bpath, tpath, "--kind", "lora", "--budget", 200, "-o", tmp_path / "new")
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path / "new")) == ["extract_report.json", "tucker_peft_adapter.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["ad", "base.safetensors", "new", "tuned.safetensors"]  # no temp files


def test_extract_failure_leaves_no_output(tmp_path, capsys, monkeypatch):
    import safetensors.numpy

    bpath, tpath, _, _ = _pair(tmp_path, "lora", sharded=False)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save", boom)
    rc, out, err = _run(capsys, "extract", bpath, tpath, "--kind", "lora", "--budget", 200, "-o", tmp_path / "ad", "-q")
    assert rc == 1 and err == "tucker-peft: error: disk full\n"
    assert sorted(os.listdir(tmp_path)) == ["base.safetensors", "tuned.safetensors"]


# -- bad arguments -----------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["extract", "{b}", "{t}", "--kind", "banana", "--budget", "10", "-o", "{o}"],
    ["ranks", "{b}", "--budget", "abc"],
    ["ranks", "{b}", "--budget", "0"],
    ["ranks", "{tmp}/does-not-exist", "--budget", "10"],
    ["extract", "{b}", "{tmp}/does-not-exist", "--kind", "cp", "--budget", "10", "-o", "{o}"],
    ["extract", "{b}", "{t}", "--kind", "cp", "--budget", "10", "--energy", "0.9", "-o", "{o}"],
    ["extract", "{b}", "{t}", "--kind", "cp", "-o", "{o}"],
    ["extract", "{b}", "{t}", "--kind", "tucker", "--energy", "1.5", "-o", "{o}"],
    ["extract", "{b}", "{t}", "--kind", "lora", "--energy", "none,0.9", "-o", "{o}"],
    ["ranks", "{b}", "--match", "lora"],
    ["ranks", "{b}", "--match", "fancy:3"],
    ["ranks", "{b}", "--budget", "10", "--kinds", "tucker,nope"],
    ["ranks", "{b}", "--budget", "10", "--include", "("],
    ["ranks", "{b}", "--budget", "10", "--no-such-option"],
    ["ranks", "{junk}", "--budget", "10"],
    ["frobnicate"],
    [],
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv):
    bpath, tpath, _, _ = _pair(tmp_path, "lora", sharded=False)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    fill = {"b": bpath, "t": tpath, "o": str(tmp_path / "ad"), "tmp": str(tmp_path),
            "junk": str(tmp_path / "junk.safetensors")}
    rc, out, err = _run(capsys, *[a.format(**fill) for a in argv])
    assert rc == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("tucker-peft: error: "), err
    assert not os.path.exists(tmp_path / "ad")


# -- the program -------------------------------------------------------------------------

def _py(*args, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, **kw)


def test_python_m_help_and_subcommand_help():
    r = _py("-m", "tucker_peft.cli", "--help")
    assert r.returncode == 0 and "ranks" in r.stdout and "extract" in r.stdout, r.stderr
    r = _py("-m", "tucker_peft.cli", "extract", "--help")
    assert r.returncode == 0 and "--energy" in r.stdout and "tucker_peft_adapter.safetensors" in r.stdout, r.stderr


def test_entry_point_and_no_torch_import(tmp_path):
    eps = importlib.metadata.entry_points(group="console_scripts", name="tucker-peft")
    assert [ep.value for ep in eps] == ["tucker_peft.cli:main"]
    bpath, tpath, _, _ = _pair(tmp_path, "tucker", sharded=True)
    code = (
        "import sys, tucker_peft\n"
        "assert 'tucker_peft.cli' not in sys.modules\n"
        "from tucker_peft.cli import main\n"
        f"assert main(['ranks', {bpath!r}, '--budget', '100', '--json']) == 0\n"
        f"assert main(['extract', {bpath!r}, {tpath!r}, '--kind', 'cp', '--budget', '100', '-o', {str(tmp_path / 'ad')!r}, '-q']) == 0\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    r = _py("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("NO-TORCH")
    exe = shutil.which("tucker-peft")
    if exe is None:
        pytest.skip("the tucker-peft script is not on PATH (package not installed)")
    r = subprocess.run([exe, "ranks", bpath, "--budget", "100", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and sorted(t["name"] for t in json.loads(r.stdout)["tensors"]) == sorted(ADAPTABLE)
    r = subprocess.run([exe, "ranks", str(tmp_path / "missing"), "--budget", "1"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("tucker-peft: error: ")


# -- untrusted checkpoints and crashes (one line, exit 2 for a bad argument, 1 for a failure) ---

def _one_line_error(rc, out, err, code):
    assert rc == code, err
    assert err.count("\n") == 1 and err.startswith("tucker-peft: error: "), err
    assert "Traceback" not in err
    return err


def _index(folder, wmap):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": wmap}, f)
    return str(folder)


def test_index_cannot_send_shards_outside_the_checkpoint(tmp_path, capsys):
    tensors = _base()
    os.makedirs(tmp_path / "outside")
    safetensors_numpy.save_file(tensors, str(tmp_path / "outside" / "x.safetensors"))
    outside = str(tmp_path / "outside" / "x.safetensors")
    ck = tmp_path / "ck"
    os.makedirs(ck / "sub")
    os.symlink(outside, ck / "link.safetensors")
    os.symlink(tmp_path / "outside", ck / "sub" / "dir")
    for shard in ("../outside/x.safetensors", outside, "link.safetensors", "sub/dir/x.safetensors",
                  "sub/../../outside/x.safetensors"):
        folder = _index(ck, {n: shard for n in tensors})
        with pytest.raises(CheckpointError, match="outside it|absolute path"):
            open_checkpoint(folder)
        err = _one_line_error(*_run(capsys, "ranks", folder, "--budget", 100), 2)
        assert "weight_map" in err
    # A shard in a subfolder of the checkpoint is fine.
    shutil.copy(outside, ck / "sub" / "x.safetensors")
    assert sorted(open_checkpoint(_index(ck, {n: "sub/x.safetensors" for n in tensors})).keys()) == sorted(tensors)


def test_hugging_face_cache_layout_with_symlinks_into_blobs_still_loads(tmp_path):
    tensors = _base()
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    os.makedirs(blobs)
    os.makedirs(snap)
    safetensors_numpy.save_file(tensors, str(blobs / "1234"))
    with open(blobs / "5678", "w") as f:
        json.dump({"weight_map": {n: "model-00001-of-00001.safetensors" for n in tensors}}, f)
    os.symlink("../../blobs/1234", snap / "model-00001-of-00001.safetensors")
    os.symlink("../../blobs/5678", snap / "model.safetensors.index.json")
    assert sorted(open_checkpoint(snap).keys()) == sorted(tensors)


def test_a_shard_that_is_not_safetensors_is_not_echoed(tmp_path, capsys):
    secret = b"root:x:0:0:root:/root:/bin/bash\n" * 4
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "passwd.safetensors").write_bytes(secret)
    folder = _index(tmp_path / "ck", {"w.weight": "passwd.safetensors"})
    err = _one_line_error(*_run(capsys, "ranks", folder, "--budget", 100), 2)
    assert str(int.from_bytes(secret[:8], "little")) not in err and "root:x" not in err
    assert "expected a safetensors file" in err


def _raw_header(path, header: bytes, data: bytes = b"") -> str:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return str(path)


@pytest.mark.parametrize("header,data,match", [
    (b'{"__metadata__": ["a", "b"]}', b"", "__metadata__"),
    (b'{"__metadata__": "text"}', b"", "__metadata__"),
    (b'{"__metadata__": {"a": {"b": 1}}}', b"", "__metadata__"),
    (b"[" * 50_000 + b"]" * 50_000, b"", "nested too deeply"),
    (b'{"w": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", b"", "nested too deeply"),
    (b'{"w": [1, 2]}', b"", "expected an object"),
    (b'{"w": {"dtype": "F32", "shape": [2.9, 2.2], "data_offsets": [0, 16]}}', bytes(16), "shape of ints"),
    (b'{"w": {"dtype": "F32", "shape": [true, 4], "data_offsets": [0, 16]}}', bytes(16), "shape of ints"),
    (b'{"w": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}', bytes(16), "shape of ints"),
    (b'{"w": {"dtype": "F32", "shape": "22", "data_offsets": [0, 16]}}', bytes(16), "shape of ints"),
    (b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0.0, 16.5]}}', bytes(16), "two ints"),
    (b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}', bytes(16), "needs 16 bytes"),
    (b'{"w": {"dtype": "F99", "shape": [2, 2], "data_offsets": [0, 16]}}', bytes(16), "expected a dtype"),
    (b'{"w": {"dtype": ["F32"], "shape": [2, 2], "data_offsets": [0, 16]}}', bytes(16), "expected a dtype"),
    (b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 32]}}', bytes(16), "do not fit"),
], ids=["meta-list", "meta-str", "meta-nested", "deep", "deep-entry", "list-entry", "float-shape", "bool-dim", "negative",
        "str-shape", "float-offsets", "short-data", "unknown-dtype", "list-dtype", "offsets-beyond"])
def test_malformed_headers_are_one_line_errors(tmp_path, capsys, header, data, match):
    path = _raw_header(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(path)
    _one_line_error(*_run(capsys, "ranks", path, "--budget", 100), 2)


def test_deeply_nested_index_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "model.safetensors.index.json").write_text("[" * 50_000 + "]" * 50_000)
    err = _one_line_error(*_run(capsys, "ranks", tmp_path / "ck", "--budget", 100), 2)
    assert "nested too deeply" in err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.safetensors")
    os.makedirs(tmp_path / "ck")
    os.mkfifo(tmp_path / "ck" / "model.safetensors.index.json")
    for p in (tmp_path / "pipe.safetensors", tmp_path / "ck"):
        r = _py("-m", "tucker_peft.cli", "ranks", str(p), "--budget", "100")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "a FIFO" in r.stderr, r.stderr


def test_names_with_control_characters_are_escaped(tmp_path, capsys):
    evil = "evil\x1b[31m\x1b]0;pwned\x07.weight"
    tensors = {evil: np.ones((6, 4), np.float32), "ok.weight": np.ones((6, 4), np.float32)}
    safetensors_numpy.save_file(tensors, str(tmp_path / "b.safetensors"))
    tuned = {k: v + np.outer(np.arange(6), np.arange(4)).astype(np.float32) for k, v in tensors.items()}
    tuned["gone\x1b[2J.weight"] = np.ones((3, 3), np.float32)
    safetensors_numpy.save_file(tuned, str(tmp_path / "t.safetensors"))
    rc, out, err = _run(capsys, "ranks", tmp_path / "b.safetensors", "--budget", 10)
    assert rc == 0 and "\x1b" not in out + err and "evil\\x1b[31m" in out
    rc, out, err = _run(capsys, "extract", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "--kind", "lora",
                        "--budget", 100, "-o", tmp_path / "ad")
    assert rc == 0, err
    assert "\x1b" not in out + err and "\x07" not in out + err and "gone\\x1b[2J" in err


def test_seed_must_be_non_negative(tmp_path, capsys):
    bpath, tpath, _, _ = _pair(tmp_path, "cp", sharded=False)
    err = _one_line_error(*_run(capsys, "extract", bpath, tpath, "--kind", "cp", "--budget", 200, "--seed", -1,
                                "-o", tmp_path / "ad"), 2)
    assert "--seed" in err and not os.path.exists(tmp_path / "ad")


@pytest.mark.parametrize("error", ["oserror", "safetensors"])
def test_full_disk_is_one_line_exit_1(tmp_path, capsys, monkeypatch, error):
    import errno

    import safetensors
    import safetensors.numpy

    bpath, tpath, _, _ = _pair(tmp_path, "lora", sharded=False)

    def full(*a, **k):
        if error == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        # What safetensors itself raises on ENOSPC.
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    from tucker_peft import _format

    # ENOSPC surfaces at write/fsync time in the one atomic writer; safetensors' own error at serialisation.
    if error == "oserror":
        monkeypatch.setattr(_format.os, "fsync", full)
    else:
        monkeypatch.setattr(_format, "_serialize", full)
    err = _one_line_error(*_run(capsys, "extract", bpath, tpath, "--kind", "lora", "--budget", 200,
                                "-o", tmp_path / "ad", "-q"), 1)
    assert "No space left on device" in err
    assert sorted(os.listdir(tmp_path)) == ["base.safetensors", "tuned.safetensors"]


def test_compare_threads_beyond_the_cores_is_a_usage_error(capsys):
    err = _one_line_error(*_run(capsys, "compare", "--threads", 100000), 2)
    assert "--threads" in err and "cores" in err


def test_tensors_with_more_modes_than_the_cap_are_skipped_quickly(tmp_path, capsys):
    # A 4-element 20-D tensor made extract plan for more than 90 s.
    base = {"deep.weight": np.zeros((2, 2) + (1,) * 18, np.float32), "ok.weight": np.zeros((6, 4), np.float32)}
    tuned = {k: v + 1 for k, v in base.items()}
    safetensors_numpy.save_file(base, str(tmp_path / "b.safetensors"))
    safetensors_numpy.save_file(tuned, str(tmp_path / "t.safetensors"))
    rc, out, err = _run(capsys, "extract", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "--kind", "tucker",
                        "--budget", 100, "-o", tmp_path / "ad")
    assert rc == 0, err
    report = json.loads((tmp_path / "ad" / "extract_report.json").read_text())
    assert [r["name"] for r in report["layers"]] == ["ok.weight"]
    rc, out, err = _run(capsys, "ranks", tmp_path / "b.safetensors", "--budget", 100, "--json")
    skipped = {r["name"]: r["reason"] for r in json.loads(out)["not_adaptable"]}
    assert "ndim 20 > 12" in skipped["deep.weight"]


# -- --force and -o safety (issue 10 §4: never delete what extract did not write) ------------------

def _extract(capsys, bpath, tpath, out, *extra):
    return _run(capsys, "extract", bpath, tpath, "--kind", "lora", "--budget", 200, "-o", out, "-q", *extra)


def test_extract_force_replaces_only_its_own_files(tmp_path, capsys):
    from tucker_peft import _format

    bpath, tpath, _, _ = _pair(tmp_path, "lora", sharded=False)
    out_dir = tmp_path / "ad"
    assert _extract(capsys, bpath, tpath, out_dir)[0] == 0
    first = (out_dir / _format.ADAPTER_FILE).read_bytes()
    (out_dir / "notes.txt").write_text("mine")
    os.makedirs(out_dir / "sub")
    rc, out, err = _run(capsys, "extract", bpath, tpath, "--kind", "lora", "--budget", 100, "-o", out_dir, "-q",
                        "--force")
    assert rc == 0, err
    assert sorted(os.listdir(out_dir)) == ["extract_report.json", "notes.txt", "sub", _format.ADAPTER_FILE]
    assert (out_dir / "notes.txt").read_text() == "mine"
    assert (out_dir / _format.ADAPTER_FILE).read_bytes() != first  # replaced (a smaller budget)
    # A version-1 adapter directory is recognised too; its pair is replaced by the new file.
    legacy = tmp_path / "legacy"
    os.makedirs(legacy)
    (legacy / "adapter_config.json").write_text(json.dumps({"format": _format.LEGACY_FORMAT, "layers": {}}))
    (legacy / "adapter_model.safetensors").write_bytes(b"old")
    (legacy / "keep.txt").write_text("k")
    rc, out, err = _extract(capsys, bpath, tpath, legacy, "--force")
    assert rc == 0, err
    assert sorted(os.listdir(legacy)) == ["extract_report.json", "keep.txt", _format.ADAPTER_FILE]
    # A PEFT adapter's adapter_config.json is not a tucker-peft marker.
    peft_dir = tmp_path / "peft"
    os.makedirs(peft_dir)
    (peft_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    rc, out, err = _extract(capsys, bpath, tpath, peft_dir, "--force")
    assert rc == 2 and "holds none" in err and os.listdir(peft_dir) == ["adapter_config.json"]


def test_extract_never_writes_into_or_around_an_input(tmp_path, capsys, monkeypatch):
    bpath, tpath, _, _ = _pair(tmp_path, "lora", sharded=True)  # TUNED is a directory of shards
    before = {p: open(os.path.join(dp, p), "rb").read() for dp, _, fs in os.walk(tmp_path) for p in fs}
    for out in (tmp_path / "tuned", tmp_path / "tuned" / "inner", tmp_path):
        for extra in ((), ("--force",)):
            rc, out_, err = _extract(capsys, bpath, tpath, out, *extra)
            assert rc == 2 and err.count("\n") == 1 and "input checkpoint" in err, (out, err)
    monkeypatch.chdir(tmp_path)
    rc, out_, err = _extract(capsys, bpath, tpath, ".", "--force")
    assert rc == 2 and "input checkpoint" in err
    after = {p: open(os.path.join(dp, p), "rb").read() for dp, _, fs in os.walk(tmp_path) for p in fs}
    assert after == before
    assert not os.path.exists(tmp_path / "tuned" / "inner")


def test_extract_empty_output_is_a_usage_error(tmp_path, capsys, monkeypatch):
    bpath, tpath, _, _ = _pair(tmp_path, "lora", sharded=False)
    monkeypatch.chdir(tmp_path)
    for extra in ((), ("--force",)):
        rc, out, err = _extract(capsys, bpath, tpath, "", *extra)
        assert rc == 2 and err.count("\n") == 1 and "-o/--output" in err and out == ""
    assert sorted(os.listdir(tmp_path)) == ["base.safetensors", "tuned.safetensors"]
