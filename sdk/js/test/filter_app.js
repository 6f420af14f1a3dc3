// A filter plugin, as a user writes one: drops events whose user-agent holds a listed word.

import * as weir from "../weir.js";

export function keep(event, config) {
  const agent = (event.headerText("user-agent") ?? "").toLowerCase();
  return !(config.words ?? ["bot"]).some((word) => agent.includes(word));
}

export const { init, filter } = weir.filter(keep);
