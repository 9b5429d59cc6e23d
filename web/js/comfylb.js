// ComfyLB's sidebar tab in ComfyUI's web UI.  The panel itself is panel.js, which the
// standalone page mounts too.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { createPanel, STATUS_EVENT } from "./panel.js";

const TOKEN_SETTING = "ComfyLB.Token";
const listeners = new Set();

// Registered at import: the frontend only dispatches custom events that have a listener.
api.addEventListener(STATUS_EVENT, (e) => listeners.forEach((cb) => cb(e.detail)));

// ComfyLB gives each client one prompt's messages at a time, as one ComfyUI would, unless
// the client says it can show several running prompts at once — as this web UI can.  The
// flag goes out with the socket's first message; a socket opened before this extension
// loaded is reopened (the UI reconnects by itself) so that it carries the flag.
const ownFlags = api.getClientFeatureFlags?.bind(api);
if (ownFlags) {
  api.getClientFeatureFlags = () => ({ ...ownFlags(), comfylb_interleave: true });
  if (api.socket?.readyState === WebSocket.OPEN) api.socket.close();
}

function settings() {
  return app.extensionManager?.setting;
}

async function askToken() {
  const dialog = app.extensionManager?.dialog;
  const message = "This ComfyLB needs a token for its management API (auth.token in its config).";
  const token = dialog?.prompt
    ? await dialog.prompt({ title: "ComfyLB token", message, defaultValue: "" })
    : window.prompt(message);
  if (!token) return null;
  await settings()?.set(TOKEN_SETTING, token);
  return token;
}

async function confirmAction(message) {
  const dialog = app.extensionManager?.dialog;
  if (dialog?.confirm) return Boolean(await dialog.confirm({ title: "ComfyLB", message }));
  return window.confirm(message);
}

app.registerExtension({
  name: "ComfyLB.Panel",
  settings: [{
    id: TOKEN_SETTING,
    name: "Token for ComfyLB's /lb/* API (empty when none is set)",
    type: "text",
    defaultValue: "",
    category: ["ComfyLB", "Access", "Token"],
  }],
  async setup() {
    const manager = app.extensionManager;
    if (!manager?.registerSidebarTab) {
      console.info("ComfyLB: this ComfyUI frontend has no sidebar tabs, so the ComfyLB panel is not shown");
      return;
    }
    const panel = createPanel({
      request(method, path, body) {
        const headers = body ? { "Content-Type": "application/json" } : {};
        const token = settings()?.get(TOKEN_SETTING);
        if (token) headers.Authorization = `Bearer ${token}`;
        return api.fetchApi(path, { method, headers, body: body ? JSON.stringify(body) : undefined });
      },
      onStatus: (cb) => listeners.add(cb),
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
  },
});
