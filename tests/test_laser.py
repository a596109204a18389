"""LASER: matrix types from the architecture, SVDs computed once, interventions equal to the best rank-r
truncation, LowRankLinear vs dense write-back, the prefix cache, greedy composition, save/load of the factors,
and the `sparsekit laser` command end to end on tiny models."""

import json
import re

import pytest
import torch
from torch import nn

from sparsekit import laser
from sparsekit.laser import (Intervention, LaserFactors, MultipleChoiceObjective, PerplexityObjective, PrefixCache,
                             apply_interventions, discover_matrix_types, greedy_compose, laser_search,
                             parse_layers, parse_rhos, rank_for, resolve_matrix_types)
from sparsekit.models import find_decoder_layers, linear_weight
from sparsekit.nn import LowRankLinear
from sparsekit.tasks import MCExample
from tiny_models import WORDS, random_windows, save_tiny_hf_folder, tiny_model, tiny_tokenizer

EXPECTED = {
    "llama": {"self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
              "self_attn.o_proj": "attn.o", "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up",
              "mlp.down_proj": "mlp.down"},
    "gpt2": {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.o", "mlp.c_fc": "mlp.up", "mlp.c_proj": "mlp.down"},
    "opt": {"self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v", "self_attn.q_proj": "attn.q",
            "self_attn.out_proj": "attn.o", "fc1": "mlp.up", "fc2": "mlp.down"},
    "phi": {"self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
            "self_attn.dense": "attn.o", "mlp.fc1": "mlp.up", "mlp.fc2": "mlp.down"},
}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", layers=3)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2", layers=3)


# ---------------------------------------------------------------------------------------------------------
# Matrix types and argument parsing
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_matrix_types_and_roles_from_the_architecture(arch):
    model = tiny_model(arch, layers=2)
    types = discover_matrix_types(model)
    assert {n: t.short for n, t in types.items()} == EXPECTED[arch]
    for t in types.values():
        assert t.layers == (0, 1)
        assert t.block == t.short.split(".")[0]
        assert t.shape == tuple(linear_weight(find_decoder_layers(model)[0].get_submodule(t.name)).shape)


class _Config:
    num_hidden_layers, vocab_size, hidden_size = 2, 16, 8


class MixerAttention(nn.Module):  # roles must come from data flow: no name says q, k, v or o
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        return self.d(self.a(x) * self.b(x) + self.c(x))


class Ffn(nn.Module):  # w1 is called first, but w2 is the gate: its output goes through the activation
    def __init__(self):
        super().__init__()
        self.w1, self.w2, self.w3, self.act = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8), nn.SiLU()

    def forward(self, x):
        up = self.w1(x)
        return self.w3(up * self.act(self.w2(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.mixer, self.ffn = nn.LayerNorm(8), MixerAttention(), Ffn()

    def forward(self, x):
        x = x + self.mixer(self.norm(x))
        return x + self.ffn(x)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = _Config()
        self.embed, self.blocks, self.head = nn.Embedding(16, 8), nn.ModuleList([Block(), Block()]), nn.Linear(8, 16)

    def forward(self, input_ids, use_cache=False):
        x = self.embed(input_ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_roles_follow_data_flow_not_names_or_call_order():
    types = discover_matrix_types(Toy())
    assert {n: t.short for n, t in types.items()} == {
        "mixer.a": "attn.q", "mixer.b": "attn.k", "mixer.c": "attn.v", "mixer.d": "attn.o",
        "ffn.w1": "mlp.up", "ffn.w2": "mlp.gate", "ffn.w3": "mlp.down"}


def test_resolve_matrix_types(llama, gpt2):
    types = discover_matrix_types(llama)
    assert resolve_matrix_types("mlp.down_proj,attn.o", types) == ["mlp.down_proj", "self_attn.o_proj"]
    assert resolve_matrix_types("mlp", types) == ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert resolve_matrix_types("all", types) == list(types)
    assert resolve_matrix_types(["attn.o", "self_attn.o_proj"], types) == ["self_attn.o_proj"]
    with pytest.raises(ValueError, match=r"unknown matrix type 'mlp\.fc_out'.*mlp\.down \(mlp\.down_proj\)"):
        resolve_matrix_types("mlp.fc_out", types)
    assert resolve_matrix_types("attn", discover_matrix_types(gpt2)) == ["attn.c_attn", "attn.c_proj"]


def test_parse_layers_and_rhos():
    assert parse_layers("20-29", 30) == list(range(20, 30))
    assert parse_layers("1,3-4,1", 30) == [1, 3, 4]
    assert parse_layers("-2--1", 30) == [28, 29]
    assert parse_layers("last-half", 30) == list(range(15, 30))
    assert parse_layers("all", 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="layer 30 is out of range: the model has 30 decoder layers"):
        parse_layers("25-30", 30)
    with pytest.raises(ValueError, match="bad layer entry 'x'"):
        parse_layers("1,x", 30)
    with pytest.raises(ValueError, match="empty"):
        parse_layers("5-3", 30)
    assert parse_rhos("0.1,0.01,1,0.1") == [0.01, 0.1, 1.0]
    for bad in ("0", "1.5", "-0.1", "nan"):
        with pytest.raises(ValueError, match=r"rho must be in \(0, 1\]"):
            parse_rhos(bad)
    with pytest.raises(ValueError, match="not a number"):
        parse_rhos("0.1,abc")


def test_rank_for_is_lasers_floor_never_zero():
    assert rank_for(0.01, (576, 1536)) == 5  # int(576 * 0.01)
    assert rank_for(0.1, (1536, 576)) == 57
    assert rank_for(0.01, (64, 64)) == 1  # floor would give 0
    assert rank_for(1.0, (32, 64)) == 32
    assert rank_for(0.29, (100, 300)) == 29  # no float round-down (0.29 * 100 = 28.999...)


# ---------------------------------------------------------------------------------------------------------
# SVDs once; what an intervention does to the model
# ---------------------------------------------------------------------------------------------------------

def _count_svd_calls(monkeypatch):
    calls = []
    real = laser.truncated_svd

    def counting(w, rank, **kw):
        calls.append((tuple(w.shape), rank))
        return real(w, rank, **kw)

    monkeypatch.setattr(laser, "truncated_svd", counting)
    return calls


def test_svds_are_batched_by_shape_and_reused_for_every_rho(llama, monkeypatch):
    calls = _count_svd_calls(monkeypatch)
    types = discover_matrix_types(llama)
    names = resolve_matrix_types("all", types)
    rhos = [0.05, 0.25, 0.5]
    targets = [(l, n) for l in (1, 2) for n in names]
    factors = LaserFactors(llama, targets, rhos, method="randomized")
    # shapes: q/o 64x64, k/v 32x64, gate/up 128x64, down 64x128: one stacked call each, at the largest rank
    assert sorted(calls) == sorted([((4, 64, 64), 32), ((4, 32, 64), 16), ((4, 128, 64), 32),
                                    ((2, 64, 128), 32)])
    assert factors.svd_calls == 4
    windows = random_windows(2, 16)
    ivs = [Intervention(l, n, r) for l, n in targets for r in rhos]
    laser_search(llama, PerplexityObjective(windows), ivs, factors)
    assert len(calls) == 4  # 42 interventions and the composition evaluated without one more SVD


def test_stacks_are_split_by_memory_cap(llama, monkeypatch):
    calls = _count_svd_calls(monkeypatch)
    LaserFactors(llama, [(l, "mlp.down_proj") for l in range(3)], [0.1], max_stack_bytes=2 * 64 * 128 * 4)
    assert [c[0] for c in calls] == [(2, 64, 128), (1, 64, 128)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("rho", [0.1, 0.9])  # LowRankLinear and dense write-back
def test_intervention_equals_the_optimal_rank_r_truncation(arch, rho, request):
    model = request.getfixturevalue(arch)
    name = "mlp.down_proj" if arch == "llama" else "mlp.c_proj"
    target = find_decoder_layers(model)[1].get_submodule(name)
    w = linear_weight(target).clone()
    rank = rank_for(rho, w.shape)
    factors = LaserFactors(model, [(1, name)], [rho], method="exact")
    with apply_interventions(model, [Intervention(1, name, rho)], factors) as applied:
        mod = find_decoder_layers(model)[1].get_submodule(name)
        got = mod.dense_weight() if isinstance(mod, LowRankLinear) else linear_weight(mod)
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert torch.allclose(got.double(), best, atol=1e-5 * float(s[0]))
        err = torch.linalg.matrix_norm(w.double() - got.double())
        assert err <= torch.linalg.matrix_norm(w.double() - best) * (1 + 1e-5)  # Eckart-Young
        assert applied.records[0]["rank"] == rank
    restored = find_decoder_layers(model)[1].get_submodule(name)
    assert restored is target and torch.equal(linear_weight(restored), w)


@pytest.mark.parametrize("arch,name", [("llama", "self_attn.q_proj"), ("gpt2", "attn.c_attn")])
def test_low_rank_module_only_when_it_saves_bytes(arch, name, request):
    model = request.getfixturevalue(arch)
    layer = find_decoder_layers(model)[0]
    m, n = linear_weight(layer.get_submodule(name)).shape
    limit = m * n / (m + n)  # llama q 64x64: 32; gpt2 c_attn 192x64: 48
    rhos = [0.25, 0.75]
    factors = LaserFactors(model, [(0, name)], rhos, method="exact")
    x = torch.randn(3, 5, n)
    for rho in rhos:
        rank = rank_for(rho, (m, n))
        with apply_interventions(model, [Intervention(0, name, rho)], factors) as applied:
            mod = layer.get_submodule(name)
            assert isinstance(mod, LowRankLinear) == (rank < limit)
            assert applied.records[0]["storage"] == ("low_rank" if rank < limit else "dense")
            if isinstance(mod, LowRankLinear):  # computes what the truncated dense layer computes
                u, s, v = factors.factors(0, name, rank)
                dense = torch.nn.functional.linear(x, (u * s) @ v.t(), mod.bias)
                assert torch.allclose(mod(x), dense, atol=1e-5)
        assert not isinstance(layer.get_submodule(name), LowRankLinear)


def test_two_interventions_on_one_matrix_are_refused(llama):
    factors = LaserFactors(llama, [(0, "mlp.up_proj")], [0.1, 0.2])
    with pytest.raises(ValueError, match="two interventions target layer 0 'mlp.up_proj'"):
        apply_interventions(llama, [Intervention(0, "mlp.up_proj", 0.1), Intervention(0, "mlp.up_proj", 0.2)],
                            factors)
    assert isinstance(find_decoder_layers(llama)[0].mlp.up_proj, nn.Linear)


# ---------------------------------------------------------------------------------------------------------
# Evaluation with the prefix cache; composition; search
# ---------------------------------------------------------------------------------------------------------

def _mc_objective(text, n=6):
    tok = tiny_tokenizer(text)
    words = text.split()
    examples = [MCExample([" ".join(words[i:i + 9])] * 3, [" " + words[i + 9], " " + words[i + 20], " the"], 0)
                for i in range(0, 40 * n, 40)]
    return MultipleChoiceObjective(examples, tok, "toy")


class _PaddedLogitSum:
    """An objective with a continuous score on batches of different shapes with padding masks, as the
    multiple-choice scorer calls the model."""

    def positions(self, hidden_bytes):
        return 64 * hidden_bytes

    @torch.no_grad()
    def evaluate(self, model, progress=False, desc=""):
        total = 0.0
        for b, t in ((3, 7), (2, 11), (4, 5)):
            ids = random_windows(b, t, seed=b * t)
            mask = torch.ones(b, t, dtype=torch.long)
            mask[0, t - 2:] = 0
            total += float(model(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()].sum())
        return {"sum": total}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["ppl", "mc", "padded"])
def test_prefix_cache_gives_the_full_evaluation(arch, kind, request):
    model = request.getfixturevalue(arch)
    text = open(WORDS, encoding="utf-8").read()[:20000]
    obj = {"ppl": lambda: PerplexityObjective(random_windows(3, 24)), "mc": lambda: _mc_objective(text),
           "padded": _PaddedLogitSum}[kind]()
    name = "mlp.up_proj" if arch == "llama" else "mlp.c_fc"
    factors = LaserFactors(model, [(2, name)], [0.1])
    cache = PrefixCache(model, obj)
    base = cache.capture([2])
    assert base == obj.evaluate(model)
    with apply_interventions(model, [Intervention(2, name, 0.1)], factors):
        full = obj.evaluate(model)
        fast = cache.evaluate(2)
    assert fast == pytest.approx(full, rel=1e-6)
    if kind != "mc":  # accuracy on 6 toy questions may not move
        assert fast != base  # the intervention does change the score: the comparison can fail
    assert all(not isinstance(l, laser._ReplayLayer) for l in find_decoder_layers(model))


def test_prefix_cache_refuses_a_different_evaluation(llama):
    obj = PerplexityObjective(random_windows(2, 16))
    cache = PrefixCache(llama, obj)
    cache.capture([1])
    cache.objective = PerplexityObjective(random_windows(2, 20))
    with pytest.raises(RuntimeError, match="out of step"):
        cache.evaluate(1)
    assert all(not isinstance(l, laser._ReplayLayer) for l in find_decoder_layers(llama))


def test_greedy_compose_on_a_toy_score():
    a, a2, b, c, d = (Intervention(1, "x", 0.1), Intervention(1, "x", 0.5), Intervention(2, "x", 0.1),
                      Intervention(3, "y", 0.1), Intervention(4, "y", 0.1))
    gains = {a: 3.0, a2: 2.5, b: 2.0, c: 1.0, d: 0.5}
    clash = {frozenset({b, c}): -2.5}  # b and c together are worse than b alone
    seen = []

    def score(ivs):
        seen.append(tuple(ivs))
        total = sum(gains[i] for i in ivs) + sum(v for k, v in clash.items() if k <= set(ivs))
        return (total,)

    chosen, best, tried = greedy_compose([a, a2, b, c, d], score, (0.0,))
    assert chosen == [a, b] and best == (5.0,)
    assert [t[0] for t in tried] == [a, b, c] and [t[2] for t in tried] == [True, True, False]
    assert (a, a2) not in seen  # a second rho on the same matrix is never tried
    assert (a, b, c, d) not in seen  # stops at the first intervention that does not improve
    assert greedy_compose([a], lambda ivs: (-1.0,), (0.0,))[0] == []


def test_laser_search_on_a_tiny_model(llama):
    obj = PerplexityObjective(random_windows(2, 16))
    ivs = [Intervention(l, n, r) for l in (1, 2) for n in ("mlp.down_proj", "self_attn.o_proj") for r in (0.1, 1.0)]
    factors = LaserFactors(llama, sorted({(i.layer, i.matrix_type) for i in ivs}), [0.1, 1.0])
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    res = laser_search(llama, obj, ivs, factors, progress=False)
    assert len(res.singles) == 8
    keys = [obj.key(r.metrics) for r in res.singles]
    assert keys == sorted(keys, reverse=True)
    assert res.base == obj.evaluate(llama)
    full_rank = [r for r in res.singles if r.intervention.rho == 1.0]  # rank = min(m, n): no change
    assert all(r.metrics["ppl"] == pytest.approx(res.base["ppl"], rel=1e-4) for r in full_rank)
    if res.composed:
        assert obj.key(res.composed_metrics) > obj.key(res.base)
        with apply_interventions(llama, res.composed, factors):
            assert obj.evaluate(llama) == pytest.approx(res.composed_metrics, rel=1e-6)
    after = llama.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # without the prefix cache: the same scores
    res0 = laser_search(llama, obj, ivs, factors, cache_bytes=0)
    assert [r.intervention for r in res0.singles] == [r.intervention for r in res.singles]
    assert [r.metrics["ppl"] for r in res0.singles] == pytest.approx([r.metrics["ppl"] for r in res.singles])


# ---------------------------------------------------------------------------------------------------------
# Save / load of the factors
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,names", [("llama", ["mlp.down_proj", "self_attn.q_proj"]),
                                        ("gpt2", ["mlp.c_fc", "attn.c_proj"])])
def test_low_rank_layers_round_trip_through_save_compressed(arch, names, tmp_path):
    from sparsekit import load_compressed, save_compressed
    from sparsekit.compressed import count_parameters

    model = tiny_model(arch, layers=2)
    factors = LaserFactors(model, [(1, n) for n in names], [0.1])
    before = count_parameters(model)
    apply_interventions(model, [Intervention(1, n, 0.1) for n in names], factors)
    assert count_parameters(model) < before
    manifest = save_compressed(model, str(tmp_path / "m"))
    assert {v["class"] for v in manifest["modules"].values()} == {"LowRankLinear"}
    loaded = load_compressed(str(tmp_path / "m"), attn_implementation="eager")
    layer = find_decoder_layers(loaded)[1]
    for n in names:
        mod = layer.get_submodule(n)
        ref = find_decoder_layers(model)[1].get_submodule(n)
        assert isinstance(mod, LowRankLinear) and mod.rank == ref.rank
        assert torch.equal(mod.v, ref.v) and torch.equal(mod.us, ref.us)
    ids = random_windows(2, 12)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert count_parameters(loaded) == count_parameters(model)


# ---------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    text = open(WORDS, encoding="utf-8").read()[:60000]
    return save_tiny_hf_folder(str(tmp_path_factory.mktemp("models") / "tiny-llama"), text, layers=3)


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(open(WORDS, encoding="utf-8").read()[:8000])
    return str(path)


@pytest.fixture(scope="module")
def tiny_mc(tmp_path_factory):
    words = open(WORDS, encoding="utf-8").read()[:20000].split()
    path = tmp_path_factory.mktemp("mc") / "toy.jsonl"
    with open(path, "w") as f:
        for i in range(0, 12 * 30, 30):
            f.write(json.dumps({"query": " ".join(words[i:i + 8]), "choices": [words[i + 8], words[i + 15]],
                                "gold": 0}) + "\n")
    return str(path)


def run_cli(args, capsys):
    from sparsekit.cli_laser import main

    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_end_to_end_perplexity(tiny_folder, tiny_text, tmp_path, capsys):
    from sparsekit import load_compressed

    out = tmp_path / "laser"
    code, stdout, err = run_cli(["--model", tiny_folder, "--eval-set", tiny_text, "--val", "2", "--test", "3",
                                 "--seqlen", "32", "--layers", "1-2", "--matrix-types", "mlp.down,attn.o",
                                 "--rhos", "0.05,0.5", "--output", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert "single interventions, best first" in stdout and "test perplexity (3 windows)" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "perplexity" and report["val_size"] == 2 and report["test_size"] == 3
    assert len(report["singles"]) == 2 * 2 * 2
    assert report["svd"]["batched_calls"] == 2  # o_proj 64x64 and down_proj 64x128, each one stack
    assert {s["storage"] for s in report["singles"]} == {"low_rank", "dense"}  # rank 3 vs rank 32 of 64
    vals = [s["val"]["ppl"] for s in report["singles"]]
    assert vals == sorted(vals)
    assert set(report["test"]) == {"base", "best_single", "composed"}
    n_low_rank = sum(c["storage"] == "low_rank" for c in report["composed"])
    assert (report["parameters"]["after"] < report["parameters"]["before"]) == (n_low_rank > 0)
    loaded = load_compressed(str(out))
    assert sum(isinstance(m, LowRankLinear) for m in loaded.modules()) == n_low_rank
    if not report["composed"]:
        assert report["test"]["composed"] == report["test"]["base"]


def test_cli_end_to_end_multiple_choice_with_separate_test_set(tiny_folder, tiny_mc, tmp_path, capsys):
    out = tmp_path / "laser"
    code, stdout, err = run_cli(["--model", tiny_folder, "--eval-set", tiny_mc, "--test-set", tiny_mc,
                                 "--val", "6", "--test", "12", "--layers=-1", "--matrix-types", "mlp",
                                 "--rhos", "0.25", "--no-compose", "--output", str(out), "--no-progress"], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "acc" and report["layers"] == [2]
    assert [s["short"] for s in report["singles"]] and {s["short"] for s in report["singles"]} == \
        {"mlp.gate", "mlp.up", "mlp.down"}
    assert report["test"]["base"]["n"] == 12 and report["val"]["base"]["n"] == 6
    assert report["compose_steps"] == []


def test_cli_lists_matrix_types(tiny_folder, capsys):
    code, stdout, _ = run_cli(["--model", tiny_folder, "--list-matrix-types", "--no-progress"], capsys)
    assert code == 0
    assert re.search(r"mlp\.down_proj\s+mlp\.down\s+mlp\s+64x128\s+0-2", stdout), stdout


def test_cli_help_teaches(capsys):
    with pytest.raises(SystemExit):
        run_cli(["--help"], capsys)
    text = capsys.readouterr().out
    assert "examples:" in text and "--list-matrix-types" in text and "rank = max(1, floor(rho" in text


@pytest.mark.parametrize("extra,message", [
    (["--matrix-types", "mlp.fc_out"], r"unknown matrix type 'mlp\.fc_out'"),
    (["--layers", "1-3"], "layer 3 is out of range: the model has 3 decoder layers"),
    (["--layers", "1-x"], "bad layer entry '1-x'"),
    (["--rhos", "0,0.1"], r"rho must be in \(0, 1\]"),
    (["--rhos", "1.5"], r"rho must be in \(0, 1\]"),
    (["--val", "0"], "--val must be >= 1"),
    (["--test", "400"], r"--test 400 = 402 needed \(the test split would be empty"),
    (["--eval-set", "/no/such.txt"], "no such text file"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--method", "exact", "--oversample", "-1"], "--oversample and --power-iters must be >= 0"),
])
def test_cli_bad_input(extra, message, tiny_folder, tiny_text, tmp_path, capsys):
    args = ["--model", tiny_folder, "--eval-set", tiny_text, "--val", "2", "--test", "2", "--seqlen", "32",
            "--output", str(tmp_path / "o"), "--no-progress"]
    code, _, err = run_cli(args + extra, capsys)
    assert code == 2
    assert re.search(message, err), err
    assert not (tmp_path / "o").exists()


def test_cli_bad_input_multiple_choice_and_output(tiny_folder, tiny_mc, tiny_text, tmp_path, capsys):
    base = ["--model", tiny_folder, "--no-progress"]
    code, _, err = run_cli(base + ["--eval-set", tiny_mc, "--val", "8", "--test", "8", "--output",
                                   str(tmp_path / "o")], capsys)
    assert code == 2 and "holds only 12 questions; --val 8 + --test 8 = 16 needed" in err
    code, _, err = run_cli(base + ["--eval-set", tiny_mc, "--test-set", tiny_text, "--output", str(tmp_path / "o")],
                           capsys)
    assert code == 2 and "not of the same kind" in err
    code, _, err = run_cli(base + ["--eval-set", tiny_text], capsys)
    assert code == 2 and "--output DIR is required" in err
    (tmp_path / "o").mkdir()
    code, _, err = run_cli(base + ["--eval-set", tiny_text, "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "--overwrite" in err


def test_nan_perplexity_ranks_last():
    """A NaN perplexity (a broken reduction) sorts after every finite one, so it is never the best single."""
    keys = sorted([263.7, float("nan"), 261.3, 261.9], key=lambda p: tuple(-x for x in PerplexityObjective.key({"ppl": p})))
    assert keys[:3] == [261.3, 261.9, 263.7] and keys[3] != keys[3]


def test_low_rank_linear_built_directly_starts_like_nn_linear():
    """LowRankLinear(in, out, rank) starts with finite factors whose product has nn.Linear's weight variance
    (its factors were torch.empty) and a bias drawn as nn.Linear draws it; a bool rank is refused."""
    torch.manual_seed(0)
    layer = LowRankLinear(512, 256, 16)
    w = layer.us @ layer.v.T
    assert torch.isfinite(w).all()
    assert abs(w.var().item() / (1 / (3 * 512)) - 1) < 0.15
    assert 0 < layer.bias.abs().max().item() <= 512 ** -0.5
    with pytest.raises(ValueError, match="rank must be an int, got True"):
        LowRankLinear(64, 48, True)


def test_cli_seqlen_past_the_models_positions(tiny_folder, tiny_text, tmp_path, capsys):
    """--seqlen is checked against the model's positions (it used to fail deep in its embedding)."""
    code, _, err = run_cli(["--model", tiny_folder, "--eval-set", tiny_text, "--val", "1", "--test", "1",
                            "--seqlen", "300", "--layers", "0", "--rhos", "0.1", "--output", str(tmp_path / "o"),
                            "--no-progress"], capsys)
    assert code == 2
    assert "--seqlen 300 is longer than the model's" in err
