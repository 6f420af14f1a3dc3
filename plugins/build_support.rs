// Builds packages of the plugins/ workspace into WASI 0.2 components, for build scripts.
//
// `include!`d by host/build.rs (which embeds the example plugins in the `weir` binary and gives
// the integration tests every plugin's path), by benches/build.rs (the benches' paths) and by
// benches/fluvio/build.rs (which also builds a Fluvio SmartModule with `wasm_cargo_build`), as
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

/// weir's root, for a build script whose crate lives `depth` folders below it.
fn weir_root(depth: usize) -> std::path::PathBuf {
    let manifest_dir = std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    manifest_dir
        .ancestors()
        .nth(depth)
        .expect("the crate lives inside weir's root")
        .to_path_buf()
}

/// The outer build's target directory: the first ancestor of OUT_DIR that holds CACHEDIR.TAG.
fn outer_target_dir() -> Option<std::path::PathBuf> {
    let out_dir =
        std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    out_dir
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .map(std::path::Path::to_path_buf)
}

/// `cargo build --release --target TARGET --target-dir TARGET_DIR` in `dir`, without the outer
/// build's flags and wrappers (clippy, coverage), which are for the host, not for wasm.
fn wasm_cargo_build(
    dir: &std::path::Path,
    target: &str,
    target_dir: &std::path::Path,
) -> std::process::Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(dir)
        .args(["build", "--release", "--target", target, "--target-dir"])
        .arg(target_dir);
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
    cmd
}

/// Builds `packages` of `root`/plugins/ (`root`: weir's root) in release mode into
/// `<target>/plugins` and returns each package's component path.
fn build_plugins(root: &std::path::Path, packages: &[&str]) -> Vec<(String, std::path::PathBuf)> {
    let plugins = root.join("plugins");
    for input in ["plugins", "sdk", "wit", "format"] {
        println!("cargo:rerun-if-changed={}", root.join(input).display());
    }
    let target_dir = outer_target_dir()
        .unwrap_or_else(|| root.join("target"))
        .join("plugins");
    let mut cmd = wasm_cargo_build(&plugins, PLUGIN_TARGET, &target_dir);
    for package in packages {
        cmd.args(["-p", package]);
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
