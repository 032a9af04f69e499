"""Example workflows: UI format (what a user drags into ComfyUI) <-> API format (what /prompt runs).

The UI files in workflows/ui/ are the source of truth (example_workflows/ links to that folder, so the
host lists them in its template browser). The API twins in workflows/api/ are generated from them:

    python scripts/workflow_tools.py convert              # ui/*.json -> api/*.json (needs a server)
    python scripts/workflow_tools.py check                # validate ui/*.json, fail if api/ is stale
    python scripts/workflow_tools.py author               # (re)write ui/*.json from the specs below

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
COLUMN_GAP = 60
ROW_GAP = 40          # between a node's bottom and the next node's title bar
MARGIN = 20
# The default view shows the whole graph in an 1800x1000 window, in the area left free by the sidebar,
# top bar, run button and minimap, at no smaller zoom than where the frontend stops drawing text (~0.57).
VIEW_AREA = (80, 140, 1680, 600)  # x, y, width, height in screen pixels
VIEW_SCALE = (0.6, 0.8)


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
    layout() turns the column assignment and each node's estimated size into positions."""

    def __init__(self, object_info: dict):
        self.info = object_info
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self._by_id: dict[int, dict] = {}
        self._column: dict[int, int] = {}

    def add(self, kind: str, column: int, widgets: dict | None = None, links: dict | None = None,
            title: str | None = None, size=None, color: str | None = None) -> int:
        """Add a node to `column` (0 = leftmost), below the nodes added there before. `size` is a minimum:
        the width is widened to the column's, the height raised to what the node's rows need."""
        node_id = len(self.nodes) + 1
        widgets = dict(widgets or {})
        links = dict(links or {})
        node = {"id": node_id, "type": kind, "pos": [0, 0], "size": list(size or [320, 60]), "flags": {},
                "order": node_id - 1, "mode": 0, "inputs": [], "outputs": [], "properties": {}}
        self._column[node_id] = column
        if kind in FRONTEND_ONLY:
            node["widgets_values"] = [widgets["text"]]
            node["title"] = title or "Note"
            node["color"], node["bgcolor"] = "#432", "#653"
            self.nodes.append(node)
            self._by_id[node_id] = node
            return node_id
        info = self.info[kind]
        node["properties"] = {"Node name for S&R": kind}
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
        width and the height their text needs), nodes stacked top-down ROW_GAP apart."""
        x = MARGIN
        for column in sorted(set(self._column.values())):
            members = [n for n in self.nodes if self._column[n["id"]] == column]
            widths = [n["size"][0] for n in members if n["type"] not in FRONTEND_ONLY]
            width = max(widths or [n["size"][0] for n in members])
            y = MARGIN + TITLE_HEIGHT
            for node in members:
                node["size"][0] = width
                if node["type"] in FRONTEND_ONLY:
                    node["size"][1] = max(node["size"][1], note_height(node["widgets_values"][0], width))
                node["pos"] = [x, y]
                y += node["size"][1] + ROW_GAP + TITLE_HEIGHT
            x += width + COLUMN_GAP

    def default_view(self) -> dict:
        """extra.ds: scale and offset that show the whole graph (LiteGraph: screen = (graph + offset) * scale)."""
        boxes = [rectangle(n) for n in self.nodes]
        left, top = min(b[0] for b in boxes), min(b[1] for b in boxes)
        width, height = max(b[2] for b in boxes) - left, max(b[3] for b in boxes) - top
        view_x, view_y, view_w, view_h = VIEW_AREA
        scale = min(view_w / width, view_h / height)
        scale = round(min(max(scale, VIEW_SCALE[0]), VIEW_SCALE[1]), 3)
        return {"scale": scale, "offset": [round(view_x / scale - left, 1), round(view_y / scale - top, 1)]}

    def workflow(self) -> dict:
        self.layout()
        for node in self.nodes:
            for output in node["outputs"]:
                if not output["links"]:
                    output["links"] = None
        return {"id": "00000000-0000-4000-8000-000000000000", "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {"ds": self.default_view()},
                "version": 0.4}


SDXL_CKPT = "sd_xl_base_1.0.safetensors"
SD15_CKPT = "v1-5-pruned-emaonly.safetensors"
SDXL_ADAPTER = "iqa_adapter_sdxl_topiq_nr_laion_aes.safetensors"
SDXL_REF_ADAPTER = "iqa_adapter_sdxl_reference.safetensors"
SD15_ADAPTER = "iqa_adapter_sd15_topiq_nr_laion_aes.safetensors"
PROMPT = "best quality, high quality, a lighthouse on a cliff at sunset"
SD15_NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality"


def _text_to_image(b: GraphBuilder, ckpt: str, adapter: str, size: int, steps: int, cfg: float, negative: str,
                   batch: int = 1, tokens_from=None, adapter_id=None):
    """Checkpoint and adapter loaders (column 0), prompts (column 1); returns node ids."""
    c = b.add("CheckpointLoaderSimple", 0, {"ckpt_name": ckpt}, size=[340, 100])
    pos = b.add("CLIPTextEncode", 1, {"text": PROMPT}, {"clip": (c, 1)}, title="Positive prompt", size=[360, 150])
    neg = b.add("CLIPTextEncode", 1, {"text": negative}, {"clip": (c, 1)}, title="Negative prompt", size=[360, 150])
    a = adapter_id or b.add("IQAAdapterLoader", 0, {"adapter_name": adapter}, size=[340, 60])
    return c, pos, neg, a


def _sampler(b: GraphBuilder, model, pos, neg, latent, steps, cfg, seed=42, column=3, title=None):
    return b.add("KSampler", column, {"seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler",
                                     "scheduler": "normal", "denoise": 1.0},
                 {"model": model, "positive": (pos, 0), "negative": (neg, 0), "latent_image": (latent, 0)},
                 title=title, size=[300, 260])


def example_specs() -> dict:
    """name -> function(builder) that adds the nodes of that example."""

    def quality_target(b, ckpt, adapter, size, steps, cfg, negative, note):
        c, pos, neg, a = _text_to_image(b, ckpt, adapter, size, steps, cfg, negative)
        t = b.add("IQAAdapterEncodeTarget", 1, {"quality": "best", "percentile": 99.0, "targets": ""},
                  {"adapter": (a, 0)}, size=[360, 200])
        ap = b.add("IQAAdapterApply", 2, {"weight": 1.0}, {"model": (c, 0), "adapter": (a, 0), "tokens": (t, 0)},
                   size=[300, 160])
        lat = b.add("EmptyLatentImage", 2, {"width": size, "height": size, "batch_size": 1}, size=[300, 110])
        k = _sampler(b, (ap, 0), pos, neg, lat, steps, cfg)
        d = b.add("VAEDecode", 4, {}, {"samples": (k, 0), "vae": (c, 2)}, size=[200, 50])
        b.add("SaveImage", 5, {"filename_prefix": "iqa_adapter/quality_99"}, {"images": (d, 0)},
              size=[400, 400])
        b.add("Note", 0, {"text": note})

    def sdxl(b):
        quality_target(b, SDXL_CKPT, SDXL_ADAPTER, 1024, 30, 5.0, "",
                       "IQA-Adapter on SDXL: the image is generated at a quality target, the 99th CC3M percentile "
                       "of both metrics the adapter was trained on (topiq_nr, laion_aes). Put the adapter weights "
                       "in models/iqa_adapter. Pick quality 'best' ... 'worst' (or 'custom' + the percentile slider); "
                       "low targets degrade the image on purpose; 'weight' scales the adapter's effect. Rows typed "
                       "in 'targets' make a batch, one target per image (wire 'count' into batch_size).")

    def sd15(b):
        quality_target(b, SD15_CKPT, SD15_ADAPTER, 512, 30, 7.5, SD15_NEGATIVE,
                       "IQA-Adapter on SD1.5 (16 cross-attention layers): the same quality target (99th CC3M "
                       "percentile) as the SDXL example. The authors released SDXL adapters only; use an SD1.5 "
                       "adapter you trained (models/iqa_adapter, with a <name>.json descriptor).")

    def sweep(b):
        c, pos, neg, a = _text_to_image(b, SDXL_CKPT, SDXL_ADAPTER, 1024, 30, 5.0, "")
        s = b.add("IQATargetSweep", 1, {"metrics": "", "start": 1.0, "stop": 99.0, "steps": 8,
                                        "mode": "percentile", "spacing": "linear"},
                  {"adapter": (a, 0)}, size=[360, 280])
        ap = b.add("IQAAdapterApply", 2, {"weight": 1.0}, {"model": (c, 0), "adapter": (a, 0), "tokens": (s, 0)},
                   size=[300, 160])
        lat = b.add("EmptyLatentImage", 2, {"width": 1024, "height": 1024, "batch_size": 8},
                    {"batch_size": (s, 2)}, size=[300, 110])
        k = _sampler(b, (ap, 0), pos, neg, lat, 30, 5.0)
        d = b.add("VAEDecode", 4, {}, {"samples": (k, 0), "vae": (c, 2)}, size=[200, 50])
        m = b.add("IQAMetricLoader", 4, {"metric": "topiq_nr"}, size=[300, 110])
        sc = b.add("IQAScore", 5, {}, {"images": (d, 0), "metric": (m, 0)}, size=[300, 120])
        b.add("IQASweepReport", 6, {"filename_prefix": "iqa_sweep/sweep"},
              {"images": (d, 0), "targets": (s, 1), "scores": (sc, 0)}, size=[420, 460])
        b.add("Note", 0, {"text": (
            "Degradation sweep: one sampler run renders 8 quality targets, CC3M percentile 1 -> 99 (row i of "
            "the tokens conditions image i; 'count' drives the latent batch size). IQA Score measures each image "
            "and the Sweep Report writes a labelled grid, a chart of measured score vs target with Spearman's "
            "rho, and CSV/JSON tables to output/iqa_sweep. Low targets act as a degradation model.")})

    def reference(b):
        c, pos, neg, a = _text_to_image(b, SDXL_CKPT, SDXL_REF_ADAPTER, 1024, 30, 5.0, "")
        img = b.add("LoadImage", 0, {"image": "reference.png"}, size=[340, 360])
        em = b.add("IQAMetricLoader", 0, {"metric": "arniqa"}, title="Reference IQA model", size=[320, 110])
        r = b.add("IQAAdapterEncodeReference", 1, {}, {"adapter": (a, 0), "reference": (img, 0),
                                                        "metric": (em, 0)}, size=[360, 120])
        ap = b.add("IQAAdapterApply", 2, {"weight": 1.0}, {"model": (c, 0), "adapter": (a, 0), "tokens": (r, 0)},
                   size=[300, 160])
        lat = b.add("EmptyLatentImage", 2, {"width": 1024, "height": 1024, "batch_size": 1}, size=[300, 110])
        k = _sampler(b, (ap, 0), pos, neg, lat, 30, 5.0)
        d = b.add("VAEDecode", 4, {}, {"samples": (k, 0), "vae": (c, 2)}, size=[200, 50])
        b.add("SaveImage", 5, {"filename_prefix": "iqa_adapter/reference"}, {"images": (d, 0)},
              size=[400, 400])
        b.add("Note", 1, {"text": (
            "Reference-image quality transfer (IQA-Adapter v2): a reference-based adapter reads an IQA model's "
            "internal activations of the reference image and transfers its quality traits (blur, JPEG, noise, "
            "colour shift), not its objects or colours. Load a reference adapter, the IQA model its descriptor names "
            "(the extractor), and any image.")})

    def guidance(b):
        c, pos, neg, a = _text_to_image(b, SDXL_CKPT, SDXL_ADAPTER, 1024, 30, 5.0, "")
        t = b.add("IQAAdapterEncodeTarget", 1, {"quality": "best", "percentile": 99.0, "targets": ""},
                  {"adapter": (a, 0)}, size=[360, 200])
        ap = b.add("IQAAdapterApply", 2, {"weight": 1.0}, {"model": (c, 0), "adapter": (a, 0), "tokens": (t, 0)},
                   size=[300, 160])
        guide_metric = b.add("IQAMetricLoader", 1, {"metric": "topiq_nr", "differentiable": True},
                             title="Guiding metric", size=[320, 110])
        gd = b.add("IQAGradientGuidance", 2, {"scale": 1.0},
                   {"model": (ap, 0), "vae": (c, 2), "metric": (guide_metric, 0)}, size=[320, 280])
        lat = b.add("EmptyLatentImage", 2, {"width": 1024, "height": 1024, "batch_size": 1}, size=[300, 110])
        k1 = _sampler(b, (ap, 0), pos, neg, lat, 30, 5.0, title="KSampler (adapter only)")
        k2 = _sampler(b, (gd, 0), pos, neg, lat, 30, 5.0, title="KSampler (adapter + gradient guidance)")
        d1 = b.add("VAEDecode", 4, {}, {"samples": (k1, 0), "vae": (c, 2)}, size=[200, 50])
        d2 = b.add("VAEDecode", 4, {}, {"samples": (k2, 0), "vae": (c, 2)}, size=[200, 50])
        both = b.add("ImageBatch", 5, {}, {"image1": (d1, 0), "image2": (d2, 0)}, size=[200, 70])
        b.add("SaveImage", 6, {"filename_prefix": "iqa_adapter/unguided_vs_guided"},
              {"images": (both, 0)}, size=[400, 400])
        m1 = b.add("IQAMetricLoader", 5, {"metric": "topiq_nr"}, title="Score: guiding metric",
                   size=[300, 110])
        m2 = b.add("IQAMetricLoader", 5, {"metric": "musiq"}, title="Score: second metric",
                   size=[300, 110])
        b.add("IQAScore", 6, {}, {"images": (both, 0), "metric": (m1, 0)}, size=[320, 140])
        b.add("IQAScore", 6, {}, {"images": (both, 0), "metric": (m2, 0)}, size=[320, 140])
        b.add("Note", 0, {"text": (
            "Gradient quality guidance (the paper's first method) next to the adapter: the same seed with the "
            "adapter alone (image 1) and with the guiding metric's gradient added at every step (image 2). "
            "Scores are shown for the guiding metric and a second metric: guidance raises the metric it "
            "follows far more than others, and high scales make adversarial textures.")})

    def score_images(b):
        i1 = b.add("LoadImage", 0, {"image": "example1.png"}, size=[300, 360])
        i2 = b.add("LoadImage", 0, {"image": "example2.png"}, size=[300, 360])
        both = b.add("ImageBatch", 1, {}, {"image1": (i1, 0), "image2": (i2, 0)}, size=[200, 70])
        m = b.add("IQAMetricLoader", 1, {"metric": "topiq_nr"}, size=[300, 110])
        b.add("IQAScore", 2, {}, {"images": (both, 0), "metric": (m, 0)}, size=[360, 200])
        b.add("Note", 2, {"text": (
            "Score existing images with any pyiqa metric (weights in models/iqa, nothing is downloaded). "
            "Batch more images with Image Batch (images of one size), or load a whole folder of the input "
            "directory with 'Load Image Dataset from Folder': each image is then scored on its own.")})

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
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(builder.workflow(), indent=2) + "\n")
        written.append(path)
    return written


def convert_all(object_info: dict, ui_dir: pathlib.Path = UI_DIR, api_dir: pathlib.Path = API_DIR,
                write: bool = True) -> dict[str, dict]:
    """ui/*.json -> {name: api prompt}; writes api/<name>.json when `write`."""
    out = {}
    api_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(ui_dir.glob("*.json")):
        api = ui_to_api(json.loads(path.read_text()), object_info)
        out[path.stem] = api
        if write:
            (api_dir / path.name).write_text(json.dumps(api, indent=2) + "\n")
    return out


def _object_info(url: str | None) -> tuple[dict, object]:
    sys.path.insert(0, str(SCRIPTS))
    from comfy_server import ComfyServer, ensure_pack_linked, host_dir

    if url:
        import urllib.request
        with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=120) as r:
            return json.loads(r.read()), None
    ensure_pack_linked(host_dir())
    server = ComfyServer(pathlib.Path(tempfile.mkdtemp(prefix="iqa-wf-")), host_dir()).start()
    return server.object_info(), server


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["convert", "check", "author"])
    parser.add_argument("--url", help="a running ComfyUI server (default: start one)")
    parser.add_argument("--only", nargs="*", help="author only these examples")
    args = parser.parse_args(argv)
    object_info, server = _object_info(args.url)
    try:
        if args.command == "author":
            for path in author(object_info, only=args.only):
                print(f"wrote {path.relative_to(ROOT)}")
            args.command = "convert"
        failures = 0
        for path in sorted(UI_DIR.glob("*.json")):
            ui = json.loads(path.read_text())
            errors = validate_ui(ui, object_info)
            errors += [f"nodes {a} and {b} overlap (title bar included)" for a, b in overlapping_nodes(ui)]
            for error in errors:
                print(f"{path.name}: {error}", file=sys.stderr)
            failures += bool(errors)
        converted = convert_all(object_info, write=args.command == "convert")
        for name, api in converted.items():
            target = API_DIR / f"{name}.json"
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
