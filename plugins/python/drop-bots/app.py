"""drop-bots in Python: drops an event whose user-agent header contains bot, crawler or spider,
in any ASCII case (what plugins/drop-bots does in Rust)."""

import weir


@weir.filter
def keep(event, config):
    agent = (event.header("user-agent") or b"").lower()
    return not (b"bot" in agent or b"crawler" in agent or b"spider" in agent)
