"""Example workflows: UI format (what a user drags into ComfyUI) <-> API format (what /prompt runs).

The UI files in workflows/ui/ are the source of truth (example_workflows/ links to that folder, so the
host lists them in its template browser, titled by file name, with <name>.jpg as the thumbnail). They are
named for people (EXAMPLES); their API twins in workflows/api/ keep short names for scripts and are
generated from them:

    python scripts/workflow_tools.py convert              # ui/<title>.json -> api/<name>.json (needs a server)
    python scripts/workflow_tools.py check                # validate ui/*.json, fail if api/ is stale
    python scripts/workflow_tools.py author               # (re)write ui/*.json from the specs below
    python scripts/workflow_tools.py thumbnails           # redraw ui/<title>.jpg (scripts/make_thumbnails.py)

`author` lays each example out in columns, data flowing left to right (loaders, text/conditioning,
apply/patch, sampler, decode, score/save/report), with realistic node sizes and no overlaps
(GraphBuilder.layout); `check` and `convert` also report nodes whose rectangles overlap.

A server is started (ComfyServer) unless --url points at a running one: its /object_info is the ground
truth of every node's inputs, widget order and output types.

UI format (workflow JSON version 0.4): nodes with id, type, pos, size, inputs (sockets and widgets
driven by a link: name, type, link[, widget]), outputs (name, type, links, slot_index), widgets_values
in the order of the node's widget inputs (required, then optional), where the frontend adds one extra
value after a seed-like INT (`control_after_generate`) and after an image-upload combo ("image");
links are [id, from_node, from_slot, to_node, to_slot, type].
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

SCRIPTS = pathlib.Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
UI_DIR = ROOT / "workflows" / "ui"
API_DIR = ROOT / "workflows" / "api"

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
            link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link["type"]]
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
# Authoring: build UI files from compact specs (the result is then the source of truth)
# --------------------------------------------------------------------------------------------------

# Layout. The frontend renders a node at its stored size (growing it only up to computeSize()), with the
# title bar drawn above pos[1]; so stored sizes must be realistic and stacking must count the title bar.
TITLE_HEIGHT = 30     # LiteGraph.NODE_TITLE_HEIGHT
SLOT_ROW = 20         # LiteGraph.NODE_SLOT_HEIGHT: one input/output socket row
WIDGET_ROW = 24       # LiteGraph.NODE_WIDGET_HEIGHT + 4 px spacing
MULTILINE_EXTRA = 90  # a multiline text box beyond its one widget row
NODE_PADDING = 16     # below the last row
COLUMN_GAP = 50
ROW_GAP = 40          # between a node's bottom and the next node's title bar
MARGIN = 20
GROUP_PAD = 10        # a group's frame around its nodes
GROUP_HEADER = 44     # a group's title strip above its first node's title bar
GROUP_COLORS = {"Models": "#3f789e", "Quality target": "#8A8", "Prompt": "#a1309b", "Sample": "#b58b2a",
                "Score": "#88A", "Images": "#3f789e"}
# The default view shows the whole graph in a 1366x768 window (a laptop), in the area left free by the
# sidebar, top bar and run button, at no smaller zoom than where the frontend stops drawing text (~0.57).
VIEW_AREA = (75, 135, 1265, 570)  # x, y, width, height in screen pixels (below the Run bar)
VIEW_SCALE = (0.6, 0.8)
WINDOW = (1366, 768)


def node_height(sockets: int, widget_rows: int, multiline: int) -> int:
    """The body height (without title bar) that fits a node's rows, a little above the frontend's own
    computeSize() for every node in the examples (checked by tests/test_browser.py)."""
    return NODE_PADDING + SLOT_ROW * sockets + WIDGET_ROW * widget_rows + MULTILINE_EXTRA * multiline


def note_height(text: str, width: int) -> int:
    """A Note's body height that shows all of its text at `width` (monospace, ~7.5 px a character)."""
    chars_per_line = max(1, int((width - 24) / 7.5))
    lines = sum(max(1, -(-len(paragraph) // chars_per_line)) for paragraph in text.split("\n"))
    return 40 + 16 * lines


def rectangle(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a node as drawn, title bar included."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


def group_problems(ui: dict) -> list[str]:
    """Group frames that overlap each other, or that cover a node which is not inside them (LiteGraph
    makes a node a group's member by position, so such a node would move with the wrong group)."""
    problems = []
    frames = [(g["title"], g["bounding"]) for g in ui.get("groups", [])]
    for i, (name_a, (ax, ay, aw, ah)) in enumerate(frames):
        for name_b, (bx, by, bw, bh) in frames[i + 1:]:
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                problems.append(f"groups {name_a!r} and {name_b!r} overlap")
    for name, (gx, gy, gw, gh) in frames:
        for node in ui["nodes"]:
            left, top, right, bottom = rectangle(node)
            touches = left < gx + gw and gx < right and top < gy + gh and gy < bottom
            inside = gx <= left and right <= gx + gw and gy <= top and bottom <= gy + gh
            if touches and not inside:
                problems.append(f"group {name!r} partly covers node {node['id']} ({node.get('title') or node['type']})")
    return problems


def overlapping_nodes(ui: dict) -> list[tuple[int, int]]:
    """Pairs of node ids whose drawn rectangles overlap."""
    boxes = [(n["id"], rectangle(n)) for n in ui["nodes"]]
    pairs = []
    for i, (id_a, a) in enumerate(boxes):
        for id_b, b in boxes[i + 1:]:
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                pairs.append((id_a, id_b))
    return pairs


class GraphBuilder:
    """Builds a UI workflow with widget order, extra widget values and output types from /object_info.

    Nodes are placed in columns (data flows left to right) and stacked in the order they are added;
    layout() turns the column assignment and each node's estimated size into positions. Nodes may belong
    to a named group (a frame with a title: Models / Quality target / Prompt / Sample / Score)."""

    def __init__(self, object_info: dict):
        self.info = object_info
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self._by_id: dict[int, dict] = {}
        self._column: dict[int, int] = {}
        self._group: dict[int, str | None] = {}
        self.models: list[dict] = []

    def add(self, kind: str, column: int | None, widgets: dict | None = None, links: dict | None = None,
            title: str | None = None, size=None, color: str | None = None, group: str | None = None,
            models: list[dict] | None = None) -> int:
        """Add a node to `column` (0 = leftmost; None = the shortest column, for notes), below the nodes
        added there before. `size` is a minimum:
        the width is widened to the column's, the height raised to what the node's rows need. `models`:
        download metadata of the files the node's widgets name ({name, url, directory}), which the
        frontend's missing-models dialog offers."""
        node_id = len(self.nodes) + 1
        widgets = dict(widgets or {})
        links = dict(links or {})
        node = {"id": node_id, "type": kind, "pos": [0, 0], "size": list(size or [300, 60]), "flags": {},
                "order": node_id - 1, "mode": 0, "inputs": [], "outputs": [], "properties": {}}
        self._column[node_id] = column
        self._group[node_id] = group
        if kind in FRONTEND_ONLY:
            node["widgets_values"] = [widgets["text"]]
            node["title"] = title or "Note"
            node["color"], node["bgcolor"] = "#432", "#653"
            self.nodes.append(node)
            self._by_id[node_id] = node
            return node_id
        info = self.info[kind]
        node["properties"] = {"Node name for S&R": kind}
        if models:
            node["properties"]["models"] = [dict(m) for m in models]
            self.models += [dict(m) for m in models if m not in self.models]
        unknown = set(widgets) | set(links)
        values = []
        for name, spec, _ in _input_specs(info):
            unknown.discard(name)
            if is_widget(spec):
                value = widgets[name] if name in widgets else input_options(spec).get("default")
                if value is None and input_type(spec) == "COMBO":
                    choices = combo_values(spec)
                    value = choices[0] if choices else ""
                if value is None:
                    value = {"STRING": "", "INT": 0, "FLOAT": 0.0, "BOOLEAN": False}[input_type(spec)]
                values.append(value)
                extra = extra_widget_values(spec, name)
                if extra and input_options(spec).get("image_upload"):
                    values.append("image")
                elif extra:
                    values.append("fixed")
                if name in links:
                    node["inputs"].append({"name": name, "type": input_type(spec), "widget": {"name": name},
                                           "link": None})
            else:
                node["inputs"].append({"name": name, "type": input_type(spec), "link": None})
        if unknown:
            raise WorkflowError(f"{kind}: no input(s) named {sorted(unknown)}")
        node["widgets_values"] = values
        multiline = sum(1 for name, spec in widget_inputs(info) if input_options(spec).get("multiline"))
        sockets = max(len([i for i in node["inputs"] if "widget" not in i]), len(info.get("output", [])))
        node["size"][1] = max(node["size"][1], node_height(sockets, len(values), multiline))
        for slot, out_type in enumerate(info.get("output", [])):
            names = info.get("output_name") or info.get("output", [])
            node["outputs"].append({"name": names[slot], "type": out_type, "slot_index": slot, "links": []})
        if title:
            node["title"] = title
        if color:
            node["color"] = color
        self.nodes.append(node)
        self._by_id[node_id] = node
        for name, (origin_id, origin_slot) in links.items():
            self.connect(origin_id, origin_slot, node_id, name)
        return node_id

    def connect(self, origin_id: int, origin_slot: int, target_id: int, input_name: str) -> None:
        target = self._by_id[target_id]
        slot = next(i for i, s in enumerate(target["inputs"]) if s["name"] == input_name)
        link_id = len(self.links) + 1
        out_type = self._by_id[origin_id]["outputs"][origin_slot]["type"]
        self.links.append([link_id, origin_id, origin_slot, target_id, slot, out_type])
        target["inputs"][slot]["link"] = link_id
        self._by_id[origin_id]["outputs"][origin_slot]["links"].append(link_id)

    def layout(self) -> None:
        """Columns left to right, each as wide as its widest node (notes excepted: they take the column's
        width and the height their text needs), nodes stacked top-down ROW_GAP apart; a node that starts
        a group leaves room for the group's title strip above it."""
        auto = [n for n in self.nodes if self._column[n["id"]] is None]  # notes: the shortest column
        for note in auto:
            heights = {}
            for node in self.nodes:
                column = self._column[node["id"]]
                if column is not None:
                    heights[column] = heights.get(column, 0) + node["size"][1] + TITLE_HEIGHT + ROW_GAP
            self._column[note["id"]] = min(sorted(heights), key=lambda c: heights[c])
        x = MARGIN
        for column in sorted(set(self._column.values())):
            members = [n for n in self.nodes if self._column[n["id"]] == column]
            widths = [n["size"][0] for n in members if n["type"] not in FRONTEND_ONLY]
            width = max(widths or [n["size"][0] for n in members])
            y = MARGIN + GROUP_HEADER + TITLE_HEIGHT
            previous = None
            for index, node in enumerate(members):
                group = self._group[node["id"]]
                if index and group != previous:
                    y += GROUP_HEADER + 2 * GROUP_PAD
                node["size"][0] = width
                if node["type"] in FRONTEND_ONLY:
                    node["size"][1] = max(node["size"][1], note_height(node["widgets_values"][0], width))
                node["pos"] = [x, y]
                y += node["size"][1] + ROW_GAP + TITLE_HEIGHT
                previous = group
            x += width + COLUMN_GAP

    def groups(self) -> list[dict]:
        """One frame per group around its nodes (title strip above); frames never overlap (see layout)."""
        out = []
        names = list(dict.fromkeys(g for g in self._group.values() if g))
        for index, name in enumerate(names):
            boxes = [rectangle(n) for n in self.nodes if self._group[n["id"]] == name]
            left, top = min(b[0] for b in boxes) - GROUP_PAD, min(b[1] for b in boxes) - GROUP_HEADER
            right, bottom = max(b[2] for b in boxes) + GROUP_PAD, max(b[3] for b in boxes) + GROUP_PAD
            out.append({"id": index + 1, "title": name, "bounding": [left, top, right - left, bottom - top],
                        "color": GROUP_COLORS.get(name, "#3f789e"), "font_size": 22, "flags": {}})
        return out

    def default_view(self, groups: list[dict]) -> dict:
        """extra.ds: scale and offset that show the whole graph (LiteGraph: screen = (graph + offset) * scale)."""
        boxes = [rectangle(n) for n in self.nodes]
        boxes += [(g["bounding"][0], g["bounding"][1], g["bounding"][0] + g["bounding"][2],
                   g["bounding"][1] + g["bounding"][3]) for g in groups]
        left, top = min(b[0] for b in boxes), min(b[1] for b in boxes)
        width, height = max(b[2] for b in boxes) - left, max(b[3] for b in boxes) - top
        view_x, view_y, view_w, view_h = VIEW_AREA
        scale = min(view_w / width, view_h / height)
        scale = round(min(max(scale, VIEW_SCALE[0]), VIEW_SCALE[1]), 3)
        return {"scale": scale, "offset": [round(view_x / scale - left, 1), round(view_y / scale - top, 1)]}

    def workflow(self, slug: str) -> dict:
        self.layout()
        for node in self.nodes:
            for output in node["outputs"]:
                if not output["links"]:
                    output["links"] = None
        groups = self.groups()
        workflow = {"id": workflow_id(slug), "revision": 0,
                    "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                    "links": self.links, "groups": groups, "config": {},
                    "extra": {"ds": self.default_view(groups), EXAMPLE_KEY: slug}, "version": 0.4}
        if self.models:
            workflow["models"] = self.models
        return workflow


# --------------------------------------------------------------------------------------------------
# The examples
# --------------------------------------------------------------------------------------------------

# API twin name (stable, for scripts) -> UI file name. The template browser titles a custom node's
# template with its file name, so the UI files are named for people.
EXAMPLES = {
    "sdxl_quality_target": "SDXL image at a chosen quality",
    "sd15_quality_target": "SD1.5 image at a chosen quality",
    "degradation_sweep": "Quality sweep from worst to best (SDXL)",
    "reference_transfer": "Quality of a reference image, img2img (SDXL)",
    "gradient_guidance": "Quality guidance from a metric gradient (SDXL)",
    "score_images": "Score your images with a quality metric",
}
EXAMPLE_KEY = "iqa_adapter_example"  # extra.<key> = the API twin's name, in every UI file


def workflow_id(slug: str) -> str:
    """A stable, unique workflow id per example."""
    import uuid
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-iqa-adapter/examples/{slug}"))


def ui_path(slug: str, ui_dir: pathlib.Path = UI_DIR) -> pathlib.Path:
    return ui_dir / f"{EXAMPLES[slug]}.json"


def api_path(slug: str, api_dir: pathlib.Path = API_DIR) -> pathlib.Path:
    return api_dir / f"{slug}.json"


def thumbnail_path(slug: str, ui_dir: pathlib.Path = UI_DIR) -> pathlib.Path:
    return ui_dir / f"{EXAMPLES[slug]}.jpg"  # the frontend asks for <template>.jpg


def slug_of(ui: dict) -> str:
    return ui.get("extra", {}).get(EXAMPLE_KEY, "")


SDXL_CKPT = "sd_xl_base_1.0.safetensors"
SD15_CKPT = "v1-5-pruned-emaonly-fp16.safetensors"
CHECKPOINT_MODELS = {
    SDXL_CKPT: {"name": SDXL_CKPT, "directory": "checkpoints",
                "url": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors"},
    SD15_CKPT: {"name": SD15_CKPT, "directory": "checkpoints",
                "url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly-fp16.safetensors"},
}
SDXL_ADAPTER = "iqa_adapter_sdxl_topiq_nr_laion_aes.safetensors"
SDXL_REF_ADAPTER = "iqa_adapter_sdxl_reference.safetensors"
SD15_ADAPTER = "iqa_adapter_sd15_topiq_nr_laion_aes.safetensors"
# The authors' prompt when none is given is "best quality, high quality"; the examples prefix it to a subject.
PROMPT = "best quality, high quality, a lighthouse on a cliff at sunset"
SD15_NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality"  # the authors' SD1.5 negative
STEPS, SDXL_CFG, SD15_CFG = 30, 5.0, 7.5  # the authors' defaults (adapter weight 1.0)

WHERE_ADAPTERS = ("Adapters: the authors' SDXL adapters are linked from github.com/X1716/IQA-Adapter (a Google "
                  "Drive folder); put them in models/iqa_adapter. Metric weights go in models/iqa. Nothing is "
                  "downloaded; missing base models are offered for download when the workflow opens.")
SDXL_DEFAULTS = ("Authors' settings: 30 steps, CFG 5.0, weight 1.0, no negative prompt (SDXL then uses zeros: "
                 "Conditioning Zero Out). Their prompt when none is given is 'best quality, high quality'; here "
                 "it leads the subject.")
SCORE_NOTE = ("IQA Score squashes images to 512x512 as the CC3M statistics were made, so a score compares "
              "with the target percentile.")


def _checkpoint(b: GraphBuilder, ckpt: str) -> int:
    return b.add("CheckpointLoaderSimple", 0, {"ckpt_name": ckpt}, size=[300, 100], group="Models",
                 models=[CHECKPOINT_MODELS[ckpt]])


def _prompts(b: GraphBuilder, ckpt_id: int, column: int, sdxl: bool, text: str = PROMPT):
    """Positive prompt, and the negative: SDXL = zeroed conditioning (the authors pass no negative and SDXL
    base zeroes empty prompts, text and pooled); SD1.5 = the authors' negative prompt."""
    pos = b.add("CLIPTextEncode", column, {"text": text}, {"clip": (ckpt_id, 1)}, title="Positive prompt",
                size=[320, 130], group="Prompt")
    if sdxl:
        neg = b.add("ConditioningZeroOut", column, {}, {"conditioning": (pos, 0)},
                    title="Negative: zeros (SDXL, as the authors)", size=[320, 50], group="Prompt")
    else:
        neg = b.add("CLIPTextEncode", column, {"text": SD15_NEGATIVE}, {"clip": (ckpt_id, 1)},
                    title="Negative prompt (the authors')", size=[320, 130], group="Prompt")
    return pos, neg


def _sampler(b: GraphBuilder, model, pos, neg, latent, cfg, column, seed=42, title=None, denoise=1.0):
    return b.add("KSampler", column, {"seed": seed, "steps": STEPS, "cfg": cfg, "sampler_name": "euler",
                                      "scheduler": "normal", "denoise": denoise},
                 {"model": model, "positive": (pos, 0), "negative": (neg, 0), "latent_image": (latent, 0)},
                 title=title, size=[280, 260], group="Sample")


def _score(b: GraphBuilder, images, column: int, metrics: list[tuple[int, int]], title=None) -> int:
    links = {"images": images}
    for name, metric in zip(("metric", "metric_2", "metric_3"), metrics):
        links[name] = metric
    return b.add("IQAScore", column, {}, links, title=title, size=[320, 150], group="Score")


def example_specs() -> dict:
    """name -> function(builder) that adds the nodes of that example."""

    def quality_target(b, ckpt, adapter, size, cfg, sdxl, note):
        c = _checkpoint(b, ckpt)
        a = b.add("IQAAdapterLoader", 0, {"adapter_name": adapter}, size=[300, 60], group="Models")
        m = b.add("IQAMetricLoader", 0, {"metric": "topiq_nr"}, title="Score metric", size=[300, 110],
                  group="Models")
        b.add("Note", None, {"text": note})
        t = b.add("IQAAdapterEncodeTarget", 1, {"quality": "best", "percentile": 99.0, "targets": ""},
                  {"adapter": (a, 0)}, size=[320, 200], group="Quality target")
        pos, neg = _prompts(b, c, 1, sdxl)
        ap = b.add("IQAAdapterApply", 2, {"weight": 1.0}, {"model": (c, 0), "adapter": (a, 0), "tokens": (t, 0)},
                   size=[280, 150], group="Sample")
        lat = b.add("EmptyLatentImage", 2, {"width": size, "height": size, "batch_size": 1}, size=[280, 110],
                    group="Sample")
        k = _sampler(b, (ap, 0), pos, neg, lat, cfg, 2)
        d = b.add("VAEDecode", 3, {}, {"samples": (k, 0), "vae": (c, 2)}, size=[280, 50], group="Sample")
        b.add("SaveImage", 3, {"filename_prefix": "iqa_adapter/quality_99"}, {"images": (d, 0)},
              size=[280, 300], group="Sample")
        _score(b, (d, 0), 4, [(m, 0)])

    def sdxl(b):
        quality_target(b, SDXL_CKPT, SDXL_ADAPTER, 1024, SDXL_CFG, True,
                       "An SDXL image at the quality you choose: pick 'best' ... 'worst', or 'custom' and a CC3M "
                       "percentile of the adapter's metrics (99 = better than 99% of CC3M photos; low targets "
                       "degrade on purpose). "
                       + SDXL_DEFAULTS + "\n" + WHERE_ADAPTERS + "\n" + SCORE_NOTE)

    def sd15(b):
        quality_target(b, SD15_CKPT, SD15_ADAPTER, 512, SD15_CFG, False,
                       "An SD1.5 image at the quality you choose (CC3M percentile: 99 best, 1 worst). Authors' "
                       "settings: 30 steps, CFG 7.5, weight 1.0, their negative prompt; their prompt when none is "
                       "given is 'best quality, high quality', here it leads the subject.\n"
                       "The authors published SDXL adapters only: use an SD1.5 adapter you trained, in "
                       "models/iqa_adapter with a <name>.json descriptor (the pack's models/README.md). "
                       + SCORE_NOTE)

    def sweep(b):
        c = _checkpoint(b, SDXL_CKPT)
        a = b.add("IQAAdapterLoader", 0, {"adapter_name": SDXL_ADAPTER}, size=[300, 60], group="Models")
        m = b.add("IQAMetricLoader", 0, {"metric": "topiq_nr"}, title="Score metric", size=[300, 110],
                  group="Models")
        b.add("Note", None, {"text": (
            "One sampler run renders a row of quality targets, from worst to best (CC3M percentile 1 to 99; "
            "spacing 'paper' gives the paper's 1/25/50/75/99). Image i gets target i; 'count' sets the batch "
            "size. IQA Score measures each image, and the Sweep Report saves a labelled grid, a chart of score "
            "against target (Spearman's rho) and CSV/JSON tables in output/iqa_sweep.\n" + WHERE_ADAPTERS)})
        s = b.add("IQATargetSweep", 1, {"metrics": "", "start": 1.0, "stop": 99.0, "steps": 8,
                                        "mode": "percentile", "spacing": "linear"},
                  {"adapter": (a, 0)}, size=[320, 280], group="Quality target")
        pos, neg = _prompts(b, c, 1, True)
        ap = b.add("IQAAdapterApply", 2, {"weight": 1.0}, {"model": (c, 0), "adapter": (a, 0), "tokens": (s, 0)},
                   size=[280, 150], group="Sample")
        lat = b.add("EmptyLatentImage", 2, {"width": 1024, "height": 1024, "batch_size": 8},
                    {"batch_size": (s, 2)}, size=[280, 110], group="Sample")
        k = _sampler(b, (ap, 0), pos, neg, lat, SDXL_CFG, 2)
        d = b.add("VAEDecode", 3, {}, {"samples": (k, 0), "vae": (c, 2)}, size=[200, 50], group="Sample")
        sc = _score(b, (d, 0), 4, [(m, 0)])
        b.add("IQASweepReport", 4, {"filename_prefix": "iqa_sweep/sweep"},
              {"images": (d, 0), "targets": (s, 1), "scores": (sc, 0)}, size=[360, 420], group="Score")

    def reference(b):
        c = _checkpoint(b, SDXL_CKPT)
        a = b.add("IQAAdapterLoader", 0, {"adapter_name": SDXL_REF_ADAPTER}, size=[300, 60], group="Models")
        em = b.add("IQAMetricLoader", 0, {"metric": "arniqa"}, title="Reference IQA model (extractor)",
                   size=[300, 110], group="Models")
        m = b.add("IQAMetricLoader", 0, {"metric": "topiq_nr"}, title="Score metric", size=[300, 110],
                  group="Models")
        b.add("Note", None, {"text": (
            "Copy the quality of a reference image (blur, JPEG, noise, colour shift), not its content, as the "
            "authors demo it: image-to-image (SDEdit) from the image you load as 'Image to re-render'; "
            "'denoise' on the KSampler sets how much is redrawn (lower keeps more of it). The reference "
            "adapter's descriptor names the IQA model whose activations encode the reference; which model, "
            "layers and pooling the authors used is not published, so the extractor is our reading.\n"
            + WHERE_ADAPTERS)})
        ref = b.add("LoadImage", 1, {"image": "reference.png"}, title="Quality reference", size=[300, 340],
                    group="Quality target")
        r = b.add("IQAAdapterEncodeReference", 1, {}, {"adapter": (a, 0), "reference": (ref, 0),
                                                        "metric": (em, 0)}, size=[300, 100], group="Quality target")
        pos, neg = _prompts(b, c, 2, True)
        content = b.add("LoadImage", 3, {"image": "content.png"}, title="Image to re-render", size=[300, 340],
                        group="Sample")
        enc = b.add("VAEEncode", 3, {}, {"pixels": (content, 0), "vae": (c, 2)}, size=[300, 50], group="Sample")
        ap = b.add("IQAAdapterApply", 4, {"weight": 1.0}, {"model": (c, 0), "adapter": (a, 0), "tokens": (r, 0)},
                   size=[280, 150], group="Sample")
        k = _sampler(b, (ap, 0), pos, neg, enc, SDXL_CFG, 4, denoise=0.6)
        d = b.add("VAEDecode", 4, {}, {"samples": (k, 0), "vae": (c, 2)}, size=[280, 50], group="Sample")
        b.add("SaveImage", 5, {"filename_prefix": "iqa_adapter/reference"}, {"images": (d, 0)},
              size=[280, 300], group="Score")
        _score(b, (d, 0), 5, [(m, 0)])

    def guidance(b):
        c = _checkpoint(b, SDXL_CKPT)
        a = b.add("IQAAdapterLoader", 0, {"adapter_name": SDXL_ADAPTER}, size=[300, 60], group="Models")
        guide_metric = b.add("IQAMetricLoader", 0, {"metric": "topiq_nr", "differentiable": True},
                             title="Guiding metric", size=[300, 110], group="Models")
        b.add("Note", None, {"text": (
            "The same seed twice: with the adapter alone (image 1) and with gradient quality guidance added at "
            "every step (image 2; the paper's first method). The scores show the guiding metric and a second "
            "one: guidance raises the metric it follows far more than others, and high scales make "
            "adversarial textures.\n" + WHERE_ADAPTERS)})
        t = b.add("IQAAdapterEncodeTarget", 1, {"quality": "best", "percentile": 99.0, "targets": ""},
                  {"adapter": (a, 0)}, size=[320, 200], group="Quality target")
        pos, neg = _prompts(b, c, 1, True)
        ap = b.add("IQAAdapterApply", 2, {"weight": 1.0}, {"model": (c, 0), "adapter": (a, 0), "tokens": (t, 0)},
                   size=[280, 150], group="Sample")
        gd = b.add("IQAGradientGuidance", 2, {"scale": 1.0},
                   {"model": (ap, 0), "vae": (c, 2), "metric": (guide_metric, 0)}, size=[280, 280], group="Sample")
        lat = b.add("EmptyLatentImage", 2, {"width": 1024, "height": 1024, "batch_size": 1}, size=[280, 110],
                    group="Sample")
        k1 = _sampler(b, (ap, 0), pos, neg, lat, SDXL_CFG, 3, title="KSampler (adapter only)")
        k2 = _sampler(b, (gd, 0), pos, neg, lat, SDXL_CFG, 3, title="KSampler (adapter + guidance)")
        d1 = b.add("VAEDecode", 4, {}, {"samples": (k1, 0), "vae": (c, 2)}, size=[240, 50], group="Sample")
        d2 = b.add("VAEDecode", 4, {}, {"samples": (k2, 0), "vae": (c, 2)}, size=[240, 50], group="Sample")
        # Batch Images (ImageBatch) is deprecated on ComfyUI >= 0.21 in favour of BatchImagesNode, which the
        # older hosts we support do not have: kept until every tested host has the replacement.
        both = b.add("ImageBatch", 4, {}, {"image1": (d1, 0), "image2": (d2, 0)}, size=[240, 70], group="Sample")
        b.add("SaveImage", 4, {"filename_prefix": "iqa_adapter/unguided_vs_guided"}, {"images": (both, 0)},
              size=[240, 260], group="Sample")
        m1 = b.add("IQAMetricLoader", 5, {"metric": "topiq_nr"}, title="Score: guiding metric",
                   size=[300, 110], group="Score")
        m2 = b.add("IQAMetricLoader", 5, {"metric": "musiq"}, title="Score: second metric",
                   size=[300, 110], group="Score")
        _score(b, (both, 0), 5, [(m1, 0), (m2, 0)])

    def score_images(b):
        i1 = b.add("LoadImage", 0, {"image": "example1.png"}, size=[300, 340], group="Images")
        i2 = b.add("LoadImage", 0, {"image": "example2.png"}, size=[300, 340], group="Images")
        # ImageBatch: deprecated on ComfyUI >= 0.21, but its replacement is missing on the older hosts we support
        both = b.add("ImageBatch", 1, {}, {"image1": (i1, 0), "image2": (i2, 0)}, size=[240, 70], group="Images")
        m = b.add("IQAMetricLoader", 2, {"metric": "topiq_nr"}, size=[320, 110], group="Score")
        _score(b, (both, 0), 2, [(m, 0)])
        b.add("Note", 2, {"text": (
            "Score your own images with any pyiqa metric (weights in ComfyUI/models/iqa under pyiqa's file "
            "names; nothing is downloaded). Batch more images with Batch Images (images of one size), or load a "
            "folder from the input directory with 'Load Image Dataset from Folder'. " + SCORE_NOTE)})

    return {"sdxl_quality_target": sdxl, "sd15_quality_target": sd15, "degradation_sweep": sweep,
            "reference_transfer": reference, "gradient_guidance": guidance, "score_images": score_images}


def author(object_info: dict, out_dir: pathlib.Path = UI_DIR, only: list[str] | None = None) -> list[pathlib.Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in example_specs().items():
        if only and name not in only:
            continue
        builder = GraphBuilder(object_info)
        build(builder)
        path = ui_path(name, out_dir)
        path.write_text(json.dumps(builder.workflow(name), indent=2) + "\n")
        written.append(path)
    return written


def stray_ui_files(ui_dir: pathlib.Path = UI_DIR) -> list[pathlib.Path]:
    """JSON files in the UI folder that are not one of EXAMPLES (e.g. left behind by a rename)."""
    known = {ui_path(slug, ui_dir).name for slug in EXAMPLES}
    return [p for p in sorted(ui_dir.glob("*.json")) if p.name not in known]


def convert_all(object_info: dict, ui_dir: pathlib.Path = UI_DIR, api_dir: pathlib.Path = API_DIR,
                write: bool = True) -> dict[str, dict]:
    """ui/<title>.json -> {slug: api prompt}; writes api/<slug>.json when `write`."""
    out = {}
    api_dir.mkdir(parents=True, exist_ok=True)
    for slug in EXAMPLES:
        api = ui_to_api(json.loads(ui_path(slug, ui_dir).read_text()), object_info)
        out[slug] = api
        if write:
            api_path(slug, api_dir).write_text(json.dumps(api, indent=2) + "\n")
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
    parser.add_argument("command", choices=["convert", "check", "author", "thumbnails"])
    parser.add_argument("--url", help="a running ComfyUI server (default: start one)")
    parser.add_argument("--only", nargs="*", help="author only these examples")
    args = parser.parse_args(argv)
    if args.command == "thumbnails":
        from comfyui_iqa_adapter.scripts.make_thumbnails import write_thumbnails
        for path in write_thumbnails({slug: thumbnail_path(slug) for slug in EXAMPLES}):
            print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KB)")
        return 0
    object_info, server = _object_info(args.url)
    try:
        if args.command == "author":
            for path in author(object_info, only=args.only):
                print(f"wrote {path.relative_to(ROOT)}")
            args.command = "convert"
        failures = 0
        for path in stray_ui_files():
            print(f"{path.relative_to(ROOT)}: not one of the examples (EXAMPLES); remove or add it", file=sys.stderr)
            failures += 1
        for slug in EXAMPLES:
            path = ui_path(slug)
            ui = json.loads(path.read_text())
            errors = validate_ui(ui, object_info)
            errors += [f"nodes {a} and {b} overlap (title bar included)" for a, b in overlapping_nodes(ui)]
            errors += group_problems(ui)
            for error in errors:
                print(f"{path.name}: {error}", file=sys.stderr)
            failures += bool(errors)
        converted = convert_all(object_info, write=args.command == "convert")
        for slug, api in converted.items():
            target = api_path(slug)
            if args.command == "check":
                if not target.exists() or json.loads(target.read_text()) != api:
                    print(f"{target.relative_to(ROOT)} is stale: run `python scripts/workflow_tools.py convert`",
                          file=sys.stderr)
                    failures += 1
            else:
                print(f"wrote {target.relative_to(ROOT)}")
        return 1 if failures else 0
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
