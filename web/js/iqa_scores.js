// Shows the Markdown text that the pack's nodes return after Run (scores, targets, sweep summary)
// on the node itself. The host frontend renders node text only on its own Preview Any node.
import { app } from "../../../scripts/app.js";  // served at /extensions/<pack>/js/

const NODES = new Set(["IQAScore", "IQASweepReport", "IQAAdapterEncodeTarget", "IQATargetSweep"]);

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function inline(text) {
  return escapeHtml(text).replace(/\*\*(.+?)\*\*/g, "<b>$1</b>").replace(/`(.+?)`/g, "<code>$1</code>");
}

// The subset our nodes write: paragraphs, **bold**, `code`, "- " lists and pipe tables.
function renderMarkdown(markdown) {
  const out = [];
  let table = null;
  let list = null;
  const flush = () => {
    if (table) out.push(`<table>${table.join("")}</table>`);
    if (list) out.push(`<ul>${list.join("")}</ul>`);
    table = null;
    list = null;
  };
  for (const line of String(markdown).split("\n")) {
    const trimmed = line.trim();
    if (trimmed.startsWith("|")) {
      if (/^\|[\s:|-]+\|$/.test(trimmed)) continue;
      const cells = trimmed.slice(1, -1).split("|").map((c) => c.trim());
      const tag = table ? "td" : "th";
      table = table || [];
      table.push(`<tr>${cells.map((c) => `<${tag}>${inline(c)}</${tag}>`).join("")}</tr>`);
    } else if (trimmed.startsWith("- ")) {
      if (table) flush();
      list = list || [];
      list.push(`<li>${inline(trimmed.slice(2))}</li>`);
    } else {
      flush();
      if (trimmed) out.push(`<p>${inline(trimmed)}</p>`);
    }
  }
  flush();
  return out.join("");
}

function scoreWidget(node) {
  let widget = node.widgets?.find((w) => w.name === "iqa_scores");
  if (widget) return widget;
  const element = document.createElement("div");
  element.className = "iqa-scores";
  element.style.cssText = "font: 12px sans-serif; color: var(--input-text, #ddd); background: var(--comfy-input-bg, #222);" +
    "border-radius: 6px; padding: 4px 8px; overflow: auto; max-height: 320px; user-select: text;";
  const content = document.createElement("div");
  content.style.display = "flow-root";  // its height includes its children's margins
  element.appendChild(content);
  // The text's own height, fixed: frontends that lay DOM widgets out by min/max height (1.4x and later)
  // would otherwise stretch it over the space the node keeps for its preview image.
  const height = () => Math.min(320, 32 + content.offsetHeight);  // + padding and the frontend's margins
  widget = node.addDOMWidget("iqa_scores", "iqa_scores", element, {
    serialize: false, hideOnZoom: false, getMinHeight: height, getMaxHeight: height, getHeight: height,
  });
  widget.serialize = false;
  widget.computeSize = () => [node.size[0], height()];  // frontends that ask the widget (1.32)
  widget.content = content;
  return widget;
}

function addStyle() {
  if (document.getElementById("iqa-scores-style")) return;
  const style = document.createElement("style");
  style.id = "iqa-scores-style";
  style.textContent = ".iqa-scores table{border-collapse:collapse;margin:2px 0}" +
    ".iqa-scores th,.iqa-scores td{padding:1px 8px;text-align:right;border-bottom:1px solid #555}" +
    ".iqa-scores p{margin:3px 0}.iqa-scores ul{margin:2px 0;padding-left:16px}";
  document.head.appendChild(style);
}

app.registerExtension({
  name: "IQAAdapter.Scores",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.has(nodeData.name)) return;
    addStyle();
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (!text || !text.length) return;
      const widget = scoreWidget(this);
      widget.content.innerHTML = renderMarkdown(Array.isArray(text) ? text.join("\n\n") : text);
      // room for the table and, below it, the image the node previews (score card, sweep grid)
      const size = this.computeSize();
      const preview = message?.images?.length ? 260 : 0;
      this.setSize([Math.max(this.size[0], size[0], 340), Math.max(this.size[1], size[1] + preview)]);
      this.setDirtyCanvas?.(true, true);
    };
  },
});
