"""workflows/*.json opened in ComfyUI's real frontend (comfyui-frontend-package, served by the session's
ComfyUI) in headless Chromium, the way a user opens a workflow file: `app.loadGraphData(workflow)`,
the call behind the file-open and drag-and-drop paths, which runs the frontend's own schema
validation and missing-node check. Asserts: no missing-node dialog or other dialog/toast, every node
type registered, every widget value the workflow sets kept and accepted (combo values among the
options, numbers within min/max), the frontend's API graph equal to workflows/api/<name>.json, and no
console errors. One screenshot per workflow goes to $SVDQ_ARTIFACTS/frontend (default
tests/integration/artifacts/frontend).

Needs the Python package `playwright` (its wheel carries its driver; no browser download is used)
and a Chromium: $SVDQ_CHROMIUM, else /usr/bin/chromium (Debian's `chromium`) or one on PATH.
Skipped with the reason when either is missing."""
import copy
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import REPO

playwright_api = pytest.importorskip("playwright.sync_api", reason="the Python package playwright is not installed: "
                                     "pip install playwright (not `playwright install`: the test uses a system Chromium)")


def _find_chromium():
    """$SVDQ_CHROMIUM when set (and only it), else /usr/bin/chromium or a Chromium on PATH."""
    explicit = os.environ.get("SVDQ_CHROMIUM")
    candidates = [explicit] if explicit else ["/usr/bin/chromium", shutil.which("chromium"),
                                              shutil.which("chromium-browser"), shutil.which("google-chrome")]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = _find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason=(f"SVDQ_CHROMIUM={os.environ.get('SVDQ_CHROMIUM')} is not an executable file" if os.environ.get("SVDQ_CHROMIUM")
            else "no Chromium found: install Debian's chromium (/usr/bin/chromium) or set SVDQ_CHROMIUM to one"))

# What a fresh profile on a machine without outside network needs (background fetches off).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("SVDQ_ARTIFACTS") or REPO / "tests" / "integration" / "artifacts") / "frontend"
WORKFLOWS = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))

# The files the workflows name, as links to the session's tiny models, so that the loaders' combos
# offer them (ours lists only files whose header is an SVDQuant checkpoint, so its links must point
# at one). Made for this module only: the other tests expect the folders as the session made them.
MODEL_LINKS = {
    "diffusion_models/svdq-int4_r32-flux.1-dev.safetensors": "diffusion_models/tiny-flux-svdq-int4.safetensors",
    "diffusion_models/svdq-int4_r32-flux.1-schnell.safetensors": "diffusion_models/tiny-flux-schnell-svdq-int4.safetensors",
    "text_encoders/clip_l.safetensors": "text_encoders/clip_l_random.safetensors",
    "text_encoders/t5xxl_fp16.safetensors": "text_encoders/clip_l_random.safetensors",
    "vae/ae.safetensors": "vae_approx/taef1_decoder.safetensors",
    "loras/flux-lora-style.safetensors": "loras/tiny-kohya.safetensors",
    "loras/flux-lora-detail.safetensors": "loras/tiny-diffusers.safetensors",
}

# Runs in the page: open the workflow as the file-open/drop handlers do, then read back what the
# frontend made of it.
LOAD_AND_INSPECT = """
async ([workflow, name]) => {
  const app = window.app;
  await app.loadGraphData(workflow, true, true, name);
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  await new Promise(r => setTimeout(r, 500));  // dialogs and toasts are mounted by Vue after the call
  const nodes = app.rootGraph.nodes.map(node => ({
    id: node.id, type: node.type, registered: node.type in LiteGraph.registered_node_types,
    has_errors: !!node.has_errors,
    widgets: (node.widgets ?? []).map(w => {
      let values = w.options?.values;
      if (typeof values === "function") values = values(w, node);
      return {name: w.name, type: w.type, value: w.value, values: Array.isArray(values) ? values : null,
              min: w.options?.min ?? null, max: w.options?.max ?? null};
    }),
  }));
  const shown = sel => [...document.querySelectorAll(sel)].filter(e => e.getClientRects().length)
                                                           .map(e => e.innerText.trim().slice(0, 500));
  const serialized = app.rootGraph.serialize();
  return {nodes, widgets_values: Object.fromEntries(serialized.nodes.map(n => [n.id, n.widgets_values ?? []])),
          prompt: (await app.graphToPrompt()).output,
          dialogs: shown(".p-dialog"), toasts: shown(".p-toast-message")};
}
"""


@pytest.fixture(scope="module")
def workflow_models(comfy):
    models = comfy.base / "models"
    made = []
    try:
        for link, target in MODEL_LINKS.items():
            path = models / link
            if not path.parent.exists():
                path.parent.mkdir(parents=True)
                made.append(path.parent)
            path.symlink_to(models / target)
            made.append(path)
        yield comfy
    finally:
        for path in reversed(made):
            path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()


@pytest.fixture(scope="module")
def browser(workflow_models):
    comfy = workflow_models
    # A first start opens the template browser; a user who opens a file has closed it. For the
    # screenshot: titles and widgets drawn in full at the zoom that fits the graph (this frontend's
    # level-of-detail setting: the smallest font size drawn as text), no minimap over it.
    for key, value in [("Comfy.TutorialCompleted", True), ("LiteGraph.Canvas.MinFontSizeForLOD", 1),
                       ("Comfy.Minimap.Visible", False)]:
        r = comfy.http.post(f"{comfy.url}/api/settings/{key}", json=value, timeout=30)
        r.raise_for_status()
    with playwright_api.sync_playwright() as pw:
        # launch() gives Chromium a fresh temporary --user-data-dir.
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def open_in_frontend(browser, url, workflow, name, screenshot=None):
    """Open `workflow` (UI format) in a fresh page of the frontend: -> (what the page reports, console errors)."""
    page = browser.new_page(viewport={"width": 1920, "height": 1080})
    errors = []

    def on_console(msg):
        # The browser logs each HTTP error of a fetch as "Failed to load resource": the frontend asks for
        # optional files (user.css, unset settings: 404) and for api.comfy.org (no outside network here).
        if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
            errors.append(f"console: {msg.text} ({msg.location.get('url')})")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on("response", lambda r: errors.append(f"HTTP {r.status} {r.url}") if r.status >= 500 else None)
    try:
        page.goto(url + "/")
        page.wait_for_function("window.app?.rootGraph && window.app.canvas && window.LiteGraph?.registered_node_types"
                               " && Object.keys(LiteGraph.registered_node_types).length > 100", timeout=120_000)
        report = page.evaluate(LOAD_AND_INSPECT, [workflow, name])
        if screenshot:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot))
    finally:
        page.close()
    return report, errors


def problems_in(workflow, report, errors, api=None):
    """Every way the frontend did not take the workflow as written, as readable lines."""
    problems = [f"dialog shown: {text!r}" for text in report["dialogs"]]
    problems += [f"toast shown: {text!r}" for text in report["toasts"]]
    problems += errors
    for node in report["nodes"]:
        where = f"node {node['id']} {node['type']}"
        if not node["registered"] or node["has_errors"]:
            problems.append(f"{where}: node type not known to the frontend")
        for w in node["widgets"]:
            if w["type"] == "combo" and w["values"] is not None and w["value"] not in w["values"]:
                problems.append(f"{where}: {w['name']}={w['value']!r} is not among its options {w['values'][:8]}")
            if isinstance(w["value"], (int, float)) and not isinstance(w["value"], bool):
                if (w["min"] is not None and w["value"] < w["min"]) or (w["max"] is not None and w["value"] > w["max"]):
                    problems.append(f"{where}: {w['name']}={w['value']} outside [{w['min']}, {w['max']}]")
    ids = {node["id"] for node in report["nodes"]}
    for node in workflow["nodes"]:
        if node["id"] not in ids:
            problems.append(f"node {node['id']} {node['type']} was not created")
            continue
        got = report["widgets_values"][str(node["id"])]
        if got != node.get("widgets_values", []):
            problems.append(f"node {node['id']} {node['type']}: widget values {node.get('widgets_values')} "
                            f"became {got}")
    if api is not None:
        got = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in report["prompt"].items()}
        want = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
        if got != want:
            problems.append(f"the frontend's API graph differs from workflows/api: {json.dumps(got, sort_keys=True)}")
    return problems


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_opens_in_the_frontend(comfy, browser, name):
    workflow = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    api = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    report, errors = open_in_frontend(browser, comfy.url, workflow, name, screenshot=ARTIFACTS / f"{name}.png")
    assert len(report["nodes"]) == len(workflow["nodes"])
    problems = problems_in(workflow, report, errors, api)
    assert not problems, "\n".join(problems)


def test_frontend_check_catches_unknown_nodes_and_invalid_values(comfy, browser):
    """The check above is not vacuous: a copy of a workflow with an unknown node type, a file name the
    loader does not offer and a number out of range fails it, each for its own reason."""
    workflow = json.loads((REPO / "workflows" / "flux1-dev-t2i.json").read_text())
    broken = copy.deepcopy(workflow)
    by_type = {node["type"]: node for node in broken["nodes"]}
    by_type["FluxGuidance"]["type"] = "NoSuchNodeType"
    by_type["SVDQuantFluxLoader"]["widgets_values"][0] = "no-such-model.safetensors"
    by_type["BasicScheduler"]["widgets_values"][1] = 100000  # steps: max 10000
    report, errors = open_in_frontend(browser, comfy.url, broken, "broken",
                                      screenshot=ARTIFACTS / "negative-control-broken.png")
    problems = "\n".join(problems_in(broken, report, errors))
    assert "NoSuchNodeType" in " ".join(report["dialogs"]), problems  # the frontend's missing-node dialog
    assert "NoSuchNodeType: node type not known" in problems, problems
    assert "model_name='no-such-model.safetensors' is not among its options" in problems, problems
    assert "steps=100000 outside" in problems, problems
