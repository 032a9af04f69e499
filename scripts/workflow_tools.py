"""Example workflows: the UI files are the source, their API twins are generated from them.

workflows/ui/<title>.json is what a user drags into ComfyUI and what the template browser lists
(example_workflows/ links to that folder; the card is titled by the file name, with <title>.jpg beside
it). Edit those files as the frontend saves them (or in the frontend: open, arrange, save). Each names its
API twin in extra.iqa_adapter_example; workflows/api/<name>.json is generated from it, the prompt the
frontend's own graphToPrompt queues (tests/test_browser.py compares the two):

    python -m comfyui_iqa_adapter.scripts.workflow_tools convert     # ui/*.json -> api/<name>.json
    python -m comfyui_iqa_adapter.scripts.workflow_tools check       # validate ui/*.json, fail if api/ is stale
    python -m comfyui_iqa_adapter.scripts.workflow_tools thumbnails  # redraw ui/<title>.jpg (make_thumbnails.py)

A server is started (ComfyServer) unless --url points at a running one: its /object_info is the ground
truth of every node's inputs, widget order and output types.

UI format (workflow JSON version 0.4): nodes with id, type, pos, size, inputs (sockets and widgets
driven by a link: name, type, link[, widget]), outputs (name, type, links, slot_index), widgets_values
in the order of the node's widget inputs (required, then optional), where the frontend adds one extra
value after a seed-like INT (`control_after_generate`) and after an image-upload combo ("image");
links are [id, from_node, from_slot, to_node, to_slot, type]. Notes, muted and bypassed nodes are not
sent to the server.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
UI_DIR = ROOT / "workflows" / "ui"
API_DIR = ROOT / "workflows" / "api"
EXAMPLE_KEY = "iqa_adapter_example"  # extra.<key> of a UI file = its API twin's name
TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT: a node's title bar is drawn above pos[1]

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # no backend class: never sent to /prompt
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".gguf")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MUTED_MODES = (2, 4)  # never / bypass
SEED_NAMES = ("seed", "noise_seed")  # the frontend adds a control widget to these by name too


class WorkflowError(ValueError):
    pass


# --------------------------------------------------------------------------------------------------
# object_info helpers
# --------------------------------------------------------------------------------------------------

def _input_specs(info: dict) -> list[tuple[str, list, bool]]:
    """[(name, spec, required)] in the node's declared order (input_order when present)."""
    inputs = info.get("input", {})
    order = info.get("input_order", {})
    out = []
    for group, required in (("required", True), ("optional", False)):
        specs = inputs.get(group, {}) or {}
        names = order.get(group) or list(specs)
        out += [(name, specs[name], required) for name in names if name in specs]
    return out


def input_type(spec) -> str:
    kind = spec[0]
    return "COMBO" if isinstance(kind, list) else str(kind)


def input_options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def combo_values(spec) -> list:
    if isinstance(spec[0], list):
        return list(spec[0])
    return list(input_options(spec).get("options", []))


def is_widget(spec) -> bool:
    options = input_options(spec)
    if options.get("forceInput"):
        return False
    return input_type(spec) in WIDGET_TYPES


def widget_inputs(info: dict) -> list[tuple[str, list]]:
    return [(name, spec) for name, spec, _ in _input_specs(info) if is_widget(spec)]


def extra_widget_values(spec, name: str = "") -> int:
    """Values the frontend stores after this widget's own value (seed control, upload button)."""
    options = input_options(spec)
    extra = 0
    if options.get("control_after_generate") or (name in SEED_NAMES and input_type(spec) == "INT"):
        extra += 1
    if options.get("image_upload"):
        extra += 1
    return extra


# --------------------------------------------------------------------------------------------------
# UI -> API
# --------------------------------------------------------------------------------------------------

def _links_by_id(ui: dict) -> dict[int, list]:
    links = {}
    for link in ui.get("links", []):
        if isinstance(link, dict):  # newer serialisation
            link = [link[key] for key in ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")]
        links[int(link[0])] = link
    return links


def _widget_values_by_name(node: dict, info: dict) -> dict:
    values = node.get("widgets_values", [])
    if isinstance(values, dict):
        return dict(values)
    out, index = {}, 0
    for name, spec in widget_inputs(info):
        if index >= len(values):
            raise WorkflowError(f"node {node['id']} ({node['type']}): widgets_values has {len(values)} values, "
                                f"no value for widget {name!r}")
        out[name] = values[index]
        index += 1 + extra_widget_values(spec, name)
    if index != len(values):
        raise WorkflowError(f"node {node['id']} ({node['type']}): widgets_values has {len(values)} values, the node's "
                            f"widgets take {index}")
    return out


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The API prompt the frontend would queue for this UI workflow."""
    links = _links_by_id(ui)
    nodes = {int(n["id"]): n for n in ui["nodes"]}
    api = {}
    for node in ui["nodes"]:
        kind = node["type"]
        if kind in FRONTEND_ONLY or node.get("mode", 0) in MUTED_MODES:
            continue
        if kind not in object_info:
            raise WorkflowError(f"node {node['id']}: unknown node type {kind!r} (not in the server's /object_info)")
        info = object_info[kind]
        inputs = _widget_values_by_name(node, info)
        for socket in node.get("inputs", []) or []:
            link_id = socket.get("link")
            if link_id is None:
                continue
            link = links.get(int(link_id))
            if link is None:
                raise WorkflowError(f"node {node['id']} ({kind}): input {socket['name']!r} uses missing link {link_id}")
            origin = nodes.get(int(link[1]))
            if origin is None or origin["type"] in FRONTEND_ONLY:
                raise WorkflowError(f"link {link_id}: origin node {link[1]} is missing or not a backend node")
            inputs[socket["name"]] = [str(link[1]), int(link[2])]
        title = node.get("title") or info.get("display_name") or kind
        api[str(node["id"])] = {"inputs": inputs, "class_type": kind, "_meta": {"title": title}}
    return api


# --------------------------------------------------------------------------------------------------
# Validation against /object_info
# --------------------------------------------------------------------------------------------------

def _is_file_combo(name: str, spec, values: list) -> bool:
    """Model/image file pickers: their options depend on the user's folders, so any file name is fine."""
    options = input_options(spec)
    if options.get("image_upload"):
        return True
    if any(isinstance(v, str) and v.lower().endswith(MODEL_SUFFIXES) for v in values):
        return True
    return name.endswith("_name") or name in ("ckpt_name", "file", "image")


def _check_widget(node_label: str, name: str, spec, value, errors: list[str]) -> None:
    kind = input_type(spec)
    options = input_options(spec)
    if kind == "COMBO":
        values = combo_values(spec)
        if value in values:
            return
        if isinstance(value, str) and _is_file_combo(name, spec, values) and \
                value.lower().endswith(MODEL_SUFFIXES + IMAGE_SUFFIXES):
            return
        errors.append(f"{node_label}: {name} = {value!r} is not one of {values[:20]}")
    elif kind == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{node_label}: {name} = {value!r} is not an integer")
        elif ("min" in options and value < options["min"]) or ("max" in options and value > options["max"]):
            errors.append(f"{node_label}: {name} = {value} outside [{options.get('min')}, {options.get('max')}]")
    elif kind == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{node_label}: {name} = {value!r} is not a number")
        elif ("min" in options and value < options["min"]) or ("max" in options and value > options["max"]):
            errors.append(f"{node_label}: {name} = {value} outside [{options.get('min')}, {options.get('max')}]")
    elif kind == "BOOLEAN":
        if not isinstance(value, bool):
            errors.append(f"{node_label}: {name} = {value!r} is not a boolean")
    elif kind == "STRING":
        if not isinstance(value, str):
            errors.append(f"{node_label}: {name} = {value!r} is not a string")


def _types_match(a: str, b: str) -> bool:
    if a == "*" or b == "*":
        return True
    return bool(set(str(a).split(",")) & set(str(b).split(",")))


def validate_ui(ui: dict, object_info: dict) -> list[str]:
    """Problems of a UI workflow against the server: unknown node types, bad widget values, links whose
    types do not match, required inputs left unconnected. [] = valid."""
    errors: list[str] = []
    if ui.get("version") is None or not isinstance(ui.get("nodes"), list):
        return ["not a UI-format workflow (needs 'version', 'nodes', 'links')"]
    links = _links_by_id(ui)
    nodes = {int(n["id"]): n for n in ui["nodes"]}
    if len(nodes) != len(ui["nodes"]):
        errors.append("duplicate node ids")
    for node in ui["nodes"]:
        kind = node["type"]
        label = f"node {node['id']} ({kind})"
        if kind in FRONTEND_ONLY:
            continue
        info = object_info.get(kind)
        if info is None:
            errors.append(f"{label}: unknown node type (not registered on the server)")
            continue
        try:
            widgets = _widget_values_by_name(node, info)
        except WorkflowError as error:
            errors.append(str(error))
            widgets = {}
        specs = {name: (spec, required) for name, spec, required in _input_specs(info)}
        linked = {s["name"] for s in node.get("inputs", []) or [] if s.get("link") is not None}
        for name, value in widgets.items():
            if name not in linked:
                _check_widget(label, name, specs[name][0], value, errors)
        for name, (spec, required) in specs.items():
            if required and not is_widget(spec) and name not in linked:
                errors.append(f"{label}: required input {name!r} ({input_type(spec)}) is not connected")
        for slot, socket in enumerate(node.get("inputs", []) or []):
            if socket["name"] not in specs:
                errors.append(f"{label}: input {socket['name']!r} does not exist on this node")
                continue
            link_id = socket.get("link")
            if link_id is None:
                continue
            link = links.get(int(link_id))
            if link is None:
                errors.append(f"{label}: input {socket['name']!r} uses missing link {link_id}")
                continue
            if int(link[3]) != int(node["id"]) or int(link[4]) != slot:
                errors.append(f"link {link_id}: its target ({link[3]}, slot {link[4]}) is not {label} slot {slot}")
            origin = nodes.get(int(link[1]))
            origin_info = object_info.get(origin["type"]) if origin else None
            if origin_info is None:
                errors.append(f"link {link_id}: origin node {link[1]} is missing or unknown")
                continue
            outputs = origin_info.get("output", [])
            if int(link[2]) >= len(outputs):
                errors.append(f"link {link_id}: {origin['type']} has no output slot {link[2]}")
                continue
            out_type, in_type = outputs[int(link[2])], input_type(specs[socket["name"]][0])
            if not _types_match(out_type, in_type) or not _types_match(out_type, link[5]):
                errors.append(f"link {link_id}: {origin['type']} output {link[2]} ({out_type}) -> {label} "
                              f"{socket['name']} ({in_type}); link says {link[5]}")
        for slot, output in enumerate(node.get("outputs", []) or []):
            for link_id in output.get("links") or []:
                link = links.get(int(link_id))
                if link is None or int(link[1]) != int(node["id"]) or int(link[2]) != slot:
                    errors.append(f"{label}: output {slot} lists link {link_id}, which does not start there")
    return errors


# --------------------------------------------------------------------------------------------------
# Layout facts of a UI file (as LiteGraph draws it)
# --------------------------------------------------------------------------------------------------

def rectangle(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a node as drawn, title bar included."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


def group_rectangle(group: dict) -> tuple[float, float, float, float]:
    x, y, w, h = group["bounding"]
    return x, y, x + w, y + h


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def overlapping_nodes(ui: dict) -> list[tuple[int, int]]:
    """Pairs of node ids whose drawn rectangles overlap."""
    boxes = [(n["id"], rectangle(n)) for n in ui["nodes"]]
    return [(id_a, id_b) for i, (id_a, a) in enumerate(boxes) for id_b, b in boxes[i + 1:] if _overlap(a, b)]


def group_problems(ui: dict) -> list[str]:
    """Group frames that overlap each other, or that cover a node which is not inside them (LiteGraph
    makes a node a group's member by position, so such a node would move with the wrong group)."""
    problems = []
    frames = [(g["title"], group_rectangle(g)) for g in ui.get("groups", [])]
    for i, (name_a, a) in enumerate(frames):
        problems += [f"groups {name_a!r} and {name_b!r} overlap" for name_b, b in frames[i + 1:] if _overlap(a, b)]
    for name, frame in frames:
        for node in ui["nodes"]:
            box = rectangle(node)
            inside = frame[0] <= box[0] and box[2] <= frame[2] and frame[1] <= box[1] and box[3] <= frame[3]
            if _overlap(box, frame) and not inside:
                problems.append(f"group {name!r} partly covers node {node['id']} ({node.get('title') or node['type']})")
    return problems


def layout_problems(ui: dict) -> list[str]:
    return [f"nodes {a} and {b} overlap (title bar included)" for a, b in overlapping_nodes(ui)] + group_problems(ui)


# --------------------------------------------------------------------------------------------------
# The examples: whatever UI files workflows/ui holds
# --------------------------------------------------------------------------------------------------

def examples(ui_dir: pathlib.Path = UI_DIR) -> dict[str, pathlib.Path]:
    """API twin name -> UI file, for every UI workflow (each names its twin in extra.<EXAMPLE_KEY>)."""
    found = {}
    for path in sorted(ui_dir.glob("*.json")):
        name = slug_of(json.loads(path.read_text()))
        if not name:
            raise WorkflowError(f"{path.name}: extra.{EXAMPLE_KEY} (its API twin's name) is missing")
        if name in found:
            raise WorkflowError(f"{path.name} and {found[name].name} both name the API twin {name!r}")
        found[name] = path
    return found


def slug_of(ui: dict) -> str:
    return ui.get("extra", {}).get(EXAMPLE_KEY, "")


def api_path(name: str, api_dir: pathlib.Path = API_DIR) -> pathlib.Path:
    return api_dir / f"{name}.json"


def thumbnail_path(ui_file: pathlib.Path) -> pathlib.Path:
    return ui_file.with_suffix(".jpg")  # the frontend asks for <template>.jpg


def convert_all(object_info: dict, write: bool = True) -> dict[str, dict]:
    """{name: api prompt} for every UI file; writes api/<name>.json when `write`."""
    out = {}
    for name, path in examples().items():
        out[name] = ui_to_api(json.loads(path.read_text()), object_info)
        if write:
            api_path(name).write_text(json.dumps(out[name], indent=2) + "\n")
    return out


def _object_info(url: str | None) -> tuple[dict, object]:
    from comfyui_iqa_adapter.scripts.comfy_server import ComfyServer, ensure_pack_linked, host_dir

    if url:
        import urllib.request
        with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=120) as r:
            return json.loads(r.read()), None
    ensure_pack_linked(host_dir())
    server = ComfyServer(pathlib.Path(tempfile.mkdtemp(prefix="iqa-wf-")), host_dir()).start()
    return server.object_info(), server


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["convert", "check", "thumbnails"])
    parser.add_argument("--url", help="a running ComfyUI server (default: start one)")
    args = parser.parse_args(argv)
    if args.command == "thumbnails":
        from comfyui_iqa_adapter.scripts.make_thumbnails import write_thumbnails
        for path in write_thumbnails({name: thumbnail_path(ui) for name, ui in examples().items()}):
            print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KB)")
        return 0
    object_info, server = _object_info(args.url)
    try:
        failures = 0
        for path in examples().values():
            ui = json.loads(path.read_text())
            errors = validate_ui(ui, object_info) + layout_problems(ui)
            for error in errors:
                print(f"{path.name}: {error}", file=sys.stderr)
            failures += bool(errors)
        stale = {api_path(name) for name in examples()} ^ set(API_DIR.glob("*.json"))
        for name, api in convert_all(object_info, write=args.command == "convert").items():
            target = api_path(name)
            if args.command == "convert":
                print(f"wrote {target.relative_to(ROOT)}")
            elif not target.exists() or json.loads(target.read_text()) != api:
                stale.add(target)
        for target in sorted(stale):
            print(f"{target.relative_to(ROOT)} is stale or has no UI file: run `python -m "
                  "comfyui_iqa_adapter.scripts.workflow_tools convert` (and remove twins of removed examples)",
                  file=sys.stderr)
        return 1 if failures or stale else 0
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
