"""The world-model planner around the shipped VLA, in one process: in the env through evaluation's run_episode,
through the ROS policy node's checkpoint source (planner parameter), and its refusals."""

import numpy as np
import pytest
import torch

from vla_stack.errors import VlaStackError
from vla_stack.planners import wrap_policy
from vla_stack.planners.world_model.model import WmConfig, WorldModel, save_world_model
from vla_stack.policy.vla.runner import InvalidObservationError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def wm_checkpoint(tmp_path_factory):
    """An untrained (random) world model of the shipped shape: the planner's plumbing, not its judgement."""
    torch.manual_seed(0)
    cfg = WmConfig(robot="panda", image_size=32, channels=(8, 8), latent_dim=16, hidden=32, predictor_hidden=64)
    return save_world_model(tmp_path_factory.mktemp("wm") / "wm", WorldModel(cfg))


@pytest.fixture(scope="module")
def env():
    from vla_stack.sim.env import TabletopEnv

    e = TabletopEnv("pick", "panda", image_size=64, max_steps=16)
    yield e
    e.close()


@pytest.fixture(scope="module")
def vla():
    from vla_stack.paths import share_dir
    from vla_stack.policy.vla.runner import load_vla_policy

    return load_vla_policy(share_dir("policies") / "vla_tiny", "panda", async_inference=False)


@pytest.mark.parametrize("mode", ["mcts", "best_of_k"])
def test_planner_runs_an_episode(env, vla, wm_checkpoint, mode):
    from vla_stack.evaluation import run_episode

    planner = wrap_policy("wm", vla, env, checkpoint=wm_checkpoint, k=4, mode=mode, deadline_s=None,
                          max_simulations=64, batch_size=16)
    record, _ = run_episode(env, planner, seed=1_000_000)
    m = record["planner"]
    assert record["steps"] == 16 and m["decisions"] == 2 and m["mode"] == mode
    assert m["rollouts_mean"] >= (4 if mode == "best_of_k" else 20)
    summary = planner.summary()
    assert summary["decisions"] == 2
    # deterministic without a deadline: the same seed gives the same actions
    actions = []
    for _ in range(2):
        obs, _ = env.reset(seed=1_000_001)
        planner.reset(seed=1_000_001)
        actions.append(np.stack([planner.select_action(obs) for _ in range(3)]))
    np.testing.assert_array_equal(actions[0], actions[1])


def test_branched_collection_tries_every_candidate_and_leaves_the_episode_alone(tmp_path):
    """collect_branched: K entries per branched decision, candidate 0 = the episode's own outcome, and the
    episode itself identical to one collected without branching (every branch restored the sim and the VLA)."""
    from vla_stack.data.episode_store import EpisodeStore
    from vla_stack.paths import share_dir
    from vla_stack.planners.world_model.collect import collect_branched
    from vla_stack.planners.world_model.train import load_episodes

    vla_path = share_dir("policies") / "vla_tiny"
    for name, prob, before, points in (("plain", 0.0, None, 0), ("branched", 1.0, None, 2), ("early", 1.0, 8, 1)):
        r = collect_branched("pick", "panda", vla_path, tmp_path / f"{name}.zarr", 1, seed_start=7, k=3,
                             branch_prob=prob, branch_before=before, max_steps=16, progress=False)
        assert r["branch_points"] == points
    plain, branched = EpisodeStore.open(tmp_path / "plain.zarr"), EpisodeStore.open(tmp_path / "branched.zarr")
    a, b = plain.read_episode(0), branched.read_episode(0)
    np.testing.assert_array_equal(a["action"], b["action"])
    np.testing.assert_array_equal(a["images.front"], b["images.front"])
    meta = branched.episode_meta(0)
    entries = meta.extra["branches"]
    assert [e["t"] for e in entries] == [0, 0, 0, 8, 8, 8]
    assert [e["t"] for e in EpisodeStore.open(tmp_path / "early.zarr").episode_meta(0).extra["branches"]] == [0, 0, 0]
    np.testing.assert_allclose(entries[3]["chunk"], b["action"][8:16], atol=1e-5)  # candidate 0 was executed
    assert entries[0]["success"] == meta.success and not any(e["success"] for e in entries)  # 16 steps: no pick
    assert len({str(e["chunk"]) for e in entries[:3]}) == 3
    cfg = WmConfig(robot="panda", image_size=32, channels=(8, 8), latent_dim=16, hidden=32, predictor_hidden=64)
    train, _ = load_episodes([str(tmp_path / "branched.zarr")], cfg, progress=False)
    assert [br["value"] for br in train[0].branches] == [0.0] * 6


def test_the_deadline_covers_the_whole_decision(env, vla, wm_checkpoint):
    """The search gets what the VLA proposals and the encoding left of the decision deadline."""
    planner = wrap_policy("wm", vla, env, checkpoint=wm_checkpoint, k=2, deadline_s=0.5)
    obs, _ = env.reset(seed=1_000_000)
    planner.reset(seed=1_000_000)
    planner.predict_action_chunk(obs)
    record = planner._decisions[-1]
    assert record["stopped_by"] == "deadline"
    assert 0 < record["search_deadline_ms"] <= 500 - record["proposal_ms"]
    with pytest.raises(VlaStackError, match="deadline_s must be positive"):
        wrap_policy("wm", vla, env, checkpoint=wm_checkpoint, deadline_s=0)


def test_options_arrive_as_strings_from_the_command_line(env, vla, wm_checkpoint):
    """`--planner-option k=3` gives the string '3': options are parsed, and a bad value is a clear error."""
    planner = wrap_policy("wm", vla, env, checkpoint=wm_checkpoint, k="3", mode="best_of_k", deadline_s="none",
                          batch_size="16", c_puct="1.5")
    assert (planner.k, planner.deadline_s, planner.search_config.batch_size, planner.search_config.c_puct) == \
        (3, None, 16, 1.5)
    obs, _ = env.reset(seed=1_000_000)
    planner.reset(seed=1_000_000)
    assert planner.predict_action_chunk(obs).shape == (8, 8)
    followed = wrap_policy("wm", vla, env, checkpoint=wm_checkpoint, k="3", mode="mcts", deadline_s="none",
                           max_simulations="32", batch_size="8", backup="max", follow_vla="true",
                           root_tolerance="0.01")
    assert followed.follow_vla and followed.search_config.backup == "max"
    assert followed.search_config.root_tolerance == 0.01
    followed.reset(seed=1_000_000)
    assert followed.predict_action_chunk(obs).shape == (8, 8)
    assert followed._decisions[-1]["rollouts"] == 32
    assert followed.episode_metrics()["departed_from_one_step"] in (0, 1)
    for bad in ({"k": "eight"}, {"follow_vla": "maybe"}, {"backup": "median"}, {"root_tolerance": "-1"}):
        with pytest.raises(VlaStackError, match="bad wm planner option"):
            wrap_policy("wm", vla, env, checkpoint=wm_checkpoint, **bad)
    with pytest.raises(VlaStackError, match="pessimism must be >= 0"):
        wrap_policy("wm", vla, env, checkpoint=wm_checkpoint, pessimism="-1")


def test_pessimism_needs_fitted_ensemble_heads(env, vla, wm_checkpoint, tmp_path):
    """pessimism reads the value heads' spread: a single-head model, or an ensemble whose extra heads were never
    fitted (a checkpoint saved mid-training), is refused; a fitted one plans."""
    with pytest.raises(VlaStackError, match="ensemble of value heads"):
        wrap_policy("wm", vla, env, checkpoint=wm_checkpoint, pessimism="1")
    torch.manual_seed(0)
    cfg = WmConfig(robot="panda", image_size=32, channels=(8, 8), latent_dim=16, hidden=32, predictor_hidden=64,
                   value_heads=3)
    unfitted = save_world_model(tmp_path / "unfitted", WorldModel(cfg), {"step": 250})
    with pytest.raises(VlaStackError, match="never fitted"):
        wrap_policy("wm", vla, env, checkpoint=unfitted, pessimism="1")
    fitted = save_world_model(tmp_path / "fitted", WorldModel(cfg), {"value_ensemble": {"heads": 3}})
    planner = wrap_policy("wm", vla, env, checkpoint=fitted, pessimism="1", k=2, deadline_s="none",
                          max_simulations="16", batch_size="8")
    obs, _ = env.reset(seed=1_000_000)
    planner.reset(seed=1_000_000)
    assert planner.pessimism == 1.0 and planner.predict_action_chunk(obs).shape == (8, 8)


def test_planner_refuses_bad_observations_and_robots(env, vla, wm_checkpoint):
    planner = wrap_policy("wm", vla, env, checkpoint=wm_checkpoint, k=2, deadline_s=0.02)
    obs, _ = env.reset(seed=1_000_000)
    obs["state"] = obs["state"].copy()
    obs["state"][0] = np.nan
    with pytest.raises(InvalidObservationError):
        planner.select_action(obs)
    from types import SimpleNamespace

    from vla_stack.sim.robots import get_robot

    with pytest.raises(VlaStackError, match="trained for 'panda'"):
        wrap_policy("wm", vla, SimpleNamespace(robot=get_robot("so101")), checkpoint=wm_checkpoint)
    with pytest.raises(VlaStackError, match="unknown wm planner option"):
        wrap_policy("wm", vla, env, checkpoint=wm_checkpoint, bogus=1)
    with pytest.raises(VlaStackError, match="needs a VLA"):
        wrap_policy("wm", object(), env, checkpoint=wm_checkpoint)


def test_ros_checkpoint_source_with_the_wm_planner(env, wm_checkpoint):
    from vla_stack.paths import share_dir
    from vla_stack.ros.policy_source import load_source
    from vla_stack.sim.robots import get_robot

    robot = get_robot("panda")
    source = load_source(str(share_dir("policies") / "vla_tiny"), robot, 10.0, "wm",
                         {"checkpoint": str(wm_checkpoint), "deadline_s": 0.05, "k": 2})
    obs, _ = env.reset(seed=1_000_000)
    chunk = source.chunk(obs, None)
    assert chunk.shape == (8, 8) and np.all(np.isfinite(chunk))
    assert source.name == "vla_tiny+wm"
    with pytest.raises(VlaStackError, match="needs a checkpoint policy"):
        load_source("expert", robot, 10.0, "wm")
    assert load_source(str(share_dir("policies") / "vla_tiny"), robot, 10.0, inference_steps=4).policy.num_steps == 4
    with pytest.raises(VlaStackError, match="inference_steps must be at least 1"):
        load_source(str(share_dir("policies") / "vla_tiny"), robot, 10.0, inference_steps=-1)


def test_policy_node_planner_parameter(wm_checkpoint):
    """One process, no graph: configure loads the checkpoint wrapped by the planner named in the parameters."""
    import os

    import rclpy
    from rclpy.context import Context
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from vla_stack.paths import share_dir
    from vla_stack.ros.policy_node import PolicyNode

    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    context = Context()
    rclpy.init(context=context, domain_id=int(os.environ.get("ROS_DOMAIN_ID", "43")))
    try:
        vla = str(share_dir("policies") / "vla_tiny")
        params = [Parameter("policy", value=vla), Parameter("planner", value="wm"),
                  Parameter("planner_checkpoint", value=str(wm_checkpoint)), Parameter("planner_deadline", value=0.05)]
        node = PolicyNode(context=context, parameter_overrides=params)
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.source.name == "vla_tiny+wm"
        assert node.source.policy.deadline_s == 0.05
        node.destroy_node()
        bad = PolicyNode(context=context, parameter_overrides=[Parameter("policy", value=vla),
                                                               Parameter("planner", value="bogus")])
        assert bad.trigger_configure() == TransitionCallbackReturn.FAILURE
        bad.destroy_node()
    finally:
        rclpy.shutdown(context=context)


def test_bench_planner_reports_the_planners_own_decisions(wm_checkpoint):
    from vla_stack.planners.world_model.bench import bench_planner

    r = bench_planner(wm_checkpoint, decisions=3, deadline_s=0.1, k=2, batch_size=16, seconds=0.02,
                      options={"backup": "max"})
    d = r["decisions"]
    assert d["count"] == 3 and d["deadline_ms"] == 100.0 and d["options"] == {"backup": "max"}
    assert d["rollouts_min"] <= d["rollouts_p50"] <= d["rollouts_max"] and d["rollouts_min"] >= 2
    assert 0 <= d["decisions_over_deadline"] <= 3 and 0 <= d["decisions_with_1000_rollouts"] <= 3
    assert d["decision_ms_p50"] >= d["proposal_ms_p50"] and d["decision_ms_max"] >= d["decision_ms_p50"]
    assert [row["batch"] for row in r["throughput"]] == [1, 8, 32, 128, 512]


def test_critic_check_scores_every_candidate_in_the_simulator_and_leaves_the_episode_alone(env, wm_checkpoint):
    from vla_stack.paths import share_dir
    from vla_stack.planners.world_model.critic_check import critic_check, try_candidates

    env.reset(seed=3)
    before = env.sim.get_state().copy()
    still = np.repeat(np.r_[env.sim.arm_qpos(), 0.0][None], 8, 0).astype(np.float32)
    away = still.copy()
    away[:, 0] += 0.3  # swings the arm; nothing is grasped either way
    truth = try_candidates(env, np.stack([still, away, still]))
    np.testing.assert_array_equal(env.sim.get_state(), before)  # restored bit for bit
    assert truth[0] == truth[2] and 0.0 <= truth.min() and truth.max() <= 0.5  # deterministic, no success
    vla = share_dir("policies") / "vla_tiny"
    out = {mode: critic_check("pick", "panda", 1, 1_000_000, vla, wm_checkpoint, mode, k=3, max_steps=16,
                              progress=False) for mode in ("oracle", "model")}
    for result in out.values():
        assert len(result["decisions"]) == 2 and all(len(d["truth"]) == 3 == len(d["scores"]) for d in result["decisions"])
    # both runs start from the same state with the same samples: the simulator's scores reproduce
    assert out["oracle"]["decisions"][0]["truth"] == out["model"]["decisions"][0]["truth"]
    with pytest.raises(VlaStackError, match="goal_offset"):
        critic_check("pick", "panda", 1, 1_000_000, vla, wm_checkpoint, "model", true_offset=True, progress=False)


def test_goal_offset_planner_keeps_its_last_readings_and_scores_once_it_has_both(vla):
    from vla_stack.evaluation import run_episode
    from vla_stack.planners.world_model.policy import WorldModelPlanner
    from vla_stack.sim.env import TabletopEnv

    cfg = WmConfig(robot="panda", image_size=32, channels=(8, 8), latent_dim=16, hidden=32, predictor_hidden=64,
                   heads_command=True, progress_target="goal_distance", goal_offset=True, keypoint_channels=8,
                   keypoint_image_size=64)
    wm = WorldModel(cfg).eval()
    nan = np.nan
    readings, seen = [], []

    def read(frames, state, instruction):  # (target, cube) positions as a reader that loses sight of one would
        seen.append(frames.shape)
        return None, np.array(readings.pop(0), float)

    wm.read_goal_offset = read
    planner = WorldModelPlanner(vla, wm, "panda", k=4, mode="best_of_k")
    env = TabletopEnv("place_centre", "panda", image_size=64, max_steps=24)
    try:
        obs, _ = env.reset(seed=1_000_000)
        readings += [[[nan, nan], [0.3, 0.1]], [[0.5, 0.0], [nan, nan]], [[nan, nan], [0.45, 0.05]]]
        assert planner.read_offset(obs, "x") is None  # the target never seen yet
        assert np.allclose(planner.read_offset(obs, "x"), [0.2, -0.1])  # the cube from the first reading
        assert np.allclose(planner.read_offset(obs, "x"), [0.05, -0.05])  # the target from the second
        assert seen[0] == (2, 64, 64, 3)
        readings += [[[nan, nan], [0.3, 0.1]]] + [[[0.5, 0.0], [0.3, 0.1]]] * 2
        record, _ = run_episode(env, planner, seed=1_000_000)  # reset forgets: the first decision is the VLA's
        m = record["planner"]
        assert m["decisions"] == 3 and m["unscored"] == 1 and m["rollouts_mean"] == 4
        no_wrist = {**obs, "images": {"front": obs["images"]["front"]}}
        with pytest.raises(VlaStackError, match="wrist camera"):
            planner.read_offset(no_wrist, "x")
    finally:
        env.close()
