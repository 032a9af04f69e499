// Inputs that depend on each other, kept honest on the canvas: no widget looks used while it is not.
// - Quality Target: the preset writes the percentile slider; moving the slider away selects "custom".
// - Quality Target Sweep: a spacing with fixed targets greys out what it does not read
//   (quantile-knots: steps; paper: from, to and steps), and 'hold' while 'metrics' is empty (every metric
//   is swept then). Values stay as they were and are still saved.
import { app } from "../../../scripts/app.js";  // served at /extensions/<pack>/js/

const PRESETS = { best: 99, high: 90, good: 75, average: 50, low: 25, worst: 1 };
const SPACING_UNUSED = { "quantile-knots": ["steps"], paper: ["start", "stop", "steps"] };

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function chainCallback(target, fn) {
  const previous = target.callback;
  target.callback = function (...args) {
    const result = previous?.apply(this, args);
    fn(...args);
    return result;
  };
}

function syncPresetAndSlider(node) {
  const preset = widget(node, "quality");
  const slider = widget(node, "percentile");
  if (!preset || !slider) return;
  chainCallback(preset, (value) => {
    if (value in PRESETS) slider.value = PRESETS[value];
  });
  chainCallback(slider, (value) => {
    if (preset.value in PRESETS && PRESETS[preset.value] !== Number(value)) preset.value = "custom";
  });
}

function greyUnusedSweepInputs(node) {
  const spacing = widget(node, "spacing");
  if (!spacing) return;
  const unused = SPACING_UNUSED[spacing.value] || [];
  for (const name of ["start", "stop", "steps"]) {
    const input = widget(node, name);
    if (input) input.disabled = unused.includes(name);
  }
  const metrics = widget(node, "metrics");
  const hold = widget(node, "hold");
  if (metrics && hold) hold.disabled = !String(metrics.value ?? "").trim();
  node.setDirtyCanvas?.(true, true);
}

function after(nodeType, method, fn) {
  const original = nodeType.prototype[method];
  nodeType.prototype[method] = function (...args) {
    const result = original?.apply(this, args);
    fn(this);
    return result;
  };
}

app.registerExtension({
  name: "IQAAdapter.Inputs",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "IQAAdapterEncodeTarget") {
      after(nodeType, "onNodeCreated", syncPresetAndSlider);
    }
    if (nodeData.name === "IQATargetSweep") {
      after(nodeType, "onNodeCreated", (node) => {
        for (const name of ["spacing", "metrics"]) {
          const input = widget(node, name);
          if (input) chainCallback(input, () => greyUnusedSweepInputs(node));
        }
        greyUnusedSweepInputs(node);
      });
      after(nodeType, "onConfigure", greyUnusedSweepInputs);  // a saved workflow sets values without callbacks
    }
  },
});
