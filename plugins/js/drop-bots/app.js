// drop-bots in JavaScript: drops an event whose user-agent header contains bot, crawler or
// spider, in any ASCII case (what plugins/drop-bots does in Rust).

import * as weir from "weir";

export function keep(event) {
  return !/bot|crawler|spider/i.test(event.headerText("user-agent") ?? "");
}

export const { init, filter } = weir.filter(keep);
