// ComfyLB's sidebar tab in ComfyUI's web UI.  The panel itself is panel.js, which the
// standalone page mounts too.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { createPanel, STATUS_EVENT } from "./panel.js";

// Where earlier versions kept the /lb token: ComfyUI settings, which any client reads back
// with GET /api/settings.  It is moved into a session cookie once, then blanked.
const OLD_TOKEN_SETTING = "ComfyLB.Token";
const listeners = new Set();

// Registered at import: the frontend only dispatches custom events that have a listener.
api.addEventListener(STATUS_EVENT, (e) => listeners.forEach((cb) => cb(e.detail)));

// A prompt this client queued waits for a peer (none is available): said once per spell
// of waiting, not once per prompt, until a prompt of this client's starts again.
let toldWaiting = false;
api.addEventListener("comfylb.waiting", (e) => {
  if (toldWaiting) return;
  toldWaiting = true;
  app.extensionManager?.toast?.add({ severity: "warn", summary: "ComfyLB: prompt waiting",
    detail: e.detail?.reason ? String(e.detail.reason) : "no peer is available", life: 10000 });
});
api.addEventListener("execution_start", () => { toldWaiting = false; });

// ComfyLB gives each client one prompt's messages at a time, as one ComfyUI would, unless
// the client says it can show several running prompts at once — as this web UI can.  The
// flag goes out with the socket's first message; a socket opened before this extension
// loaded is reopened (the UI reconnects by itself) so that it carries the flag.
const ownFlags = api.getClientFeatureFlags?.bind(api);
if (ownFlags) {
  api.getClientFeatureFlags = () => ({ ...ownFlags(), comfylb_interleave: true });
  if (api.socket?.readyState === WebSocket.OPEN) api.socket.close();
}

async function askToken() {
  const dialog = app.extensionManager?.dialog;
  const message = "This ComfyLB needs a token for its management API (auth.token in its config).";
  const token = dialog?.prompt
    ? await dialog.prompt({ title: "ComfyLB token", message, defaultValue: "" })
    : window.prompt(message);
  return token || null;
}

async function forgetStoredToken() {
  let old = null;
  try { old = await api.getSetting(OLD_TOKEN_SETTING); } catch { return; }
  if (!old) return;
  await api.fetchApi("/lb/session", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token: old }) }).catch(() => {});
  await api.storeSetting(OLD_TOKEN_SETTING, "");
}

async function confirmAction(message) {
  const dialog = app.extensionManager?.dialog;
  if (dialog?.confirm) return Boolean(await dialog.confirm({ title: "ComfyLB", message }));
  return window.confirm(message);
}

app.registerExtension({
  name: "ComfyLB.Panel",
  async setup() {
    const manager = app.extensionManager;
    if (!manager?.registerSidebarTab) {
      console.info("ComfyLB: this ComfyUI frontend has no sidebar tabs, so the ComfyLB panel is not shown");
      return;
    }
    await forgetStoredToken().catch(() => {});
    const panel = createPanel({
      request(method, path, body) {
        // the session cookie (Path=/api/lb) goes along: fetchApi asks the same origin
        const headers = body ? { "Content-Type": "application/json" } : {};
        return api.fetchApi(path, { method, headers, body: body ? JSON.stringify(body) : undefined });
      },
      onStatus: (cb) => listeners.add(cb),
      clientId: () => api.clientId || null,
      toast: (message) => manager.toast?.add(message),
      askToken,
      confirm: confirmAction,
    });
    manager.registerSidebarTab({
      id: "comfylb",
      icon: "pi pi-sitemap",
      title: "ComfyLB",
      tooltip: "ComfyLB: peers and queue",
      label: "ComfyLB",
      type: "custom",
      render: (el) => panel.render(el),
      destroy: () => panel.destroy(),
    });
    // The pushes go to the socket that subscribed: again after every reconnect.  "status"
    // also comes when a socket opens, so a panel drawn before the first one subscribes then.
    api.addEventListener("reconnected", () => panel.resubscribe());
    api.addEventListener("status", () => panel.state.snapshot && !panel.state.subscribed && panel.resubscribe());
  },
});
