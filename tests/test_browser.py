"""The example workflows in the real ComfyUI frontend (headless Chromium driven by Playwright).

Each UI workflow is loaded with app.loadGraphData; no node may be of an unregistered type or flagged
with errors, and the prompt the frontend itself builds (app.graphToPrompt) must equal our API twin in
workflows/api/ (so the UI -> API conversion matches the frontend's). Each is also opened as a user does:
from the template browser dialog (card title, thumbnail, click), and must show whole in a 1366x768 window,
under none of the frontend's panels. Screenshots go to test-output/screenshots/. Skips loudly where
Chromium or Playwright is absent (scripts/test.sh installs Debian's chromium).
"""
from __future__ import annotations

import json
import os
import pathlib
import urllib.request

import pytest

from comfyui_iqa_adapter.scripts import workflow_tools
from conftest import comfy_server_module
from test_workflows import tiny_assets  # noqa: F401 - fixture: tiny metric weights, adapters, input images

pytestmark = pytest.mark.browser

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHOTS = ROOT / "test-output" / "screenshots"
CHROMIUM = os.environ.get("IQA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
UI_FILES = sorted(workflow_tools.examples().values())
WINDOW = {"width": 1366, "height": 768}  # a laptop: every template must fit it
# measured: 1.32.9 (0.3.75's pin) leaves such nodes unmarked; 1.48.7 (0.33.0's pin) and 1.58.1 mark them
FLAGS_ABSENT_VALUES_SINCE = (1, 48)


# The missing-models dialog (the base checkpoints the test host lacks) is on the page.
MISSING_MODELS_SHOWN = """() => Array.from(document.querySelectorAll('.p-dialog'))
    .some(d => /missing/i.test(d.innerText) && /model/i.test(d.innerText))"""

# Loads a workflow into the graph after closing any dialog left by the previous case. The missing-models
# dialog opens some time after loadGraphData returns (over a second on a loaded CI machine): where it is
# expected, wait for it (up to 20 s) rather than for a fixed pause.
LOAD_WORKFLOW = """async (workflow, waitForDialog) => {
    const shown = MISSING_MODELS_SHOWN;
    document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click());
    await new Promise(r => setTimeout(r, 100));
    await window.app.loadGraphData(workflow, true, true, null);
    await new Promise(r => setTimeout(r, 300));
    for (let waited = 0; waitForDialog && waited < 20000 && !shown(); waited += 100)
        await new Promise(r => setTimeout(r, 100));
}""".replace("MISSING_MODELS_SHOWN", MISSING_MODELS_SHOWN)


def _dialog_expected(page, workflow: dict) -> bool:
    """Measured on 1.32.9: the missing-models dialog opens exactly when the workflow lists models."""
    return bool(workflow.get("models")) and page.frontend_version < FLAGS_ABSENT_VALUES_SINCE


def api_twin(workflow: dict) -> dict:
    return json.loads(workflow_tools.api_path(workflow_tools.slug_of(workflow)).read_text())


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
        tab = browser.new_page(viewport=WINDOW)
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
    names = {workflow_tools.slug_of(json.loads(p.read_text())) for p in UI_FILES}
    assert {"sdxl_quality_target", "sd15_quality_target", "degradation_sweep", "reference_transfer",
            "gradient_guidance", "score_images"} <= names, names
    link = ROOT / "example_workflows"
    assert link.resolve() == workflow_tools.UI_DIR.resolve(), \
        "example_workflows/ must point at workflows/ui (template browser)"


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_workflow_loads_in_frontend(page, path):
    workflow = json.loads(path.read_text())
    result = page.evaluate(
        """async ([workflow, waitForDialog]) => {
            const app = window.app;
            await (LOAD_WORKFLOW)(workflow, waitForDialog);
            const nodes = app.graph._nodes || app.graph.nodes;
            const registered = window.LiteGraph.registered_node_types;
            const report = nodes.map(n => ({id: n.id, type: n.type, registered: !!registered[n.type],
                                            has_errors: !!n.has_errors,
                                            // combo values not among the server's options (files the user supplies)
                                            absent: (n.widgets || []).filter(w => w.type === 'combo' && w.options
                                                && Array.isArray(w.options.values)
                                                && !w.options.values.includes(w.value))
                                                .map(w => w.name),
                                            // '$$' widgets are the frontend's own (e.g. an image preview)
                                            widgets: (n.widgets || []).filter(w => !String(w.name).startsWith('$$'))
                                                .length}));
            const prompt = await app.graphToPrompt();
            const dialogs = Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText.slice(0, 600));
            document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click());
            return {report, output: prompt.output, dialogs};
        }""".replace("LOAD_WORKFLOW", LOAD_WORKFLOW), [workflow, _dialog_expected(page, workflow)])
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
    # the only dialog: the missing-models one, offering the base checkpoint the test host does not have
    models = workflow.get("models", [])
    for dialog in result["dialogs"]:
        assert "missing" in dialog.lower() and "model" in dialog.lower(), result["dialogs"]
        assert models and all(m["name"] in dialog for m in models), (path.name, dialog)
    if version < FLAGS_ABSENT_VALUES_SINCE:
        assert bool(result["dialogs"]) == _dialog_expected(page, workflow), (path.name, result["dialogs"])
    # The frontend's own UI -> API conversion equals our twin (widget order, links, control values).
    ours = api_twin(workflow)
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
    workflow = json.loads(path.read_text())
    result = page.evaluate(
        """async ([workflow, waitForDialog]) => {
            const app = window.app;
            await (LOAD_WORKFLOW)(workflow, waitForDialog);
            document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click());  // missing models
            const canvas = app.canvas;
            const groups = (app.graph._groups || app.graph.groups || [])
                .map(g => Array.from(g._bounding || g.bounding));
            const nodes = (app.graph._nodes || app.graph.nodes).map(n => ({
                id: n.id, name: n.title || n.type, box: Array.from(n.getBounding()), size: Array.from(n.size),
                needed: Array.from(n.computeSize()),
                texts: (n.widgets || [])
                    .filter(w => w.element && w.element.tagName === 'TEXTAREA' && w.element.isConnected)
                    .map(w => [w.element.scrollHeight, w.element.clientHeight])}));
            return {nodes, groups, scale: canvas.ds.scale, offset: Array.from(canvas.ds.offset),
                    view: [canvas.canvas.clientWidth, canvas.canvas.clientHeight]};
        }""".replace("LOAD_WORKFLOW", LOAD_WORKFLOW), [workflow, _dialog_expected(page, workflow)])
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
    scrolling = [(n["id"], n["name"], n["texts"])
                 for n in nodes for scroll, client in n["texts"] if scroll > client + 1]
    assert scrolling == [], f"{path.name}: text boxes that need scrolling: {scrolling}"
    scale, (off_x, off_y), (view_w, view_h) = result["scale"], result["offset"], result["view"]
    outside = []
    for n in nodes:
        x, y, w, h = n["box"]
        left, top = (x + off_x) * scale, (y + off_y) * scale
        if left < 0 or top < 0 or left + w * scale > view_w or top + h * scale > view_h:
            outside.append((n["id"], n["name"]))
    for index, (x, y, w, h) in enumerate(result["groups"]):
        left, top = (x + off_x) * scale, (y + off_y) * scale
        if left < 0 or top < 0 or left + w * scale > view_w or top + h * scale > view_h:
            outside.append(("group", index))
    assert outside == [], f"{path.name}: nodes outside the default view ({view_w}x{view_h}): {outside}"


# ------------------------------------------------------------------------------------ inputs that depend on each other

DEPENDENT_INPUTS = """() => {
    const app = window.app, LG = window.LiteGraph;
    const find = (node, name) => node.widgets.find(w => w.name === name);
    const choose = (widget, value) => { widget.value = value; widget.callback?.(value); };  // as a click does
    const added = [];
    const add = type => { const node = LG.createNode(type); app.graph.add(node); added.push(node); return node; };
    const out = {presets: {}, spacings: {}};
    const target = add("IQAAdapterEncodeTarget");
    for (const name of find(target, "quality").options.values) {
        choose(find(target, "quality"), name);
        out.presets[name] = find(target, "percentile").value;
    }
    choose(find(target, "quality"), "best");
    choose(find(target, "percentile"), 42);
    out.after_slider = find(target, "quality").value;
    const sweep = add("IQATargetSweep");
    const greyed = node => ["start", "stop", "steps"].filter(name => find(node, name).disabled);
    for (const spacing of find(sweep, "spacing").options.values) {
        choose(find(sweep, "spacing"), spacing);
        out.spacings[spacing] = greyed(sweep);
    }
    out.hold_greyed = [find(sweep, "hold").disabled];  // metrics empty: every metric is swept
    choose(find(sweep, "metrics"), "topiq_nr");
    out.hold_greyed.push(find(sweep, "hold").disabled);
    choose(find(sweep, "metrics"), "");
    find(sweep, "spacing").value = "paper";  // a saved node: values come back without callbacks
    const saved = sweep.serialize();
    const reopened = add("IQATargetSweep");
    out.fresh = greyed(reopened);
    reopened.configure(saved);
    out.reopened = greyed(reopened);
    out.reopened_steps = find(reopened, "steps").value;
    added.forEach(node => app.graph.remove(node));
    return out;
}"""


def test_inputs_that_depend_on_each_other_stay_in_step(page):
    """Quality Target: each preset moves the slider to its percentile (the node's own table), and moving the
    slider selects 'custom'. Quality Target Sweep: a spacing with fixed targets greys out what it does not
    read, also when a saved workflow opens with it (the values themselves are kept); 'hold' is greyed while
    'metrics' is empty (every metric is swept)."""
    from comfyui_iqa_adapter.adapter import quality, sweep

    result = page.evaluate(DEPENDENT_INPUTS)
    assert {name: result["presets"][name] for name in quality.QUALITY_PRESETS} == quality.QUALITY_PRESETS, result
    assert result["after_slider"] == "custom", result
    assert set(result["spacings"]) == set(sweep.SPACINGS)
    assert result["spacings"] == {"linear": [], "normal": [], "quantile-knots": ["steps"],
                                  "paper": ["start", "stop", "steps"]}, result
    assert result["fresh"] == [] and result["reopened"] == ["start", "stop", "steps"], result
    assert result["reopened_steps"] == 8, result
    assert result["hold_greyed"] == [True, False], result
    assert not page.page_errors, page.page_errors


# ------------------------------------------------------------------------------------- the template browser

# Which parts of the graph a user cannot see in the window: points over every node (title bar included)
# and every group's title strip, each either off the window or under an element that is neither the
# canvas nor a node's own DOM widget (a panel, the Run bar, the minimap, a toast, ...).
HIDDEN_PARTS = """() => {
    const app = window.app, canvas = app.canvas, ds = canvas.ds;
    const rect = canvas.canvas.getBoundingClientRect();
    const ours = e => e === canvas.canvas || !!(e && e.closest && e.closest('.dom-widget, [data-node-id]'));
    const covering = (x, y) => {
        if (x < 0 || y < 0 || x >= window.innerWidth || y >= window.innerHeight) return 'outside the window';
        const e = document.elementFromPoint(x, y);
        if (ours(e)) return null;
        const panel = e && (e.closest('[class*=minimap]') ? 'minimap' : (e.getAttribute('aria-label')
                      || e.getAttribute('data-testid') || String(e.className).slice(0, 60) || e.tagName));
        return panel || 'nothing';
    };
    const check = (name, [x, y, w, h], rows) => {
        const found = new Set();
        for (let i = 0; i <= 4; i++) for (let j = 0; j <= rows; j++) {
            const sx = rect.left + (x + 1 + (w - 2) * i / 4 + ds.offset[0]) * ds.scale;
            const sy = rect.top + (y + 1 + (h - 2) * j / Math.max(rows, 1) + ds.offset[1]) * ds.scale;
            const what = covering(sx, sy);
            if (what) found.add(what);
        }
        return found.size ? [name + ': ' + Array.from(found).join(', ')] : [];
    };
    const nodes = app.graph._nodes || app.graph.nodes;
    const groups = app.graph._groups || app.graph.groups || [];
    return nodes.flatMap(n => check(`node ${n.id} ${n.title || n.type}`, Array.from(n.getBounding()), 6))
        .concat(groups.flatMap(g => { const [x, y, w] = Array.from(g._bounding || g.bounding);
                                      return check(`group ${g.title}`, [x, y, w, 30], 0); }));
}"""


# Waits until the canvas view (scale, offset) stays put for 10 frames: fit-to-view may still be moving.
VIEW_SETTLED = """async () => {
    const ds = window.app.canvas.ds;
    let last = '', same = 0;
    for (let frame = 0; frame < 1200 && same < 10; frame++) {
        await new Promise(r => requestAnimationFrame(r));
        const now = [ds.scale, ds.offset[0], ds.offset[1]].join();
        same = now === last ? same + 1 : 0;
        last = now;
    }
    return same >= 10;
}"""


def _open_templates(page):
    """The sidebar's Templates entry opens the template browser dialog: this pack's category in it."""
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Templates", exact=True).first.click()
    dialog = page.get_by_role("dialog").filter(has_text="Templates").first
    dialog.get_by_text(comfy_server_module.PACK_LINK_NAME, exact=True).first.click()
    return dialog


def _assert_whole_in_view(page, label: str) -> None:
    """Fails on any part of the graph off the window or under a panel (the minimap included)."""
    hidden = page.evaluate(HIDDEN_PARTS)
    assert hidden == [], f"{label} on frontend {page.frontend_version}: hidden parts"


def _dismiss_error_overlay(page):
    dismiss = page.locator("[data-testid='error-overlay-dismiss']")
    if dismiss.count():
        dismiss.first.click()
    page.wait_for_timeout(500)


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_template_opens_from_the_template_browser(page, tiny_assets, path):  # noqa: F811 - fixture
    """As a user: Templates in the sidebar, this pack's category, the card (title = the file name, whole,
    our thumbnail beside it), click; the workflow opens whole in a 1366x768 window, under no panel."""
    title, workflow = path.stem, json.loads(path.read_text())
    dialog = _open_templates(page)
    card = dialog.locator(f"[data-testid='template-workflow-{title}']")
    card.scroll_into_view_if_needed()
    page.wait_for_function(
        "(card) => { const i = card.querySelector('img'); return i && i.complete && i.naturalWidth; }",
        arg=card.element_handle(), timeout=30_000)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"templates_{title}.png"))
    heading = card.locator("h3").first
    assert heading.inner_text().strip() == title
    # cut with an ellipsis: one line (line-clamp) with the rest below, or one row wider than the card
    assert heading.evaluate("e => e.scrollWidth <= e.clientWidth + 1 && e.scrollHeight <= e.clientHeight + 1"), \
        f"{title}: the card cuts its title"
    thumbnail = card.locator("img").first
    assert thumbnail.get_attribute("alt") == title
    shown = thumbnail.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    from PIL import Image
    assert tuple(shown) == Image.open(workflow_tools.thumbnail_path(path)).size, "the card shows our thumbnail"
    card.click()
    # This template's graph, not the previous case's: SD1.5 and SDXL examples share node count and ids.
    page.wait_for_function(
        """(wanted) => { const nodes = window.app.graph._nodes || window.app.graph.nodes;
                         return nodes.length === wanted.length && wanted.every(([id, type, x, y]) => nodes.some(n =>
                             String(n.id) === id && n.type === type
                             && Math.abs(n.pos[0] - x) < 1 && Math.abs(n.pos[1] - y) < 1)); }""",
        arg=[[str(n["id"]), n["type"], *n["pos"]] for n in workflow["nodes"]], timeout=60_000)
    if _dialog_expected(page, workflow):  # the missing-models dialog (base checkpoints the test host lacks)
        page.wait_for_function(MISSING_MODELS_SHOWN, timeout=20_000)
    else:
        page.wait_for_timeout(1500)
    page.keyboard.press("Escape")
    _dismiss_error_overlay(page)  # since 1.48: "N errors found" for the files the test host lacks
    assert page.evaluate(VIEW_SETTLED), f"{title}: the view kept moving (fit-to-view never settled)"
    page.screenshot(path=str(SHOTS / f"template_{title}.png"))
    assert not page.page_errors, page.page_errors
    _assert_whole_in_view(page, title)


# ------------------------------------------------------------------------------------------ Run, scores shown

# Ask the tiny models and a weight-free metric for what the example names (users' files are not here).
TINY_WIDGETS = """(node, tiny) => {
    for (const w of node.widgets || []) {
        if (w.name === 'ckpt_name') w.value = tiny.checkpoint;
        if (w.name === 'adapter_name') w.value = tiny.adapter;
        if (node.type === 'EmptyLatentImage' && (w.name === 'width' || w.name === 'height')) w.value = 64;
        if ((node.type === 'KSampler' || node.type === 'KSamplerAdvanced') && w.name === 'steps') w.value = 2;
        if (node.type === 'IQATargetSweep' && w.name === 'steps') w.value = 4;
        if (node.type === 'IQAMetricLoader' && w.name === 'metric') w.value = tiny.metric;
        if (node.type === 'IQAMetricLoader' && w.name === 'device') w.value = 'cpu';
    }
}"""
RUN_EXAMPLES = ["score_images", "degradation_sweep"]  # scoring only; generating + scoring + sweep report


def _click_run(page):
    for locator in (page.get_by_role("button", name="Run", exact=True),
                    page.locator("[data-testid='queue-button']"),
                    page.get_by_role("button", name="Queue", exact=False)):
        if locator.count():
            locator.first.click()
            return
    raise AssertionError("no Run button found in the frontend")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", RUN_EXAMPLES)
def test_run_shows_scores_on_the_canvas(page, comfy_server, tiny_assets, name):  # noqa: F811 - fixture
    """Load the example, point it at the tiny models, click Run, and find the scores on the page: the
    score table rendered on each scoring node, and the score card it previews; the grown cards leave
    the workflow whole in view."""
    workflow = json.loads(workflow_tools.examples()[name].read_text())
    tiny = {"checkpoint": "tiny_sd15.safetensors", "adapter": "tiny_sd15_iqa_adapter.safetensors", "metric": "piqe"}
    page.evaluate(
        """async ([workflow, tiny]) => {
            const app = window.app;
            await app.loadGraphData(workflow, true, true, null);
            const setTiny = {TINY_WIDGETS};
            for (const node of (app.graph._nodes || app.graph.nodes)) setTiny(node, tiny);
            app.graph.setDirtyCanvas(true, true);
        }""".replace("{TINY_WIDGETS}", TINY_WIDGETS), [workflow, tiny])
    page.keyboard.press("Escape")
    _click_run(page)
    expected = ["piqe", "Spearman rho"] if name == "degradation_sweep" else ["piqe"]
    page.wait_for_function(
        """(expected) => expected.every(text => Array.from(document.querySelectorAll('.iqa-scores'))
                                                .some(e => e.innerText.includes(text)))""",
        arg=expected, timeout=600_000)
    page.wait_for_timeout(1000)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"run_{name}.png"))
    shown = page.evaluate(
        """() => {
            const app = window.app;
            const nodes = (app.graph._nodes || app.graph.nodes).filter(n => n.type === 'IQAScore');
            const ds = app.canvas.ds, top = app.canvas.canvas.getBoundingClientRect().top;
            // graph units between a node's text (its bottom edge on the page) and the node's bottom edge
            const room = (app.graph._nodes || app.graph.nodes)
                .filter(n => (n.widgets || []).some(w => w.name === 'iqa_scores'))
                .map(n => { const text = n.widgets.find(w => w.name === 'iqa_scores').element;
                            const bottom = (text.getBoundingClientRect().bottom - top) / ds.scale - ds.offset[1];
                            return [n.type, Math.round(n.pos[1] + n.size[1] - bottom),
                                    text.scrollHeight - text.clientHeight]; });
            return {
                room,
                tables: Array.from(document.querySelectorAll('.iqa-scores')).map(e => e.innerText),
                cards: nodes.map(n => (n.imgs && n.imgs.length) || (app.nodeOutputs && app.nodeOutputs[n.id]
                                       && (app.nodeOutputs[n.id].images || []).length) || 0),
            };
        }""")
    tables = [t for t in shown["tables"] if "piqe" in t]
    assert tables, shown
    numbers = [line for t in tables for line in t.splitlines() if line.strip()[:1].isdigit()]
    assert numbers, f"no score rows on the page: {tables}"
    # piqe is lower-is-better: the column head carries the arrow, the line under the table the words
    assert any("piqe (↓)" in t and "piqe: lower is better" in t for t in tables), tables
    assert shown["cards"] and all(count >= 1 for count in shown["cards"]), f"score card not previewed: {shown}"
    if name == "degradation_sweep":
        assert any("Spearman rho" in t for t in shown["tables"]), shown["tables"]
    # the preview (score card, sweep grid and chart) gets its space below the text, inside the node
    previewing = [(kind, room) for kind, room, _ in shown["room"] if kind in ("IQAScore", "IQASweepReport")]
    print(f"room below the text on frontend {page.frontend_version}: {shown['room']}")
    assert previewing and all(room >= 180 for _, room in previewing), previewing
    # and the text is whole: no scrolling inside its box
    assert all(hidden <= 1 for _, _, hidden in shown["room"]), shown["room"]
    assert not page.page_errors, page.page_errors
    _assert_whole_in_view(page, f"{name} after Run")


def test_pack_nodes_are_findable_and_documented(comfy_server):
    """Sub-categories, display names with 'Quality', and a help page per node where the frontend looks for
    it (/extensions/<pack folder>/docs/<node id>.md)."""
    info = comfy_server.object_info()
    ours = {name: node for name, node in info.items() if node.get("category", "").startswith("IQA-Adapter")}
    assert len(ours) >= 11
    for name, node in ours.items():
        assert node["category"].count("/") == 1, (name, node["category"])
        assert "Quality" in node["display_name"], (name, node["display_name"])
        assert "search_aliases" not in node or "quality" in node["search_aliases"]
        pack = node["python_module"].split(".", 1)[1]
        with urllib.request.urlopen(f"{comfy_server.url}/extensions/{pack}/docs/{name}.md", timeout=30) as response:
            text = response.read().decode()
        assert text.startswith(f"# {node['display_name']}"), (name, text[:80])
    metric_options = ours["IQAMetricLoader"]["input"]["required"]["metric"]
    options = metric_options[1]["options"] if metric_options[0] == "COMBO" else metric_options[0]
    from comfyui_iqa_adapter.models import metrics
    full_reference = [metrics.is_full_reference(n) for n in options]
    assert full_reference == sorted(full_reference), "no-reference metrics first, then full-reference ones"
    from comfyui_iqa_adapter.adapter import iqa_models
    folder = [str(comfy_server.models_dir / "iqa")]
    not_ready = [n for n in options if not metrics.is_full_reference(n)
                 and iqa_models.missing_weight_files(n, folder, plan=False) != []]
    assert all(options.index("piqe") < options.index(n) for n in not_ready), "metrics that load here come first"
    assert "piqe" in metric_options[-1]["tooltip"] and "Weight-free" in metric_options[-1]["tooltip"]
