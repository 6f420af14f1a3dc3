"""An enrich plugin for the tests: tags events, drops `drop`, doubles `twice`, fails `fail`."""

import weir


@weir.enrich
def tag(event, out, config):
    if event.value == b"drop":
        return
    if event.value == b"fail":
        raise weir.PluginError("cannot tag this one")
    out.add_headers({"team": config.get("team", "data")}, route="tagged")
    if event.value == b"twice":
        out.emit(value=b"copy")
