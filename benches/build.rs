//! Gives the benches every plugin's path (see plugins/build_support.rs); the plugins are built
//! once per build, by whichever build script runs first.

include!("../plugins/build_support.rs");

fn main() {
    write_plugin_paths(&build_plugins(&weir_root(1), ALL_PLUGINS));
}
