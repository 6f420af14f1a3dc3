"""A filter plugin, as a user writes one: drops events whose user-agent holds a listed word."""

import weir


@weir.filter
def keep(event, config):
    agent = (event.header("user-agent") or b"").lower()
    return not any(word.encode() in agent for word in config.get("words", ["bot"]))
