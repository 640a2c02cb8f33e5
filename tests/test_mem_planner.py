"""The MEM planner's high level: memory labels and their validation, memory through an injected failed grasp,
training samples from an episode store, a tiny model that learns, decoding, checkpoints, and the planner loop."""

import json
import logging
from pathlib import Path

import mujoco
import numpy as np
import pytest
import torch

from vla_stack.errors import VlaStackError
from vla_stack.planners.mem.data import DropInjector, build_samples, collect_mem
from vla_stack.planners.mem.memory import (EMPTY, InvalidMemoryError, TaskMemory, advance_memory, is_memory_text,
                                           is_subtask_text, records_outcome)
from vla_stack.planners.mem.model import CheckpointError, HighLevelModel, MemConfig, MiniLMText, load_model
from vla_stack.planners.mem.policy import RECENT_RELEASE, MemPlanner, SubtaskExpert, make_policy
from vla_stack.planners.mem.train import SampleSet, fit
from vla_stack.policy.scripted import ScriptedExpert
from vla_stack.sim.env import TabletopEnv
from vla_stack.sim.robots import get_robot
from vla_stack.sim.tasks import generate

PANDA = get_robot("panda")
TINY = dict(image_size=32, patch=8, width=32, encoder_layers=1, decoder_layers=1, heads=2, ff_mult=2)


@pytest.fixture(scope="module")
def text():
    return MiniLMText()


@pytest.fixture(scope="module")
def perturbed_store(tmp_path_factory):
    """One restore episode with a forced drop (32 px front camera)."""
    path = tmp_path_factory.mktemp("mem") / "restore.zarr"
    result = collect_mem("restore", "panda", 1, path, seed_start=3, image_size=32, drop_fraction=1.0, progress=False)
    assert result["drops_happened"] == 1
    return path


# ------------------------------------------------------------------------------------------- memory
def test_sort_and_restore_labels_are_outcomes():
    sort = TaskMemory(generate("sort", PANDA, 0), PANDA)
    colors = [sort.task.cubes[s.goal.cube].color for s in sort.task.subtasks]
    assert sort.label(0) == "0 of 3 cubes sorted"
    assert sort.label(2) == f"2 of 3 cubes sorted; {colors[0]} is in the {colors[0]} bin, {colors[1]} is in the {colors[1]} bin"
    assert sort.subtask(3) == "done" and sort.subtask(0) == sort.task.subtasks[0].text
    restore = TaskMemory(generate("restore", PANDA, 0), PANDA)
    assert restore.label(0).startswith(f"the {restore.task.cubes[0].color} cube started at the ")
    assert "; it started at the " in restore.label(1) and "is back at the" in restore.label(2)
    for memory in (sort, restore):
        for k, label in enumerate(memory.labels()):
            assert memory.check_memory(label) == label and is_memory_text(label)
            assert memory.done_from_memory(label) == k
            assert is_subtask_text(memory.subtask(k))


@pytest.mark.parametrize("garbled", [
    "xq ## cube cube", "4 of 3 cubes sorted", "1 of 3 cubes sorted", "2 of 3 cubes sorted; {a} is in the {a} bin",
    "1 of 3 cubes sorted; {a} is in the {b} bin", "1 of 2 cubes sorted; {a} is in the {a} bin",
    "2 of 3 cubes sorted; {a} is in the {a} bin, {a} is in the {a} bin", "1 of 3 cubes sorted; {x} is in the {x} bin",
    "the {a} cube started at the moon", None, 42,
])
def test_garbled_memory_is_rejected(garbled):
    task = generate("sort", PANDA, 0)
    memory = TaskMemory(task, PANDA)
    a, b = task.cubes[0].color, task.cubes[1].color
    x = next(c for c in ("red", "green", "blue", "yellow", "purple", "orange") if c not in {c.color for c in task.cubes})
    text = garbled.format(a=a, b=b, x=x) if isinstance(garbled, str) else garbled
    with pytest.raises(InvalidMemoryError):
        memory.check_memory(text)


def test_memory_survives_injected_failed_grasp():
    """A cube dropped mid-carry and re-grasped: the outcome memory stays at the last confirmed outcome until the
    scene's detector confirms the subtask, then moves on once; the episode still succeeds."""
    env = TabletopEnv("sort", "panda", cameras=())
    try:
        env.reset(seed=5)
        expert = ScriptedExpert(env)
        expert.reset(seed=5)
        memory = TaskMemory(env.task, env.robot)
        inject = DropInjector(env, subtask=1, hold_steps=4)
        cube = env.task.subtasks[1].goal.cube
        labels, fell = [], False
        for _ in range(env.max_steps):
            action = inject(expert.select_action())
            _, _, terminated, truncated, _ = env.step(action)
            labels.append(memory.label(env.subtask_index))
            if inject.drop_step is not None and env.subtask_index == 1:
                fell = fell or not env.sim.cube_touching_robot(cube)  # let go by the forced release
            if terminated or truncated:
                break
        assert inject.drop_step is not None and fell
        assert env.success(), "the expert re-grasps the dropped cube"
        after_drop = labels[inject.drop_step:]
        # Only confirmed outcomes: exactly the three transitions, in order, no matter the failed attempt.
        changes = [labels[0]] + [b for a, b in zip(labels, labels[1:]) if a != b]
        assert changes == memory.labels()
        assert after_drop[0] == memory.label(1), "the drop did not undo or advance the memory"
    finally:
        env.close()


def test_paused_collection_runs_one_subtask_at_a_time(tmp_path):
    """`pause_steps`: the subtask executor gets the next subtask only after a pause, as in the planner loop;
    the episode still succeeds and its frames train the same sample kinds."""
    from vla_stack.data.episode_store import EpisodeStore

    path = tmp_path / "paused.zarr"
    result = collect_mem("restore", "panda", 1, path, seed_start=3, image_size=32, drop_fraction=0.0,
                         pause_steps=15, progress=False)
    assert result["successes"] == 1
    store = EpisodeStore.open(path)
    meta = store.episode_meta(0)
    assert meta.extra["executor"] == "subtask" and meta.extra["pause_steps"] == 15
    done = store.episode_arrays(0)["subtask_index"][...]
    assert list(np.unique(done)) == [0, 1, 2]
    samples = build_samples([path], progress=False)
    assert {s.kind for s in samples} == {"boundary", "steady"}
    with pytest.raises(VlaStackError, match="pause_steps"):
        collect_mem("restore", "panda", 1, tmp_path / "bad.zarr", pause_steps=-1, progress=False)


def test_vla_executor_collection_records_the_scenes_outcomes(tmp_path):
    """`executor=<VLA>`: the VLA runs the handed subtasks (the high level's data on a learned low level's states);
    every frame records the completed set by the detectors, and its samples are labelled from that set."""
    from vla_stack.data.episode_store import EpisodeStore

    path = tmp_path / "vla.zarr"
    result = collect_mem("sort", "panda", 1, path, seed_start=5, drop_fraction=0.0, pause_steps=10,
                         executor="vla_mem_tiny", progress=False)
    assert result["episodes"] == 1
    store = EpisodeStore.open(path)
    meta = store.episode_meta(0)
    assert meta.extra["executor"] == "vla_mem_tiny" and meta.extra["terminal_frame"]
    arrays = store.episode_arrays(0)
    masks, in_order = arrays["done_mask"][...], arrays["subtask_index"][...]
    # the in-order count never exceeds the completed set; the set only holds subtasks of this scene
    assert all(bin(int(m)).count("1") >= k and 0 <= m < 8 for m, k in zip(masks, in_order))
    assert arrays["images.front"].shape[1:] == (128, 128, 3) and "images.wrist" not in arrays
    memory = TaskMemory(generate("sort", PANDA, 5), PANDA)
    for sample in build_samples([path], progress=False):
        assert sample.memory_out in {memory.label_set(set(d)) for d in
                                     [{i for i in range(3) if int(m) >> i & 1} for m in masks]}
    with pytest.raises(VlaStackError, match="neither 'expert'"):
        collect_mem("sort", "panda", 1, tmp_path / "bad.zarr", executor="no_such_policy", progress=False)


def test_samples_follow_the_completed_set_when_cubes_are_sorted_out_of_order(tmp_path):
    """A learned low level may sort the second cube first or knock a sorted one out: labels come from the set
    (`done_mask`), not from an in-order count."""
    from vla_stack.data.episode_store import EpisodeStore
    from vla_stack.planners.mem.data import store_features

    task = generate("sort", PANDA, 11)
    names = list(PANDA.joint_names)
    store = EpisodeStore.open_or_create(tmp_path / "set.zarr", robot="panda", fps=10,
                                        features=store_features(32, len(names), names))
    masks = [0] * 6 + [0b010] * 6 + [0b000] * 6 + [0b011] * 6
    with store.begin_episode(instruction=task.instruction, subtasks=task.subtask_texts, task="sort", seed=11) as w:
        for m in masks:
            w.add_frame({"images.front": np.zeros((32, 32, 3), np.uint8), "state": np.zeros(len(names), np.float32),
                         "action": np.zeros(len(names), np.float32), "subtask_index": np.int64(0),
                         "done_mask": np.int64(m)})
        w.commit(success=False, extra={"subtask_index": "completed"})
    memory = TaskMemory(task, PANDA)
    samples = build_samples([tmp_path / "set.zarr"], progress=False, boundary_frames=2, reset_samples=0)
    boundary = {(s.memory_in, s.memory_out, s.subtask, s.valid_subtasks) for s in samples if s.kind == "boundary"}
    texts = task.subtask_texts
    assert boundary == {
        (EMPTY, memory.label_set(set()), texts[0], tuple(texts)),
        (memory.label_set(set()), memory.label_set({1}), texts[0], (texts[0], texts[2])),
        (memory.label_set({1}), memory.label_set(set()), texts[0], tuple(texts)),  # knocked out again
        (memory.label_set(set()), memory.label_set({0, 1}), texts[2], (texts[2],)),
    }
    assert memory.label_set({1}) == f"1 of 3 cubes sorted; {task.cubes[task.subtasks[1].goal.cube].color} is in " \
                                     f"the {task.cubes[task.subtasks[1].goal.cube].color} bin"


def test_init_from_fine_tunes_a_checkpoint_and_refuses_another_model(tmp_path, text):
    from vla_stack.planners.mem.train import start_from_checkpoint

    path = HighLevelModel(MemConfig(**TINY), text=text).save(tmp_path / "start")
    model = start_from_checkpoint({"model": dict(TINY)}, path)
    assert model.training and model.trainable_parameters() > 0
    saved = load_model(path, text=text).state_for_saving()
    assert all(torch.equal(v, saved[k]) for k, v in model.state_for_saving().items())
    with pytest.raises(VlaStackError, match="differs from the checkpoint in width"):
        start_from_checkpoint({"model": {**TINY, "width": 48}}, path)


def test_training_samples_from_a_perturbed_store(perturbed_store):
    samples = build_samples([perturbed_store], progress=False)
    task = generate("restore", PANDA, 3)
    memory = TaskMemory(task, PANDA)
    assert {s.kind for s in samples} == {"boundary", "steady"}
    assert any(s.after_failure for s in samples)
    for s in samples:
        assert s.image.shape == (32, 32, 3)
        assert s.memory_out in memory.labels() and s.subtask in [*task.subtask_texts, "done"]
        k = memory.labels().index(s.memory_out)
        assert s.subtask == memory.subtask(k)
        assert s.stale == (s.memory_in != s.memory_out)
    first = [s for s in samples if s.kind == "boundary" and s.memory_in == EMPTY]
    assert first and all(s.memory_out == memory.label(0) for s in first)


def test_samples_name_the_running_subtask(perturbed_store):
    """Boundary frames ran the subtask that just finished, frames inside a subtask run that subtask; the model
    input carries it next to a non-empty memory only."""
    from vla_stack.planners.mem.memory import model_context

    samples = build_samples([perturbed_store], progress=False)
    memory = TaskMemory(generate("restore", PANDA, 3), PANDA)
    for s in samples:
        k = memory.labels().index(s.memory_out)
        if s.kind == "boundary":
            assert s.running == ("" if s.memory_in == EMPTY else memory.subtask(k - 1))
        else:
            assert s.running == memory.subtask(k)
    assert model_context(EMPTY, "put the red cube in the red bin") == EMPTY
    assert model_context(memory.label(1), None) == memory.label(1)
    assert model_context(memory.label(1), memory.subtask(1)) == f"{memory.label(1)} | now: {memory.subtask(1)}"
    running = SampleSet(samples, 32, running=True)
    assert [m for m in running.memories_in] == [model_context(s.memory_in, s.running) for s in samples]


def test_post_call_samples_repeat_the_boundary_with_the_updated_memory(perturbed_store):
    plain = build_samples([perturbed_store], progress=False, boundary_frames=3)
    samples = build_samples([perturbed_store], progress=False, boundary_frames=3, post_call_frames=3)
    post = [s for s in samples if s.kind == "post_call"]
    later_boundaries = [s for s in plain if s.kind == "boundary" and s.memory_in != EMPTY]
    assert post and len(post) == len(later_boundaries)
    for p, b in zip(post, later_boundaries):
        assert np.array_equal(p.image, b.image) and p.memory_in == b.memory_out == p.memory_out
        assert not p.stale and p.running == p.subtask == b.subtask


def test_hard_negatives_come_from_just_before_a_completion(perturbed_store):
    """`steady_before_boundary` samples: frames shortly before a subtask completes, labelled not stale."""
    from vla_stack.data.episode_store import EpisodeStore
    from vla_stack.planners.mem.data import LATE_GAP, LATE_WINDOW

    store = EpisodeStore.open(perturbed_store)
    done = store.episode_arrays(0)["subtask_index"][...]
    completions = [t for t in range(1, len(done)) if done[t] > done[t - 1]]
    samples = build_samples([perturbed_store], progress=False, steady_before_boundary=3)
    late = [s for s in samples if s.kind == "late"]
    assert len(late) == 3 * len(completions)
    frames = store.episode_arrays(0)["images.front"][...]
    for s in late:
        t = next(t for t in range(len(frames)) if np.array_equal(frames[t], s.image))
        stop = min(c for c in completions if c > t)
        assert stop - LATE_WINDOW <= t < stop - LATE_GAP
        assert not s.stale and s.memory_in == s.memory_out
    assert "late" not in {s.kind for s in build_samples([perturbed_store], progress=False)}


# ------------------------------------------------------------------------------------------- model
def test_tiny_model_trains_and_decodes_valid_subtasks(perturbed_store, text):
    torch.manual_seed(0)
    samples = build_samples([perturbed_store], progress=False)
    model = HighLevelModel(MemConfig(**TINY), text=text)
    data = SampleSet(samples, model.config.image_size)
    result = fit(model, data, {"steps": 150, "batch_size": 16, "lr": 3e-3, "warmup_steps": 10, "image_shift": 0},
                 np.random.default_rng(0))
    assert result["final_loss"] < 0.3 * result["first_loss"], result
    model.eval()  # incremental decoding runs in eval mode only (no dropout)
    subtasks, memories, p = model.generate(data.images[:8].float(), data.goals[:8], data.memories_in[:8])
    assert all(is_subtask_text(s) for s in subtasks), subtasks
    assert np.mean([s == t for s, t in zip(subtasks, data.subtasks[:8])]) >= 0.75
    assert p.shape == (8,) and bool(((p >= 0) & (p <= 1)).all())
    # Incremental decoding with per-layer caches writes exactly what full re-decoding writes.
    full = model.generate(data.images[:8].float(), data.goals[:8], data.memories_in[:8], use_cache=False)
    assert (full[0], full[1]) == (subtasks, memories)
    with torch.no_grad():  # and its logits are the full decoder's, padding of the encoder states included
        states, pad = model.encode(data.images[:8].float(), data.goals[:8], data.memories_in[:8])
        tokens = model.target_tokens(data.subtasks[:8], data.memories_in[:8])[:, :6]
        cache = model._decode_cache(states, pad)
        steps = torch.stack([model._decode_step(tokens[:, :i + 1], cache) for i in range(6)], 1)
        torch.testing.assert_close(steps, model.decode_logits(tokens, states, pad), atol=1e-4, rtol=1e-4)


def test_conv_stem_encoder_learns_and_round_trips(perturbed_store, tmp_path, text):
    """`encoder: conv` (the VLA's conv stem + coordinate channels): one token per patch x patch pixels."""
    torch.manual_seed(0)
    model = HighLevelModel(MemConfig(**{**TINY, "encoder": "conv"}), text=text)
    data = SampleSet(build_samples([perturbed_store], progress=False), model.config.image_size)
    assert model.patch(data.images[:2].float()).shape == (2, (32 // 8) ** 2, 32)  # a 4x4 token grid, width 32
    result = fit(model, data, {"steps": 120, "batch_size": 16, "lr": 3e-3, "warmup_steps": 10, "image_shift": 0},
                 np.random.default_rng(0))
    assert result["final_loss"] < 0.3 * result["first_loss"], result
    loaded = load_model(model.save(tmp_path / "conv"), text=text)
    batch = (data.images[:4].float(), data.goals[:4], data.memories_in[:4])
    assert loaded.generate(*batch)[:2] == model.eval().generate(*batch)[:2]
    with pytest.raises(VlaStackError, match="unknown high-level image encoder"):
        HighLevelModel(MemConfig(**{**TINY, "encoder": "vit"}), text=text)


def test_checkpoint_round_trip_and_corrupt_checkpoints(tmp_path, text):
    model = HighLevelModel(MemConfig(**TINY), text=text)
    path = model.save(tmp_path / "ok", extra={"use_memory": True})
    loaded = load_model(path, text=text)
    for key, value in model.state_for_saving().items():
        assert torch.equal(value, loaded.state_for_saving()[key])
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path / "missing", text=text)
    truncated = model.save(tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(truncated, text=text)
    bad_json = model.save(tmp_path / "json")
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(bad_json, text=text)
    other = HighLevelModel(MemConfig(**{**TINY, "width": 48, "heads": 2}), text=text).save(tmp_path / "other")
    (other / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(other, text=text)


# ------------------------------------------------------------------------------------------- planner
def test_planner_resets_and_logs_garbled_memory(tmp_path, text, caplog):
    model = HighLevelModel(MemConfig(**TINY), text=text)
    planner = MemPlanner(None, None, model)
    task = generate("sort", PANDA, 1)
    planner.set_scene(task, PANDA)
    good = TaskMemory(task, PANDA).label(1)
    assert planner.set_memory(good) == good
    with caplog.at_level(logging.WARNING, logger="vla_stack.planners.mem"):
        assert planner.set_memory("1 of 3 cubes sorted; ??? garbage") == EMPTY
        assert planner.set_memory(None) == EMPTY
    assert planner.memory == EMPTY
    assert planner.episode_metrics()["invalid_memory"] == 2
    assert sum("memory reset" in r.message for r in caplog.records) == 2
    # Without a scene only the grammar is checked.
    planner.set_scene(None, None)
    assert planner.set_memory(good) == good and planner.set_memory("garbage") == EMPTY
    # The loop keeps going after whatever the (untrained) model writes: invalid output is reset, never raised.
    planner.set_scene(task, PANDA)
    image = np.zeros((64, 64, 3), np.uint8)
    calls = sum(planner.update(image, task.instruction) for _ in range(12))
    assert calls >= 1 and is_memory_text(planner.memory)


class ScriptedOutputs(HighLevelModel):
    """A high level whose outputs the test dictates, to check the planner's control logic on its own."""

    def set_outputs(self, subtask: str, memory: str, completion: float = 1.0) -> None:
        self.outputs, self.p = (subtask, memory), completion

    def generate(self, images, goals, memories, use_cache=True):
        self.seen = getattr(self, "seen", []) + [("call", memories[0])]
        return [self.outputs[0]], [self.outputs[1]], torch.tensor([self.p])

    def completion_probability(self, images, goals, memories):
        self.seen = getattr(self, "seen", []) + [("check", memories[0])]
        return torch.tensor([self.p])


def scripted_sort_planner(text, **planner_options):
    """A planner over ScriptedOutputs on sort scene 1 (no environment): model, planner, task, its memory labels,
    a blank front image. The head is consulted from the first step on unless the test sets min_subtask_steps."""
    planner_options.setdefault("min_subtask_steps", 0)
    model = ScriptedOutputs(MemConfig(**TINY), text=text)
    planner = MemPlanner(None, None, model, **planner_options)
    task = generate("sort", PANDA, 1)
    planner.set_scene(task, PANDA)
    return model, planner, task, TaskMemory(task, PANDA), np.zeros((64, 64, 3), np.uint8)


def test_planner_feeds_the_running_subtask_when_the_checkpoint_was_trained_so(text):
    from vla_stack.planners.mem.memory import model_context

    task = generate("sort", PANDA, 1)
    memory, first = TaskMemory(task, PANDA), task.subtasks[0].text
    image = np.zeros((64, 64, 3), np.uint8)
    for trained_so in (False, True):
        model = ScriptedOutputs(MemConfig(**TINY), text=text)
        model.checkpoint_meta = {"running_subtask_input": trained_so}
        planner = MemPlanner(None, None, model, check_every=1, min_subtask_steps=0)
        planner.set_scene(task, PANDA)
        model.set_outputs(first, memory.label(0), completion=0.0)
        planner.update(image, task.instruction)  # the first call: empty memory, nothing running
        planner.update(image, task.instruction)  # a completion check
        expected = model_context(memory.label(0), first) if trained_so else memory.label(0)
        assert model.seen == [("call", EMPTY), ("check", expected)]


def test_false_alarm_keeps_the_running_subtask(text):
    """A completion-triggered call that brings no new outcome (memory unchanged) must not switch a sort
    subtask to another unsorted cube; an updated memory or a stall re-plan may switch it."""
    model, planner, task, memory, image = scripted_sort_planner(text, check_every=1, replan_steps=6)
    first, second = task.subtasks[0].text, task.subtasks[1].text
    model.set_outputs(first, memory.label(0))
    assert planner.update(image, task.instruction) and planner.subtask == first
    model.set_outputs(second, memory.label(0))  # head fires, but nothing changed
    assert planner.update(image, task.instruction) and planner.subtask == first
    assert planner.episode_metrics()["false_alarms"] == 1
    model.set_outputs(second, memory.label(1))  # a real outcome: the next subtask is taken
    assert planner.update(image, task.instruction) and planner.subtask == second
    model.set_outputs(first, memory.label(1), completion=0.0)  # quiet head: the stall re-plan may switch
    for _ in range(5):
        assert not planner.update(image, task.instruction)
    assert planner.update(image, task.instruction) and planner.subtask == first
    assert planner.episode_metrics()["stall_calls"] == 1 and planner.episode_metrics()["false_alarms"] == 1


def test_chunk_mode_asks_for_a_new_chunk_only_when_the_subtask_changes(text):
    """The ROS policy node steps the planner on every observation (`observe`) and asks the low level for a new
    chunk every n_action_steps, or at once when the high level changed the subtask."""

    class LowLevel:  # records what the planner hands the low level
        n_action_steps, instruction, observed = 8, None, 0

        def observe(self, obs):
            self.observed += 1

        def predict_action_chunk(self, obs, observe=True):
            self.observed += observe
            return np.zeros((16, 8), np.float32)

    model = ScriptedOutputs(MemConfig(**TINY), text=text)
    low = LowLevel()
    planner = MemPlanner(low, None, model, check_every=1, min_subtask_steps=0, grasp_gate=False)
    task = generate("sort", PANDA, 1)
    memory = TaskMemory(task, PANDA)
    first, second = task.subtasks[0].text, task.subtasks[1].text
    planner.set_scene(task, PANDA)
    obs = {"images": {"front": np.zeros((64, 64, 3), np.uint8)}, "state": np.zeros(8, np.float32),
           "instruction": task.instruction}
    assert planner.n_action_steps == 8
    model.set_outputs(first, memory.label(0))
    assert planner.observe(obs) and low.instruction == first  # the first call sets a subtask
    model.set_outputs(second, memory.label(0))
    assert not planner.observe(obs) and low.instruction == first  # a false alarm: keep the running chunk
    model.set_outputs(second, memory.label(1))
    assert planner.observe(obs) and low.instruction == second  # a new subtask: new chunk now
    planner.predict_action_chunk(obs, observe=False)
    assert low.observed == 3 and planner.episode_metrics()["false_alarms"] == 1


def test_records_outcome_reads_the_running_subtask_off_any_memory():
    sort = "2 of 3 cubes sorted; red is in the red bin, blue is in the blue bin"
    assert records_outcome(sort, "put the blue cube in the blue bin") is True
    assert records_outcome(sort, "put the green cube in the green bin") is False
    assert records_outcome("0 of 3 cubes sorted", "put the red cube in the red bin") is False
    bowl = "the red cube is in the green bowl; it started at the far left"
    assert records_outcome(bowl, "put the red cube in the green bowl") is True
    assert records_outcome(bowl, "put the red cube back where it was") is False
    assert records_outcome("the red cube is back at the far left", "put the red cube back where it was") is True
    assert records_outcome("the red cube started at the far left", "put the red cube in the green bowl") is False
    assert records_outcome("1 of 2 steps done; pick up the red cube", "pick up the red cube") is True
    assert records_outcome(EMPTY, "pick up the red cube") is None
    assert records_outcome(sort, None) is None and records_outcome(sort, "done") is None
    # advance_memory adds the running subtask's outcome, and only where it fits
    assert advance_memory("the red cube started at the far left", "put the red cube in the green bowl") == bowl
    assert advance_memory(bowl, "put the red cube back where it was") == "the red cube is back at the far left"
    assert advance_memory(sort, "put the green cube in the green bin") == \
        "3 of 3 cubes sorted; red is in the red bin, blue is in the blue bin, green is in the green bin"
    assert advance_memory(sort, "put the red cube in the red bin") is None  # already recorded
    assert advance_memory(bowl, "put the blue cube back where it was") is None


def test_completion_call_that_misreads_another_cube_is_a_false_alarm(text):
    """The head fires while the orange cube is carried and the decoder writes "red is in the red bin" (a misread
    image): the running subtask and the memory stay; a memory that records the running cube is taken."""
    model, planner, task, memory, image = scripted_sort_planner(text, check_every=1)
    first, second, third = task.subtask_texts
    model.set_outputs(first, memory.label(0))
    assert planner.update(image, task.instruction)
    other = memory.label_set({1})  # the second cube sorted, not the running first one
    model.set_outputs(third, other)
    assert planner.update(image, task.instruction)
    assert (planner.subtask, planner.memory) == (first, memory.label(0))
    assert planner.episode_metrics()["false_alarms"] == 1
    model.set_outputs(second, memory.label(1))
    assert planner.update(image, task.instruction)
    assert (planner.subtask, planner.memory) == (second, memory.label(1))


def test_stall_replan_lets_the_completion_head_settle_a_stuck_or_misread_memory(text):
    """A stall re-plan whose decoder keeps the memory (it cannot see the yellow cube in the yellow bin) or names
    another cube: the head on the kept memory decides; above 0.5 the running subtask's outcome is added."""
    model, planner, task, memory, image = scripted_sort_planner(text, check_every=1, replan_steps=3, threshold=0.8)
    first, second, third = task.subtask_texts
    model.set_outputs(first, memory.label(0), completion=0.0)
    assert planner.update(image, task.instruction)
    model.set_outputs(second, memory.label(0), completion=0.6)  # below the trigger: only stalls call
    assert [planner.update(image, task.instruction) for _ in range(3)] == [False, False, True]
    assert planner.memory == advance_memory(memory.label(0), first) == memory.label(1)
    assert planner.subtask == second  # decoded again from the updated memory
    model.set_outputs(third, memory.label_set({0, 2}), completion=0.2)  # misread: the third cube, head quiet
    assert [planner.update(image, task.instruction) for _ in range(3)] == [False, False, True]
    assert planner.memory == memory.label(1)
    assert planner.episode_metrics()["misread_memories"] == 1


def test_false_alarms_do_not_hold_off_the_stall_replan(text):
    """The head keeps firing at a cube that is in its bin and the decoder keeps missing it (closed loop over the
    VLA: the running subtask never ended). False alarms do not restart the stall clock, so `replan_steps` after
    the last accepted call the stall rule settles it and the next subtask is taken."""
    model, planner, task, memory, image = scripted_sort_planner(text, check_every=1, replan_steps=4, threshold=0.8)
    first, second, _ = task.subtask_texts
    model.set_outputs(first, memory.label(0))
    assert planner.update(image, task.instruction)
    model.set_outputs(second, memory.label(0), completion=0.9)
    for _ in range(3):  # confirm=1: every check fires, every call is a false alarm
        assert planner.update(image, task.instruction) and planner.subtask == first
    assert planner.episode_metrics()["false_alarms"] == 3
    assert planner.update(image, task.instruction)  # step 4: the stall re-plan
    assert (planner.memory, planner.subtask) == (memory.label(1), second)
    assert planner.episode_metrics()["stall_calls"] == 1
    trace = planner.episode_metrics()["calls"]
    assert [(c["step"], c["stall"], c["false_alarm"]) for c in trace] == \
        [(0, False, False), (1, False, True), (2, False, True), (3, False, True), (4, True, False)]
    assert trace[1]["decoded"] == [second, memory.label(0)] and trace[1]["subtask"] == first
    assert trace[4]["memory_in"] == memory.label(0) and trace[4]["completed"] is None  # no scene attached
    assert trace[4]["p_done"] == 0.9  # what the completion head said, kept for calibrating the stall rule


def test_no_completion_call_sooner_than_the_shortest_subtask(text):
    """Right after a call the arm still hangs over the cube it let go of, and the head reads that as the new
    subtask done: the head is not consulted until `min_subtask_steps` after the last accepted call. Carrying (the
    holding gate winds the stall clock on) and false alarms do not restart that wait."""
    model, planner, task, memory, image = scripted_sort_planner(text, check_every=1, replan_steps=12,
                                                                min_subtask_steps=10, grasp_gate=False)
    first, second, third = task.subtask_texts
    model.set_outputs(first, memory.label(0))
    assert planner.update(image, task.instruction, gripper=0.0)  # step 0
    model.set_outputs(second, memory.label(1))  # the head fires at every check; the decoder claims the cube
    for _ in range(9):  # steps 1-9: too soon for a pick and place
        assert not planner.update(image, task.instruction, gripper=0.0)
    assert planner.episode_metrics()["completion_checks"] == 0 and planner.subtask == first
    assert planner.update(image, task.instruction, gripper=0.0) and planner.subtask == second  # step 10
    for _ in range(12):  # steps 11-22: carried (at 22 the gate winds the stall clock on)
        assert not planner.update(image, task.instruction, gripper=0.6)
    model.set_outputs(third, memory.label(1))  # no new outcome: a false alarm
    assert planner.update(image, task.instruction, gripper=0.0)  # step 23: let go, checked at once
    assert planner.update(image, task.instruction, gripper=0.0)  # step 24: the false alarm did not restart it
    assert [(c["step"], c["false_alarm"]) for c in planner.episode_metrics()["calls"]] == \
        [(0, False), (10, False), (23, True), (24, True)]
    assert planner.subtask == second and planner.summary()["min_subtask_steps"] == 10
    with pytest.raises(VlaStackError, match="min_subtask_steps"):
        MemPlanner(None, None, model, min_subtask_steps=-1)


def test_make_policy_options_and_subtask_executor(tmp_path, text):
    env = TabletopEnv("restore", "panda", cameras=())
    try:
        path = HighLevelModel(MemConfig(**TINY), text=text).save(tmp_path / "ckpt", extra={"use_memory": True})
        with pytest.raises(VlaStackError, match="unknown mem planner option"):
            make_policy(ScriptedExpert(env), env, checkpoint=path, colour="red")
        with pytest.raises(VlaStackError, match="on or off"):
            make_policy(ScriptedExpert(env), env, checkpoint=path, memory="maybe")
        with pytest.raises(CheckpointError):
            make_policy(ScriptedExpert(env), env, checkpoint=tmp_path / "nothing")
        planner = make_policy(ScriptedExpert(env), env, checkpoint=path, memory="off", check_every="3", settle="4")
        assert isinstance(planner.policy, SubtaskExpert) and not planner.use_memory and planner.check_every == 3
        assert planner.settle == 4 and (planner.threshold, planner.confirm) == (0.5, 1)  # no calibration saved
        assert planner.stall_threshold == 0.5 and planner.holding_closure == 0.25
        assert make_policy(ScriptedExpert(env), env, checkpoint=path, holding_closure="off").holding_closure is None
        assert make_policy(ScriptedExpert(env), env, checkpoint=path, stall_threshold="0.8").stall_threshold == 0.8
        with pytest.raises(VlaStackError, match="stall_threshold"):
            make_policy(ScriptedExpert(env), env, checkpoint=path, stall_threshold="1.5")
        # A checkpoint's calibrated trigger is the default; options still override it.
        calibrated = HighLevelModel(MemConfig(**TINY), text=text).save(
            tmp_path / "calibrated", extra={"use_memory": True, "trigger": {"threshold": 0.8, "confirm": 2}})
        planner = make_policy(ScriptedExpert(env), env, checkpoint=calibrated)
        assert (planner.threshold, planner.confirm) == (0.8, 2)
        planner = make_policy(ScriptedExpert(env), env, checkpoint=calibrated, threshold="0.6")
        assert (planner.threshold, planner.confirm) == (0.6, 2)
        # The subtask executor runs exactly the subtask it is given.
        env.reset(seed=2)
        executor = SubtaskExpert(env)
        executor.reset(seed=2)
        executor.instruction = env.task.subtasks[0].text
        for _ in range(env.max_steps):
            env.step(executor.select_action())
            if env.subtask_index == 1:
                break
        assert env.subtask_index == 1
        for _ in range(30):  # it does not go on to the next subtask by itself
            env.step(executor.select_action())
        assert env.subtask_index == 1
        # Given the same subtask again after finishing it, it starts over: knocked out of the bowl, the cube goes
        # back in; a goal that already holds is left alone.
        for _ in range(60):
            env.step(executor.select_action())
        assert executor._finished
        goal = env.task.subtasks[0].goal
        body = env.sim._cube_body[goal.cube]
        adr = env.sim.model.jnt_qposadr[env.sim.model.body_jntadr[body]]
        env.sim.data.qpos[adr:adr + 2] = env.task.cubes[goal.cube].xy
        mujoco.mj_forward(env.sim.model, env.sim.data)
        assert not env.sim.goal_reached(goal)
        executor.instruction = env.task.subtasks[0].text
        for _ in range(env.max_steps):
            env.step(executor.select_action())
            if executor._finished:
                break
        assert env.sim.goal_reached(goal)
    finally:
        env.close()


def test_shipped_checkpoint_plans_sort_with_the_subtask_executor():
    """The shipped high level over the scripted subtask executor on a held-out sort scene (first 120 steps):
    the first call writes a subtask of the scene, every memory it keeps is well formed for the scene (a wrong one
    is reset, never kept), and it is called at boundaries / on completion checks, not every step."""
    shipped = Path(__file__).resolve().parents[1] / "policies" / "mem_tiny"
    env = TabletopEnv("sort", "panda", cameras=(), max_steps=120)
    try:
        planner = make_policy(ScriptedExpert(env), env, checkpoint=shipped)
        obs, info = env.reset(seed=1_000_003)
        planner.reset(seed=1_000_003)
        memory = TaskMemory(env.task, env.robot)
        done = False
        while not done:
            obs, _, terminated, truncated, info = env.step(planner.select_action(obs))
            done = terminated or truncated
            assert memory.check_memory(planner.memory) == planner.memory
        metrics = planner.episode_metrics()
        assert metrics["subtasks"][0] in env.task.subtask_texts
        assert all(s in env.task.subtask_texts or s == "done" for s in metrics["subtasks"])
        assert 1 <= metrics["high_level_calls"] <= env.steps // planner.check_every + 1
        assert metrics["completion_checks"] >= 1
        trace = metrics["calls"]  # one record per call, the scene's completed set beside what was written
        assert len(trace) == metrics["high_level_calls"] and trace[0]["step"] == 0 and trace[0]["memory_in"] == EMPTY
        assert [c["step"] for c in trace] == sorted(c["step"] for c in trace)
        assert all(set(c["completed"]) <= set(range(len(env.task.subtasks))) for c in trace)
        assert json.loads(json.dumps(trace)) == trace  # goes into the evaluation JSON as it is
    finally:
        env.close()


def test_oracle_high_level_hands_the_low_level_the_next_unfinished_subtask():
    """high_level=oracle (diagnosis): the low level's instruction is the first subtask whose goal does not hold;
    a cube put in its bin moves it on, one knocked out again brings it back and is counted."""
    from vla_stack.paths import resolve_checkpoint
    from vla_stack.policy.vla.runner import load_vla_policy

    env = TabletopEnv("sort", "panda", image_size=64)
    try:
        low = load_vla_policy(resolve_checkpoint("vla_mem_tiny"), "panda", async_inference=False)
        with pytest.raises(VlaStackError, match="model or oracle"):
            make_policy(low, env, high_level="sometimes")
        with pytest.raises(VlaStackError, match="learned low level"):
            make_policy(ScriptedExpert(env), env, high_level="oracle")
        planner = make_policy(low, env, high_level="oracle")
        obs, _ = env.reset(seed=1_000_001)
        planner.reset(seed=1_000_001)
        first, second = env.task.subtasks[0], env.task.subtasks[1]

        def move_cube(cube: int, xy) -> None:
            body = env.sim._cube_body[cube]
            adr = env.sim.model.jnt_qposadr[env.sim.model.body_jntadr[body]]
            env.sim.data.qpos[adr:adr + 3] = (*xy, env.sim.data.qpos[adr + 2] + 0.004)
            mujoco.mj_forward(env.sim.model, env.sim.data)
            for _ in range(3):
                env.sim.step()

        assert np.isfinite(planner.select_action(obs)).all() and low.instruction == first.text
        move_cube(first.goal.cube, env.sim.receptacle_pos(first.goal.target)[:2])
        assert env.sim.goal_reached(first.goal)
        obs, *_ = env.step(planner.select_action(obs))
        assert low.instruction == second.text
        move_cube(first.goal.cube, env.task.cubes[first.goal.cube].xy)
        planner.select_action(obs)
        assert low.instruction == first.text
        metrics = planner.episode_metrics()
        assert metrics["subtasks_undone"] == 1 and metrics["subtask_switches"] == 2
        summary = planner.summary()
        assert summary["low_level"] == low.name and summary["episodes"] == 1 and summary["subtasks_undone"] == 1
    finally:
        env.close()


def test_no_call_while_the_gripper_holds_a_cube(text):
    """Every sort/restore subtask ends with the cube let go: while the gripper is closed the completion head is
    not consulted and a stall re-plan waits, so a cube carried over its bowl is never recorded as placed."""
    model = ScriptedOutputs(MemConfig(**TINY), text=text)
    planner = MemPlanner(None, None, model, check_every=1, replan_steps=4, holding_closure=0.25,
                         min_subtask_steps=0)
    task = generate("restore", PANDA, 1)
    memory = TaskMemory(task, PANDA)
    first, second = task.subtasks[0].text, task.subtasks[1].text
    planner.set_scene(task, PANDA)
    image = np.zeros((64, 64, 3), np.uint8)
    model.set_outputs(first, memory.label(0))
    assert planner.update(image, task.instruction, gripper=0.0) and planner.subtask == first
    model.set_outputs(second, memory.label(1))  # the head would fire and the decoder claim the cube is in
    for _ in range(14):  # carried: closed on the cube, well past replan_steps
        assert not planner.update(image, task.instruction, gripper=0.46)
    assert planner.subtask == first and planner.memory == memory.label(0)
    assert planner.episode_metrics()["holding_steps"] == 14
    assert planner.update(image, task.instruction, gripper=0.02) and planner.subtask == second  # let go
    # Without the gate (holding_closure None) the same carried cube is recorded at once.
    ungated = MemPlanner(None, None, model, check_every=1, replan_steps=4, holding_closure=None,
                         min_subtask_steps=0, grasp_gate=False)
    ungated.set_scene(task, PANDA)
    model.set_outputs(first, memory.label(0))
    ungated.update(image, task.instruction, gripper=0.0)
    model.set_outputs(second, memory.label(1))
    assert ungated.update(image, task.instruction, gripper=0.46) and ungated.subtask == second


def test_no_outcome_without_a_grasp(text):
    """A cube pushed against its bin or missed in the grasp looks sorted in the front image: an outcome of the
    running subtask is adopted only if the gripper held something while that subtask ran. A stall re-plan
    without that evidence re-issues the running subtask, a completion call is a false alarm; closing on nothing
    (the measured empty close of the panda hand) is no evidence. (carry_steps 1: the carries here are short.)"""
    model, planner, task, memory, image = scripted_sort_planner(text, check_every=1, replan_steps=8,
                                                                holding_closure=None, carry_steps=1)
    first, second, third = task.subtask_texts
    model.set_outputs(first, memory.label(0))
    assert planner.update(image, task.instruction, gripper=0.0)  # step 0
    model.set_outputs(second, memory.label(1), completion=0.0)  # the decoder reads the first cube as sorted
    for closure in (0.26, 0.59, 0.8, 0.91, 0.96, 0.99, 1.0):  # steps 1-7: an empty close, the head silent
        assert not planner.update(image, task.instruction, gripper=closure)
    assert planner.update(image, task.instruction, gripper=1.0)  # step 8: the stall re-plan
    assert (planner.memory, planner.subtask) == (memory.label(0), first)  # re-issued, nothing recorded
    last = planner.episode_metrics()["calls"][-1]
    assert (last["stall"], last["ungrasped"], last["held"]) == (True, True, False)
    for closure in (0.3, 0.46, 0.46, 0.46, 0.46, 0.1, 0.0):  # steps 9-15: grasped, carried, let go
        assert not planner.update(image, task.instruction, gripper=closure)
    model.set_outputs(first, memory.label(0), completion=0.0)  # the outcome missed at the stall re-plan:
    assert planner.update(image, task.instruction, gripper=0.0) and planner.subtask == first  # step 16, re-issued
    model.set_outputs(second, memory.label(1), completion=1.0)
    assert planner.update(image, task.instruction, gripper=0.0)  # step 17: the grasp before the stall counts
    assert (planner.memory, planner.subtask) == (memory.label(1), second)
    assert planner.episode_metrics()["calls"][-1]["held"]
    model.set_outputs(third, memory.label(2))  # evidence is per subtask: the next outcome needs its own grasp
    assert planner.update(image, task.instruction, gripper=0.0)  # step 18
    last = planner.episode_metrics()["calls"][-1]
    assert (last["false_alarm"], last["ungrasped"]) == (True, True) and planner.memory == memory.label(1)
    assert planner.episode_metrics()["ungrasped_outcomes"] == 2 and planner.summary()["grasp_gate"]
    # A subtask left at a stall re-plan (its outcome missed) and re-issued later keeps the grasp it had.
    model, planner = scripted_sort_planner(text, check_every=1, replan_steps=8, holding_closure=None,
                                           carry_steps=1)[:2]
    model.set_outputs(first, memory.label(0), completion=0.0)
    planner.update(image, task.instruction, gripper=0.0)  # step 0
    for closure in (0.46, 0.46, 0.46, 0.46, 0.0, 0.0, 0.0):  # steps 1-7: the first cube carried and let go
        planner.update(image, task.instruction, gripper=closure)
    model.set_outputs(second, memory.label(0), completion=0.0)
    assert planner.update(image, task.instruction, gripper=0.0) and planner.subtask == second  # step 8: missed
    for _ in range(7):  # steps 9-15: nothing grasped
        planner.update(image, task.instruction, gripper=0.0)
    model.set_outputs(first, memory.label(0), completion=0.0)
    assert planner.update(image, task.instruction, gripper=0.0) and planner.subtask == first  # step 16: back
    model.set_outputs(second, memory.label(1), completion=1.0)
    assert planner.update(image, task.instruction, gripper=0.0) and planner.memory == memory.label(1)
    # Without a gripper reading (a node with no joint states) there is no evidence to ask for.
    model, blind = scripted_sort_planner(text, check_every=1)[:2]
    model.set_outputs(first, memory.label(0))
    assert blind.update(image, task.instruction)
    model.set_outputs(second, memory.label(1))
    assert blind.update(image, task.instruction) and blind.memory == memory.label(1)


def test_head_overrules_a_misread_completion_call_right_after_a_carry(text):
    """Over the VLA the decoder mostly names another cube when the running one reached its bin (86-90% of the
    completion calls it missed, held-out sort): right after a real carry (held >= carry_steps, let go within
    RECENT_RELEASE steps) the completion head decides, as at a stall. A brief grasp (a cube knocked or dropped
    on the way, the other 10-14%: carried 6 steps median against 21) or a release long ago stays a false alarm."""
    def carry_then_call(steps_held: int, wait: int):
        model, planner, task, memory, image = scripted_sort_planner(text, check_every=1)
        first = task.subtask_texts[0]
        model.set_outputs(first, memory.label(0), completion=0.0)
        assert planner.update(image, task.instruction, gripper=0.0)  # step 0
        for _ in range(steps_held):  # carried (no calls while the gripper is closed)
            assert not planner.update(image, task.instruction, gripper=0.46)
        for _ in range(wait):  # let go, the head quiet
            assert not planner.update(image, task.instruction, gripper=0.0)
        model.set_outputs(first, memory.label_set({1}), completion=0.9)  # the second cube named, not the first
        assert planner.update(image, task.instruction, gripper=0.0)
        return planner, memory, first, planner.episode_metrics()["calls"][-1]

    planner, memory, first, call = carry_then_call(steps_held=20, wait=3)
    assert planner.memory == memory.label(1) and not call["false_alarm"]  # the running cube's outcome
    assert (call["carried_steps"], call["since_held"]) == (17, 4)  # counted once steady for HELD_STEPS steps
    for steps_held, wait in ((8, 3), (20, RECENT_RELEASE + 1)):
        planner, memory, first, call = carry_then_call(steps_held, wait)
        assert (planner.memory, planner.subtask, call["false_alarm"]) == (memory.label(0), first, True)
    with pytest.raises(VlaStackError, match="head_decides"):
        scripted_sort_planner(text, head_decides="all")


def test_failure_breakdown_by_first_high_level_error(tmp_path):
    """`vla-stack mem failures`: each failed episode goes to the first call whose kept memory disagrees with the
    scene's completed subtasks; restore's start-region wording is not an error."""
    from typer.testing import CliRunner

    from vla_stack.cli import app
    from vla_stack.planners.mem.failures import LOW_LEVEL, MISSED, RECORDED, failure_breakdown, handover_delays

    sort, restore = TaskMemory(generate("sort", PANDA, 1), PANDA), TaskMemory(generate("restore", PANDA, 2), PANDA)

    def call(step, memory, completed, stall=False):
        return {"step": step, "stall": stall, "false_alarm": False, "memory": memory, "completed": completed}

    def episode(seed, calls, success=False):
        return {"seed": seed, "success": success, "subtasks_completed": 0, "planner": {"calls": calls}}

    record = {"task": "sort", "robot": "panda", "per_episode": [
        episode(1, [call(0, sort.label(0), [])], success=True),
        episode(1, [call(0, sort.label(0), []), call(60, sort.label_set({0}), [0]),
                    call(70, sort.label_set({0, 1}), [0])]),  # the next cube recorded 10 steps on
        episode(1, [call(0, sort.label(0), []), call(100, sort.label(0), [2], stall=True)]),
        episode(1, [call(0, sort.label(0), []), call(60, sort.label_set({2}), [2])])]}
    result = failure_breakdown(record)
    assert result["failures"] == 3 and [row["kind"] for row in result["per_failure"]] == [RECORDED, MISSED, LOW_LEVEL]
    assert result["by_first_error"] == {f"{RECORDED} (completion call)": 1, f"{MISSED} (stall call)": 1, LOW_LEVEL: 1}
    wrong_region = restore.label(1).rsplit(" the ", 1)[0] + " the far right"  # the cube is in; the region is off
    assert wrong_region != restore.label(1)
    restore_record = {"task": "restore", "robot": "panda",
                      "per_episode": [episode(2, [call(0, restore.label(0), []), call(60, wrong_region, [0])])]}
    assert failure_breakdown(restore_record)["by_first_error"] == {LOW_LEVEL: 1}
    assert failure_breakdown(restore_record)["per_failure"][0]["handover_delays"] is None  # an older record
    # Handover delays: the scene finished its first subtask at step 30 and its second at 90; the memory recorded
    # them at 60 (30 steps late) and never; a false alarm's memory does not count.
    late = episode(2, [call(0, restore.label(0), []), call(60, restore.label(1), [0])])
    late["planner"]["scene_completions"] = [30, 90]
    result = failure_breakdown({"task": "restore", "robot": "panda", "per_episode": [late]})
    assert result["per_failure"][0]["handover_delays"] == [30, None]
    assert result["low_level_after_late_handover"] == 1
    subtasks = [s.text for s in generate("restore", PANDA, 2).subtasks]
    false_alarm = {**call(40, restore.label(1), [0]), "false_alarm": True}
    assert handover_delays([false_alarm, call(45, restore.label(1), [0])], [30], subtasks) == [15]
    (tmp_path / "eval.json").write_text(json.dumps(record))
    out = CliRunner().invoke(app, ["mem", "failures", str(tmp_path / "eval.json"), "--json", str(tmp_path / "f.json")])
    assert out.exit_code == 0 and "3 of 4 episodes failed" in out.output
    assert json.loads((tmp_path / "f.json").read_text())["failures"] == 3
    untraced = {"task": "sort", "robot": "panda", "per_episode": [{"seed": 1, "success": False, "planner": {}}]}
    with pytest.raises(VlaStackError, match="no per-call trace"):
        failure_breakdown(untraced)
