"""The example workflows in the real ComfyUI frontend (headless Chromium driven by Playwright).

Each UI workflow is loaded with app.loadGraphData; no node may be of an unregistered type or flagged
with errors, and the prompt the frontend itself builds (app.graphToPrompt) must equal our API twin in
workflows/api/ (so the UI -> API conversion matches the frontend's). A screenshot of each goes to
test-output/screenshots/. Skips loudly where Chromium or Playwright is absent (scripts/test.sh
installs Debian's chromium).
"""
from __future__ import annotations

import json
import os
import pathlib
import urllib.request

import pytest

from conftest import comfy_server_module

ROOT = pathlib.Path(__file__).resolve().parent.parent
UI_DIR = ROOT / "workflows" / "ui"
API_DIR = ROOT / "workflows" / "api"
SHOTS = ROOT / "test-output" / "screenshots"
CHROMIUM = os.environ.get("IQA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
UI_FILES = sorted(UI_DIR.glob("*.json"))
# measured: 1.32.9 (0.3.75's pin) leaves such nodes unmarked; 1.48.7 (0.33.0's pin) and 1.58.1 mark them
FLAGS_ABSENT_VALUES_SINCE = (1, 48)


def _skip(reason: str):
    if os.environ.get("CI"):
        pytest.fail("in CI the browser test must run: " + reason)
    pytest.skip("SKIPPED LOUDLY: " + reason)


@pytest.fixture(scope="module")
def page(comfy_server):
    if not pathlib.Path(CHROMIUM).exists():
        _skip(f"Chromium not found at {CHROMIUM} (scripts/test.sh installs it with apt-get)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip("the playwright package is not installed (requirements-dev.txt)")
    # No first-run template browser: the tutorial counts as done for this server's user.
    request = urllib.request.Request(comfy_server.url + "/api/settings/Comfy.TutorialCompleted",
                                     data=b"true", headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=30).read()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        tab = browser.new_page(viewport={"width": 1800, "height": 1000})
        errors: list[str] = []
        tab.on("pageerror", lambda error: errors.append(str(error)))
        tab.goto(comfy_server.url, wait_until="domcontentloaded", timeout=120_000)
        tab.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        tab.wait_for_timeout(1500)
        tab.keyboard.press("Escape")  # close any dialog (template browser) left open
        tab.page_errors = errors
        tab.frontend_version = tuple(int(part) for part in
                                     tab.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__").split(".")[:3])
        expected = comfy_server_module.frontend_root()
        if expected is not None:  # IQA_TEST_FRONTEND: make sure that frontend is the one served
            assert ".".join(map(str, tab.frontend_version)) == expected.name, (tab.frontend_version, expected)
        yield tab
        browser.close()


def test_ui_workflows_exist():
    names = {p.stem for p in UI_FILES}
    assert {"sdxl_quality_target", "sd15_quality_target", "degradation_sweep", "reference_transfer",
            "gradient_guidance", "score_images"} <= names, names
    link = ROOT / "example_workflows"
    assert link.resolve() == UI_DIR.resolve(), "example_workflows/ must point at workflows/ui (template browser)"


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_workflow_loads_in_frontend(page, path):
    workflow = json.loads(path.read_text())
    result = page.evaluate(
        """async (workflow) => {
            const app = window.app;
            await app.loadGraphData(workflow, true, true, null);
            await new Promise(r => setTimeout(r, 300));
            const nodes = app.graph._nodes || app.graph.nodes;
            const registered = window.LiteGraph.registered_node_types;
            const report = nodes.map(n => ({id: n.id, type: n.type, registered: !!registered[n.type],
                                            has_errors: !!n.has_errors,
                                            // combo values not among the server's options (files the user supplies)
                                            absent: (n.widgets || []).filter(w => w.type === 'combo' && w.options
                                                && Array.isArray(w.options.values) && !w.options.values.includes(w.value))
                                                .map(w => w.name),
                                            // '$$' widgets are the frontend's own (e.g. an image preview)
                                            widgets: (n.widgets || []).filter(w => !String(w.name).startsWith('$$')).length}));
            const prompt = await app.graphToPrompt();
            const dialogs = Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText.slice(0, 300));
            return {report, output: prompt.output, dialogs};
        }""", workflow)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{path.stem}.png"))
    assert len(result["report"]) == len(workflow["nodes"])
    missing = [n for n in result["report"] if not n["registered"]]
    assert not missing, f"{path.name}: node types unknown to the frontend: {missing}"
    # Frontends since 1.48 mark a node whose combo value is absent from the server's options (a model or
    # image the user has not put in place yet); 1.32 does not. Anything else marked is an error.
    version = page.frontend_version
    flags_absent_values = version >= FLAGS_ABSENT_VALUES_SINCE
    red = sorted(n["id"] for n in result["report"] if n["has_errors"])
    expected_red = sorted(n["id"] for n in result["report"] if n["absent"]) if flags_absent_values else []
    assert red == expected_red, (f"{path.name} on frontend {version}: nodes flagged with errors {red}, expected "
                                 f"{expected_red} (the nodes naming absent files): {result['report']}")
    # every stored widget value has its widget (extra control/upload widgets included), none left over
    # (newer frontends report node ids as strings)
    stored = {str(n["id"]): len(n.get("widgets_values", [])) for n in workflow["nodes"]}
    for node in result["report"]:
        assert node["widgets"] == stored[str(node["id"])], (path.name, node, stored[str(node["id"])])
    assert not any("missing" in d.lower() for d in result["dialogs"]), result["dialogs"]
    # The frontend's own UI -> API conversion equals our twin (widget order, links, control values).
    ours = json.loads((API_DIR / path.name).read_text())
    theirs = result["output"]
    assert sorted(theirs) == sorted(ours), f"{path.name}: node ids differ: {sorted(theirs)} vs {sorted(ours)}"
    for node_id, node in ours.items():
        assert theirs[node_id]["class_type"] == node["class_type"]
        assert theirs[node_id]["inputs"] == node["inputs"], (path.name, node_id, node["class_type"])
    assert not page.page_errors, page.page_errors


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_workflow_layout_in_frontend(page, path):
    """As the frontend draws it: no two node rectangles (getBounding: title bar included) overlap, every
    stored size holds the node's rows (computeSize), Note texts need no scrolling, and the stored default
    view shows every node inside the window."""
    result = page.evaluate(
        """async (workflow) => {
            const app = window.app;
            await app.loadGraphData(workflow, true, true, null);
            await new Promise(r => setTimeout(r, 300));
            const canvas = app.canvas;
            const nodes = (app.graph._nodes || app.graph.nodes).map(n => ({
                id: n.id, name: n.title || n.type, box: Array.from(n.getBounding()), size: Array.from(n.size),
                needed: Array.from(n.computeSize()),
                texts: (n.widgets || []).filter(w => w.element && w.element.tagName === 'TEXTAREA' && w.element.isConnected)
                                        .map(w => [w.element.scrollHeight, w.element.clientHeight])}));
            return {nodes, scale: canvas.ds.scale, offset: Array.from(canvas.ds.offset),
                    view: [canvas.canvas.clientWidth, canvas.canvas.clientHeight]};
        }""", json.loads(path.read_text()))
    nodes = result["nodes"]
    overlaps = []
    for i, a in enumerate(nodes):
        ax, ay, aw, ah = a["box"]
        for b in nodes[i + 1:]:
            bx, by, bw, bh = b["box"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                overlaps.append(f"{a['id']} {a['name']} {a['box']} / {b['id']} {b['name']} {b['box']}")
    assert overlaps == [], f"{path.name}: overlapping nodes in the frontend: {overlaps}"
    cramped = [(n["id"], n["name"], n["size"], n["needed"]) for n in nodes
               if n["size"][0] + 0.5 < n["needed"][0] or n["size"][1] + 0.5 < n["needed"][1]]
    assert cramped == [], f"{path.name}: stored size smaller than the node's rows: {cramped}"
    notes = [n for n in nodes if n["name"] == "Note"]
    assert notes and all(n["texts"] for n in notes), f"{path.name}: the Note's text box was not rendered"
    scrolling = [(n["id"], n["name"], n["texts"]) for n in nodes for scroll, client in n["texts"] if scroll > client + 1]
    assert scrolling == [], f"{path.name}: text boxes that need scrolling: {scrolling}"
    scale, (off_x, off_y), (view_w, view_h) = result["scale"], result["offset"], result["view"]
    outside = []
    for n in nodes:
        x, y, w, h = n["box"]
        left, top = (x + off_x) * scale, (y + off_y) * scale
        if left < 0 or top < 0 or left + w * scale > view_w or top + h * scale > view_h:
            outside.append((n["id"], n["name"]))
    assert outside == [], f"{path.name}: nodes outside the default view ({view_w}x{view_h}): {outside}"
