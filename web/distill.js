// comfyui-distill front-end extension.
//
// * A live loss sparkline, progress and ETA drawn on the training nodes, from the server's
//   "distill.progress" events (nodes/host.py NodeProgress: {node, iteration, total, loss, eta_s, run, memory,
//   warning?}).
// * An "open monitor" button on the training nodes: GET /distill/monitor starts the Distill panel in
//   this ComfyUI process (once) and answers its URL, which opens in a new tab.
// * Which nodes train is the server's answer to GET /distill/training_nodes (one node per registered
//   method layout, distill_nodes/training.py), asked once before the node definitions register.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PROGRESS_EVENT = "distill.progress";
const MONITOR_ROUTE = "/distill/monitor";
const TRAINING_NODES_ROUTE = "/distill/training_nodes";
let trainingNodes = new Set();
const KEEP = 300; // loss points kept per node
const STRIP = 64; // height of the sparkline strip under the widgets, in canvas units

/** node id -> {losses: log10 loss per iteration, iteration, total, etaS} */
const progress = new Map();

function formatDuration(seconds) {
  if (!Number.isFinite(seconds)) return "?";
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(r).padStart(2, "0")}s` : `${r}s`;
}

/** Whether a progress event belongs to this node: same id, and the run folder is the node's save_name
 * (another open workflow may have a node with the same id). */
function isRunOf(node, detail) {
  const saveName = node.widgets?.find((w) => w.name === "save_name")?.value;
  const run = String(detail.run ?? "");
  return !saveName || run.endsWith(`/${saveName}`) || run.endsWith(`\\${saveName}`);
}

function onProgress({ detail }) {
  const node = app.graph?.getNodeById(Number(detail.node)) ?? app.graph?.getNodeById(detail.node);
  if (!node || !isRunOf(node, detail)) return;
  const entry = progress.get(node.id) ?? { losses: [] };
  if (detail.iteration <= (entry.iteration ?? 0)) entry.losses = []; // a new (or resumed) run
  if (detail.loss > 0) entry.losses.push(Math.log10(detail.loss));
  if (entry.losses.length > KEEP) entry.losses.splice(0, entry.losses.length - KEEP);
  Object.assign(entry, { iteration: detail.iteration, total: detail.total, etaS: detail.eta_s,
                         memory: detail.memory, warning: detail.warning });
  progress.set(node.id, entry);
  node.setDirtyCanvas(true, false);
}

function drawSparkline(ctx, node, entry) {
  const pad = 8, width = node.size[0] - 2 * pad, top = node.size[1] - STRIP + 4, height = STRIP - 24;
  ctx.save();
  ctx.fillStyle = "rgba(0, 0, 0, 0.25)";
  ctx.fillRect(pad, top, width, height);
  const values = entry.losses;
  if (values.length > 1) {
    const lo = Math.min(...values), hi = Math.max(...values), span = Math.max(hi - lo, 1e-6);
    ctx.strokeStyle = "#4fc3f7";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    values.forEach((v, i) => {
      const x = pad + (i / (values.length - 1)) * width;
      const y = top + height - ((v - lo) / span) * height;
      i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
    });
    ctx.stroke();
  }
  const last = values.length ? (10 ** values[values.length - 1]).toPrecision(3) : "-";
  ctx.fillStyle = "#ddd";
  ctx.font = "11px sans-serif";
  ctx.fillText(
    `loss ${last}   ${entry.iteration}/${entry.total}   ETA ${formatDuration(entry.etaS)}` +
      (entry.memory ? `   memory ${entry.memory}` : ""),
    pad, top + height + 14,
  );
  if (entry.warning) { // a run that will take hours on this machine (nodes/host.py long_run_warning)
    ctx.fillStyle = "#ffb74d";
    ctx.fillText(`slow: ${entry.warning}`, pad + 4, top + 12);
  }
  ctx.restore();
}

async function openMonitor() {
  const response = await api.fetchApi(MONITOR_ROUTE);
  const body = await response.json();
  if (body.url) window.open(body.url, "_blank");
  else alert(`Distill monitor could not start: ${body.error ?? response.statusText}`);
}

app.registerExtension({
  name: "comfyui-distill.progress",
  async init() {
    try {
      const response = await api.fetchApi(TRAINING_NODES_ROUTE);
      if (response.ok) trainingNodes = new Set(await response.json());
    } catch (error) {
      console.warn("comfyui-distill: could not ask which nodes train", error);
    }
  },
  setup() {
    api.addEventListener(PROGRESS_EVENT, onProgress);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!trainingNodes.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const button = this.addWidget("button", "open monitor", null, openMonitor, { serialize: false });
      button.serialize = false; // not a value: saved workflows keep the widgets_values of the Python inputs
      this.size[1] += STRIP;
      return result;
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = onDrawForeground?.apply(this, arguments);
      const entry = progress.get(this.id);
      if (entry && !this.flags?.collapsed) drawSparkline(ctx, this, entry);
      return result;
    };
  },
});
