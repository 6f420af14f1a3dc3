// An enrich plugin for the tests: tags events, drops `drop`, doubles `twice`, fails `fail`.

import * as weir from "../weir.js";

export function tag(event, out, config) {
  const value = event.text();
  if (value === "drop") {
    return;
  }
  if (value === "fail") {
    throw new weir.PluginError("cannot tag this one");
  }
  out.addHeaders({ team: config.team ?? "data" }, { route: "tagged" });
  if (value === "twice") {
    out.emit({ value: "copy" });
  }
}

export const { init, enrich } = weir.enrich(tag);
