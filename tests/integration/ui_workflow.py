"""API-format graph -> ComfyUI UI-format workflow (what the frontend opens and the template
browser lists), using a running ComfyUI's /object_info for each node's inputs, widgets and outputs.

    COMFYUI_URL=http://127.0.0.1:8188 python tests/integration/ui_workflow.py

rewrites workflows/<name>.json from workflows/api/<name>.json (ComfyUI must have this pack loaded).
"""
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINK_TYPES_ARE_WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def _is_widget(spec):
    kind = spec[0]
    return isinstance(kind, list) or kind in LINK_TYPES_ARE_WIDGETS


def _topological(graph):
    order, seen = [], set()

    def visit(node_id):
        if node_id in seen:
            return
        seen.add(node_id)
        for value in graph[node_id]["inputs"].values():
            if isinstance(value, list):
                visit(value[0])
        order.append(node_id)

    for node_id in graph:
        visit(node_id)
    return order


def api_to_ui(graph, object_info):
    order = _topological(graph)
    # Columns by depth, so the canvas reads left to right.
    depth = {}
    for node_id in order:
        parents = [v[0] for v in graph[node_id]["inputs"].values() if isinstance(v, list)]
        depth[node_id] = 1 + max((depth[p] for p in parents), default=-1)
    rows = {}
    nodes, links = [], []
    out_links = {node_id: {} for node_id in graph}
    for node_id in order:
        for name, value in graph[node_id]["inputs"].items():
            if isinstance(value, list):
                out_links[value[0]].setdefault(value[1], []).append((node_id, name))
    link_ids = {}
    for src in order:
        info = object_info[graph[src]["class_type"]]
        for slot, targets in sorted(out_links[src].items()):
            for dst, name in targets:
                link_id = len(links) + 1
                link_ids[(dst, name)] = link_id
                links.append([link_id, int(src), slot, int(dst), None, info["output"][slot]])
    for index, node_id in enumerate(order):
        node = graph[node_id]
        info = object_info[node["class_type"]]
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        inputs, widgets = [], []
        for name in info.get("input_order", {}).get("required", []) + info.get("input_order", {}).get("optional", []):
            spec = specs[name]
            value = node["inputs"].get(name)
            if isinstance(value, list) or not _is_widget(spec):
                if value is None:
                    continue
                slot = len(inputs)
                inputs.append({"name": name, "type": spec[0], "link": link_ids[(node_id, name)]})
                links[link_ids[(node_id, name)] - 1][4] = slot
            else:
                widgets.append(value)
                if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("control_after_generate"):
                    widgets.append("fixed")
        outputs = [{"name": out_name, "type": out_type, "slot_index": slot,
                    "links": [link_ids[(dst, name)] for dst, name in out_links[node_id].get(slot, [])]}
                   for slot, (out_name, out_type) in enumerate(zip(info["output_name"], info["output"]))]
        column = depth[node_id]
        row = rows.get(column, 0)
        rows[column] = row + 1
        nodes.append({"id": int(node_id), "type": node["class_type"], "pos": [40 + 340 * column, 40 + 220 * row],
                      "size": [300, 60 + 26 * (len(widgets) + len(inputs))], "flags": {}, "order": index, "mode": 0,
                      "inputs": inputs, "outputs": outputs, "properties": {"Node name for S&R": node["class_type"]},
                      "widgets_values": widgets})
    return {"last_node_id": max(int(n) for n in graph), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def main():
    import urllib.request

    url = os.environ.get("COMFYUI_URL", "http://127.0.0.1:8188")
    object_info = json.load(urllib.request.urlopen(url + "/object_info"))
    for api in sorted((REPO / "workflows" / "api").glob("*.json")):
        ui = api_to_ui(json.loads(api.read_text()), object_info)
        (REPO / "workflows" / api.name).write_text(json.dumps(ui, indent=2) + "\n")
        print("wrote", REPO / "workflows" / api.name)


if __name__ == "__main__":
    sys.exit(main())
