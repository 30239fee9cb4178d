"""The node pack without ComfyUI: declarations (ids, categories, tooltips), name confinement, the
shipped workflows (valid against the nodes' signatures and ComfyUI's stock nodes, UI twins in
sync), the headless runner, and the nodes themselves on the built-in teacher (train, cancel and
resume, sample, save / load, compare)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import torch

import distill_core.workflow as wf
from distill_core.memory_plan import MemoryPlan
from distill_core.report import loss_curve, preview_pixels
from distill_core.safetensors_io import read_card
from distill_core.sampling import few_step, k_sampler

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "workflows"
nodes = wf.node_pack()
from distill_nodes import host  # noqa: E402  (the pack is importable once node_pack() put it on the path)
from distill_nodes.sampling import recipe  # noqa: E402


def _info() -> dict:
    stock = json.loads((ROOT / "tests" / "data" / "stock_nodes.json").read_text())["nodes"]
    return {**stock, **wf.pack_info()}


@pytest.fixture
def folders(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("DISTILL_OUTPUT_DIR", str(tmp_path / "output"))
    return tmp_path


# ------------------------------------------------------------------ declarations
def test_every_node_is_prefixed_categorised_and_documented():
    assert len(nodes.NODE_CLASS_MAPPINGS) >= 8
    for node_id, cls in nodes.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("Distill") and nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id]
        assert cls.CATEGORY.startswith("distill/") and cls.DESCRIPTION
        declared = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for name, decl in declared.get(group, {}).items():
                assert len(decl) == 2 and decl[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
        assert all(cls.OUTPUT_TOOLTIPS), f"{node_id} has an output without a tooltip"


def test_the_pack_root_exports_the_mappings_and_the_web_directory():
    source = (ROOT / "__init__.py").read_text()
    assert "NODE_CLASS_MAPPINGS" in source and "NODE_DISPLAY_NAME_MAPPINGS" in source
    assert 'WEB_DIRECTORY = "./web"' in source and (ROOT / "web" / "distill.js").is_file()


@pytest.mark.parametrize("name", ["../../x", "/etc/passwd", "a/b", "..", "", "x\\y", ".hidden", "a" * 200])
def test_names_that_could_leave_their_folder_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="not allowed|would leave"):
        host.confined(tmp_path, name, ".safetensors")


def test_a_plain_name_stays_in_its_folder(tmp_path):
    assert host.confined(tmp_path, "my student_4 v1.2", ".safetensors") == (
        tmp_path / "my student_4 v1.2.safetensors").resolve()
    assert host.confined(tmp_path, "x.safetensors", ".safetensors").name == "x.safetensors"


# ------------------------------------------------------------------ workflows
@pytest.mark.parametrize("api_file", sorted((WORKFLOWS / "api").glob("*.json")), ids=lambda p: p.name)
def test_shipped_workflows_are_valid_and_their_ui_twins_match(api_file):
    info = _info()
    graph = json.loads(api_file.read_text())
    assert wf.validate_api(graph, info) == []
    twin = WORKFLOWS / api_file.name
    ui = json.loads(twin.read_text())
    note = wf.workflow_notes()[api_file.stem]
    assert ui == wf.api_to_ui(graph, info, {str(n["id"]): n["pos"] for n in ui["nodes"]}, note)
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        src_node = next(n for n in ui["nodes"] if n["id"] == src)
        dst_node = next(n for n in ui["nodes"] if n["id"] == dst)
        assert src_node["outputs"][src_slot]["type"] == kind and link_id in src_node["outputs"][src_slot]["links"]
        assert dst_node["inputs"][dst_slot]["link"] == link_id


def test_every_shipped_workflow_says_what_it_does_and_its_time_on_a_cpu_and_a_gpu():
    notes = wf.workflow_notes()
    assert set(notes) == {p.stem for p in WORKFLOWS.glob("*.json")}
    for name, text in notes.items():
        assert re.search(r"\d.* on (2 CPU cores|a CPU)", text), name
        assert re.search(r"on (a|one) (24 GB consumer )?GPU", text), name
        ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
        assert [n["widgets_values"] for n in ui["nodes"] if n["type"] == "Note"] == [[text]]


def test_every_ui_workflow_has_an_api_twin():
    """ComfyUI lists every JSON directly in workflows/ as a template: only UI-format files go there."""
    ui_files = {p.name for p in WORKFLOWS.glob("*.json")}
    assert ui_files and ui_files == {p.name for p in (WORKFLOWS / "api").glob("*.json")}
    assert all("nodes" in json.loads((WORKFLOWS / n).read_text()) for n in ui_files)


def test_every_ui_workflow_is_what_the_generator_writes_from_its_api_twin(tmp_path, capsys):
    """The UI twins cannot go stale against the nodes' inputs: each is regenerated from its API twin (with
    every optional widget at its default, as ComfyUI's front end saves a loaded graph) and compared."""
    for api in sorted((WORKFLOWS / "api").glob("*.json")):
        wf.run_ui_workflow(argparse.Namespace(workflow=str(api), out=str(tmp_path / api.name), note=None))
        assert json.loads((tmp_path / api.name).read_text()) == json.loads((WORKFLOWS / api.name).read_text()), \
            api.name


def test_validation_names_each_problem():
    info = _info()
    graph = {
        "1": {"class_type": "DistillBuiltinTeacher", "inputs": {"guidance": 50.0}},
        "2": {"class_type": "DistillToSteps", "inputs": {"teacher": ["1", 0], "method": "magic"}},
        "3": {"class_type": "DistillSample", "inputs": {"student": ["1", 0], "seed": 0, "count": 2, "steps": 0,
                                                        "colour": 1}},
        "4": {"class_type": "NotANode", "inputs": {}},
    }
    text = "\n".join(wf.validate_api(graph, info))
    assert "guidance=50.0 is outside" in text and "'magic' is not one of" in text
    assert "required input 'iterations' is missing" in text and "wants DISTILL_STUDENT, gets DISTILL_TEACHER" in text
    assert "no input named 'colour'" in text and "unknown node type 'NotANode'" in text


def test_combo_widgets_declared_as_newer_nodes_declare_them_are_checked_against_their_options():
    """``["COMBO", {"options": [...]}]``: a value out of the options is named; an empty option list is a file
    list, whose files depend on the machine."""
    info = {"Pick": {"input": {"required": {"mode": ["COMBO", {"options": ["a", "b"]}],
                                            "file": ["COMBO", {"options": []}]}},
                     "output": ["X"], "output_name": ["X"]}}
    assert wf.validate_api({"1": {"class_type": "Pick", "inputs": {"mode": "b", "file": "f.safetensors"}}}, info) == []
    assert wf.validate_api({"1": {"class_type": "Pick", "inputs": {"mode": "c", "file": "x"}}}, info) == [
        "node 1 (Pick): mode='c' is not one of ['a', 'b']"]
    ui = wf.api_to_ui({"1": {"class_type": "Pick", "inputs": {"mode": "b", "file": "f"}}}, info)
    assert ui["nodes"][0]["widgets_values"] == ["b", "f"] and ui["nodes"][0]["inputs"] == []
    # an optional combo the graph leaves out: its first choice, as the front end fills it (CLIPLoader's device)
    info["Pick"]["input"]["optional"] = {"device": [["default", "cpu"], {"advanced": True}]}
    ui = wf.api_to_ui({"1": {"class_type": "Pick", "inputs": {"mode": "b", "file": "f"}}}, info)
    assert ui["nodes"][0]["widgets_values"] == ["b", "f", "default"]


def test_the_runner_names_unknown_node_types_and_cycles():
    graph = json.loads((WORKFLOWS / "api" / "sd15_lora_4_steps.json").read_text())
    with pytest.raises(ValueError, match="CheckpointLoaderSimple"):
        wf.run_graph(graph)
    cycle = {"1": {"class_type": "A", "inputs": {"x": ["2", 0]}}, "2": {"class_type": "B", "inputs": {"x": ["1", 0]}}}
    with pytest.raises(ValueError, match="cycle"):
        wf.topological_order(cycle)


def test_workflows_a_and_c_run_headlessly(folders, capsys, short_workflow):
    """The node-pack workflow of docs/comfyui.md: built-in teacher -> Distill to 4 steps -> sample -> save; then
    the compare workflow loads the saved student."""
    for path in (short_workflow(WORKFLOWS / "api" / "builtin_distill_4_steps.json", iterations=10),
                 WORKFLOWS / "api" / "compare_builtin_student.json"):
        wf.run(argparse.Namespace(workflow=str(path), models=None, output=None))
    printed = capsys.readouterr().out
    student = folders / "models" / "diffusion_models" / "digits_4step.safetensors"
    card = read_card(student)
    assert card["kind"] == "student" and card["nfe"] == 4 and card["student"]["kind"] == "full"
    assert (folders / "models" / "diffusion_models" / "digits_4step_shared.safetensors").is_file()
    assert (folders / "output" / "builtin_distill_4_steps_3.png").stat().st_size > 1000
    assert (folders / "output" / "compare_builtin_student_3.png").is_file()
    assert (folders / "output" / "compare_builtin_student_3_table.png").is_file()  # a second IMAGE output
    assert "dB against the teacher's reference solve" in printed
    assert json.loads((folders / "output" / "distill_runs" / "digits_4step" / "status.json").read_text())[
        "state"] == "finished"


def test_the_three_methods_workflow_distils_and_compares_in_one_graph(folders, capsys, short_workflow):
    """Built-in teacher -> SFD, reflow and DMD2 students -> one Compare node: a named row per student."""
    workflow = short_workflow(WORKFLOWS / "api" / "compare_three_methods.json", iterations=4)
    wf.run(argparse.Namespace(workflow=str(workflow), models=None, output=None))
    printed = capsys.readouterr().out
    for name, method, nfe in (("digits_sfd_4step", "sfd", 4), ("digits_reflow_4step", "reflow", 4),
                              ("digits_dmd2_2step", "dmd2", 2)):
        card = read_card(folders / "models" / "diffusion_models" / f"{name}.safetensors")
        assert card["method"] == method and max(int(k) for k in card["sigmas"]) == nfe
        assert f"{method}, {nfe} steps: " in printed
    grid = folders / "output" / "compare_three_methods_5.png"
    assert grid.stat().st_size > 1000 and (folders / "output" / "compare_three_methods_5_table.png").is_file()


# ------------------------------------------------------------------ nodes
def _distill(teacher, **kw):
    args = dict(steps=2, method="sfd", iterations=6, learning_rate=2e-4, batch=4, seed=0, guidance_mode="auto",
                student="full", lora_rank=4, save_name="tiny", resume=False, preview_every=2, checkpoint_every=2)
    return nodes.NODE_CLASS_MAPPINGS["DistillToSteps"]().run(teacher, **{**args, **kw})


def test_cancel_keeps_a_checkpoint_and_queueing_again_with_resume_continues(folders, monkeypatch):
    (teacher,) = nodes.NODE_CLASS_MAPPINGS["DistillBuiltinTeacher"]().run(guidance=2.0)
    calls = {"n": 0}

    class Interrupted(Exception):
        pass

    def cancel_at_the_fourth_iteration():
        calls["n"] += 1
        if calls["n"] == 4:
            raise Interrupted("Cancel pressed")

    monkeypatch.setattr(host, "check_interrupt", cancel_at_the_fourth_iteration)
    monkeypatch.setattr(host.NodeProgress, "cancels", (Interrupted,))
    host.NodeProgress(None).poll()  # the node also polls before every network evaluation ...
    assert calls["n"] == 1
    calls["n"] = 0
    monkeypatch.setattr(host.NodeProgress, "poll", lambda self: None)  # ... here: only between iterations
    with pytest.raises(Interrupted):
        _distill(teacher)
    run_dir = folders / "output" / "distill_runs" / "tiny"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"
    assert json.loads((run_dir / "checkpoints" / "checkpoint.json").read_text())["iteration"] == 4
    assert not (folders / "models" / "diffusion_models" / "tiny.safetensors").exists()

    model, student, curve = _distill(teacher, resume=True)["result"]
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines] == [1, 2, 3, 4, 5, 6]  # nothing lost, nothing repeated
    assert model is None and student.path == (folders / "models" / "diffusion_models" / "tiny.safetensors").resolve()
    assert curve.shape == (1, 320, 640, 3) and 0 <= curve.min() and curve.max() <= 1

    images, latent = nodes.NODE_CLASS_MAPPINGS["DistillSample"]().run(student, seed=3, count=5, steps=0)["result"]
    assert images.shape == (5, 64, 64, 3) and torch.isfinite(images).all() and latent["samples"].shape == (5, 1, 16, 16)
    with pytest.raises(ValueError, match="cannot sample with 3 steps"):
        nodes.NODE_CLASS_MAPPINGS["DistillSample"]().run(student, seed=3, count=1, steps=3)


def test_a_stop_request_from_the_panel_stops_a_node_run_that_resume_finishes(folders, monkeypatch):
    """The panel's Stop on a run a node trains (its ``STOP`` file): the node stops after the iteration with a
    checkpoint and says how to go on; queueing again with resume on finishes the run."""
    from distill_core.train.status import request_stop

    (teacher,) = nodes.NODE_CLASS_MAPPINGS["DistillBuiltinTeacher"]().run(guidance=2.0)
    run_dir = folders / "output" / "distill_runs" / "tiny"
    with monkeypatch.context() as patch, pytest.raises(
            RuntimeError, match="training stopped early; queue again with resume on to continue"):
        patch.setattr(host, "check_interrupt", lambda: request_stop(run_dir))
        _distill(teacher, iterations=4, checkpoint_every=4)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"
    assert json.loads((run_dir / "checkpoints" / "checkpoint.json").read_text())["iteration"] == 1
    _, student, _ = _distill(teacher, iterations=4, checkpoint_every=4, resume=True)["result"]
    assert read_card(student.path)["training"]["iterations"] == 4


def test_a_new_run_replaces_no_student_and_resume_continues_a_finished_one(folders, monkeypatch):
    """Queueing a training node again without resume, under a name that holds a run: refused before anything
    loads, with the choices, and the student file and the run folder unchanged; a file at the student's path
    that no run made is refused too. Resume with the same iterations gives the finished run's student as it is,
    with more it goes on training and, as it replaces the file, has ComfyUI forget what loaders read from it."""
    forgets = []
    monkeypatch.setattr(host, "forget_cached_outputs", lambda: forgets.append(1))
    (teacher,) = nodes.NODE_CLASS_MAPPINGS["DistillBuiltinTeacher"]().run(guidance=2.0)
    _distill(teacher, iterations=2)
    target = folders / "models" / "diffusion_models" / "tiny.safetensors"
    run_dir = folders / "output" / "distill_runs" / "tiny"
    before = {p: p.read_bytes() for p in [target, *run_dir.rglob("*")] if p.is_file()}
    with pytest.raises(ValueError, match=re.escape(
            f"{run_dir} holds a run (student.safetensors, checkpoints/), which a new run would replace: turn "
            "resume on to go on with it (a finished run with the same iterations is used as it is), give another "
            f"save_name, or delete that folder and {target} to start it again")):
        _distill(teacher, iterations=2, seed=1)
    shutil.rmtree(run_dir)
    with pytest.raises(ValueError, match=re.escape(f"{target} exists already, which this run's student would "
                                                   "replace: give another save_name, or move that file away")):
        _distill(teacher, iterations=2, seed=1)
    assert target.read_bytes() == before[target] and not run_dir.exists()

    _, first, _ = _distill(teacher, iterations=2, save_name="more")["result"]
    trained = first.path.read_bytes()
    loaders = [nodes.NODE_CLASS_MAPPINGS[n] for n in ("DistillLoadStudent", "DistillStudentSchedule",
                                                   "DistillTwoModelSchedule")]
    states = [loader.IS_CHANGED(student_file="diffusion_models/more.safetensors") for loader in loaders]
    _, again, _ = _distill(teacher, iterations=2, save_name="more", resume=True)["result"]  # used as it is
    assert again.path.read_bytes() == trained and forgets == []
    assert [loader.IS_CHANGED(student_file="diffusion_models/more.safetensors") for loader in loaders] == states
    _, student, _ = _distill(teacher, iterations=3, save_name="more", resume=True)["result"]
    assert read_card(student.path)["training"]["iterations"] == 3 and forgets == [1]
    for loader, state in zip(loaders, states):  # the nodes that read the file by name read it again
        assert loader.IS_CHANGED(student_file="diffusion_models/more.safetensors", steps=0) != state
        assert loader.IS_CHANGED(student_file="(connected student)") == "(connected student)"
        assert loader.IS_CHANGED(steps=0) == ""  # the widget turned into a linked input
    lines = (folders / "output" / "distill_runs" / "more" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iter"] for line in lines] == [1, 2, 3]


def test_forgetting_cached_outputs_asks_comfyui_for_a_cache_reset_that_keeps_the_models(monkeypatch):
    """The flags ComfyUI's menu item "Free model and node cache" sets, less the unloading of models: read by
    ComfyUI's prompt worker when the running prompt ends."""
    import sys
    from types import ModuleType, SimpleNamespace

    flags = {}
    server = ModuleType("server")
    server.PromptServer = SimpleNamespace(instance=SimpleNamespace(prompt_queue=SimpleNamespace(
        set_flag=flags.__setitem__)))
    monkeypatch.setitem(sys.modules, "server", server)
    host.forget_cached_outputs()
    assert flags == {}  # outside ComfyUI: nothing
    monkeypatch.setattr(host, "in_comfyui", lambda: True)
    host.forget_cached_outputs()
    assert flags == {"unload_models": False, "free_memory": True}


def test_a_training_node_starts_from_another_nodes_student(folders):
    """A 1-step SFD LoRA refined by DMD2: the distribution node's ``start_from`` takes the student socket of
    the first node, and a student of another kind is refused with the settings that would fit."""
    (teacher,) = nodes.NODE_CLASS_MAPPINGS["DistillBuiltinTeacher"]().run(guidance=2.0)
    _, first, _ = _distill(teacher, steps=1, iterations=2, student="lora", save_name="first")["result"]
    node = nodes.NODE_CLASS_MAPPINGS["DistillDistributionMatching"]()
    args = dict(steps=1, method="dmd2", iterations=1, learning_rate=1e-4, batch=2, critic_updates=1, seed=0,
                student="lora", lora_rank=4, resume=False, preview_every=0, checkpoint_every=1)
    student = node.run(teacher, **args, save_name="refined", start_from=first)["result"][1]
    assert read_card(student.path)["training"]["init_from"] == "first.safetensors"
    with pytest.raises(ValueError, match=r"\(student: lora, lora_rank: 4, lora_alpha: 4\)"):
        node.run(teacher, **{**args, "lora_rank": 8}, save_name="other", start_from=first)


def test_save_and_load_student_nodes_confine_and_check_the_teacher(folders):
    (teacher,) = nodes.NODE_CLASS_MAPPINGS["DistillBuiltinTeacher"]().run(guidance=2.0)
    _, student, _ = _distill(teacher, iterations=2)["result"]
    save = nodes.NODE_CLASS_MAPPINGS["DistillSaveStudent"]()
    with pytest.raises(ValueError, match="not allowed"):
        save.run(student, "../../escape")
    (path,) = save.run(student, "kept")["result"]
    assert Path(path) == (folders / "models" / "diffusion_models" / "kept.safetensors").resolve()
    assert save.run(student, "kept")["result"] == (path,)  # the same student: already saved there
    _, other, _ = _distill(teacher, iterations=2, seed=1, save_name="other")["result"]
    (moved,) = save.run(other, "kept")["result"]  # another student under a taken name: the first is kept
    assert Path(moved).name == "kept_2.safetensors" and Path(moved).read_bytes() == other.path.read_bytes()
    assert Path(path).read_bytes() == student.path.read_bytes()

    load = nodes.NODE_CLASS_MAPPINGS["DistillLoadStudent"]()
    assert "diffusion_models/kept.safetensors" in nodes.NODE_CLASS_MAPPINGS["DistillLoadStudent"].INPUT_TYPES()[
        "required"]["student_file"][0]
    _, loaded = load.run(teacher, "diffusion_models/kept.safetensors")
    assert loaded.card["nfe"] == 2
    with pytest.raises(FileNotFoundError, match="not in the diffusion_models folder"):
        load.run(teacher, "diffusion_models/../../../etc/passwd")
    (folders / "models" / "loras").mkdir(parents=True)
    from distill_core.safetensors_io import save_atomic

    save_atomic({"w": torch.zeros(1)}, folders / "models" / "loras" / "plain.safetensors", {"kind": "other"})
    with pytest.raises(ValueError, match="no student metadata"):
        load.run(teacher, "loras/plain.safetensors")


def test_the_student_recipe_travels_in_the_file():
    card = {"sigmas": {"2": [80.0, 1.0, 0.006], "3": [80.0, 5.0, 1.0, 0.006]},
            "guidance": {"mode": "cfg", "w": 4.5}}
    sigmas, cfg = recipe(card)
    assert sigmas.tolist() == pytest.approx([80.0, 5.0, 1.0, 0.006]) and cfg == 4.5
    assert recipe({**card, "guidance": {"mode": "distilled", "w": 2.0}}, 2)[1] == 1.0
    with pytest.raises(ValueError, match=r"samples with \[2, 3\] steps, not 5"):
        recipe(card, 5)
    with pytest.raises(ValueError, match="class means, which SamplerCustom cannot see"):
        recipe({**card, "afs_center": "class_mean"})


def test_the_comfyui_sampler_function_is_the_engines_few_step_sampler(tiny_edm):
    x = torch.randn(3, 1, 8, 8) * 80
    sigmas = torch.tensor([80.0, 10.0, 1.0, 0.006])
    labels = torch.tensor([1, 2, 3])
    seen = []
    solve = k_sampler({"sampler": "euler_afs", "afs": True})
    got = solve(lambda x, s, cond: tiny_edm(x, s, cond), x, sigmas, {"cond": labels}, callback=seen.append)
    torch.testing.assert_close(got, few_step(tiny_edm, x, sigmas, labels, afs=True))
    assert [s["i"] for s in seen] == [0, 1, 2] and seen[-1]["denoised"].shape == x.shape


def test_loss_curve_and_latent_previews_are_images():
    metrics = [{"iter": i, "loss": {"0": 1.0 / i, "1": 2.0 / i}} for i in range(1, 20)]
    curve = loss_curve(metrics, width=200, height=100)
    assert curve.shape == (100, 200, 3) and curve.dtype == torch.uint8 and (curve != 255).any()

    class SD15Format:
        latent_rgb_factors = [[0.3, 0.2, 0.2], [0.2, 0.3, 0.2], [-0.1, 0.1, 0.3], [-0.2, -0.2, -0.3]]

    grid = preview_pixels(torch.randn(3, 4, 8, 8), SD15Format())
    assert grid.shape[-1] == 3 and grid.dtype == torch.uint8 and grid.shape[0] >= 8


# ------------------------------------------------------------------ web extension and monitor
def test_the_web_extension_listens_to_what_the_server_sends():
    js = (ROOT / "web" / "distill.js").read_text()
    assert '"distill.progress"' in js and '"/distill/monitor"' in js
    sent = (ROOT / "distill_nodes" / "host.py").read_text()
    assert 'send_event("distill.progress"' in sent
    assert '"/distill/monitor"' in (ROOT / "distill_nodes" / "monitor.py").read_text()
    assert '"/distill/training_nodes"' in js and '"/distill/training_nodes"' in (
        ROOT / "distill_nodes" / "monitor.py").read_text()
    assert set(nodes.TRAINING_NODES) == {"DistillToSteps", "DistillPhasedScoreDistill", "DistillDistributionMatching"}


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node (CI installs nodejs)")
def test_the_web_extension_is_valid_javascript(tmp_path):
    module = tmp_path / "distill.mjs"  # an ES module, as the front end loads it
    module.write_text((ROOT / "web" / "distill.js").read_text())
    check = subprocess.run(["node", "--check", str(module)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_the_monitor_node_serves_the_panel_on_loopback(folders):
    (url,) = nodes.NODE_CLASS_MAPPINGS["DistillMonitor"]().run(port=0)["result"]
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
    assert nodes.NODE_CLASS_MAPPINGS["DistillMonitor"]().run(port=0)["result"] == (url,)  # started once


def test_compare_takes_several_lora_students_of_one_teacher_without_stacking_their_adapters(folders):
    (teacher,) = nodes.NODE_CLASS_MAPPINGS["DistillBuiltinTeacher"]().run(guidance=2.0)
    _, two, _ = _distill(teacher, student="lora", save_name="two", steps=2, iterations=2)["result"]
    _, three, _ = _distill(teacher, student="lora", save_name="three", steps=3, iterations=2)["result"]
    node = nodes.NODE_CLASS_MAPPINGS["DistillCompare"]()
    args = dict(seed=0, count=3, steps=0, reference_steps=8)
    grid, metrics, table = node.run(two, student_2=three, **args)["result"]
    alone = {}
    for handle in (two, three):
        alone.update({line.split(":")[0]: line for line in node.run(handle, **args)["result"][1].splitlines()
                      if "dB against" in line})
    together = [line for line in metrics.splitlines() if "dB against" in line]
    assert together == [alone["sfd, 2 steps"], alone["sfd, 3 steps"]]  # each student as when it is alone
    assert grid.shape[0] == 1 and grid.shape[-1] == 3 and table.shape[0] == 1 and table.shape[-1] == 3
    assert grid.shape[1] >= 5 * 48  # five named rows: teacher, solver and student at 2, solver and student at 3


def test_method_auto_is_the_default_and_trains_the_preset_it_names(folders, monkeypatch):
    from distill_core.methods import auto

    declared = nodes.NODE_CLASS_MAPPINGS["DistillToSteps"].INPUT_TYPES()["required"]["method"]
    assert declared[0][0] == "auto" and declared[1]["default"] == "auto"
    monkeypatch.setitem(auto.BENCH_BUDGET, "iters", 2)  # the presets' budget, shortened for the test
    monkeypatch.setitem(auto.BENCH_BUDGET, "batch", 4)
    (teacher,) = nodes.NODE_CLASS_MAPPINGS["DistillBuiltinTeacher"]().run(guidance=2.0)
    out = _distill(teacher, method="auto", steps=2, iterations=6, save_name="auto2")
    _, student, _ = out["result"]
    assert student.card["method"] == "sfd" and student.card["nfe"] == 2
    assert out["ui"]["text"][0] == auto.choose(2, "builtin", True).describe()
    lines = (folders / "output" / "distill_runs" / "auto2" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # the preset's iterations, not the widget's 6


def test_the_lower_bound_of_a_run_is_timed_from_one_teacher_evaluation(monkeypatch):
    from distill_core.sources import builtin_source

    ticks = iter([0.0, 0.5, 1.0, 3.0])  # a warm-up call of 0.5 s, then the timed one: 2 s
    monkeypatch.setattr(host.time, "perf_counter", lambda: next(ticks))
    assert host.run_seconds_at_least(builtin_source(), iterations=100, batch=8, steps=4) == 100 * 8 * (4 + 3) * 2.0


def test_a_run_that_will_take_hours_is_announced_before_it_starts(folders, monkeypatch, capsys):
    (teacher,) = nodes.NODE_CLASS_MAPPINGS["DistillBuiltinTeacher"]().run(guidance=2.0)
    events = []
    monkeypatch.setattr(host, "run_seconds_at_least", lambda source, iterations, batch, steps: 2.5 * 3600)
    monkeypatch.setattr(host, "send_event", lambda name, data: events.append(data))
    _distill(teacher, iterations=2, save_name="slow")
    first = events[0]
    assert first["iteration"] == 0 and first["run"].endswith("slow")
    assert first["warning"].startswith("at least 2.5 h on this machine (timed from one teacher evaluation")
    assert all(e.get("warning") == first["warning"] for e in events)  # it stays on the node during the run
    assert capsys.readouterr().out.count("slow: at least 2.5 h") == 1


def test_every_run_states_its_time_before_it_starts(folders, monkeypatch, capsys):
    (teacher,) = nodes.NODE_CLASS_MAPPINGS["DistillBuiltinTeacher"]().run(guidance=2.0)
    events = []
    monkeypatch.setattr(host, "run_seconds_at_least", lambda source, iterations, batch, steps: 150.0)
    monkeypatch.setattr(host, "send_event", lambda name, data: events.append(data))
    _distill(teacher, iterations=2, save_name="quick", grad_checkpointing=True)
    printed = capsys.readouterr().out
    assert "quick: at least 2.5 min on this machine (timed from one teacher evaluation before the run)\n" in printed
    assert not any("warning" in e for e in events)  # minutes are no warning
    # the memory plan, on the node and in the console; the optional memory lever reached the run's config
    assert re.search(r"quick: memory plan about \d+\.\d GiB: frozen weights", printed)
    assert all(re.fullmatch(r"\d+\.\d GiB", e["memory"]) for e in events)
    assert "grad_checkpointing: true" in (host.runs_folder() / "quick" / "config.yaml").read_text()


@pytest.mark.parametrize("seconds_per_iteration, warned", [(20.0, True), (5.0, False)])
def test_a_run_that_will_take_hours_says_so_on_the_node(monkeypatch, capsys, seconds_per_iteration, warned):
    from types import SimpleNamespace

    clock, events = {"t": 0.0}, []
    monkeypatch.setattr(host.time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr(host, "send_event", lambda name, data: events.append(data))
    plan = MemoryPlan(frozen=2**30, trained_params=2**24, ema_params=0, activations_per_sample=2**28,
                      micro_batch=4, factor=1.0, family="sd")
    run = SimpleNamespace(iteration=0, total=400, out=Path("runs") / "slow", memory_plan=plan)
    progress = host.NodeProgress("7")
    progress.on_start(run)
    for k in range(1, 4):
        clock["t"] += seconds_per_iteration
        run.iteration = k
        progress.on_iteration(run, {"loss": {"0": 0.1}})
    assert "warning" not in events[0]  # one iteration is not a measurement
    assert ("warning" in events[-1]) == warned  # 397 x 20 s is 2.2 h; 397 x 5 s is 33 min
    assert all(e["memory"] == "2.2 GiB" for e in events)  # 1 GiB + 0.25 GiB trained + 4 x 0.25 GiB activations
    if warned:
        assert events[-1]["warning"].startswith("about 2.2 h to go on this machine (20.0 s per iteration")
        assert capsys.readouterr().out.count("slow: about 2.2 h") == 1  # printed once, not every iteration


def test_a_training_node_under_a_multi_process_launcher_points_to_the_command_line(folders, monkeypatch):
    (teacher,) = nodes.NODE_CLASS_MAPPINGS["DistillBuiltinTeacher"]().run(guidance=2.0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="for several GPUs use the command line: accelerate launch"):
        _distill(teacher, iterations=2, save_name="two_processes")
    assert not (host.runs_folder() / "two_processes").exists()  # refused before anything was written
