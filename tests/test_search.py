"""The layer search without Ray: mutator, fingerprint, evolution, evaluation protocols, history, leaderboard,
config checks. (tests/test_search_ray.py runs whole searches.)"""
import json
import random

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from evonorm.space import PAPER_LAYERS, parse
from pipelines.checks import ConfigError
from pipelines.search.driver import check_search_config, reference_layers, seed_graphs
from pipelines.search.evaluator import Rejected, evaluate, finite_check, stability_check
from pipelines.search.evolution import Member, Strategy, pareto_front
from pipelines.search.fingerprint import fingerprint, probe_outputs, static_problem
from pipelines.search.history import History
from pipelines.search.leaderboard import (SUMMARY_FILE, leaderboard_rows, protocol_summary, rerank_jobs, write_comparison,
                                          write_leaderboard, write_norm_configs)
from pipelines.search.mutator import LEAF_NODES, Mutator, series_problem
from pipelines.search.proxy import ProxyData, build_anchor
from tests.conftest import CONF_DIR

import evonorm


def search_cfg(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("search", overrides=["output_dir=/tmp/unused", *overrides])


# --------------------------------------------------------------------------------------------------------------
# mutator

@pytest.mark.parametrize("series", ["b", "s"])
def test_random_layers_and_mutants_are_valid_layers_of_their_series(series):
    mutator, rng = Mutator(series, 3, 8), random.Random(0)
    graphs = [mutator.random_graph(rng) for _ in range(40)]
    assert len({g.canonical_hash() for g in graphs}) > 30  # random, not one layer again and again
    for graph in graphs:
        assert graph.is_valid and graph.depends_on_x and series_problem(graph, series) is None
        assert graph.nodes[:len(LEAF_NODES)] == LEAF_NODES and 3 <= graph.num_ops <= 8
        assert graph.normalize().num_ops == graph.num_ops  # every drawn node is used
        child, change = mutator.mutate(graph, rng)
        assert child.is_valid and series_problem(child, series) is None
        assert child.canonical_hash() != graph.canonical_hash()
        changed = [i for i, (a, b) in enumerate(zip(graph.nodes, child.nodes)) if a != b]
        assert len(child.nodes) == len(graph.nodes) and len(changed) == 1 and changed[0] >= len(LEAF_NODES)
        assert change.startswith(f"node {changed[0]}:")


def test_series_s_never_draws_a_batch_aggregation():
    mutator = Mutator("s")
    assert not [op for op in mutator.ops if op.endswith("_nhw")] and "std_hw" in mutator.ops
    assert {"std_nhw", "mean_nhw", "rms_nhw"} <= set(Mutator("b").ops)


def test_mutator_draws_the_same_layers_from_the_same_seed():
    a = [Mutator("s").random_graph(random.Random(3)).formula() for _ in range(2)]
    assert a[0] == a[1]


# --------------------------------------------------------------------------------------------------------------
# static check and fingerprint

def fp(formula):
    return fingerprint(probe_outputs(parse(formula)))


def test_fingerprint_is_equal_for_equivalent_layers_and_tells_others_apart():
    assert fp(PAPER_LAYERS["s0"]) == fp("sigmoid(x * v1) * x / std_hwg(x)") == fp("x / std_hwg(x) * sigmoid(v1 * x)")
    assert fp("(x + x) + x") == fp("x + (x + x)")
    assert fp("x * (v1 + 1) - x") == fp("x * v1")
    others = [PAPER_LAYERS["s0"], PAPER_LAYERS["s1"], "x * sigmoid(v1 * x) / std_hw(x)",
              "x * sigmoid(v1 * x) / std_hwc(x)", "x * sigmoid(v0 * x) / std_hwg(x)", "x * v1", "x * v0"]
    assert len({fp(f) for f in others}) == len(others)  # hwg, hw, hwc differ on the probe; v0 * x is not 0


def test_static_check_rejects_constant_layers_and_the_wrong_series():
    def problem(formula, series):
        graph = parse(formula)
        return static_problem(graph, series, probe_outputs(graph))

    assert problem("x - x", "s") and "constant" in problem("x * 0 + v1 * 0", "s")
    assert "series s" in problem(PAPER_LAYERS["b0"], "s") and "series b" in problem(PAPER_LAYERS["s0"], "b")
    assert problem(PAPER_LAYERS["b0"], "b") is None and problem(PAPER_LAYERS["s0"], "s") is None


# --------------------------------------------------------------------------------------------------------------
# evolution

def members(*scores):
    return [Member(i, parse("x * v1"), s) for i, s in enumerate(scores)]


def test_pareto_front_keeps_the_undominated():
    front = pareto_front(members((0.9, 0.1), (0.5, 0.5), (0.4, 0.4), (0.1, 0.9), (0.5, 0.5)))
    assert sorted(m.id for m in front) == [0, 1, 3, 4]


def test_aging_evolution_removes_the_oldest_and_draws_parents_from_the_front():
    strategy = Strategy("evolution", Mutator("s"), population=3, tournament=3)
    rng = random.Random(0)
    assert all(strategy.next(rng)[2] == "random" for _ in range(3))  # the initial population is random
    for member in members((0.99, 0.99), (0.5, 0.5), (0.6, 0.4), (0.3, 0.3)):
        strategy.add(member)
    assert [m.id for m in strategy.population] == [1, 2, 3]  # 0, the best, aged out
    parents = {strategy.next(rng)[1] for _ in range(30)}
    assert parents == {1, 2}  # 3 is dominated by 1 in every tournament (the sample is the whole population)


def test_random_search_never_mutates_and_seeds_come_first():
    strategy = Strategy("random", Mutator("s"), 2, 1, seeds=[parse(PAPER_LAYERS["s0"])])
    strategy.add(members((0.5, 0.5))[0])
    strategy.add(members((0.5, 0.5))[0])
    rng = random.Random(0)
    assert strategy.next(rng)[2] == "seed"
    assert {strategy.next(rng)[2] for _ in range(10)} == {"random"}


# --------------------------------------------------------------------------------------------------------------
# evaluation protocols (no Ray: the worker's function called directly)

def tiny_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = (torch.rand(n, 1, 8, 8, generator=g) * 60 + labels.view(-1, 1, 1, 1) * 60).to(torch.uint8)
    split = {k: v.numpy() for k, v in (("train", images), ("score", images[:48]), ("rerank", images[48:]))}
    label_split = {k: v.numpy() for k, v in (("train", labels), ("score", labels[:48]), ("rerank", labels[48:]))}
    return ProxyData(split, label_split, (0.5,), (0.25,), 4)


SETTINGS = {
    "proxy": {"anchors": {"resnet": {"arch": "preact_resnet_cifar", "width": 4, "lr": 0.1},
                          "mobilenet_v2": {"arch": "mobilenet_v2", "width_mult": 0.1, "depth_mult": 0.15,
                                           "output_stride": 4, "dropout": 0.0}},
              "channels_last": True, "batch_size": 8, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
              "warmup_steps": 2, "label_smoothing": 0.0, "steps": 8},
    "protocols": {"finite_scales": [0.01, 1.0, 100.0],
                  "stability": {"steps": 2, "step_size": 0.1, "batch_size": 8, "max_grad_norm": 1000.0},
                  "screen": {"steps": 4, "min_accuracy": 0.0, "eval_size": 16}},
    "rerank": {"steps": 6},
}


def graph_layer(formula):
    return {"norm": "graph", "kwargs": {"graph": formula, "groups": 2}}


def test_evaluation_scores_a_layer_on_every_anchor_and_a_retry_gives_the_same_result():
    data = tiny_data()
    job = {"layer": graph_layer(PAPER_LAYERS["s0"]), "seed": 7}
    first, again = evaluate(job, data, SETTINGS), evaluate(job, data, SETTINGS)
    assert first["status"] == "passed" and first["ended_by"] is None and len(first["scores"]) == 2
    assert all(0 <= s <= 1 for s in first["scores"]) and set(first["times"]) == {"finite", "stability", "quality",
                                                                                   "proxy"}
    assert first["scores"] == again["scores"] and first["screen"] == again["screen"]
    other_seed = evaluate({**job, "seed": 8}, data, SETTINGS)
    assert other_seed["scores"] != first["scores"] or other_seed["worst_grad_norm"] != first["worst_grad_norm"]
    rerank = evaluate({**job, "rerank": True}, data, SETTINGS)
    assert set(rerank["times"]) == {"proxy"} and len(rerank["scores"]) == 2


def test_references_pass_the_stress_test_with_their_plain_ops():
    data = tiny_data()
    for name, layer in reference_layers(["bn_relu", "gn_relu", "b0", "s0"], groups=2).items():
        outcome = evaluate({"layer": layer, "seed": 1}, data, SETTINGS)  # b0/s0: fused kernels differentiate once
        assert outcome["ended_by"] not in ("finite", "stability"), (name, outcome["reason"])
        assert outcome["worst_grad_norm"] < SETTINGS["protocols"]["stability"]["max_grad_norm"]


def test_finiteness_and_stability_reject_what_blows_up():
    factory = evonorm.norm_act_factory("graph", graph="exp(exp(x))", groups=2)
    with pytest.raises(Rejected) as rejected:
        finite_check(factory, [0.01, 1.0, 100.0], seed=0)
    assert rejected.value.protocol == "finite"
    finite_check(evonorm.norm_act_factory("graph", graph=PAPER_LAYERS["s0"], groups=2), [0.01, 1.0, 100.0], 0)
    data = tiny_data()
    spec = SETTINGS["proxy"]["anchors"]["resnet"]
    unstable = build_anchor(spec, evonorm.norm_act_factory("graph", graph="x / std_hwc(std_hwc(x))", groups=2), data)
    with pytest.raises(Rejected) as rejected:
        stability_check(unstable, data, steps=2, step_size=0.1, batch_size=8, max_grad_norm=1000.0)
    assert rejected.value.protocol == "stability" and "gradient norm" in str(rejected.value)
    stable = build_anchor(spec, evonorm.norm_act_factory("bn_relu"), data)
    assert stability_check(stable, data, steps=2, step_size=0.1, batch_size=8, max_grad_norm=1000.0) < 1000.0


def test_quality_screen_rejects_below_its_threshold_at_the_first_anchor():
    settings = json.loads(json.dumps(SETTINGS))
    settings["protocols"]["screen"]["min_accuracy"] = 1.01  # nothing reaches it
    outcome = evaluate({"layer": graph_layer(PAPER_LAYERS["s0"]), "seed": 0}, tiny_data(), settings)
    assert outcome["status"] == "rejected" and outcome["ended_by"] == "quality"
    assert outcome["reason"].startswith("resnet:") and len(outcome["screen"]) == 1  # mobilenet_v2 never trained


# --------------------------------------------------------------------------------------------------------------
# history, summary, leaderboard

def entry(i, status, ended_by=None, scores=None, times=None, **extra):
    return {"kind": "candidate", "id": i, "name": f"#{i}", "hash": f"h{i}", "formula": f"x * v1 + {i}",
            "status": status, "ended_by": ended_by, "scores": scores, "times": times or {}, **extra}


def test_history_survives_a_kill_while_writing_its_last_line(tmp_path):
    history = History(tmp_path)
    history.append(entry(0, "passed", scores=[0.5]))
    with open(history.path, "a") as f:
        f.write('{"kind": "candidate", "id": 1, "na')  # a kill in the middle of a line
    again = History(tmp_path)
    assert [e["id"] for e in again.entries] == [0]
    again.append(entry(2, "passed", scores=[0.6]))
    assert [e["id"] for e in History(tmp_path).entries] == [0, 2]


def test_summary_counts_what_each_protocol_ended_and_the_time_it_saved():
    full = {"finite": 0.1, "stability": 1.0, "quality": 3.0, "proxy": 6.0}
    entries = [entry(0, "passed", scores=[0.7, 0.6], times=full),
               entry(1, "passed", scores=[0.5, 0.4], times={"finite": 0.1, "stability": 1.0, "quality": 5.0,
                                                             "proxy": 8.0}),
               entry(2, "rejected", "stability", times={"finite": 0.1, "stability": 0.5}),
               entry(3, "rejected", "static", times={"static": 0.01}),
               entry(4, "duplicate", "fingerprint", duplicate_of=0, times={"static": 0.01, "fingerprint": 0.01})]
    summary = protocol_summary(entries)
    rows = summary["protocols"]
    assert summary["sampled"] == 5 and summary["passed"] == 2
    assert rows["stability"]["ended"] == 1 and rows["stability"]["fraction"] == pytest.approx(0.2)
    assert rows["stability"]["saved_s"] == pytest.approx(4.0 + 7.0)  # mean quality + mean proxy of those that ran them
    assert rows["static"]["saved_s"] == pytest.approx(0.1 + 1.0 + 4.0 + 7.0)
    assert rows["fingerprint"]["saved_s"] == pytest.approx(sum(full.values()))  # its original's whole evaluation
    assert rows["quality"]["ended"] == 0


def test_rerank_takes_the_best_candidates_and_every_reference_seed(tmp_path):
    entries = [entry(i, "passed", scores=[s, s]) for i, s in enumerate([0.5, 0.9, 0.7, 0.6])]
    entries.append(entry(9, "rejected", "quality"))
    rerank = OmegaConf.create({"top": 2, "keep": 1, "seeds": 1, "reference_seeds": 2})
    jobs = rerank_jobs(entries, {"bn_relu": {"norm": "bn_relu", "kwargs": {}}}, rerank, groups=4)
    assert [(j["name"], j["rerank_seed"]) for j in jobs] == [("#1", 0), ("#2", 0), ("bn_relu", 0), ("bn_relu", 1)]
    done = [{**j, "kind": "rerank", "status": "passed", "scores": [0.8, 0.8]} for j in jobs[:3]]
    assert [(j["name"], j["rerank_seed"]) for j in rerank_jobs(entries + done, {"bn_relu": {}}, rerank, 4)] == [
        ("bn_relu", 1)]  # a resumed search re-ranks only what is missing
    assert rerank_jobs(entries, {"bn_relu": {}}, OmegaConf.create({**rerank, "top": 0, "keep": 0}), 4) == []


def test_leaderboard_ranks_by_rerank_score_and_writes_configs_the_run_pipeline_builds(tmp_path):
    entries = [entry(0, "passed", scores=[0.6, 0.6], formula=PAPER_LAYERS["s0"], hash="aaa"),
               entry(1, "passed", scores=[0.7, 0.7], formula="x * sigmoid(x) / std_hw(x)", hash="bbb"),
               {"kind": "reference", "name": "gn_relu", "status": "passed", "scores": [0.6, 0.5]}]
    for name, scores in (("#0", [0.8, 0.8]), ("#1", [0.7, 0.75]), ("gn_relu", [0.7, 0.7]), ("gn_relu", [0.72, 0.7])):
        entries.append({"kind": "rerank", "name": name, "status": "passed", "scores": scores})
    rows = leaderboard_rows(entries, keep=1)
    assert [r["name"] for r in rows] == ["evolved_aaa", "evolved_bbb", "gn_relu"]
    assert [r["kept"] for r in rows] == [True, False, False]
    assert rows[2]["rerank"] == pytest.approx([0.71, 0.7]) and rows[2]["rerank_seeds"] == 2
    assert write_norm_configs(tmp_path, rows) == ["evolved_aaa"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["norm=evolved_aaa", f"hydra.searchpath=[file://{tmp_path}]",
                                           "output_dir=/tmp/unused"])
    from pipelines.checks import check_config, norm_layer
    check_config(cfg)
    assert cfg.norm.name == "evolved_aaa" and norm_layer(cfg.norm) == "graph"
    layer = evonorm.norm_act_factory(norm_layer(cfg.norm), **cfg.norm.kwargs)(32)
    assert isinstance(layer, evonorm.GraphNormAct) and layer.formula == PAPER_LAYERS["s0"] and layer.groups == 32


def test_a_search_without_re_rank_lists_its_best_by_proxy_score_beside_the_references(tmp_path):
    entries = [entry(i, "passed", scores=[i / 20, i / 20]) for i in range(12)] + [entry(12, "rejected", "quality")]
    entries.append({"kind": "reference", "name": "gn_relu", "status": "passed", "scores": [0.3, 0.22],
                    "times": {}})
    rows = leaderboard_rows(entries, keep=0)
    assert [r["name"] for r in rows] == [f"evolved_h{i}" for i in range(11, 5, -1)] + ["gn_relu"] + [
        f"evolved_h{i}" for i in (5, 4, 3, 2)]  # the best 10 candidates by proxy mean and the reference, in order
    assert not any(r["kept"] for r in rows) and all(r["rerank_mean"] is None for r in rows)
    write_leaderboard(tmp_path, rows, ["a", "b"], protocol_summary(entries), "s")
    table = [line for line in (tmp_path / "leaderboard.md").read_text().splitlines() if line.startswith("| 1 |")]
    assert table == ["| 1 | evolved_h11 | `x * v1 + 11` | 0.550 | 0.550 | 0.550 |  |  |  | 0 |  |"]


# --------------------------------------------------------------------------------------------------------------
# config checks: clear errors before anything starts

def test_bad_search_configs_are_refused_with_what_to_change():
    with pytest.raises(ConfigError, match="search.budget=10 is smaller than search.population=30"):
        check_search_config(search_cfg("search.budget=10", "search.population=30"))
    check_search_config(search_cfg("search.budget=10", "search.strategy=random"))  # random search has no population
    with pytest.raises(ConfigError, match="bn_relu given twice"):
        reference_layers(["bn_relu", "s0", "bn_relu"], 4)
    with pytest.raises(ConfigError, match="no layer 'bn_rleu'"):
        reference_layers(["bn_rleu"], 4)
    with pytest.raises(ConfigError, match=r"seed_layers\[1\].*column 5: unknown name .sigm."):
        seed_graphs(["s0", "x * sigm(x)"], "s")
    with pytest.raises(ConfigError, match=r"seed_layers\[0\].*series s forbids"):
        seed_graphs(["b0"], "s")
    with pytest.raises(ConfigError, match=r"seed_layers\[1\].*again"):
        seed_graphs(["s0", "sigmoid(v1 * x) * x / std_hwg(x)"], "s")


def test_a_norm_name_found_in_two_config_dirs_is_refused(tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from pipelines.checks import check_config
    (tmp_path / "norm").mkdir()
    (tmp_path / "norm" / "s0.yaml").write_text("name: s0\nkwargs: {}\n")  # the name conf/norm has too
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["norm=s0", f"hydra.searchpath=[file://{tmp_path}]",
                                           "output_dir=/tmp/unused"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as a job gets its config
    try:
        with pytest.raises(ConfigError, match="norm=s0: a layer of that name exists twice"):
            check_config(cfg)
    finally:
        HydraConfig.instance().cfg = None


def test_fitness_is_the_scores_of_a_passed_layer_else_how_far_it_got():
    from pipelines.search.evolution import fitness
    assert fitness(entry(0, "passed", scores=[0.7, 0.6, 0.5]), 3) == (0.7, 0.6, 0.5)
    assert fitness(entry(1, "rejected", "quality", screen=[0.4, 0.1]), 3) == (0.4, 0.1, 0.0)
    assert fitness(entry(2, "rejected", "stability"), 3) == (0.0, 0.0, 0.0)
    assert fitness(entry(3, "rejected", "static"), 3) is None and fitness(entry(4, "failed"), 3) is None
    assert fitness(entry(5, "duplicate", "fingerprint", original_status="passed", scores=[0.7, 0.6, 0.5]),
                   3) == (0.7, 0.6, 0.5)


def test_an_evolved_layer_trains_in_the_run_pipeline_under_its_own_name(compose_cfg, tmp_path):
    from pipelines.run import run
    rows = [{"name": "evolved_abc", "reference": False, "kept": True, "id": 3, "rerank_mean": 0.5,
             "formula": "x * sigmoid(x) / rms_hwg(x)"}]
    write_norm_configs(tmp_path, rows)
    record = run(compose_cfg("norm=evolved_abc", f"hydra.searchpath=[file://{tmp_path}]",
                             output_dir=tmp_path / "run"))
    assert record["status"] == "completed" and record["norm"]["name"] == "evolved_abc"
    assert record["norm"]["kwargs"]["graph"] == "x * sigmoid(x) / rms_hwg(x)"


def test_comparison_ranks_a_run_where_nothing_passed_lowest(tmp_path, saved_figures):
    runs = [("evolution", 0, 0.635), ("evolution", 1, None), ("evolution", 2, None),
            ("random", 0, 0.483), ("random", 1, None), ("random", 2, 0.689)]
    for i, (strategy, seed, best) in enumerate(runs):
        run_dir = tmp_path / f"{i}-{strategy}-s{seed}"
        run_dir.mkdir()
        (run_dir / SUMMARY_FILE).write_text(json.dumps({"strategy": strategy, "seed": seed, "sampled": 100,
                                                        "best_proxy_mean": best}))
        history = History(run_dir)
        history.append({"kind": "reference", "name": "bn_relu", "scores": [0.7, 0.72]})
        for n in range(3):
            passed = best is not None and n == 2
            history.append({"kind": "candidate", "status": "passed" if passed else "rejected",
                            "ended_by": None if passed else "quality", "scores": [best, best] if passed else None})
    table = write_comparison(tmp_path).read_text()
    assert "| evolution | 3 | 0.6350 (s0), none passed (s1), none passed (s2) | none passed | 100, 100, 100 |" in table
    assert "| random | 3 | 0.4830 (s0), none passed (s1), 0.6890 (s2) | 0.4830 |" in table
    # progress.png: a line per run that found a layer, the others named in the panel, the reference in the legend
    evolution, random = saved_figures[0].axes
    assert evolution.get_title() == "evolution (3 runs)\nno candidate passed: seed 1, seed 2"
    assert random.get_title() == "random (3 runs)\nno candidate passed: seed 1"
    assert [t.get_text() for t in random.get_legend().get_texts()] == ["seed 0", "seed 2", "bn_relu (reference) 0.710"]
