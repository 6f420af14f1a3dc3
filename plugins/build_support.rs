// Builds packages of the plugins/ workspace into WASI 0.2 components, for build scripts.
//
// `include!`d by host/build.rs (which embeds the example plugins in the `weir` binary and gives
// the integration tests every plugin's path) and by benches/build.rs (the benches' paths), as
// wasmtime's test-programs do. Both build into `<target>/plugins`, so a build compiles each
// plugin once: the second build script finds everything fresh.

/// The target plugins are built for.
const PLUGIN_TARGET: &str = "wasm32-wasip2";

/// Every package of plugins/: the examples, the misbehaving plugins the tests need, and the
/// per-event-call plugin the benches compare against.
const ALL_PLUGINS: &[&str] = &[
    "drop-bots",
    "geo-enrich",
    "geo-enrich-v2",
    "count-sum",
    "panic-on-mark",
    "loop-forever",
    "alloc-unbounded",
    "bad-init",
    "bad-finish",
    "record-filter",
    "identity",
    "version-a",
    "version-b",
    "trap-always",
    "tally-a",
    "tally-b",
    "tally-wide",
    "even-key",
];

/// Writes `OUT_DIR/plugin_paths.rs`: one `pub const CRATE_NAME: &str` path per built plugin.
fn write_plugin_paths(built: &[(String, std::path::PathBuf)]) {
    let mut code = String::from("// Generated from plugins/build_support.rs.\n");
    for (crate_name, path) in built {
        code.push_str(&format!(
            "/// Path of the `{crate_name}` plugin component.\n#[allow(dead_code)] // every includer uses a few\npub const {}: &str = {:?};\n",
            crate_name.to_uppercase(),
            path.display().to_string()
        ));
    }
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("plugin_paths.rs"), code).expect("write plugin_paths.rs into OUT_DIR");
}

/// Builds `packages` of plugins/ in release mode and returns each package's component path.
fn build_plugins(packages: &[&str]) -> Vec<(String, std::path::PathBuf)> {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let root = manifest_dir
        .parent()
        .expect("crate lives inside the weir workspace")
        .to_path_buf();
    let plugins = root.join("plugins");
    for input in ["plugins", "sdk", "wit", "format"] {
        println!("cargo:rerun-if-changed={}", root.join(input).display());
    }

    // The outer target directory is the first ancestor of OUT_DIR that holds CACHEDIR.TAG.
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target_root = out_dir
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| root.join("target"));
    let target_dir = target_root.join("plugins");

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&plugins)
        .args([
            "build",
            "--release",
            "--target",
            PLUGIN_TARGET,
            "--target-dir",
        ])
        .arg(&target_dir);
    for package in packages {
        cmd.args(["-p", package]);
    }
    // The outer build's flags and wrappers (clippy, coverage) are for the host, not for wasm.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build plugins/: {e}"));
    assert!(
        status.success(),
        "building plugins/ for {PLUGIN_TARGET} failed ({status}); is the target installed? `rustup target add {PLUGIN_TARGET}`"
    );

    let release = target_dir.join(PLUGIN_TARGET).join("release");
    packages
        .iter()
        .map(|package| {
            let crate_name = package.replace('-', "_");
            let wasm = release.join(format!("{crate_name}.wasm"));
            assert!(
                wasm.is_file(),
                "plugin `{package}` built but {} is missing",
                wasm.display()
            );
            (crate_name, wasm)
        })
        .collect()
}
