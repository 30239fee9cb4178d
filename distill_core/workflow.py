"""ComfyUI workflows without ComfyUI: validate them, convert the API format into the UI format, and
run API-format graphs built from this pack's nodes.

    python -m distill_core run-workflow workflows/api/builtin_distill_4_steps.json [--models DIR] [--output DIR]

The API format is ``{"<id>": {"class_type": T, "inputs": {name: value | [src_id, output_index]}}}``;
the UI format (v0.4: ``nodes``, ``links``, positional ``widgets_values``) is what users load and
share. A node's signature (``info``) is ComfyUI's ``/object_info`` shape: ``{"input": {"required":
..., "optional": ...}, "output": [...], "output_name": [...]}``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from distill_core.atomic import write_text

#: socket types that are widgets in the UI (their values sit in ``widgets_values``)
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
PACK_ROOT = Path(__file__).resolve().parent.parent


def node_pack():
    """This pack's node package ``distill_nodes`` (the checkout's, next to ``distill_core``)."""
    if not (PACK_ROOT / "distill_nodes" / "spec.py").is_file():
        raise FileNotFoundError(
            f"the node pack is not next to distill_core ({PACK_ROOT / 'distill_nodes'}): run workflows from a clone "
            "of comfyui-distill (pip install -e .)"
        )
    if str(PACK_ROOT) not in sys.path:
        sys.path.insert(0, str(PACK_ROOT))
    return importlib.import_module("distill_nodes")


def pack_info() -> dict[str, dict]:
    """``/object_info``-style signatures of this pack's nodes."""
    mappings = node_pack().NODE_CLASS_MAPPINGS
    return {
        name: {"input": cls.INPUT_TYPES(), "output": list(cls.RETURN_TYPES), "output_name": list(cls.RETURN_NAMES)}
        for name, cls in mappings.items()
    }


def _inputs(info: dict) -> dict[str, tuple]:
    spec = info["input"]
    return {**spec.get("required", {}), **spec.get("optional", {})}


def choices(declaration) -> list | None:
    """The choices of a combo widget (``[[choices...], opts]``, or ``["COMBO", {"options": [...]}]`` as newer
    nodes declare it; an empty list is a file list that depends on the machine), else None."""
    kind = declaration[0]
    if kind == "COMBO":
        return list(declaration[1].get("options", [])) if len(declaration) > 1 else []
    return kind if isinstance(kind, list) else None


def widget_default(declaration):
    """The value ComfyUI's front end gives a widget the graph does not set: its declared default, else a combo's
    first choice (CLIPLoader's optional *device*: "default"), else None."""
    if len(declaration) > 1 and declaration[1].get("default") is not None:
        return declaration[1]["default"]
    return next(iter(choices(declaration) or []), None)


def is_widget(declaration) -> bool:
    return choices(declaration) is not None or declaration[0] in WIDGET_TYPES


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def validate_api(graph: dict, info: dict[str, dict]) -> list[str]:
    """Problems of an API-format graph: a graph or node of the wrong shape, unknown node types, missing
    required inputs, unknown inputs, dangling links, type mismatches along links, widget values out of
    their choices or range."""
    if not isinstance(graph, dict):
        return [f"an API-format workflow is a JSON object of nodes by id, not a {type(graph).__name__}"]
    if not graph:
        return ["it has no nodes: an API-format workflow is a JSON object of nodes by id (ComfyUI's Export (API))"]
    problems = []
    for nid, node in graph.items():
        if not isinstance(node, dict) or not isinstance(node.get("inputs"), dict) or "class_type" not in node:
            problems.append(f"node {nid}: a node is an object with 'class_type' and 'inputs'")
            continue
        kind = node.get("class_type")
        if kind not in info:
            problems.append(f"node {nid}: unknown node type {kind!r}")
            continue
        declared = _inputs(info[kind])
        for name in info[kind]["input"].get("required", {}):
            if name not in node["inputs"]:
                problems.append(f"node {nid} ({kind}): required input {name!r} is missing")
        for name, value in node["inputs"].items():
            if name not in declared:
                problems.append(f"node {nid} ({kind}): no input named {name!r}")
                continue
            decl = declared[name]
            if _is_link(value):
                src = graph.get(value[0])
                if src is None or src.get("class_type") not in info:
                    problems.append(f"node {nid} ({kind}): input {name!r} links to missing node {value[0]}")
                    continue
                outputs = info[src["class_type"]]["output"]
                if not 0 <= value[1] < len(outputs):
                    problems.append(f"node {nid} ({kind}): input {name!r} links to output {value[1]} of "
                                    f"{src['class_type']}, which has {len(outputs)}")
                elif choices(decl) is None and outputs[value[1]] != decl[0]:
                    problems.append(f"node {nid} ({kind}): input {name!r} wants {decl[0]}, gets "
                                    f"{outputs[value[1]]} from node {value[0]}")
            else:
                problems += [f"node {nid} ({kind}): {p}" for p in _widget_problems(name, decl, value)]
    return problems


def _widget_problems(name: str, decl, value) -> list[str]:
    kind, opts, listed = decl[0], (decl[1] if len(decl) > 1 else {}), choices(decl)
    if listed is not None:  # a file list depends on the machine: the file is checked when the node runs
        ok = not listed or opts.get("file_list") or value in listed
        return [] if ok else [f"{name}={value!r} is not one of {listed}"]
    if kind not in WIDGET_TYPES:
        return [f"{name} is a {kind} socket and must be linked, got the value {value!r}"]
    expected = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}[kind]
    if not isinstance(value, expected) or (kind != "BOOLEAN" and isinstance(value, bool)):
        return [f"{name}={value!r} is not a {kind}"]
    lo, hi = opts.get("min"), opts.get("max")
    if kind in ("INT", "FLOAT") and ((lo is not None and value < lo) or (hi is not None and value > hi)):
        return [f"{name}={value} is outside [{lo}, {hi}]"]
    return []


def topological_order(graph: dict) -> list[str]:
    """Node ids so that every node comes after the nodes it links from (a clear error for a cycle)."""
    deps = {nid: {v[0] for v in node["inputs"].values() if _is_link(v)} for nid, node in graph.items()}
    order, done = [], set()
    while len(order) < len(graph):
        ready = sorted((n for n in graph if n not in done and deps[n] <= done), key=_id_key)
        if not ready:
            raise ValueError(f"the workflow has a cycle among nodes {sorted(set(graph) - done)}")
        order += ready
        done.update(ready)
    return order


def _id_key(nid: str):
    return (0, int(nid)) if nid.isdigit() else (1, nid)


def run_graph(graph: dict, on_output: Callable[[str, str, dict], None] | None = None) -> dict[str, tuple]:
    """Execute an API-format graph of this pack's nodes in topological order; returns each node's
    outputs. ``on_output(node_id, class_type, ui)`` receives what output nodes show."""
    mappings = node_pack().NODE_CLASS_MAPPINGS
    problems = validate_api(graph, pack_info())
    if isinstance(graph, dict) and not any("a node is an object" in p for p in problems):
        unknown = sorted({str(n["class_type"]) for n in graph.values()} - set(mappings))
        if unknown:
            raise ValueError(f"the headless runner executes this pack's nodes only; unknown node types: "
                             f"{unknown} (run this workflow in ComfyUI)")
    if problems:
        raise ValueError("invalid workflow:\n  " + "\n  ".join(problems))
    results: dict[str, tuple] = {}
    for nid in topological_order(graph):
        node = graph[nid]
        cls = mappings[node["class_type"]]
        kwargs = {k: results[v[0]][v[1]] if _is_link(v) else v for k, v in node["inputs"].items()}
        out = getattr(cls(), cls.FUNCTION)(**kwargs, unique_id=nid)
        if isinstance(out, dict):
            if on_output is not None and "ui" in out:
                on_output(nid, node["class_type"], out["ui"])
            out = out["result"]
        results[nid] = tuple(out)
    return results


def companion_values(decl: list) -> list:
    """The values of the widgets ComfyUI's front end adds after an input's own, as it saves them: "fixed" for an
    INT seed's ``control_after_generate``, "image" for Load Image's upload button (``image_upload``)."""
    options = decl[1] if len(decl) > 1 and isinstance(decl[1], dict) else {}
    return ["fixed"] * bool(options.get("control_after_generate")) + ["image"] * bool(options.get("image_upload"))


def api_to_ui(graph: dict, info: dict[str, dict], positions: dict[str, list[int]] | None = None,
              note: str | None = None) -> dict:
    """The UI-format (v0.4) twin of an API graph: nodes with socket inputs / outputs and positional
    widget values (each followed by the values of the widgets the front end adds beside it,
    ``companion_values``; a widget fed by
    a link or left out of the graph has its default, as ComfyUI's front end saves it), and links.
    ``note``: the text of a stock Note node above the graph (what the workflow does and how long it takes);
    API graphs hold no notes."""
    order = topological_order(graph)
    links, ui_nodes = [], {}
    for k, nid in enumerate(order):
        node, sig = graph[nid], info[graph[nid]["class_type"]]
        inputs, widgets = [], []
        for name, decl in _inputs(sig).items():
            value = node["inputs"].get(name)
            if is_widget(decl) and not _is_link(value):
                if value is None:  # an optional widget the graph leaves out: its default, as the front end shows it
                    value = widget_default(decl)
                if value is not None:
                    widgets += [value, *companion_values(decl)]
                continue
            if is_widget(decl):  # a widget turned into a linked input keeps its (unused) value in the UI
                widgets += [widget_default(decl), *companion_values(decl)]
            link = None
            if _is_link(value):
                link = len(links) + 1
                links.append([link, int(value[0]), value[1], int(nid), len(inputs), decl[0]])
            entry = {"name": name, "type": decl[0], "link": link}
            if is_widget(decl):
                entry["widget"] = {"name": name}
            inputs.append(entry)
        outputs = [{"name": n, "type": t, "links": [], "slot_index": i}
                   for i, (t, n) in enumerate(zip(sig["output"], sig["output_name"]))]
        pos = (positions or {}).get(nid, [40 + 360 * k, 80])
        ui_nodes[nid] = {"id": int(nid), "type": node["class_type"], "pos": pos, "size": [320, 120 + 26 * len(widgets)],
                         "flags": {}, "order": k, "mode": 0, "inputs": inputs, "outputs": outputs,
                         "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets}
    for link in links:
        ui_nodes[str(link[1])]["outputs"][link[2]]["links"].append(link[0])
    nodes = [ui_nodes[n] for n in sorted(graph, key=_id_key)]
    if note is not None:
        nid = str(max(int(n) for n in graph) + 1)
        nodes.append({"id": int(nid), "type": "Note", "pos": (positions or {}).get(nid, [40, -200]),
                      "size": [640, 160], "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                      "properties": {"text": ""}, "widgets_values": [note]})
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def workflow_notes(folder: Path = PACK_ROOT / "workflows") -> dict[str, str]:
    """The Note of every shipped workflow (``workflows/notes.yaml``: name -> text), by workflow name."""
    import yaml

    return yaml.safe_load((folder / "notes.yaml").read_text())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("workflow", help="an API-format workflow JSON (the workflows/api/ twin of a shipped workflow)")
    p.add_argument("--models", help="models folder (loras/, diffusion_models/; default ./models)")
    p.add_argument("--output", help="output folder (runs and images; default ./output)")


def add_arguments_ui_workflow(p: argparse.ArgumentParser) -> None:
    p.add_argument("workflow", help="an API-format workflow JSON")
    p.add_argument("out", help="where to write its UI-format twin")
    p.add_argument("--note", help="the text of a Note node above the graph (default: the workflow's entry in "
                   "workflows/notes.yaml, if it has one)")


def read_api_workflow(path: str | Path) -> dict:
    """An API-format workflow read from ``path``, with one clear error for a missing file, a file that is not
    JSON, and a UI-format workflow given in its place."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no workflow file {path}: give an API-format workflow JSON, such as a "
                                "shipped one in workflows/api/")
    try:
        graph = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    if isinstance(graph, dict) and "nodes" in graph and "links" in graph:
        raise ValueError(f"{path} is a UI-format workflow: give its API-format twin (workflows/api/)")
    return graph


def run_ui_workflow(args: argparse.Namespace) -> int:
    info = pack_info()
    stock = PACK_ROOT / "tests" / "data" / "stock_nodes.json"
    if stock.is_file():
        info = {**json.loads(stock.read_text())["nodes"], **info}
    graph = read_api_workflow(args.workflow)
    problems = validate_api(graph, info)
    if problems:
        raise ValueError("invalid workflow:\n  " + "\n  ".join(problems))
    note = args.note if args.note is not None else workflow_notes().get(Path(args.workflow).stem)
    write_text(args.out, json.dumps(api_to_ui(graph, info, note=note), indent=1) + "\n")
    return 0


def run(args: argparse.Namespace) -> int:
    import torch

    from distill_core.report import write_png

    graph = read_api_workflow(args.workflow)
    if args.models:
        os.environ["DISTILL_MODELS_DIR"] = args.models
    if args.output:
        os.environ["DISTILL_OUTPUT_DIR"] = args.output
    out_dir = Path(os.environ.get("DISTILL_OUTPUT_DIR", "output"))
    results = run_graph(graph, lambda nid, kind, ui: print(f"[{nid} {kind}] " + " ".join(ui.get("text", []))))
    for nid, node in graph.items():
        cls = node_pack().NODE_CLASS_MAPPINGS[node["class_type"]]
        if not cls.OUTPUT_NODE:
            continue
        images = [(value, name) for value, kind, name in zip(results[nid], cls.RETURN_TYPES, cls.RETURN_NAMES)
                  if kind == "IMAGE"]
        for k, (value, name) in enumerate(images):  # the first as <workflow>_<node>.png, others by output name
            pixels = (torch.cat(list(value), dim=1) * 255).round().clamp(0, 255).byte()
            file = f"{Path(args.workflow).stem}_{nid}{'_' + name if k else ''}.png"
            print(f"wrote {write_png(pixels, out_dir / file)}")
    return 0
